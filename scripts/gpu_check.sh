#!/usr/bin/env bash
# Every GPU test and GPU benchmark, in one run, for a host with NVIDIA GPUs (the CPU suite
# skips them, saying why). Prints the figures; exits non-zero when a test fails.
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
nvidia-smi -L || { echo "error: no NVIDIA GPU visible" >&2; exit 2; }
status=0
.venv/bin/python -m pytest -q -rs tests/test_kernels_triton.py tests/test_kernels_fp4.py tests/test_attention_flashinfer.py \
    tests/test_cuda_graphs.py tests/test_fp4_engine.py tests/test_parallel_gpu.py || status=$?
.venv/bin/python bench/fp4_moe.py || status=$?
.venv/bin/python bench/decode_cuda_graphs.py || status=$?
exit "$status"
