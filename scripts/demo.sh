#!/usr/bin/env bash
# The main job: the demo model served as an OpenAI-compatible API on loopback.
# Builds the demo model if missing, starts the engine (gRPC on 127.0.0.1:$ENGINE_PORT) and
# the gateway (HTTP on 127.0.0.1:$PORT) with a freshly generated API key, waits until the
# gateway's /health answers 200, prints the base URL, the key and a curl line, and runs
# until Ctrl-C, which stops both. Extra arguments go to `engine serve` (e.g. --dtype float32).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=${MODEL:-demo-model}
ENGINE_PORT=${ENGINE_PORT:-50051}
PORT=${PORT:-8000}
NAME=${SERVED_MODEL_NAME:-$(basename "$MODEL")}
PY=.venv/bin/python
[ -f "$MODEL/config.json" ] || $PY -m engine demo-model --out "$MODEL"

KEY="sk-moeserve-$($PY -c 'import secrets; print(secrets.token_hex(24))')"
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/moeserve-demo.XXXXXX")
pids=()
stop() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap stop EXIT
trap 'echo; echo "stopping engine and gateway"; exit 0' INT TERM

$PY -m engine serve --model "$MODEL" --host 127.0.0.1 --port "$ENGINE_PORT" --served-model-name "$NAME" "$@" \
    >"$LOGS/engine.log" 2>&1 &
pids+=($!)
$PY -m gateway serve --engine "127.0.0.1:$ENGINE_PORT" --host 127.0.0.1 --port "$PORT" --api-key "$KEY" \
    >"$LOGS/gateway.log" 2>&1 &
pids+=($!)

echo "starting the engine and the gateway (logs in $LOGS)"
until $PY -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "http://127.0.0.1:$PORT/health" 2>/dev/null; do
    for pid in "${pids[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "error: a service exited before it was ready:" >&2
            tail -n 5 "$LOGS"/engine.log "$LOGS"/gateway.log >&2
            exit 1
        fi
    done
    sleep 0.5
done

BASE="http://127.0.0.1:$PORT/v1"
cat <<EOF

moeserve is serving '$NAME' (OpenAI-compatible API)
  base URL: $BASE
  API key:  $KEY

For the README's examples and the openai SDK:
  export MOESERVE_BASE_URL=$BASE MOESERVE_API_KEY=$KEY

Try it:
  curl $BASE/chat/completions -H "Content-Type: application/json" -H "Authorization: Bearer $KEY" \\
    -d '{"model": "$NAME", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64}'

Ctrl-C stops both services.
EOF
wait -n "${pids[@]}" || true
echo "error: a service exited; see $LOGS" >&2
exit 1
