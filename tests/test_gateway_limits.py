"""Budgets and rate limits per key: 429 `insufficient_quota` before the engine once a key
has spent its budget (on SQLite and PostgreSQL, surviving a gateway restart), 429
`rate_limit_exceeded` with Retry-After past its RPM or TPM, and OpenAI's x-ratelimit-*
headers on every answer to a key with limits; the windows themselves on a fake clock."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from gateway.limits import RateLimiter, Window, duration_text
from gateway.store import KeyRecord
from gateway_helpers import KEY
from ledger_helpers import STORES, chat, cost, create_key, http, records, start_gateway, store_url

RESET = re.compile(r"^(\d+ms|\d+(\.\d{1,3})?s|1m0s|0s)$")
REQUEST_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")
TOKEN_HEADERS = ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


def seconds(reset: str) -> float:
    assert RESET.match(reset), reset
    if reset.endswith("ms"):
        return int(reset[:-2]) / 1000
    minutes, _, rest = reset.rpartition("m") if "m" in reset else ("0", "", reset)
    return int(minutes or 0) * 60 + float(rest[:-1])


def limit_headers(headers: dict) -> dict:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-ratelimit-")}


@pytest.fixture(scope="module")
def sqlite_gw():
    url = store_url("sqlite")
    proc = start_gateway(url)
    proc.usage_db = url
    yield proc
    assert proc.stop() == 0


@pytest.mark.parametrize("store", STORES)
def test_key_past_its_budget_gets_insufficient_quota_before_the_engine(store):
    url = store_url(store)
    gw = start_gateway(url)
    try:
        _, _, probe = chat(gw)  # what one request costs here
        one = cost(probe["usage"]["prompt_tokens"], 0, probe["usage"]["completion_tokens"])
        key_id, key = create_key(url, "capped", "--budget", str(one * Decimal("1.5")))
        assert chat(gw, key)[0] == 200  # spent 1 of 1.5
        assert chat(gw, key)[0] == 200  # spent 2 of 1.5: over from now on
        before = records(gw)
        status, headers, body = chat(gw, key)
        assert status == 429 and "Retry-After" not in headers
        assert body == {"error": {
            "message": f"You exceeded your current quota: key {key_id} has spent ${2 * one} of its "
                       f"${one * Decimal('1.5')} budget",
            "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}
        assert records(gw).keys() == before.keys()  # it never reached an engine
        assert sum(Decimal(r["estimated_cost_decimal"]) for r in before.values() if r["key_id"] == key_id) == 2 * one
    finally:
        assert gw.stop() == 0
    restarted = start_gateway(url)  # the spend lives in the store, not in the process
    try:
        assert chat(restarted, key)[0] == 429 and chat(restarted, KEY)[0] == 200
    finally:
        assert restarted.stop() == 0


def test_rpm_limit_counts_every_generation_request_and_sends_headers_on_every_answer(sqlite_gw):
    _, key = create_key(sqlite_gw.usage_db, "two-per-minute", "--rpm", "2")
    other_id, other = create_key(sqlite_gw.usage_db, "also-two", "--rpm", "2")
    status, headers, raw = chat(sqlite_gw, key, stream=True)  # SSE answers carry them too
    h = limit_headers(headers)
    assert status == 200 and raw.endswith(b"data: [DONE]\n\n") and set(h) == set(REQUEST_HEADERS)
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("2", "1")
    assert 59 < seconds(h["x-ratelimit-reset-requests"]) <= 60
    status, headers, body = chat(sqlite_gw, key, model="no-such-model")  # an error answer: counted, with headers
    assert status == 404 and limit_headers(headers)["x-ratelimit-remaining-requests"] == "0"
    status, headers, body = http("GET", sqlite_gw.base_url + "/models", key)  # not generation: not counted
    assert status == 200 and limit_headers(headers)["x-ratelimit-remaining-requests"] == "0"
    status, headers, body = chat(sqlite_gw, key)
    assert status == 429 and 58 <= int(headers["Retry-After"]) <= 60
    assert limit_headers(headers)["x-ratelimit-remaining-requests"] == "0"
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["param"] is None
    assert body["error"]["message"].startswith("Rate limit reached for requests per minute (RPM) on key key_")
    status, headers, _ = chat(sqlite_gw, other)  # limits are per key
    assert status == 200 and limit_headers(headers)["x-ratelimit-remaining-requests"] == "1"


def test_tpm_limit_counts_the_tokens_requests_used(sqlite_gw):
    key_id, key = create_key(sqlite_gw.usage_db, "ten-tokens", "--tpm", "10")
    status, headers, body = chat(sqlite_gw, key, max_tokens=8)
    used = body["usage"]["total_tokens"]
    assert status == 200 and used > 10
    assert limit_headers(headers) == {"x-ratelimit-limit-tokens": "10", "x-ratelimit-remaining-tokens": "10",
                                      "x-ratelimit-reset-tokens": "0s"}
    status, headers, body = chat(sqlite_gw, key)
    h = limit_headers(headers)
    assert status == 429 and set(h) == set(TOKEN_HEADERS) and h["x-ratelimit-remaining-tokens"] == "0"
    assert 59 < seconds(h["x-ratelimit-reset-tokens"]) <= 60 and 58 <= int(headers["Retry-After"]) <= 60
    assert body["error"]["code"] == "rate_limit_exceeded" and f"on key {key_id}: limit 10, used {used}." in \
        body["error"]["message"]


def test_keys_without_limits_get_no_ratelimit_headers(sqlite_gw):
    status, headers, _ = chat(sqlite_gw, KEY)
    assert status == 200 and limit_headers(headers) == {}


# --- the windows on a fake clock ---------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(rpm=None, tpm=None, id_="key_t") -> KeyRecord:
    return KeyRecord(id_, "t", "h", False, datetime.now(UTC), None, rpm, tpm)


@pytest.mark.parametrize("seconds_, text", [
    (0, "0s"), (0.0004, "1ms"), (0.12, "120ms"), (1, "1s"), (6.5, "6.5s"), (59.9984, "59.999s"),
    (59.9991, "1m0s"),  # rounded up: never earlier than the window really empties
    (60, "1m0s"), (360, "6m0s"), (61.25, "1m1.25s")])
def test_durations_are_written_as_openai_writes_them(seconds_, text):
    assert duration_text(seconds_) == text


def test_a_sliding_window_frees_room_entry_by_entry():
    w = Window(10)
    for at, amount in ((0, 4), (10, 4), (20, 2)):
        w.add(at, amount)
    assert w.used == 10 and w.room_in(30, 1) == 30 and w.room_in(30, 5) == 40 and w.reset_in(30) == 50
    w.expire(60)
    assert w.used == 6 and w.room_in(60, 4) == 0


def test_rate_limiter_refuses_then_admits_when_the_window_moves():
    clock = Clock()
    limiter = RateLimiter(clock)
    k = key(rpm=2, tpm=100)
    assert limiter.admit(k).refused is None
    clock.now += 30
    assert limiter.admit(k).refused is None
    limiter.add_tokens(k, 150)
    refused = limiter.admit(k).refused  # both full: the later of the two decides
    assert refused.status == 429 and refused.headers["Retry-After"] == "60" and "(TPM)" in refused.message
    assert refused.headers["x-ratelimit-remaining-tokens"] == refused.headers["x-ratelimit-remaining-requests"] == "0"
    clock.now += 30
    state = limiter.admit(k)  # the first request left; the tokens (added at +30) are still there
    assert state.refused.headers["Retry-After"] == "30" and state.headers["x-ratelimit-remaining-requests"] == "1"
    clock.now += 30
    state = limiter.admit(k)
    assert state.refused is None and state.headers["x-ratelimit-remaining-requests"] == "1"
    assert state.headers["x-ratelimit-remaining-tokens"] == "100"
    one = key(rpm=1, id_="key_one")
    assert limiter.admit(one).refused is None
    clock.now += 0.5
    refused = limiter.admit(one).refused
    assert refused.headers["Retry-After"] == "60" and "(RPM)" in refused.message and "try again in 59.5s" in \
        refused.message
    assert limiter.peek(key(id_="key_free")) == {} and limiter.admit(key(id_="key_free")).headers == {}
