"""The ledger under load, with real processes: two gateways sharing one PostgreSQL take 500
concurrent requests (unary, streamed, and streams cut off by their clients) and the
ledger matches what the clients were told to the token and to the micro-dollar; a gateway
killed with SIGKILL mid-load loses no record of an answer whose usage reached its client."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from decimal import Decimal

import aiohttp
import pytest

from gateway_helpers import KEY, MODEL
from ledger_helpers import STORES, cost, create_key, http, keys_cli, records, start_gateway, store_url
from postgres import postgres_or_skip


@dataclass
class Seen:
    """What one client saw: the answer's id, the usage it was given (None if none) and the
    tokens it read before it cut the stream (cut streams only)."""

    id: str | None
    usage: dict | None
    cut_after: int | None = None


async def unary(session, url: str, key: str, i: int, max_tokens: int) -> Seen:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": max_tokens,
            "ignore_eos": True}
    async with session.post(url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        answer = await resp.json()
        assert resp.status == 200, answer
        return Seen(answer["id"], answer["usage"])


async def stream(session, url: str, key: str, i: int, max_tokens: int, cut_after: int | None = None) -> Seen:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"question {i}"}], "stream": True,
            "max_tokens": max_tokens, "ignore_eos": True, "stream_options": {"include_usage": True}}
    if cut_after:
        body.update(logprobs=True)
    answer_id, usage, seen = None, None, 0
    async with session.post(url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[len(b"data: "):])
            answer_id, usage = chunk["id"], chunk.get("usage") or usage
            if cut_after and chunk["choices"]:
                seen += len(chunk["choices"][0]["logprobs"]["content"])
                if seen >= cut_after:
                    resp.close()
                    return Seen(answer_id, None, seen)
    assert usage is not None, "the stream ended without its usage"
    return Seen(answer_id, usage)


def request(session, url: str, key: str, i: int):
    """Of every five: two unary, two streamed, one streamed and cut after 2 tokens of 400."""
    kind = i % 5
    if kind < 2:
        return unary(session, url, key, i, 3 + i % 4)
    if kind < 4:
        return stream(session, url, key, i, 3 + i % 4)
    return stream(session, url, key, i, 400, cut_after=2)


async def wait_for(gw, ids: set[str], timeout: float = 30.0) -> dict[str, dict]:
    """The ledger's records (by id), once all of `ids` are in it (cut streams are written after the cut)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        ledger = await asyncio.to_thread(records, gw)
        if ids <= ledger.keys() or asyncio.get_running_loop().time() > deadline:
            return ledger
        await asyncio.sleep(0.1)


def test_two_gateways_on_one_postgres_bill_500_concurrent_requests_exactly():
    url = postgres_or_skip().fresh_database()
    store_key_id, store_key = create_key(url, "load")
    gateways = [start_gateway(url), start_gateway(url)]
    try:
        async def load():
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
                outcomes = await asyncio.gather(*(
                    request(session, gateways[i % 2].base_url, (KEY, store_key)[i // 2 % 2], i) for i in range(500)))
            return outcomes, await wait_for(gateways[0], {o.id for o in outcomes})
        outcomes, ledger = asyncio.run(load())
    finally:
        for gw in gateways:
            assert gw.stop() == 0

    assert len(ledger) == 500 and {o.id for o in outcomes} == ledger.keys()
    answered = [o for o in outcomes if o.usage is not None]
    cut = [o for o in outcomes if o.cut_after is not None]
    assert len(answered) == 400 and len(cut) == 100
    for o in answered:  # each record is what its client was told
        rec = ledger[o.id]
        assert (rec["prompt_tokens"], rec["completion_tokens"], rec["cached_prompt_tokens"]) == (
            o.usage["prompt_tokens"], o.usage["completion_tokens"], o.usage["prompt_tokens_details"]["cached_tokens"])
        assert Decimal(rec["estimated_cost_decimal"]) == Decimal(str(o.usage["estimated_cost"]))
        assert rec["outcome"] == "length"
    for o in cut:  # billed for what was produced: at least what the client read, priced exactly
        rec = ledger[o.id]
        assert rec["outcome"] == "aborted" and o.cut_after <= rec["completion_tokens"] < 400
        assert Decimal(rec["estimated_cost_decimal"]) == cost(rec["prompt_tokens"], rec["cached_prompt_tokens"],
                                                              rec["completion_tokens"])
    client_tokens = sum(o.usage["total_tokens"] for o in answered)
    client_cost = sum(Decimal(str(o.usage["estimated_cost"])) for o in answered)
    assert sum(ledger[o.id]["total_tokens"] for o in answered) == client_tokens
    assert sum(Decimal(ledger[o.id]["estimated_cost_decimal"]) for o in answered) == client_cost
    # The store's totals: the answered requests plus the cut ones, exactly.
    cut_tokens = sum(ledger[o.id]["total_tokens"] for o in cut)
    cut_cost = sum(Decimal(ledger[o.id]["estimated_cost_decimal"]) for o in cut)
    rows = {r["key_id"]: r for r in _totals(url)}
    assert sum(r["total_tokens"] for r in rows.values()) == client_tokens + cut_tokens
    assert sum(Decimal(r["estimated_cost_decimal"]) for r in rows.values()) == client_cost + cut_cost
    listed = {k["id"]: k for k in map(json.loads, keys_cli("list", "--json", "--usage-db", url).stdout.splitlines())}
    assert Decimal(listed[store_key_id]["spent"]) == Decimal(rows[store_key_id]["estimated_cost_decimal"])


def _totals(url: str) -> list[dict]:
    gw = start_gateway(url)
    try:
        status, _, body = http("GET", gw.base_url + "/usage?group_by=key")
        assert status == 200
        return body["data"]
    finally:
        assert gw.stop() == 0


@pytest.mark.parametrize("store", STORES)
def test_gateway_killed_mid_load_keeps_the_record_of_every_answer_its_client_got(store):
    url = store_url(store)
    gw = start_gateway(url)
    received: list[Seen] = []

    async def one(session, i: int) -> None:
        try:
            send = unary if i % 2 else stream
            received.append(await send(session, gw.base_url, KEY, i, 4 + i % 40))
            if len(received) == 60:
                gw.kill()  # SIGKILL: no shutdown, no flush, nothing
        except (aiohttp.ClientError, AssertionError, asyncio.TimeoutError, json.JSONDecodeError):
            pass  # cut by the kill: the client got no usage

    async def load():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=60)) as session:
            await asyncio.gather(*(one(session, i) for i in range(200)))
    asyncio.run(load())
    assert gw.proc.returncode == -9 and 60 <= len(received) < 200
    survivor = start_gateway(url)  # opens the store after the crash (SQLite replays its WAL)
    try:
        ledger = records(survivor)
    finally:
        assert survivor.stop() == 0
    for o in received:
        rec = ledger[o.id]
        assert (rec["prompt_tokens"], rec["completion_tokens"]) == (o.usage["prompt_tokens"],
                                                                    o.usage["completion_tokens"])
        assert Decimal(rec["estimated_cost_decimal"]) == Decimal(str(o.usage["estimated_cost"]))
