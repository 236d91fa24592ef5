#!/usr/bin/env bash
# Multi-node launch of the main job with `accelerate launch`. Run it once on EVERY node.
#
#   node 0:  MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 launchers/accelerate_multinode.sh
#   node 1:  MACHINE_RANK=1 MAIN_PROCESS_IP=10.0.0.1 launchers/accelerate_multinode.sh
#   DeepSpeed: CONFIG=dist_gc/configs/accelerate/deepspeed_zero3.yaml (same on every node).
#   dist_gc/configs/accelerate/multi_node.yaml is a template of the same settings as a config file.
# Arguments after the script name go to dist_gc.cli.train (default: --ab --verify).
# Knobs (environment variables):
#   PYTHON            python with dist_gc, accelerate (and deepspeed) installed    [python3]
#   CONFIG            accelerate config                                              [dist_gc/configs/accelerate/multi_cpu.yaml]
#   NUM_MACHINES      number of nodes                                                [2]
#   MACHINE_RANK      this node's rank, 0..NUM_MACHINES-1                            [0]
#   NPROC_PER_NODE    processes per node (accelerate's --num_processes is the total) [2]
#   MAIN_PROCESS_IP   address of node 0, reachable from every node                   [127.0.0.1]
#   MAIN_PROCESS_PORT port on MAIN_PROCESS_IP                                        [29500]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
CONFIG=${CONFIG:-dist_gc/configs/accelerate/multi_cpu.yaml}
NUM_MACHINES=${NUM_MACHINES:-2}
MACHINE_RANK=${MACHINE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-127.0.0.1}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}

if [ $# -eq 0 ]; then set -- --ab --verify; fi
exec "$PYTHON" -m accelerate.commands.launch --config_file "$CONFIG" \
    --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" \
    --num_processes "$((NUM_MACHINES * NPROC_PER_NODE))" \
    --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
    -m dist_gc.cli.train "$@"
