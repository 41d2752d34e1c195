"""One generated sequence (a choice of a request): its tokens and scheduling state.

The scheduler and KV manager read and move these; the engine core appends sampled tokens.
A request with n > 1 owns n sequences that share the prompt.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    ABORT = "abort"


@dataclass(eq=False)
class Sequence:
    """seq_id is unique in the engine; `group` names the request, `index` the choice.

    num_computed_tokens counts tokens whose KV is in the cache: prompt chunks, then one per
    decode step. Preemption resets it to 0 and the tokens are recomputed on resumption.
    """

    seq_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    group: str = ""
    index: int = 0
    arrival: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = -1  # prefix-cache hits at first admission; -1 until admitted
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def token_ids(self, start: int = 0, stop: int | None = None) -> list[int]:
        n = len(self.prompt_ids)
        stop = self.num_tokens if stop is None else stop
        if stop <= n:
            return self.prompt_ids[start:stop]
        if start >= n:
            return self.output_ids[start - n: stop - n]
        return self.prompt_ids[start:] + self.output_ids[: stop - n]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
