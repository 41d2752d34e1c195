"""Real gateway processes on loopback for the gateway tests, and what they share.

`GatewayProcess` starts `python -m gateway serve` on a free port and drains its log on a
thread (a full pipe would block the gateway). `serving_model()` builds the small
serving checkpoint once per test session.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from functools import cache
from pathlib import Path

from moeserve.engine.v1 import engine_pb2 as pb

from engine_server import ROOT, EngineProcess, drain, stop_process, wait_for_line
from helpers import make_serving_checkpoint

KEY = "sk-moeserve-test-key"
MODEL = "tiny-r1"


@cache
def serving_model() -> Path:
    root = Path(tempfile.mkdtemp(prefix="gateway-model-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return make_serving_checkpoint(root / "model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_engine(*flags: str, name: str = MODEL, port: int = 0) -> EngineProcess:
    return EngineProcess(serving_model(), "--served-model-name", name, "--port", str(port), *flags)


def temp_usage_db() -> str:
    """A SQLite usage store in a fresh temporary folder (removed at exit)."""
    folder = Path(tempfile.mkdtemp(prefix="gateway-usage-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return f"sqlite:///{folder / 'usage.db'}"


class GatewayProcess:
    """`env` adds environment variables (MOESERVE_* from the caller's environment are not passed);
    without --usage-db among the flags the gateway gets its own temporary SQLite store."""

    def __init__(self, engines: list[str], *flags: str, keys: tuple[str, ...] = (KEY,),
                 env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "gateway", "serve", "--engine", ",".join(engines), "--port", "0",
               "--health-interval", "0.2", "--max-backoff", "0.5", "--drain-timeout", "10", *flags]
        if "--usage-db" not in flags:
            cmd += ["--usage-db", temp_usage_db()]
        for key in keys:
            cmd += ["--api-key", key]
        env = {**{k: v for k, v in os.environ.items()
                  if not k.startswith(("OPENAI_", "HTTP_PROXY", "HTTPS_PROXY", "MOESERVE_"))}, **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env)
        self.log: list[str] = []
        self.url = self._wait_for_url()
        self.reader = drain(self.proc, self.log)
        self.base_url = self.url + "/v1"

    def _wait_for_url(self) -> str:
        return wait_for_line(self.proc, r"gateway serving on (http://[\d.]+:\d+)", self.log, 60, "gateway")

    def health(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def wait_ready(self, engines: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = self.health()
            if status == 200 and body["engines_ready"] >= engines:
                return
            time.sleep(0.05)
        raise TimeoutError(f"gateway not ready with {engines} engines: {self.health()}\n" + "".join(self.log))

    def stop(self) -> int:
        return stop_process(self.proc, self.reader, self.log)

    def kill(self) -> int:
        """SIGKILL: no cleanup of any kind in the gateway."""
        self.proc.kill()
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc.stdout.close()


def kv_blocks_in_use(engine: EngineProcess, settle: float = 5.0) -> int:
    """The engine's used KV blocks once in-flight aborts landed (polled until 0 or `settle` s)."""
    stub = engine.stub()
    deadline = time.monotonic() + settle
    while True:
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        if info.kv_cache.used_blocks == 0 and info.running_requests == 0 or time.monotonic() > deadline:
            return info.kv_cache.used_blocks
        time.sleep(0.02)
