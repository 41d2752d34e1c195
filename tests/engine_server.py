"""Starts `python -m engine serve` as a real process on a free port, for the gRPC tests.

The process's output is read into `log` on a thread until it ends (a full pipe would block
the engine); a process that exits other than 0 when stopped prints its log, so that the
failing test shows why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from moeserve.engine.v1 import engine_pb2 as pb
from moeserve.engine.v1 import engine_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]


def wait_for_line(proc: subprocess.Popen, pattern: str, log: list[str], timeout: float, what: str) -> str:
    """Reads proc's output into log until a line matches pattern; returns its first group."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{what} exited early:\n" + "".join(log))
        log.append(line)
        match = re.search(pattern, line)
        if match:
            return match.group(1)
    raise TimeoutError(f"{what} did not start:\n" + "".join(log))


def drain(proc: subprocess.Popen, log: list[str]) -> threading.Thread:
    """Keeps reading a child's output into `log` so that it never blocks on a full pipe,
    until the pipe ends or is closed by the process's stop()."""
    def read() -> None:
        try:
            log.extend(iter(proc.stdout.readline, ""))
        except (ValueError, OSError):  # closed under us by stop()
            pass
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def stop_process(proc: subprocess.Popen, reader: threading.Thread | None = None, log: list[str] | None = None) -> int:
    """SIGTERM, then the exit code (a clean drain exits 0). With the thread reading its
    output (`drain`), the output is read to its end first; with `log`, printed unless 0."""
    proc.terminate()
    try:
        code = proc.wait(timeout=60)
        if reader is not None:
            reader.join(5)
    finally:
        proc.stdout.close()
    if code != 0 and log is not None:
        print(f"{proc.args[:4]} exited {code}; its output:\n" + "".join(log))
    return code


class EngineProcess:
    def __init__(self, model: Path, *flags: str, threads: int | None = 1) -> None:
        """threads: torch's CPU threads in the engine (None: torch's default, all cores)."""
        cmd = [sys.executable, "-m", "engine", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--port", "0", "--dtype", "float32", "--device", "cpu", "--drain-timeout", "10", *flags]
        env = dict(os.environ)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.log: list[str] = []
        self.port = self._wait_for_port()
        self.address = f"127.0.0.1:{self.port}"
        self.reader = drain(self.proc, self.log)

    def _wait_for_port(self) -> int:
        return int(wait_for_line(self.proc, r"engine serving \S+ on [\d.]+:(\d+)", self.log, 120, "engine"))

    def stub(self) -> pb_grpc.EngineStub:
        return pb_grpc.EngineStub(grpc.insecure_channel(self.address))

    def aio_stub(self) -> pb_grpc.EngineStub:
        return pb_grpc.EngineStub(grpc.aio.insecure_channel(self.address))

    def stop(self) -> int:
        return stop_process(self.proc, self.reader, self.log)


def chat(text: str, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role=pb.ROLE_USER, content=text)]),
                              sampling=pb.SamplingParameters(**sampling))


def tokens(ids: list[int], **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParameters(**sampling))
