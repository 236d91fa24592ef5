#!/usr/bin/env bash
# Single-node launch of the main job (dist_gc.cli.train) through `accelerate launch`.
#
# Usage (from anywhere; the script runs from the repository root):
#   launchers/accelerate.sh                                  # 2 CPU processes, GC on/off A/B + verify
#   CONFIG=dist_gc/configs/accelerate/deepspeed_zero3.yaml NUM_PROCESSES=8 launchers/accelerate.sh --task gpt2 --ab
#   CONFIG=dist_gc/configs/accelerate/fsdp2.yaml NUM_PROCESSES=8 launchers/accelerate.sh --task llama --gc on
# Arguments after the script name go to dist_gc.cli.train (default: --ab --verify).
# Knobs (environment variables):
#   PYTHON            python with dist_gc, accelerate (and deepspeed) installed   [python3]
#   CONFIG            accelerate config file                                        [dist_gc/configs/accelerate/multi_cpu.yaml]
#   NUM_PROCESSES     processes on this node                                        [2]
#   MAIN_PROCESS_PORT rendezvous port on 127.0.0.1                                  [29500]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
CONFIG=${CONFIG:-dist_gc/configs/accelerate/multi_cpu.yaml}
NUM_PROCESSES=${NUM_PROCESSES:-2}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}

if [ $# -eq 0 ]; then set -- --ab --verify; fi
exec "$PYTHON" -m accelerate.commands.launch \
    --config_file "$CONFIG" --num_processes "$NUM_PROCESSES" --main_process_port "$MAIN_PROCESS_PORT" \
    -m dist_gc.cli.train "$@"
