"""Requests-per-minute and tokens-per-minute limits per key, and OpenAI's rate-limit headers.

Each limited key has a sliding one-minute window per limit: what was counted in the last
60 s, entry by entry, each leaving the window 60 s after it came. The windows live in
this gateway process's memory: with several gateways a key gets each limit per gateway.

- Requests: a generation request is admitted while fewer than `rpm` were admitted in the
  window, and counts at admission (refused requests do not count).
- Tokens: what requests actually used (prompt + completion tokens, as billed) counts when
  its ledger record is written; a request is admitted while the window holds fewer than
  `tpm` tokens. The gateway does not tokenize, so it never guesses a request's size in
  advance; the price is that requests admitted together may overshoot `tpm` by what they
  use, and the next ones wait until the window has room again.

Headers, on every answer to a key with limits (success or not), per limit it has:
`x-ratelimit-limit-*`, `x-ratelimit-remaining-*` (at admission) and
`x-ratelimit-reset-*`, the time until the window is empty again, written as OpenAI writes
it ("1s", "6m0s", "120ms"). A refusal is 429 `rate_limit_exceeded` with `Retry-After`
(whole seconds, rounded up) saying when the window will have room.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

from gateway.errors import RATE_LIMIT, ApiError
from gateway.store import KeyRecord

WINDOW = 60.0


def duration_text(seconds: float) -> str:
    """OpenAI's (Go's) duration format: "120ms", "6.5s", "1m0s"."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms // 1000}.{ms % 1000:03d}".rstrip("0").rstrip(".") + "s"
    return f"{minutes}m{secs}" if minutes else secs


class Window:
    """Amounts counted over the last WINDOW seconds."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: deque[tuple[float, int]] = deque()
        self.used = 0

    def expire(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - WINDOW:
            self.used -= self.entries.popleft()[1]

    def add(self, now: float, amount: int) -> None:
        if amount > 0:
            self.entries.append((now, amount))
            self.used += amount

    def room_in(self, now: float, need: int) -> float:
        """Seconds until used + need <= limit (0 if already)."""
        excess, wait = self.used + need - self.limit, 0.0
        for at, amount in self.entries:
            if excess <= 0:
                break
            excess, wait = excess - amount, at + WINDOW - now
        return wait

    def reset_in(self, now: float) -> float:
        return self.entries[-1][0] + WINDOW - now if self.entries else 0.0


@dataclass(frozen=True)
class LimitState:
    headers: dict[str, str]
    refused: ApiError | None = None


class _KeyWindows:
    def __init__(self, rpm: int | None, tpm: int | None) -> None:
        self.rpm, self.tpm = rpm, tpm
        self.requests = Window(rpm) if rpm else None
        self.tokens = Window(tpm) if tpm else None


class RateLimiter:
    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._keys: dict[str, _KeyWindows] = {}

    def _windows(self, key: KeyRecord) -> _KeyWindows | None:
        if not key.rpm and not key.tpm:
            return None
        w = self._keys.get(key.id)
        if w is None or (w.rpm, w.tpm) != (key.rpm, key.tpm):  # new key, or its limits changed
            w = self._keys[key.id] = _KeyWindows(key.rpm, key.tpm)
        return w

    def admit(self, key: KeyRecord) -> LimitState:
        """Counts a generation request, or refuses it (`refused` set); headers either way."""
        w, now = self._windows(key), self.clock()
        if w is None:
            return LimitState({})
        refusals = []
        for name, window, need, unit in (("requests", w.requests, 1, "requests per minute (RPM)"),
                                         ("tokens", w.tokens, 1, "tokens per minute (TPM)")):
            if window is not None:
                window.expire(now)
                if window.used + need > window.limit:
                    refusals.append((window.room_in(now, need), name, unit, window))
        if not refusals and w.requests is not None:
            w.requests.add(now, 1)
        headers = self._headers(w, now)
        if not refusals:
            return LimitState(headers)
        wait, name, unit, window = max(refusals, key=lambda r: r[0])
        retry = max(1, math.ceil(wait))
        message = (f"Rate limit reached for {unit} on key {key.id}: limit {window.limit}, used {window.used}. "
                   f"Please try again in {duration_text(wait)}.")
        return LimitState(headers, ApiError(429, message, RATE_LIMIT, None, "rate_limit_exceeded",
                                            {**headers, "Retry-After": str(retry)}))

    def peek(self, key: KeyRecord) -> dict[str, str]:
        """The headers for an answer that is not a generation request (nothing counted)."""
        w, now = self._windows(key), self.clock()
        return {} if w is None else self._headers(w, now)

    def add_tokens(self, key: KeyRecord, tokens: int) -> None:
        w = self._windows(key)
        if w is not None and w.tokens is not None:
            w.tokens.add(self.clock(), tokens)

    @staticmethod
    def _headers(w: _KeyWindows, now: float) -> dict[str, str]:
        out = {}
        for name, window in (("requests", w.requests), ("tokens", w.tokens)):
            if window is not None:
                window.expire(now)
                out[f"x-ratelimit-limit-{name}"] = str(window.limit)
                out[f"x-ratelimit-remaining-{name}"] = str(max(0, window.limit - window.used))
                out[f"x-ratelimit-reset-{name}"] = duration_text(window.reset_in(now))
        return out
