"""GET /v1/usage (totals) and GET /v1/usage/requests (the ledger's records, newest first).

An admin key sees every key's usage; any other key only its own. Costs are exact: each
total carries `estimated_cost` as a JSON number (as in `usage` objects) and
`estimated_cost_decimal`, the exact decimal string.

    /v1/usage?start=&end=&group_by=key|model|day     start <= created < end, UTC
    /v1/usage/requests?limit=1..1000&cursor=         cursor: `next_cursor` of the previous page

start and end take a date (2025-01-31, midnight UTC), an ISO 8601 time (naive means UTC)
or unix seconds. Anything else, an unknown or repeated parameter, end not after start,
an unknown group_by, a limit out of range or a cursor this API did not write is 400
naming the parameter.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime

from aiohttp import web

from gateway.errors import invalid, store_unavailable
from gateway.pricing import cost_number
from gateway.state import services
from gateway.store import GroupBy, KeyRecord, StoreUnavailable, UsageQuery, UsageRecord, UsageTotal

MAX_LIMIT, DEFAULT_LIMIT = 1000, 100
MAX_UNIX = 253402300799  # 9999-12-31T23:59:59Z
GROUP_LABEL = {GroupBy.KEY: "key_id", GroupBy.MODEL: "model", GroupBy.DAY: "day"}


def _params(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in request.query.items():
        if name not in allowed:
            raise invalid(name, f"unknown parameter (expected {', '.join(allowed)})", "unknown_parameter")
        if name in out:
            raise invalid(name, "given more than once", "invalid_value")
        out[name] = value
    return out


def parse_time(param: str, text: str) -> datetime:
    """A date, an ISO 8601 time or unix seconds, as an aware UTC datetime."""
    text = text.strip()
    if text.isdigit():
        if int(text) > MAX_UNIX:
            raise invalid(param, f"unix seconds out of range: {text}", "invalid_value")
        return datetime.fromtimestamp(int(text), UTC)
    for candidate in (text, text.replace(" ", "+")):  # a '+' of an offset may arrive as a space
        try:
            t = datetime.fromisoformat(candidate)
        except ValueError:
            continue
        return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    raise invalid(param, f"must be a date (YYYY-MM-DD), an ISO 8601 time or unix seconds, got {text!r}",
                  "invalid_value")


def _scope(key: KeyRecord) -> str | None:
    return None if key.admin else key.id


def _cost(cost) -> dict:
    return {"estimated_cost": cost_number(cost), "estimated_cost_decimal": format(cost.normalize(), "f")}


def _total_json(t: UsageTotal, group_by: GroupBy | None) -> dict:
    out = {GROUP_LABEL[group_by]: t.group} if group_by else {}
    return {**out, "requests": t.requests, "prompt_tokens": t.prompt_tokens,
            "cached_prompt_tokens": t.cached_prompt_tokens, "completion_tokens": t.completion_tokens,
            "reasoning_tokens": t.reasoning_tokens, "total_tokens": t.prompt_tokens + t.completion_tokens,
            **_cost(t.cost)}


def record_json(rec: UsageRecord) -> dict:
    return {"object": "usage.record", "id": rec.id, "request_id": rec.request_id, "key_id": rec.key_id,
            "model": rec.model, "outcome": rec.outcome.value, "prompt_tokens": rec.prompt_tokens,
            "cached_prompt_tokens": rec.cached_prompt_tokens, "completion_tokens": rec.completion_tokens,
            "reasoning_tokens": rec.reasoning_tokens, "total_tokens": rec.prompt_tokens + rec.completion_tokens,
            **_cost(rec.cost), "queue_ms": rec.queue_ms, "ttft_ms": rec.ttft_ms, "total_ms": rec.total_ms,
            "created": int(rec.created_at.timestamp()),
            "created_at": rec.created_at.isoformat(timespec="microseconds").replace("+00:00", "Z")}


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat().replace("+00:00", "Z")


async def usage_totals(request: web.Request) -> web.Response:
    p = _params(request, ("start", "end", "group_by"))
    start = parse_time("start", p["start"]) if "start" in p else None
    end = parse_time("end", p["end"]) if "end" in p else None
    if start is not None and end is not None and end <= start:
        raise invalid("end", f"must be after start ({_iso(start)}), got {_iso(end)}", "invalid_value")
    group_by = None
    if "group_by" in p:
        try:
            group_by = GroupBy(p["group_by"])
        except ValueError:
            raise invalid("group_by", f"must be one of key, model, day, got {p['group_by']!r}",
                          "invalid_value") from None
    query = UsageQuery(start, end, group_by, _scope(request["key"]))
    try:
        totals = await services(request).store.totals(query)
    except StoreUnavailable:
        raise store_unavailable() from None
    return web.json_response({"object": "usage", "start": _iso(start), "end": _iso(end),
                              "group_by": group_by.value if group_by else None,
                              "data": [_total_json(t, group_by) for t in totals]})


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def decode_cursor(text: str) -> int:
    bad = invalid("cursor", "is not a cursor this API returned (pass next_cursor of the previous page)",
                  "invalid_value")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    kind, _, number = raw.partition(":")
    if kind != "seq" or not number.isdigit() or int(number) >= 1 << 63:
        raise bad
    return int(number)


def parse_limit(text: str) -> int:
    if not text.strip().isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise invalid("limit", f"must be an integer from 1 to {MAX_LIMIT}, got {text!r}", "invalid_value")
    return int(text)


async def usage_records(request: web.Request) -> web.Response:
    p = _params(request, ("limit", "cursor"))
    limit = parse_limit(p["limit"]) if "limit" in p else DEFAULT_LIMIT
    before = decode_cursor(p["cursor"]) if "cursor" in p else None
    try:
        rows = await services(request).store.records(_scope(request["key"]), limit + 1, before)
    except StoreUnavailable:
        raise store_unavailable() from None
    page, more = rows[:limit], len(rows) > limit
    return web.json_response({"object": "list", "data": [record_json(r) for r in page], "has_more": more,
                              "next_cursor": encode_cursor(page[-1].seq) if more else None})

