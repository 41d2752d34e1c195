#!/usr/bin/env bash
# Creates .venv and installs moeserve with the test extras. Idempotent.
# Where no NVIDIA GPU is present, torch's CPU build (2.13.0) goes in first, so the
# torch range in pyproject.toml is already met and pip never fetches a CUDA build.
# PostgreSQL's server (Debian's `postgresql` package) is installed where its binaries are
# missing and apt-get can: the usage-ledger tests start a real server from it
# (tests/postgres.py). That step never fails the set-up; it says why when it cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

have_postgres() {
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1
}

install_postgres() {
    have_postgres && return 0
    local why="the PostgreSQL tests will skip"
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "note: PostgreSQL's server is not installed and apt-get is not available; $why" >&2
        return 0
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            echo "note: PostgreSQL's server is not installed and installing it needs root (no passwordless sudo); $why" >&2
            return 0
        fi
    fi
    echo "installing Debian's postgresql package (for the usage-ledger tests)" >&2
    local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get)
    if ! "${apt[@]}" install -y --no-install-recommends postgresql >/dev/null 2>&1; then
        # Stale or missing package lists: refresh them once and try again.
        if ! { "${apt[@]}" update -qq >/dev/null 2>&1 &&
               "${apt[@]}" install -y --no-install-recommends postgresql >/dev/null 2>&1; }; then
            echo "note: apt-get could not install postgresql; $why" >&2
            return 0
        fi
    fi
    have_postgres || echo "note: postgresql was installed but initdb is not where expected; $why" >&2
}

install_postgres || true

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# Already installed for this pyproject.toml: nothing to install.
if [ ! .venv/.installed -nt pyproject.toml ]; then
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        .venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
        pip install -e ".[dev]"
    else
        pip install -e ".[dev,gpu]"
    fi
    touch .venv/.installed
fi
# The fused CPU decode step, compiled once per machine (about 40 s; a second when cached and
# unchanged), so that no engine start or test pays for it. Without a compiler the engine
# decodes through the Python model, so this never fails the set-up.
.venv/bin/python -m kernels.cpu_decode || echo "note: the fused CPU decode step could not be built" >&2
