#!/usr/bin/env bash
# Multi-node launch of the main job with the `deepspeed` launcher and a hostfile.
# Run it ONCE, on the first node: the launcher reaches the others over ssh (pdsh).
#
#   HOSTFILE=launchers/hostfile.example MASTER_ADDR=node-01 launchers/deepspeed_hostfile.sh --task gpt2 --ab
#
# As in launchers/deepspeed.sh, the main job uses accelerate's DeepSpeed plugin, selected
# by ACCELERATE_USE_DEEPSPEED / ACCELERATE_DEEPSPEED_CONFIG_FILE. The remote nodes only
# get the variables listed in a .deepspeed_env file (DeepSpeed's mechanism: NAME=VALUE
# lines, read from DS_ENV_FILE / ./.deepspeed_env / ~/.deepspeed_env), so this script
# writes one next to the repository (./.deepspeed_env) before launching.
# Arguments after the script name go to dist_gc.cli.train (default: --verify).
# Knobs (environment variables):
#   DEEPSPEED    the deepspeed launcher executable                           [deepspeed]
#   HOSTFILE     DeepSpeed hostfile ("host slots=N" lines)                  [launchers/hostfile.example]
#   DS_CONFIG    DeepSpeed JSON (with the GC block), same path on every node [dist_gc/configs/deepspeed/accelerate_zero3.json]
#   MASTER_ADDR  address of the first host, reachable from every host        [first host of HOSTFILE]
#   MASTER_PORT  rendezvous port                                              [29500]
#   LAUNCHER     pdsh, openmpi, mvapich, slurm, ... (deepspeed --launcher)   [pdsh]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEEPSPEED=${DEEPSPEED:-deepspeed}
HOSTFILE=${HOSTFILE:-launchers/hostfile.example}
DS_CONFIG=${DS_CONFIG:-dist_gc/configs/deepspeed/accelerate_zero3.json}
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^#/ && NF {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}
LAUNCHER=${LAUNCHER:-pdsh}

export ACCELERATE_USE_DEEPSPEED=true
export ACCELERATE_DEEPSPEED_CONFIG_FILE="$DS_CONFIG"
{
    echo "ACCELERATE_USE_DEEPSPEED=true"
    echo "ACCELERATE_DEEPSPEED_CONFIG_FILE=$DS_CONFIG"
    if [ -n "${PYTHONPATH:-}" ]; then echo "PYTHONPATH=$PYTHONPATH"; fi
} > .deepspeed_env

if [ $# -eq 0 ]; then set -- --verify; fi
exec "$DEEPSPEED" --hostfile "$HOSTFILE" --launcher "$LAUNCHER" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_local_rank \
    --module dist_gc.cli.train "$@"
