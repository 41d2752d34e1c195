"""Per-request sampling parameters, validated once at the edge.

Semantics follow the OpenAI API and vLLM's extensions: temperature 0 is greedy; top_k -1
(or 0) and top_p 1 and min_p 0 disable those filters; presence/frequency penalties apply
to generated tokens, the repetition penalty to prompt and generated tokens; logprobs None
returns none, k returns the sampled token's logprob and k alternatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.errors import InvalidRequest

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: up to the end of the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
               f"must be at least 1, got {self.max_tokens}")
        _check(self.n >= 1, "n", f"must be at least 1, got {self.n}")
        _check(math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
               f"must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= -1, "top_k", f"must be -1 (off) or positive, got {self.top_k}")
        _check(0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.repetition_penalty > 0, "repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        _check(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
               f"must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        _check(all(-100 <= b <= 100 for _, b in self.logit_bias), "logit_bias", "values must be in [-100, 100]")
        _check(all(s for s in self.stop), "stop", "stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(name, message)
