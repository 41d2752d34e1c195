#!/usr/bin/env bash
# Checks a host with an NVIDIA GPU: every GPU test of the suite and every GPU benchmark, in
# about 8 minutes on one H100 or H200 once set up, then a compact report. Operators run it
# on new hardware; docs/gpu_report.md keeps the latest report from real hardware.
#
#   bash scripts/gpu_check.sh [REPORT_DIR]
#
# REPORT_DIR (default: gpu-report/ in the repository) receives report.md (what is printed at
# the end: the GPU and versions, pass/fail counts with every failure and skip reason, and each
# benchmark's figures), and the full output of every step (*.log, tests.xml).
# The GPU tests are the suite's tests gated on a GPU (scripts/gpu_check.py selects them): a
# test that skips on a GPU host is listed with its reason (two GPUs needed, FlashInfer missing).
# Exit status: 0 when every test passed and every benchmark ran; 1 otherwise; 2 without a GPU.
set -uo pipefail
REPORT_DIR=$(realpath -m "${1:-$(dirname "$0")/../gpu-report}")
cd "$(dirname "$0")/.." || exit 2

# Each step's limit in seconds: together they keep the run within the 8 minutes.
TESTS_TIMEOUT=240
BENCHES=(  # name | command (after the venv's python) | seconds
    "decode step, eager and with CUDA graphs (demo model, NVFP4 experts)|bench/decode_cuda_graphs.py --batches 1,8,32,64|70"
    "fused MoE per expert format, R1 shapes, against HBM peak|bench/fp4_moe.py --batches 1,4,16,64|80"
    "MLA attention: FlashInfer against the reference, decode and long prefill|bench/attention_gpu.py|90"
)

nvidia-smi -L >/dev/null 2>&1 || { echo "error: no NVIDIA GPU visible (nvidia-smi -L failed)" >&2; exit 2; }
mkdir -p "$REPORT_DIR"
rm -f "$REPORT_DIR"/*.log "$REPORT_DIR/tests.xml" "$REPORT_DIR/benches.tsv" "$REPORT_DIR/report.md"
echo "setting up (.venv with the gpu extra; output in $REPORT_DIR/setup.log)"
bash scripts/setup.sh >"$REPORT_DIR/setup.log" 2>&1 || {
    echo "error: scripts/setup.sh failed; see $REPORT_DIR/setup.log" >&2
    exit 1
}
PY=.venv/bin/python
start=$SECONDS

echo "GPU tests (limit ${TESTS_TIMEOUT} s)"
PYTHONPATH="scripts${PYTHONPATH:+:$PYTHONPATH}" timeout --kill-after=10 "$TESTS_TIMEOUT" "$PY" -m pytest -q -rs -p gpu_check \
    -p no:cacheprovider --junitxml="$REPORT_DIR/tests.xml" tests >"$REPORT_DIR/tests.log" 2>&1
tail -n 1 "$REPORT_DIR/tests.log"

for entry in "${BENCHES[@]}"; do
    IFS="|" read -r name command limit <<<"$entry"
    log="$REPORT_DIR/bench-$(basename "${command%% *}" .py).log"
    echo "benchmark: $name (limit ${limit} s)"
    t0=$SECONDS
    # shellcheck disable=SC2086 # the command's arguments are split on purpose
    timeout --kill-after=10 "$limit" "$PY" $command >"$log" 2>&1
    code=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - t0))" "$log" >>"$REPORT_DIR/benches.tsv"
done

echo "checked in $((SECONDS - start)) s; report in $REPORT_DIR/report.md"
echo
"$PY" scripts/gpu_check.py report "$REPORT_DIR"
