"""The main job, `bash scripts/demo.sh`: engine + gateway on loopback with a fresh key; the
printed base URL and key serve the README's curl and SDK examples; Ctrl-C stops both."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from engine_server import ROOT
from gateway_helpers import drain, free_port, serving_model


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def readme_serving_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("\n## Serving\n", 1)[1].split("\n## ", 1)[0]


def readme_curls() -> list[list[str]]:
    block = re.search(r"```bash\n(.*?)```", readme_serving_section(), re.S).group(1)
    commands = [c for c in block.replace("\\\n", " ").split("\n\n") if "curl " in c]
    return [shlex.split(c.split("curl ", 1)[1]) for c in commands]


def run_curl(argv: list[str], port: int, key: str) -> tuple[int, bytes]:
    """Replays a README curl line (URL, -H headers, -d body) with urllib."""
    url, headers, body = None, {}, None
    args = iter(argv)
    for arg in args:
        if arg == "-H":
            name, _, value = next(args).partition(": ")
            headers[name] = value.replace("$MOESERVE_API_KEY", key)
        elif arg == "-d":
            body = json.loads(next(args))
        else:
            url = arg.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.status, resp.read()


def test_demo_script_serves_the_readme_examples_until_interrupted():
    engine_port, port = free_port(), free_port()
    env = dict(os.environ, MODEL=str(serving_model()), SERVED_MODEL_NAME="demo-model", ENGINE_PORT=str(engine_port),
               PORT=str(port), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(["bash", "scripts/demo.sh", "--dtype", "float32", "--kv-cache-memory", "0.05",
                             "--max-model-len", "1024"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not any("Ctrl-C" in line for line in log):
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "demo did not come up:\n" + "".join(log)
            log.append(line)
        drain(proc, log)
        text = "".join(log)
        base_url = re.search(r"base URL: (\S+)", text).group(1)
        key = re.search(r"API key:  (\S+)", text).group(1)
        assert base_url == f"http://127.0.0.1:{port}/v1" and key.startswith("sk-moeserve-")
        assert f"Authorization: Bearer {key}" in text and "curl " in text
        assert f"export MOESERVE_BASE_URL={base_url} MOESERVE_API_KEY={key}" in text

        answers = [run_curl(argv, port, key) for argv in readme_curls()]
        assert [status for status, _ in answers] == [200, 200, 200]
        simple, conversation, stream = (body for _, body in answers)
        assert json.loads(simple)["usage"]["estimated_cost"] > 0
        assert json.loads(conversation)["usage"]["prompt_tokens"] > json.loads(simple)["usage"]["prompt_tokens"]
        assert stream.startswith(b"data: {") and stream.endswith(b"data: [DONE]\n\n")

        sdk_example = re.search(r"```python\n(.*?)```", readme_serving_section(), re.S).group(1)
        ran = subprocess.run([sys.executable, "-c", sdk_example], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, MOESERVE_BASE_URL=base_url, MOESERVE_API_KEY=key))
        assert ran.returncode == 0 and "cost:" in ran.stdout, ran.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not port_open(port) and not port_open(engine_port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
