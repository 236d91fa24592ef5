#!/usr/bin/env bash
# Single-node launch of the main job with the `deepspeed` launcher.
#
# How it works: the deepspeed launcher starts NUM_PROCS processes with RANK/LOCAL_RANK/
# WORLD_SIZE set (--no_local_rank: no --local_rank argument is appended). The main job
# builds an accelerate Accelerator; ACCELERATE_USE_DEEPSPEED=true and
# ACCELERATE_DEEPSPEED_CONFIG_FILE make it use accelerate's DeepSpeed plugin with that
# JSON (exactly what `accelerate launch` with a DeepSpeed config exports), so accelerate
# calls deepspeed.init_distributed and deepspeed.initialize, and dist_gc reads the
# JSON's "gradient_centralization" block. Same script, same JSON as
# launchers/accelerate.sh with dist_gc/configs/accelerate/deepspeed_zero*.yaml.
# (For your own script without accelerate use dist_gc.deepspeed.initialize(..., config=JSON).)
#
# Usage:
#   launchers/deepspeed.sh                                    # ZeRO-2, 2 processes, --verify
#   DS_CONFIG=dist_gc/configs/deepspeed/accelerate_zero3.json NUM_PROCS=8 launchers/deepspeed.sh --task gpt2 --ab
# Arguments after the script name go to dist_gc.cli.train (default: --verify).
# Knobs (environment variables):
#   DEEPSPEED   the deepspeed launcher executable             [deepspeed]
#   DS_CONFIG   DeepSpeed JSON (with the GC block)            [dist_gc/configs/deepspeed/accelerate_zero2.json]
#   NUM_PROCS   processes on this node (--num_gpus)           [2]
#   MASTER_PORT rendezvous port                               [29500]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEEPSPEED=${DEEPSPEED:-deepspeed}
DS_CONFIG=${DS_CONFIG:-dist_gc/configs/deepspeed/accelerate_zero2.json}
NUM_PROCS=${NUM_PROCS:-2}
MASTER_PORT=${MASTER_PORT:-29500}

export ACCELERATE_USE_DEEPSPEED=true
export ACCELERATE_DEEPSPEED_CONFIG_FILE="$DS_CONFIG"
if [ $# -eq 0 ]; then set -- --verify; fi
exec "$DEEPSPEED" --num_gpus "$NUM_PROCS" --master_port "$MASTER_PORT" --no_local_rank \
    --module dist_gc.cli.train "$@"
