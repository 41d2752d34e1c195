"""What goes into the engine core and what comes out of it, as named types.

The gRPC server converts protos to and from these (`engine/server/convert.py`); the core
never sees a proto.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason
from engine.text.tool_calls import ToolCall


@dataclass(frozen=True)
class EngineRequest:
    """A tokenized request. reasoning_started: the prompt already opened `<think>`."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    parse_reasoning: bool = False
    reasoning_started: bool = False
    parse_tools: bool = False


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    token_bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    token_bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass
class ChoiceDelta:
    """New output of one choice since the last delta; finish_reason set on its last."""

    index: int
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    matched_stop: str = ""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int


@dataclass
class RequestTimings:
    """When the engine process saw a request's phases, in wall-clock nanoseconds
    (`time.time_ns()`, comparable across the server and engine processes); 0 = never.

    queued: added to the scheduler; scheduled: first put in a batch; first_token: the
    first token of any choice sampled; finished: the request ended. prefill_tokens: prompt
    tokens computed (not served from the prefix cache), preempted recomputes included;
    decode_steps: steps after the first token in which the request produced tokens.
    """

    queued_ns: int = 0
    scheduled_ns: int = 0
    first_token_ns: int = 0
    finished_ns: int = 0
    prefill_tokens: int = 0
    decode_steps: int = 0


@dataclass
class RequestOutput:
    """One step's output of a request. `usage` and `timings` are set on the last one, with finished."""

    request_id: str
    choices: list[ChoiceDelta]
    finished: bool = False
    usage: Usage | None = None
    error: Exception | None = None
    prompt: tuple[int, int] | None = None  # (prompt tokens, cached prompt tokens), on every output
    timings: RequestTimings | None = None
