#!/usr/bin/env bash
# The main job on the demo model: build it if missing, then generate from it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=${MODEL:-demo-model}
[ -f "$MODEL/config.json" ] || .venv/bin/python -m engine demo-model --out "$MODEL"
exec .venv/bin/python -m engine generate --model "$MODEL" --chat \
    --prompt "${PROMPT:-Explain paged attention in one sentence.}" --max-tokens "${MAX_TOKENS:-64}" "$@"
