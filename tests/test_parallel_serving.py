"""`engine serve` spanning several ranks (real processes, gloo on loopback, fp32): greedy
generations through gRPC equal the single-process engine's, for tensor, expert and
data-parallel layouts, on one node, over two "nodes" and under torchrun; an idle DP group;
cancellations under DP; a rank killed mid-stream; bad layouts refused before loading."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moeserve.engine.v1 import engine_pb2 as pb

from engine_server import ROOT, EngineProcess, drain, stop_process, tokens, wait_for_line
from helpers import make_serving_checkpoint
from parallel_ranks import free_port

SERVE = ("--max-model-len", "512", "--kv-cache-memory", "0.05", "--rendezvous-timeout", "60")
PROMPTS = [[0] + list(range(300 + 17 * i, 300 + 17 * i + 2 + 5 * i)) for i in range(8)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_serving_checkpoint(tmp_path_factory.mktemp("parallel_serving"))


def generations(address: str, max_tokens: int = 16) -> list[list[int]]:
    """The PROMPTS' greedy continuations, all in flight at once."""
    async def run():
        async with grpc.aio.insecure_channel(address) as channel:
            from moeserve.engine.v1 import engine_pb2_grpc as pb_grpc
            stub = pb_grpc.EngineStub(channel)
            resps = await asyncio.gather(*(stub.Generate(tokens(p, max_tokens=max_tokens, temperature=0,
                                                                ignore_eos=True)) for p in PROMPTS))
            return [list(r.choices[0].token_ids) for r in resps]
    return asyncio.run(run())


@pytest.fixture(scope="module")
def reference(model_dir):
    proc = EngineProcess(model_dir, *SERVE)
    try:
        info = proc.stub().GetModelInfo(pb.GetModelInfoRequest())
        yield generations(proc.address), info.kv_cache.total_blocks
    finally:
        assert proc.stop() == 0


def parallel_engine(model_dir, *flags: str) -> EngineProcess:
    return EngineProcess(model_dir, *SERVE, "--master-port", str(free_port()), *flags, threads=None)


@pytest.mark.parametrize("flags", [
    pytest.param(("--tensor-parallel-size", "2"), id="tp2"),
    pytest.param(("--tensor-parallel-size", "2", "--enable-expert-parallel"), id="tp2-ep-alltoall"),
    pytest.param(("--data-parallel-size", "2", "--enable-expert-parallel", "--moe-dispatch", "allgather"),
                 id="dp2-ep2-allgather"),
    pytest.param(("--data-parallel-size", "2"), id="dp2-experts-split"),
])
def test_served_greedy_generations_equal_the_single_process_engine(model_dir, reference, flags):
    expected, blocks = reference
    proc = parallel_engine(model_dir, *flags)
    try:
        assert generations(proc.address) == expected
        info = proc.stub().GetModelInfo(pb.GetModelInfoRequest())
        dp = 2 if "--data-parallel-size" in flags else 1
        assert info.kv_cache.total_blocks == dp * blocks  # each DP group its own cache
        assert info.kv_cache.used_blocks == 0
    finally:
        assert proc.stop() == 0


@pytest.fixture(scope="module")
def dp_engine(model_dir):
    proc = parallel_engine(model_dir, "--data-parallel-size", "2", "--enable-expert-parallel")
    yield proc
    assert proc.stop() == 0


def test_one_request_runs_while_the_other_dp_group_idles(dp_engine, reference):
    """One request: one DP group steps, the other runs idle forwards (MoE collectives only)."""
    resp = dp_engine.stub().Generate(tokens(PROMPTS[3], max_tokens=16, temperature=0, ignore_eos=True))
    assert list(resp.choices[0].token_ids) == reference[0][3]


def used_blocks(stub, settle: float = 10.0) -> int:
    deadline = time.monotonic() + settle
    while True:
        used = stub.GetModelInfo(pb.GetModelInfoRequest()).kv_cache.used_blocks
        if used == 0 or time.monotonic() > deadline:
            return used
        time.sleep(0.05)


def test_cancelled_streams_return_every_block_of_both_dp_groups(dp_engine):
    async def run():
        aio = dp_engine.aio_stub()
        calls = [aio.StreamGenerate(tokens([0, 40 + i, 41, 42], max_tokens=300, ignore_eos=True, temperature=0))
                 for i in range(24)]
        for call in calls[:12]:
            await call.read()  # mid-flight when cancelled
        busy = dp_engine.stub().GetModelInfo(pb.GetModelInfoRequest()).kv_cache.used_blocks
        for call in calls:
            call.cancel()
        return busy
    assert asyncio.run(run()) > 0
    assert used_blocks(dp_engine.stub()) == 0
    # and the engine still serves, both groups in step
    assert len(dp_engine.stub().Generate(tokens([0, 9, 9], max_tokens=4, temperature=0)).choices[0].token_ids) == 4


def rank_pid(proc: EngineProcess, rank: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(proc.log):
            match = re.search(rf"rank {rank} of \d+ \(pid (\d+)\) joined", line)
            if match:
                return int(match.group(1))
        time.sleep(0.1)
    raise AssertionError("rank did not log its pid:\n" + "".join(proc.log))


def test_killing_a_rank_mid_stream_stops_the_engine_nonzero_within_30s(model_dir):
    proc = parallel_engine(model_dir, "--tensor-parallel-size", "2")
    try:
        victim = rank_pid(proc, 1)

        async def run():
            call = proc.aio_stub().StreamGenerate(tokens([0, 4, 5], max_tokens=400, ignore_eos=True, temperature=0))
            await call.read()
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as err:
                while await call.read() != grpc.aio.EOF:
                    pass
            return err.value.code()
        killed = time.monotonic()
        assert asyncio.run(run()) == grpc.StatusCode.UNAVAILABLE
        assert proc.proc.wait(timeout=30) != 0
        assert time.monotonic() - killed < 30
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(proc.address))
        with pytest.raises(grpc.RpcError):  # nothing serves there any more
            health.Check(health_pb2.HealthCheckRequest(), timeout=2)
    finally:
        if proc.proc.poll() is None:
            proc.stop()
        else:
            proc.proc.stdout.close()


def start(cmd: list[str], pattern: str | None, log: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if pattern is not None:
        log.append(wait_for_line(proc, pattern, log, 120, cmd[2]))
    return proc


def test_two_nodes_on_loopback_serve_as_one_engine(model_dir, reference):
    """--nnodes 2: node 1 runs rank 1 and waits; node 0 runs rank 0 and serves gRPC."""
    common = [sys.executable, "-m", "engine", "serve", "--model", str(model_dir), "--dtype", "float32",
              "--device", "cpu", "--host", "127.0.0.1", "--port", "0", *SERVE, "--tensor-parallel-size", "2",
              "--nnodes", "2", "--master-port", str(free_port())]
    logs: tuple[list[str], list[str]] = ([], [])
    node1 = start(common + ["--node-rank", "1"], r"(engine node 1 running ranks 1\.\.1 of 2)", logs[1])
    node0 = start(common + ["--node-rank", "0"], r"engine serving \S+ on [\d.]+:(\d+)", logs[0])
    readers = [drain(node0, logs[0]), drain(node1, logs[1])]
    try:
        assert generations(f"127.0.0.1:{logs[0][-1]}") == reference[0]
    finally:
        assert stop_process(node0, readers[0], logs[0]) == 0
        assert node1.wait(timeout=30) == 0, "".join(logs[1])  # rank 0 told rank 1 to stop
        node1.stdout.close()


def test_torchrun_starts_the_same_engine(model_dir, reference):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "engine", "serve", "--model", str(model_dir), "--dtype", "float32",
           "--device", "cpu", "--host", "127.0.0.1", "--port", "0", *SERVE, "--tensor-parallel-size", "2"]
    log: list[str] = []
    proc = start(cmd, r"engine serving \S+ on [\d.]+:(\d+)", log)
    reader = drain(proc, log)
    try:
        assert generations(f"127.0.0.1:{log[-1]}") == reference[0]
        # SIGTERM to rank 0 (the server) drains it; its engine tells rank 1 to stop; torchrun then
        # sees both workers succeed (a SIGTERM to torchrun itself is a failure, by its design)
        os.kill(torchrun_worker(proc.pid, rank=0), signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            stop_process(proc, reader, log)
        reader.join(5)
        proc.stdout.close()


def torchrun_worker(torchrun: int, rank: int) -> int:
    """The pid of torchrun's worker process of global rank `rank` (from its environment)."""
    children = subprocess.run(["pgrep", "-P", str(torchrun)], capture_output=True, text=True).stdout.split()
    for pid in map(int, children):
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return pid
    raise AssertionError(f"torchrun {torchrun} has no worker of rank {rank}")


@pytest.mark.parametrize("flags, message", [
    (("--tensor-parallel-size", "3"), "--tensor-parallel-size"),
    (("--tensor-parallel-size", "0"), "--tensor-parallel-size must be at least 1"),
    (("--data-parallel-size", "3", "--enable-expert-parallel"), "--enable-expert-parallel"),
    (("--tensor-parallel-size", "2", "--nnodes", "2", "--node-rank", "2"), "--node-rank must be in 0..1"),
    (("--tensor-parallel-size", "2", "--nnodes", "3"), "--nnodes 3 does not divide"),
    (("--data-parallel-size", "2", "--moe-dispatch", "alltoall"), "--enable-expert-parallel"),
    (("--tensor-parallel-size", "2", "--kv-cache-memory", "100000"), "does not fit"),
    (("--tensor-parallel-size", "2", "--nnodes", "2", "--node-rank", "1", "--master-port", "1",
      "--rendezvous-timeout", "3"), "could not reach --master-addr 127.0.0.1 --master-port 1"),
])
def test_bad_layouts_are_one_error_line_and_exit_2(model_dir, flags, message):
    result = subprocess.run([sys.executable, "-m", "engine", "serve", "--model", str(model_dir), "--port", "0",
                             "--device", "cpu", "--dtype", "float32", *flags], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this host has the GPUs the layout asks for")
def test_more_ranks_than_gpus_is_refused(model_dir):
    result = subprocess.run([sys.executable, "-m", "engine", "serve", "--model", str(model_dir), "--port", "0",
                             "--device", "cuda", "--tensor-parallel-size", "2"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "asks for 2 GPUs on this node, which has" in result.stderr


def test_generate_with_tensor_parallelism_prints_the_single_process_text(model_dir):
    def run(*flags: str) -> str:
        result = subprocess.run([sys.executable, "-m", "engine", "generate", "--model", str(model_dir), "--prompt",
                                 "The parallel engine", "--max-tokens", "12", "--dtype", "float32", *flags],
                                cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr
        return result.stdout
    assert run("--tensor-parallel-size", "2", "--enable-expert-parallel", "--master-port", str(free_port())) == run()


def test_a_hung_rank_stops_the_engine_after_the_collective_timeout(model_dir):
    """SIGSTOP, not SIGKILL: nothing closes a socket, so only the timeout can tell."""
    proc = parallel_engine(model_dir, "--data-parallel-size", "2", "--enable-expert-parallel",
                           "--collective-timeout", "3")
    try:
        victim = rank_pid(proc, 1)
        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        assert proc.proc.wait(timeout=30) != 0  # the idle heartbeat's collective times out too
        assert time.monotonic() - stopped < 20
    finally:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.proc.poll() is None:
            proc.stop()
        else:
            proc.proc.stdout.close()
