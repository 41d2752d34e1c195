#!/usr/bin/env bash
# Creates .venv and installs moeserve with the test extras. Idempotent.
# Where no NVIDIA GPU is present, torch's CPU build (2.13.0) goes in first, so the
# torch range in pyproject.toml is already met and pip never fetches a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# Already installed for this pyproject.toml: nothing to do.
[ .venv/.installed -nt pyproject.toml ] && exit 0
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
    pip install -e ".[dev]"
else
    pip install -e ".[dev,gpu]"
fi
touch .venv/.installed
