#!/usr/bin/env bash
# The whole test suite, from a fresh clone. pytest's exit code 5 (no tests collected)
# is a failure here, like any other non-zero code.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
set +e
.venv/bin/python -m pytest "$@"
code=$?
if [ "$code" -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi
exit "$code"
