"""The usage ledger end to end, on SQLite and on PostgreSQL: a real engine, a real gateway
process, the official SDK and raw HTTP. Every request that reached an engine has one
record, committed before the answer's last bytes, billed for what it produced whether it
finished, was cut off by its client or failed mid-way; a store that cannot take records
turns requests away (503) rather than serve them unbilled."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import aiohttp
import openai
import pytest

from gateway_helpers import KEY, MODEL, start_engine
from ledger_helpers import (HELLO, STORES, chat, cost, http, records, shared_engine, sqlite_path, start_gateway,
                            store_url, wait_for_record)
from postgres import postgres_or_skip

LOCAL_ID = "local:" + hashlib.sha256(KEY.encode()).hexdigest()[:8]
UNAVAILABLE = {"type": "server_error", "param": None, "code": "usage_store_unavailable"}


@pytest.fixture(scope="module", params=STORES)
def store(request):
    return request.param


@pytest.fixture(scope="module")
def gw(store):
    url = store_url(store)
    proc = start_gateway(url)
    proc.usage_db = url
    yield proc
    assert proc.stop() == 0


def assert_billed(rec: dict, usage: dict) -> None:
    """The record holds exactly the usage the client was given, and its exact price."""
    assert {k: rec[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == {
        k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert rec["cached_prompt_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert rec["reasoning_tokens"] == usage["completion_tokens_details"]["reasoning_tokens"]
    exact = cost(rec["prompt_tokens"], rec["cached_prompt_tokens"], rec["completion_tokens"])
    assert Decimal(rec["estimated_cost_decimal"]) == exact == Decimal(str(usage["estimated_cost"]))


def test_unary_answer_is_recorded_with_the_usage_it_carried(gw):
    client = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)
    before = datetime.now(UTC)
    resp = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5,
                                          extra_headers={"X-Request-Id": "req-ledger-unary"})
    rec = records(gw)[resp.id]  # committed before the body left: there already
    assert_billed(rec, resp.usage.model_dump())
    assert rec["object"] == "usage.record" and rec["request_id"] == "req-ledger-unary"
    assert rec["key_id"] == LOCAL_ID and rec["model"] == MODEL and rec["outcome"] == "length"
    assert 0 < rec["queue_ms"] <= rec["ttft_ms"] <= rec["total_ms"] < 60_000
    created = datetime.fromisoformat(rec["created_at"])
    assert before <= created <= datetime.now(UTC) and rec["created"] == int(created.timestamp())


def test_stream_record_is_committed_before_the_usage_chunk_and_done(gw):
    async def run():
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 6, "stream": True,
                "stream_options": {"include_usage": True}}
        async with aiohttp.ClientSession() as session:
            async with session.post(gw.base_url + "/chat/completions", json=body,
                                    headers={"Authorization": f"Bearer {KEY}"}) as resp:
                async for line in resp.content:
                    if line.startswith(b"data: {") and b'"usage":{' in line:
                        chunk = json.loads(line[len(b"data: "):])
                        # [DONE] not read yet: the record must exist already.
                        return chunk, await asyncio.to_thread(records, gw), await resp.read()
    usage_chunk, ledger, rest = asyncio.run(run())
    assert usage_chunk["choices"] == [] and rest.strip() == b"data: [DONE]"
    rec = ledger[usage_chunk["id"]]
    assert_billed(rec, usage_chunk["usage"])
    assert rec["outcome"] == "length" and rec["completion_tokens"] == 6


async def _cut_stream(url: str, tokens_before_cut: int, request_id: str) -> tuple[str, int]:
    """Streams a long answer and drops the connection after `tokens_before_cut` tokens
    (counted exactly from the logprobs); (the answer's id, tokens the client saw)."""
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 1500, "stream": True, "logprobs": True,
            "ignore_eos": True}
    seen, answer_id = 0, None
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {KEY}", "X-Request-Id": request_id}) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[len(b"data: "):])
                    answer_id = chunk["id"]
                    seen += len(chunk["choices"][0]["logprobs"]["content"])
                    if seen >= tokens_before_cut:
                        break
            resp.close()  # not read to the end: the connection is dropped
    return answer_id, seen


def test_client_that_cuts_a_stream_is_billed_for_what_was_produced(gw):
    answer_id, seen = asyncio.run(_cut_stream(gw.base_url, 3, "req-cut-stream"))
    rec = wait_for_record(gw, answer_id)
    status, _, full = chat(gw, max_tokens=1)  # the same prompt answered: its prompt tokens
    assert status == 200
    assert rec["outcome"] == "aborted" and rec["request_id"] == "req-cut-stream"
    assert seen <= rec["completion_tokens"] < 1500
    assert rec["prompt_tokens"] == full["usage"]["prompt_tokens"]
    assert Decimal(rec["estimated_cost_decimal"]) == cost(rec["prompt_tokens"], rec["cached_prompt_tokens"],
                                                          rec["completion_tokens"])


def test_client_that_gives_up_on_a_unary_answer_is_billed_for_what_was_produced(gw):
    request_id = f"req-cut-unary-{uuid.uuid4().hex[:8]}"

    async def run():
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            with pytest.raises(asyncio.TimeoutError):
                await session.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}",
                                                                             "X-Request-Id": request_id},
                                   json={"model": MODEL, "messages": HELLO, "max_tokens": 1500, "ignore_eos": True})
    asyncio.run(run())
    deadline = time.monotonic() + 10
    while not (found := [r for r in records(gw).values() if r["request_id"] == request_id]):
        assert time.monotonic() < deadline, "the cut-off unary request left no record"
        time.sleep(0.05)
    [rec] = found
    assert rec["outcome"] == "aborted" and rec["prompt_tokens"] > 0 and 0 < rec["completion_tokens"] < 1500
    assert rec["ttft_ms"] is not None and rec["total_ms"] >= 900
    assert Decimal(rec["estimated_cost_decimal"]) == cost(rec["prompt_tokens"], rec["cached_prompt_tokens"],
                                                          rec["completion_tokens"])


def test_request_the_engine_refuses_leaves_no_record(gw):
    before = records(gw)
    status, _, body = chat(gw, max_tokens=2047)  # prompt + max_tokens beyond the engine's context
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert records(gw).keys() == before.keys()


def _refuse_inserts(store: str, url: str, on: bool) -> None:
    """Makes the store itself fail every new ledger row (a trigger), or stop failing."""
    if store == "sqlite":
        with sqlite3.connect(sqlite_path(url), isolation_level=None) as conn:
            conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON usage_records BEGIN "
                         "SELECT RAISE(ABORT, 'refused by the test'); END" if on else "DROP TRIGGER refuse")
        return
    db = url.rsplit("/", 1)[1]
    postgres_or_skip().psql(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'refused by the "
        "test'; END $$; CREATE TRIGGER refuse BEFORE INSERT ON usage_records FOR EACH ROW EXECUTE FUNCTION refuse()"
        if on else "DROP TRIGGER refuse ON usage_records; DROP FUNCTION refuse()", db)


def _until(fn, ok, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if ok(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def test_record_that_cannot_be_written_fails_the_answer_instead_of_its_last_bytes(gw, store):
    _refuse_inserts(store, gw.usage_db, True)
    try:
        status, headers, body = chat(gw)
        assert status == 503 and headers["Retry-After"] == "1"
        assert body["error"]["message"].startswith("usage store unavailable") and body["error"] | UNAVAILABLE == \
            body["error"]
        # Once the store answers pings again the next stream is admitted, and fails at its end.
        status, _, raw = _until(lambda: chat(gw, stream=True, stream_options={"include_usage": True}),
                                lambda r: r[0] == 200)
        assert status == 200
        events = raw.decode().strip().split("\n\n")
        last = json.loads(events[-1][len("data: "):])
        assert last["error"]["code"] == "usage_store_unavailable" and b"[DONE]" not in raw and b'"usage":{' not in raw
    finally:
        _refuse_inserts(store, gw.usage_db, False)
    status, _, body = _until(lambda: chat(gw), lambda r: r[0] == 200)
    assert status == 200 and body["id"] in records(gw)


def test_store_down_refuses_requests_with_503_and_serves_again_when_it_is_back():
    pg = postgres_or_skip()
    gw = start_gateway(pg.fresh_database())
    try:
        assert chat(gw)[0] == 200
        pg.stop()
        status, headers, body = _until(lambda: chat(gw), lambda r: r[0] != 200, timeout=5)
        assert status == 503 and headers["Retry-After"] == "1"
        assert body["error"]["message"].startswith("usage store unavailable") and body["error"] | UNAVAILABLE == \
            body["error"]
        assert http("GET", gw.base_url + "/usage")[0] == 503
        pg.start()
        status, _, body = _until(lambda: chat(gw), lambda r: r[0] == 200, timeout=15)
        assert status == 200 and body["id"] in records(gw)
    finally:
        pg.start()
        assert gw.stop() == 0


def test_engine_failing_mid_stream_is_billed_as_error_on_both_stores():
    engine = start_engine("--max-model-len", "2048", "--kv-cache-memory", "0.05")
    gateways = {kind: start_gateway(store_url(kind), engine=engine) for kind in STORES
                if kind == "sqlite" or _postgres_ok()}
    try:
        async def cut(gw):
            body = {"model": MODEL, "messages": HELLO, "max_tokens": 1500, "stream": True, "logprobs": True,
                    "ignore_eos": True}
            seen, answer_id, events = 0, None, []
            async with aiohttp.ClientSession() as session:
                async with session.post(gw.base_url + "/chat/completions", json=body,
                                        headers={"Authorization": f"Bearer {KEY}"}) as resp:
                    async for line in resp.content:
                        if line.startswith(b"data: "):
                            events.append(json.loads(line[len(b"data: "):]))
                            if "choices" in events[-1]:
                                answer_id = events[-1]["id"]
                                seen += len(events[-1]["choices"][0]["logprobs"]["content"])
                            if seen >= 3 and engine.proc.poll() is None:
                                engine.proc.kill()
            return answer_id, seen, events[-1]

        async def both():
            return await asyncio.gather(*(cut(gw) for gw in gateways.values()))
        for gw, (answer_id, seen, last) in zip(gateways.values(), asyncio.run(both()), strict=True):
            assert last["error"]["code"] == "engine_unavailable"
            rec = records(gw)[answer_id]
            assert rec["outcome"] == "error" and seen <= rec["completion_tokens"] < 1500 and rec["prompt_tokens"] > 0
            assert Decimal(rec["estimated_cost_decimal"]) == cost(rec["prompt_tokens"], rec["cached_prompt_tokens"],
                                                                  rec["completion_tokens"])
    finally:
        for gw in gateways.values():
            gw.stop()
        engine.proc.kill()
        engine.proc.wait()


def _postgres_ok() -> bool:
    try:
        postgres_or_skip()
        return True
    except pytest.skip.Exception:
        return False


def test_shared_engine_is_alive():
    assert shared_engine().proc.poll() is None
