#!/usr/bin/env bash
# Single-node launch of the main job (dist_gc.cli.train) with plain `torchrun`.
# accelerate's Accelerator() reads torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...);
# without a GPU the main job runs DDP on CPU with the gloo backend, with GPUs DDP on NCCL.
# (DeepSpeed/FSDP need an accelerate config: use launchers/accelerate.sh or deepspeed.sh.)
#
# Usage:
#   launchers/torchrun.sh                          # 2 processes, GC on/off A/B + verify
#   NPROC_PER_NODE=8 launchers/torchrun.sh --task gpt2 --ab
# Arguments after the script name go to dist_gc.cli.train (default: --ab --verify).
# Knobs (environment variables):
#   PYTHON          python with dist_gc and accelerate installed   [python3]
#   NPROC_PER_NODE  processes on this node                          [2]
#   MASTER_PORT     rendezvous port on 127.0.0.1                    [29500]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
MASTER_PORT=${MASTER_PORT:-29500}

if [ $# -eq 0 ]; then set -- --ab --verify; fi
exec "$PYTHON" -m torch.distributed.run \
    --nnodes 1 --nproc-per-node "$NPROC_PER_NODE" --master-addr 127.0.0.1 --master-port "$MASTER_PORT" \
    -m dist_gc.cli.train "$@"
