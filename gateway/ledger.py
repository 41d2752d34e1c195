"""The usage ledger at the gateway: counting what a request produced, writing its record
before the answer ends, and keeping track of whether the store can take records.

A request "reached an engine" once the engine admitted it (its first stream message
arrived: the prompt was tokenized and queued); from then on it gets exactly one record.
Its tokens come from the engine's final `usage` when the stream ended normally, else
from what arrived: the prompt counts of the first message plus the token ids of every
delta received (the engine drops what it produced after the cancel, at most a step).

`Ledger.commit` is awaited before the answer's last bytes go out (before `data: [DONE]`,
before a JSON body): when it fails the client gets an error instead of an unbilled answer.
`Ledger.commit_later` is for requests whose client is gone: the write runs on its own and
`close` waits for it. A watcher pings the store (every 0.5 s, 0.2 s while it is down), so
`healthy` notices a dead store without traffic and comes back with it; requests are refused
with 503 while it is false, before they reach an engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from moeserve.engine.v1 import engine_pb2 as pb

from gateway.keys import KeyDirectory
from gateway.limits import RateLimiter
from gateway.pricing import Price
from gateway.store import KeyRecord, Outcome, StoreUnavailable, UsageRecord, UsageStore

log = logging.getLogger(__name__)
PING_HEALTHY, PING_DOWN = 0.5, 0.2
FINISH = {pb.FINISH_REASON_STOP: Outcome.STOP, pb.FINISH_REASON_LENGTH: Outcome.LENGTH,
          pb.FINISH_REASON_TOOL_CALLS: Outcome.TOOL_CALLS}


@dataclass
class _Call:
    prompt: int = 0
    cached: int = 0
    completion: int = 0
    reasoning: int = 0
    final: pb.Usage | None = None
    last_token_at: float | None = None


@dataclass
class Tally:
    """What the engine calls of one request produced so far, from their stream messages."""

    start: float  # perf_counter when the request was sent to the engines
    calls: list[_Call]
    first_message_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finishes: set[int] = field(default_factory=set)
    recorded: bool = False
    token_gaps: list[float] = field(default_factory=list)  # seconds between a call's token-carrying messages

    @classmethod
    def begin(cls, start: float, n_calls: int) -> Tally:
        return cls(start, [_Call() for _ in range(n_calls)])

    def observe(self, i: int, msg: pb.GenerateStreamResponse) -> None:
        call = self.calls[i]
        if any(d.token_ids for d in msg.choices):
            now = time.perf_counter()
            if call.last_token_at is not None:
                self.token_gaps.append(now - call.last_token_at)
            call.last_token_at = now
        if msg.HasField("prompt"):
            call.prompt, call.cached = msg.prompt.prompt_tokens, msg.prompt.cached_prompt_tokens
        for d in msg.choices:
            n = len(d.token_ids)
            call.completion += n
            if d.reasoning and not d.text:  # best effort: a delta crossing </think> counts as content
                call.reasoning += n
            if n and self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            if d.finish_reason:
                self.finishes.add(d.finish_reason)
        if msg.HasField("usage"):
            call.final = msg.usage

    def usage(self) -> pb.Usage:
        total = pb.Usage()
        for c in self.calls:
            u = c.final or pb.Usage(prompt_tokens=c.prompt, cached_prompt_tokens=c.cached,
                                    completion_tokens=c.completion, reasoning_tokens=c.reasoning)
            total.prompt_tokens += u.prompt_tokens
            total.cached_prompt_tokens += u.cached_prompt_tokens
            total.completion_tokens += u.completion_tokens
            total.reasoning_tokens += u.reasoning_tokens
        return total

    def finished_outcome(self) -> Outcome:
        """Of a request that ended normally: length if any choice ran out, else tool_calls if
        any called a tool, else stop."""
        for reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_TOOL_CALLS):
            if reason in self.finishes:
                return FINISH[reason]
        return Outcome.STOP

    def record(self, job_id: str, request_id: str, key_id: str, model: str, price: Price,
               outcome: Outcome) -> UsageRecord:
        u, now = self.usage(), time.perf_counter()

        def ms(t: float) -> float:
            return round((t - self.start) * 1000, 3)
        return UsageRecord(job_id, request_id, key_id, model, u.prompt_tokens, u.cached_prompt_tokens,
                           u.completion_tokens, u.reasoning_tokens,
                           price.cost(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens), outcome,
                           ms(self.first_message_at), None if self.first_token_at is None else ms(self.first_token_at),
                           ms(now), datetime.now(UTC))


class Ledger:
    def __init__(self, store: UsageStore, keys: KeyDirectory, limiter: RateLimiter) -> None:
        self.store, self.keys, self.limiter = store, keys, limiter
        self._background: set[asyncio.Task] = set()
        self._watcher: asyncio.Task | None = None

    @property
    def healthy(self) -> bool:
        return self.store.healthy

    async def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch(), name="usage store watcher")

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(PING_HEALTHY if self.store.healthy else PING_DOWN)
            was = self.store.healthy
            try:
                await self.store.ping()
            except StoreUnavailable:
                continue
            if not was:
                log.info("usage store is back")

    async def commit(self, key: KeyRecord, record: UsageRecord) -> None:
        """Writes the record (durable on return); StoreUnavailable when it could not be.

        A caller cancelled meanwhile (its client left) does not stop the write."""
        await asyncio.shield(self._spawn(key, record))

    def commit_later(self, key: KeyRecord, record: UsageRecord) -> None:
        self._spawn(key, record)

    def _spawn(self, key: KeyRecord, record: UsageRecord) -> asyncio.Task:
        task = asyncio.create_task(self._write(key, record))
        self._background.add(task)
        task.add_done_callback(self._written)
        return task

    def _written(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("usage record not written: %s", task.exception())

    async def _write(self, key: KeyRecord, record: UsageRecord) -> Decimal | None:
        spent = await self.store.append(record)
        if spent is not None:
            self.keys.note_spent(key.id, spent)
        self.limiter.add_tokens(key, record.prompt_tokens + record.completion_tokens)
        return spent
