#!/usr/bin/env bash
# Multi-node launch of the main job with torchrun. Run it once on EVERY node.
#
#   node 0:  NODE_RANK=0 MASTER_ADDR=10.0.0.1 launchers/torchrun_multinode.sh
#   node 1:  NODE_RANK=1 MASTER_ADDR=10.0.0.1 launchers/torchrun_multinode.sh
#   (simulated on one machine: MASTER_ADDR=127.0.0.1, a NODE_RANK per shell)
# Arguments after the script name go to dist_gc.cli.train (default: --ab --verify).
# Knobs (environment variables):
#   PYTHON          python with dist_gc and accelerate installed                    [python3]
#   NNODES          number of nodes                                                 [2]
#   NODE_RANK       this node's rank, 0..NNODES-1 (static rendezvous only)         [0]
#   NPROC_PER_NODE  processes per node                                              [2]
#   MASTER_ADDR     address of node 0, reachable from every node                    [127.0.0.1]
#   MASTER_PORT     port on MASTER_ADDR                                             [29500]
#   RDZV            static: fixed node ranks (--node-rank, --master-addr/--master-port);
#                   c10d: elastic rendezvous (--rdzv-backend c10d --rdzv-endpoint
#                   MASTER_ADDR:MASTER_PORT --rdzv-id RDZV_ID), node ranks assigned by
#                   the rendezvous                                                  [static]
#   RDZV_ID         job id shared by all nodes (c10d only)                          [dist_gc]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV=${RDZV:-static}
RDZV_ID=${RDZV_ID:-dist_gc}

case "$RDZV" in
    static) rdzv_args=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT") ;;
    c10d)   rdzv_args=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID") ;;
    *) echo "RDZV=$RDZV: expected static or c10d" >&2; exit 2 ;;
esac

if [ $# -eq 0 ]; then set -- --ab --verify; fi
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" "${rdzv_args[@]}" \
    -m dist_gc.cli.train "$@"
