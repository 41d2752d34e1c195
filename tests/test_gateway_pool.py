"""The gateway over several engines and none: failover, an engine dying mid-stream, its return
after a restart, 503 with no engine, 429 when the queues are full. Real processes on loopback."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest

from gateway_helpers import KEY, MODEL, GatewayProcess, free_port, start_engine

FLAGS = ("--max-model-len", "1024", "--kv-cache-memory", "0.02")
HELLO = [{"role": "user", "content": "Hello"}]


def sdk(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0, timeout=30)


async def _stream_until_killed(gateway: GatewayProcess, kill) -> list[str]:
    """Opens a long stream, kills its engine after the first event, returns every event's data."""
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 900, "stream": True, "ignore_eos": True}
    events = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
        async with session.post(gateway.base_url + "/chat/completions", json=body) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: "):
                    events.append(line[6:].decode().strip())
                    if len(events) == 1:
                        kill()
    return events


def wait_for_engines(gateway: GatewayProcess, ready: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while gateway.health()[1]["engines_ready"] != ready:
        assert time.monotonic() < deadline, f"engines_ready never became {ready}: {gateway.health()}"
        time.sleep(0.05)


def test_a_dead_engine_leaves_the_pool_and_returns_after_restart():
    ports = free_port(), free_port()
    engines = [start_engine(*FLAGS, port=p) for p in ports]
    gateway = GatewayProcess([e.address for e in engines])
    try:
        gateway.wait_ready(engines=2)
        client = sdk(gateway)
        assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3).usage.completion_tokens == 3

        # Both idle: the stream goes to the first engine. Killing it ends the stream with one error event.
        events = asyncio.run(asyncio.wait_for(_stream_until_killed(gateway, engines[0].proc.kill), 30))
        error = json.loads(events[-1])["error"]
        assert error["code"] == "engine_unavailable" and error["type"] == "server_error"
        assert "[DONE]" not in events and all("choices" in json.loads(e) for e in events[:-1])
        engines[0].stop()

        # The survivor serves everything.
        for i in range(4):
            assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, seed=i).choices
        wait_for_engines(gateway, 1)

        # Restarted on the same address, the first engine returns; then it alone serves.
        engines[0] = start_engine(*FLAGS, port=ports[0])
        wait_for_engines(gateway, 2)
        assert engines[1].stop() == 0
        for i in range(3):
            resp = client.completions.create(model=MODEL, prompt="Once", max_tokens=2, seed=i)
            assert resp.usage.completion_tokens == 2
    finally:
        for e in engines:
            if e.proc.poll() is None:
                e.stop()
    # With every engine gone the gateway says so, promptly and in OpenAI's shape.
    wait_for_engines(gateway, 0)
    with pytest.raises(openai.InternalServerError) as err:
        sdk(gateway).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert err.value.status_code == 503 and err.value.code == "engine_unavailable"
    assert gateway.stop() == 0


def test_no_engine_means_503_and_an_empty_model_list():
    gateway = GatewayProcess([f"127.0.0.1:{free_port()}"])
    try:
        status, body = gateway.health()
        assert status == 503 and body["engines_ready"] == 0
        client = sdk(gateway)
        assert client.models.list().data == []
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model=MODEL, messages=HELLO)
        assert err.value.status_code == 503 and err.value.response.headers["Retry-After"] == "1"
        assert time.monotonic() - start < 5
    finally:
        assert gateway.stop() == 0


def test_full_engine_queue_means_429():
    engine = start_engine("--max-num-seqs", "1", "--max-waiting", "1", *FLAGS)
    gateway = GatewayProcess([engine.address])
    try:
        gateway.wait_ready()

        async def run():
            aclient = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
            return await asyncio.gather(*(aclient.chat.completions.create(
                model=MODEL, messages=HELLO, max_tokens=150, extra_body={"ignore_eos": True}) for _ in range(4)),
                return_exceptions=True)
        results = asyncio.run(run())
        limited = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert len(limited) == 2 and sum(1 for r in results if not isinstance(r, Exception)) == 2, results
        assert all(e.status_code == 429 and e.body["type"] == "rate_limit_error" for e in limited)
    finally:
        assert gateway.stop() == 0
        assert engine.stop() == 0
