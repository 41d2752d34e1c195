"""Graceful operation of both services, as real processes on loopback: SIGTERM drains (the
open streams finish, new requests are refused, the process exits 0; what outlasts
--drain-timeout is aborted), JSON logs carry the request id that the answer echoes, and
the gateway finds an engine restarted on its address by itself."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moeserve.engine.v1 import engine_pb2 as pb
from moeserve.engine.v1 import engine_pb2_grpc as pb_grpc

from engine_server import chat
from gateway_helpers import KEY, MODEL, GatewayProcess, free_port, start_engine

FLAGS = ("--max-model-len", "1024", "--kv-cache-memory", "0.02")
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def exit_code(proc: subprocess.Popen, timeout: float) -> int:
    """The exit code of a process already signalled, within `timeout` seconds."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        proc.stdout.close()


def chat_body(max_tokens: int, stream: bool = False) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": max_tokens,
            "ignore_eos": True}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url + "/chat/completions", json.dumps(body).encode(), {**AUTH, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


# --- the engine ------------------------------------------------------------------------


class Stream:
    """One StreamGenerate call read to its end: tokens, finish reason, usage."""

    def __init__(self, stub: pb_grpc.EngineStub, max_tokens: int) -> None:
        self.call = stub.StreamGenerate(chat("Hello", max_tokens=max_tokens, ignore_eos=True))
        self.tokens, self.finish, self.usage = 0, pb.FINISH_REASON_UNSPECIFIED, None
        self.started = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while (msg := await self.call.read()) is not grpc.aio.EOF:
            for c in msg.choices:
                self.tokens += len(c.token_ids)
                self.finish = c.finish_reason or self.finish
            if self.tokens:
                self.started.set()
            if msg.HasField("usage"):
                self.usage = msg.usage


async def _health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return reply.status


def test_engine_sigterm_lets_open_streams_finish_refuses_new_calls_and_exits_0():
    engine = start_engine(*FLAGS)

    async def run() -> tuple[list[Stream], list[int], grpc.aio.AioRpcError]:
        async with grpc.aio.insecure_channel(engine.address) as channel:
            stub = pb_grpc.EngineStub(channel)
            streams = [Stream(stub, 64) for _ in range(4)]
            await asyncio.wait_for(asyncio.gather(*(s.started.wait() for s in streams)), 30)
            engine.proc.send_signal(signal.SIGTERM)
            at_signal = [s.tokens for s in streams]
            while await _health(channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(chat("Late", max_tokens=2), timeout=10)
            await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), 30)
            return streams, at_signal, refused.value

    streams, at_signal, refused = asyncio.run(run())
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and refused.details() == "the engine is draining"
    assert min(at_signal) < 64, "the streams had ended before the signal"
    for s in streams:
        assert (s.tokens, s.finish, s.usage.completion_tokens) == (64, pb.FINISH_REASON_LENGTH, 64)
    assert exit_code(engine.proc, 30) == 0


def test_engine_drain_timeout_aborts_the_streams_that_outlast_it_and_exits_0():
    engine = start_engine(*FLAGS, "--drain-timeout", "0.5")

    async def run() -> tuple[list[Stream], float]:
        async with grpc.aio.insecure_channel(engine.address) as channel:
            streams = [Stream(pb_grpc.EngineStub(channel), 1000) for _ in range(2)]
            await asyncio.wait_for(asyncio.gather(*(s.started.wait() for s in streams)), 30)
            engine.proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), 30)
            return streams, time.monotonic() - start

    streams, ended_after = asyncio.run(run())
    assert ended_after < 5
    for s in streams:  # ended early, cleanly, with the usage of what was produced
        assert s.finish == pb.FINISH_REASON_ABORT and 0 < s.usage.completion_tokens == s.tokens < 1000
    assert exit_code(engine.proc, 15) == 0


# --- the gateway -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    proc = start_engine(*FLAGS, "--log-format", "json")
    yield proc
    assert proc.stop() == 0


async def _sse(session: aiohttp.ClientSession, url: str, started: asyncio.Event) -> list[str]:
    """The data of each event of one streamed chat completion."""
    events = []
    async with session.post(url + "/chat/completions", json=chat_body(64, stream=True)) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append(line[6:].decode().strip())
                started.set()
    return events


def _keep_alive(gateway: GatewayProcess) -> http.client.HTTPConnection:
    """A connection that has answered once and stays open (HTTP/1.1 keep-alive)."""
    host, port = gateway.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    assert resp.status == 200 and not resp.will_close
    resp.read()
    return conn


def _ask(conn: http.client.HTTPConnection, method: str, path: str, body: dict | None = None):
    conn.request(method, path, json.dumps(body) if body else None, AUTH)
    resp = conn.getresponse()
    return resp.status, resp.getheader("Connection"), json.loads(resp.read())


def test_gateway_sigterm_lets_open_streams_finish_refuses_new_requests_and_exits_0(engine, tmp_path):
    db = tmp_path / "usage.db"
    gateway = GatewayProcess([engine.address], "--usage-db", f"sqlite:///{db}")
    gateway.wait_ready()
    health_conn, api_conn = _keep_alive(gateway), _keep_alive(gateway)

    async def run() -> tuple[list[list[str]], list]:
        async with aiohttp.ClientSession(headers=AUTH) as session:
            started = [asyncio.Event() for _ in range(3)]
            streams = [asyncio.create_task(_sse(session, gateway.base_url, s)) for s in started]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 30)
            gateway.proc.send_signal(signal.SIGTERM)
            seen = await asyncio.to_thread(_while_draining, gateway, health_conn, api_conn)
            assert not any(s.done() for s in streams), "the streams had ended before the checks"
            return await asyncio.wait_for(asyncio.gather(*streams), 30), seen

    streams, (health, refused, new_connection) = asyncio.run(run())
    assert health[0] == 503 and health[2]["status"] == "draining"
    assert refused[:2] == (503, "close") and refused[2]["error"]["code"] == "draining"
    assert new_connection == "refused"
    for events in streams:
        assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 64
    assert exit_code(gateway.proc, 30) == 0
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT outcome, completion_tokens FROM usage_records").fetchall()
    assert rows == [("length", 64)] * 3


def _while_draining(gateway: GatewayProcess, health_conn, api_conn) -> tuple:
    """What a client sees once the gateway drains: /health on a kept-alive connection (polled
    until the signal landed), an API request on another, and a new connection."""
    while (health := _ask(health_conn, "GET", "/health"))[0] == 200:
        time.sleep(0.01)
    refused = _ask(api_conn, "POST", "/v1/chat/completions", chat_body(2))
    host, port = gateway.url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
        new_connection = "accepted"
    except ConnectionRefusedError:
        new_connection = "refused"
    return health, refused, new_connection


def test_gateway_drain_timeout_cancels_what_outlasts_it_and_bills_it_as_aborted(engine, tmp_path):
    db = tmp_path / "usage.db"
    gateway = GatewayProcess([engine.address], "--usage-db", f"sqlite:///{db}", "--drain-timeout", "0.3")
    gateway.wait_ready()

    async def run() -> None:
        body = chat_body(900, stream=True)
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async with session.post(gateway.base_url + "/chat/completions", json=body) as resp:
                assert resp.status == 200
                await resp.content.readline()
                gateway.proc.send_signal(signal.SIGTERM)
                with pytest.raises(aiohttp.ClientPayloadError):  # cut off: no [DONE], no clean end
                    await asyncio.wait_for(resp.read(), 10)

    asyncio.run(run())
    assert exit_code(gateway.proc, 15) == 0
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT outcome, completion_tokens FROM usage_records").fetchall()
    assert len(rows) == 1 and rows[0][0] == "aborted" and 0 < rows[0][1] < 900


def test_json_logs_carry_the_request_id_that_the_answer_echoes(engine):
    gateway = GatewayProcess([engine.address], "--log-format", "json")
    try:
        gateway.wait_ready()
        status, headers, _ = post(gateway.base_url, chat_body(2), {"X-Request-Id": "my-id-123"})
        assert status == 200 and headers["X-Request-Id"] == "my-id-123"
        status, headers, body = post(gateway.base_url, chat_body(2, stream=True), {"X-Request-Id": "my-stream-456"})
        assert status == 200 and headers["X-Request-Id"] == "my-stream-456" and body.endswith(b"data: [DONE]\n\n")
        status, headers, _ = post(gateway.base_url, {"model": MODEL}, {"X-Request-Id": "my-bad-789"})
        assert status == 400 and headers["X-Request-Id"] == "my-bad-789"
    finally:
        assert gateway.stop() == 0
    records = json_lines(gateway.log)
    assert all(r["time"].endswith("Z") and {"level", "logger", "message"} <= r.keys() for r in records)
    for request_id, status in (("my-id-123", 200), ("my-stream-456", 200), ("my-bad-789", 400)):
        access = [r for r in records if r["logger"] == "gateway.access" and r.get("request_id") == request_id]
        assert len(access) == 1, records
        assert access[0]["status"] == status and access[0]["path"] == "/v1/chat/completions"
        assert access[0]["method"] == "POST" and access[0]["duration_ms"] > 0
    billed = [r for r in records if r.get("request_id") == "my-id-123" and r["logger"] != "gateway.access"]
    assert billed and "outcome=length" in billed[0]["message"]
    # The engine, started with --log-format json too, logs in the same shape.
    assert any(r["logger"] == "engine.server" and r["message"].startswith("serving") for r in json_lines(engine.log))


def json_lines(log: list[str]) -> list[dict]:
    """The log's JSON records; every line that opens a JSON object must be one."""
    return [json.loads(line) for line in log if line.startswith("{")]


# --- reconnecting ----------------------------------------------------------------------


def test_the_gateway_serves_again_by_itself_when_its_engine_restarts_on_the_same_address():
    port = free_port()
    engine = start_engine(*FLAGS, port=port)
    # The gateway's own defaults for health checks and backoff, as deployed.
    gateway = GatewayProcess([engine.address], "--health-interval", "1", "--max-backoff", "5")
    try:
        gateway.wait_ready()
        assert post(gateway.base_url, chat_body(2))[0] == 200
        assert engine.stop() == 0
        for _ in range(3):  # with no engine: 503 at once, never a hang
            start = time.monotonic()
            status, _, body = post(gateway.base_url, chat_body(2))
            assert status == 503 and json.loads(body)["error"]["code"] == "engine_unavailable"
            assert time.monotonic() - start < 2
        engine = start_engine(*FLAGS, port=port)
        start = time.monotonic()
        while (status := post(gateway.base_url, chat_body(2))[0]) != 200 and time.monotonic() - start < 15:
            time.sleep(0.1)
        assert status == 200, "".join(gateway.log)
        assert time.monotonic() - start < 8
    finally:
        assert gateway.stop() == 0
        assert engine.stop() == 0


# --- in process ------------------------------------------------------------------------


def test_a_json_log_record_holds_the_request_id_the_extra_fields_and_the_exception():
    from moeserve.obs.logs import JsonFormatter, request_id_var

    record = logging.LogRecord("gateway.x", logging.ERROR, __file__, 1, "failed %s", ("here",), None)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    record.status = 500
    token = request_id_var.set("rid-1")
    try:
        out = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert out["message"] == "failed here" and out["level"] == "ERROR" and out["logger"] == "gateway.x"
    assert out["request_id"] == "rid-1" and out["status"] == 500
    assert "RuntimeError: boom" in out["exception"] and out["time"].endswith("Z")
    assert "request_id" not in json.loads(JsonFormatter().format(logging.makeLogRecord({"msg": "idle"})))


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan")])
def test_a_drain_timeout_that_is_not_a_number_of_seconds_is_refused(value):
    from engine.engine_process import ServeConfig
    from gateway.config import ConfigError, GatewayConfig

    with pytest.raises(ValueError, match="--drain-timeout"):
        ServeConfig("model", drain_timeout=value)
    with pytest.raises(ConfigError, match="--drain-timeout"):
        GatewayConfig(("127.0.0.1:1",), no_auth=True, drain_timeout=value)
    with pytest.raises(ValueError, match="--log-format"):
        ServeConfig("model", log_format="xml")
