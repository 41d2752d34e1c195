#!/usr/bin/env bash
# Regenerates the Python gRPC stubs from protos/ -- the only way they change; never edit
# them by hand. Run from anywhere: bash scripts/gen_protos.sh
# Writes moeserve/engine/v1/engine_pb2.py, engine_pb2.pyi and engine_pb2_grpc.py with the
# grpcio-tools pinned in pyproject.toml, so the output is byte-stable; tests/test_protos.py
# fails when the committed stubs differ from what this produces.
set -euo pipefail
cd "$(dirname "$0")/.."
for pkg in moeserve moeserve/engine moeserve/engine/v1; do
    mkdir -p "$pkg"
    [ -f "$pkg/__init__.py" ] ||
        echo '"""Generated gRPC stubs of protos/ (scripts/gen_protos.sh); never edited by hand."""' >"$pkg/__init__.py"
done
.venv/bin/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
    protos/moeserve/engine/v1/engine.proto
