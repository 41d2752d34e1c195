#!/bin/sh
# The GPU engine's entrypoint (compose.yaml, service `engine`): runs the command it is given,
# `python -m engine serve ...`, with the parallel layout that compose passes as environment:
#   TP    --tensor-parallel-size                      (default 1)
#   DP    --data-parallel-size                        (default 1)
#   EP    1 or true: --enable-expert-parallel         (default off)
#   GPUS  the GPUs compose reserved for the container (default 1)
# The engine runs one process per GPU, TP x DP of them, all on this node. Compose reserves
# GPUS devices but cannot compute that count from TP and DP (its interpolation has no
# arithmetic), so the operator sets it too, and this script refuses to start the engine
# unless GPUS is TP x DP: with fewer GPUs the engine cannot place its ranks, with more the
# extra ones would sit reserved and idle. The engine itself refuses more ranks than the GPUs
# it sees, which catches a runtime that exposes fewer devices than were reserved.
# A flag is added or left out, never passed empty: argparse would take '' for an argument.
set -eu

die() {
    echo "engine-entrypoint: $*" >&2
    exit 64 # EX_USAGE: nothing was started
}

# A whole number from 1 up, without leading zeros ($((...)) would read 010 as octal).
require_count() {
    case $2 in
        '' | *[!0-9]* | 0*) die "$1=$2: expected a whole number of at least 1" ;;
    esac
}

[ $# -gt 0 ] || die "no command to run (expected: python -m engine serve ...)"
TP=${TP:-1} DP=${DP:-1} EP=${EP:-0} GPUS=${GPUS:-1}
require_count TP "$TP"
require_count DP "$DP"
require_count GPUS "$GPUS"
for arg in "$@"; do
    case $arg in
        --tensor-parallel-size* | --data-parallel-size* | --enable-expert-parallel)
            die "$arg in the engine's command (ENGINE_ARGS?): set TP, DP and EP instead, so that GPUS is checked against them" ;;
        --nnodes* | --node-rank*)
            die "$arg in the engine's command (ENGINE_ARGS?): compose.yaml runs the engine on one node" ;;
    esac
done
ranks=$((TP * DP))
[ "$ranks" -eq "$GPUS" ] ||
    die "TP=$TP x DP=$DP needs $ranks GPUs, one per engine process, but GPUS=$GPUS are reserved: set GPUS=$ranks"

set -- "$@" --tensor-parallel-size "$TP" --data-parallel-size "$DP"
case $EP in
    1 | [Tt][Rr][Uu][Ee]) set -- "$@" --enable-expert-parallel ;;
    0 | [Ff][Aa][Ll][Ss][Ee]) ;;
    *) die "EP=$EP: expected 1 or true (expert parallelism on), 0 or false (off)" ;;
esac
exec "$@"
