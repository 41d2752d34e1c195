"""What the server process sees of one request, for metrics and traces.

`RequestRecord` follows a request from the moment its RPC arrives until its stream ends
(finished, cancelled, rejected or failed). Times are wall-clock nanoseconds
(`time.time_ns()`) so that they line up with the engine process's `RequestTimings`,
which the last output carries.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.async_engine import EngineDraining
from engine.errors import InvalidRequest, QueueFull
from engine.request import RequestOutput, RequestTimings, Usage
from engine.sequence import FinishReason


class Outcome(enum.StrEnum):
    """How a request ended, as the metrics count it."""

    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CANCELLED = "cancelled"  # the client cancelled the RPC or its deadline passed
    REJECTED = "rejected"  # invalid input, a full queue or a draining engine: never reached the engine loop
    ERROR = "error"  # the engine failed while the request ran


@dataclass
class RequestRecord:
    request_id: str = ""
    received_ns: int = field(default_factory=time.time_ns)
    first_token_ns: int = 0
    last_token_ns: int = 0
    ended_ns: int = 0
    token_gaps: list[float] = field(default_factory=list)  # seconds between outputs that carried tokens
    reasons: set[FinishReason] = field(default_factory=set)
    outcome: Outcome | None = None
    usage: Usage | None = None
    timings: RequestTimings | None = None

    def on_output(self, out: RequestOutput) -> None:
        now = time.time_ns()
        if any(d.token_ids for d in out.choices):
            if self.first_token_ns:
                self.token_gaps.append((now - self.last_token_ns) / 1e9)
            else:
                self.first_token_ns = now
            self.last_token_ns = now
        self.reasons.update(d.finish_reason for d in out.choices if d.finish_reason is not None)
        if out.finished:
            self.usage, self.timings = out.usage, out.timings

    def on_error(self, exc: BaseException) -> None:
        self.outcome = Outcome.REJECTED if isinstance(exc, (InvalidRequest, QueueFull, EngineDraining)) else Outcome.ERROR

    def end(self) -> None:
        """Called once, however the stream ended; an unfinished stream was cancelled."""
        self.ended_ns = time.time_ns()
        if self.outcome is None:
            self.outcome = self._finished_outcome() if self.usage is not None else Outcome.CANCELLED

    def _finished_outcome(self) -> Outcome:
        for reason in (FinishReason.LENGTH, FinishReason.TOOL_CALLS):
            if reason in self.reasons:
                return Outcome(reason.value)
        return Outcome.CANCELLED if FinishReason.ABORT in self.reasons else Outcome.STOP

    @property
    def ttft(self) -> float | None:
        return (self.first_token_ns - self.received_ns) / 1e9 if self.first_token_ns else None

    @property
    def duration(self) -> float:
        return (self.ended_ns - self.received_ns) / 1e9
