"""GET /v1/usage and /v1/usage/requests on SQLite and PostgreSQL: what each key may see,
totals that add up exactly, pages that cover every record once, and 400 naming the param
for every malformed query."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from gateway_helpers import KEY, MODEL
from ledger_helpers import STORES, chat, create_key, http, start_gateway, store_url


@pytest.fixture(scope="module", params=STORES)
def setup(request):
    """A gateway and three keys with answered requests: (gateway, {name: (id, key)}, {answer id: key name})."""
    url = store_url(request.param)
    gw = start_gateway(url)
    keys = {"alice": create_key(url, "alice"), "bob": create_key(url, "bob"),
            "auditor": create_key(url, "auditor", "--admin")}
    answers = {}
    for name, n in (("alice", 3), ("bob", 2), ("auditor", 1)):
        for i in range(n):
            status, _, body = chat(gw, keys[name][1], max_tokens=2 + i)
            assert status == 200
            answers[body["id"]] = name
    yield gw, keys, answers
    assert gw.stop() == 0


def usage(gw, key: str, query: str = "") -> dict:
    status, _, body = http("GET", f"{gw.base_url}/usage{query}", key)
    assert status == 200, body
    return body


def all_pages(gw, key: str, limit: int) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        status, _, body = http("GET", f"{gw.base_url}/usage/requests?limit={limit}"
                                      + (f"&cursor={cursor}" if cursor else ""), key)
        assert status == 200 and body["object"] == "list", body
        pages.append([r["id"] for r in body["data"]])
        if not body["has_more"]:
            assert body["next_cursor"] is None
            return pages
        cursor = body["next_cursor"]


def test_a_key_sees_only_its_own_usage(setup):
    gw, keys, answers = setup
    alice_id, alice = keys["alice"]
    mine = [a for a, who in answers.items() if who == "alice"]
    assert sum(all_pages(gw, alice, 1000), []) == mine[::-1]  # newest first
    totals = usage(gw, alice, "?group_by=key")
    assert [row["key_id"] for row in totals["data"]] == [alice_id] and totals["data"][0]["requests"] == 3


def test_admin_keys_see_every_key_and_totals_add_up_exactly(setup):
    gw, keys, answers = setup
    for admin in (KEY, keys["auditor"][1]):  # a command-line key, and a store key made with --admin
        listed = sum(all_pages(gw, admin, 1000), [])
        assert set(answers) <= set(listed)
    _, _, page = http("GET", gw.base_url + "/usage/requests?limit=1000", KEY)
    ours = [r for r in page["data"] if r["id"] in answers]
    by_key = {row["key_id"]: row for row in usage(gw, KEY, "?group_by=key")["data"]}
    for name, (key_id, _) in keys.items():
        rows = [r for r in ours if r["key_id"] == key_id]
        row = by_key[key_id]
        assert row["requests"] == len(rows) == list(answers.values()).count(name)
        assert row["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
        assert Decimal(row["estimated_cost_decimal"]) == sum(Decimal(r["estimated_cost_decimal"]) for r in rows)
    total = usage(gw, KEY)["data"]
    by_model = usage(gw, KEY, "?group_by=model")["data"]
    by_day = usage(gw, KEY, "?group_by=day")["data"]
    assert len(total) == 1 and "key_id" not in total[0] and [r["model"] for r in by_model] == [MODEL]
    assert [r["day"] for r in by_day] == [datetime.now(UTC).date().isoformat()]
    for rows in (by_model, by_day, list(by_key.values())):
        for field in ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "reasoning_tokens"):
            assert sum(r[field] for r in rows) == total[0][field]
        assert sum(Decimal(r["estimated_cost_decimal"]) for r in rows) == Decimal(total[0]["estimated_cost_decimal"])


def test_pages_cover_every_record_once_newest_first(setup):
    gw, _, answers = setup
    pages = all_pages(gw, KEY, 2)
    flat = sum(pages, [])
    assert all(len(p) == 2 for p in pages[:-1]) and len(flat) == len(set(flat))
    assert flat == sum(all_pages(gw, KEY, 1000), [])
    assert [a for a in flat if a in answers] == list(answers)[::-1]


def test_time_range_selects_by_creation_time(setup):
    gw, _, answers = setup
    today = datetime.now(UTC).date()
    tomorrow = (today + timedelta(days=1)).isoformat()
    everything = usage(gw, KEY)["data"][0]["requests"]
    assert everything >= len(answers)
    assert usage(gw, KEY, f"?start={today.isoformat()}&end={tomorrow}")["data"][0]["requests"] == everything
    assert usage(gw, KEY, f"?start={tomorrow}")["data"][0]["requests"] == 0
    assert usage(gw, KEY, f"?end={today.isoformat()}T00:00:00Z&group_by=key")["data"] == []
    now = int(datetime.now(UTC).timestamp())
    body = usage(gw, KEY, f"?start={now - 3600}&end={now + 60}")
    assert body["data"][0]["requests"] == everything and body["start"].endswith("Z")


@pytest.mark.parametrize("path, param", [
    ("/usage?start=yesterday", "start"),
    ("/usage?end=2025-13-01", "end"),
    ("/usage?start=99999999999999", "start"),
    ("/usage?start=2025-02-01&end=2025-01-31", "end"),
    ("/usage?start=2025-02-01&end=2025-02-01", "end"),
    ("/usage?group_by=user", "group_by"),
    ("/usage?group_by=key&group_by=model", "group_by"),
    ("/usage?limit=5", "limit"),
    ("/usage/requests?limit=1001", "limit"),
    ("/usage/requests?limit=0", "limit"),
    ("/usage/requests?limit=ten", "limit"),
    ("/usage/requests?cursor=not-a-cursor", "cursor"),
    ("/usage/requests?cursor=c2VxOi0x", "cursor"),  # "seq:-1"
    ("/usage/requests?start=2025-01-01", "start"),
])
def test_malformed_usage_queries_are_400_naming_the_param(setup, path, param):
    gw, _, _ = setup
    status, _, body = http("GET", gw.base_url + path, KEY)
    assert status == 400 and body["error"]["param"] == param, body
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"].startswith(f"{param}: ")


def test_usage_needs_a_key(setup):
    gw, _, _ = setup
    status, _, body = http("GET", gw.base_url + "/usage", None)
    assert status == 401 and body["error"]["code"] == "missing_api_key"
