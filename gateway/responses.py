"""Engine deltas -> OpenAI answers: chat.completion(.chunk), text_completion, logprobs, usage.

A `Choice` accumulates one output choice across stream messages; the same deltas make
the streamed chunks and, accumulated, the unary answer, so the two never disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moeserve.engine.v1 import engine_pb2 as pb

from gateway.errors import ApiError, SERVER
from gateway.pricing import Price, cost_number

FINISH = {pb.FINISH_REASON_UNSPECIFIED: None, pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
          pb.FINISH_REASON_TOOL_CALLS: "tool_calls"}
# What vLLM writes for a log probability of -inf, which JSON cannot hold.
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class Job:
    """Identity of one answer, repeated on every chunk."""

    id: str
    created: int
    model: str
    tokens_as_ids: bool = False
    include_usage: bool = False


@dataclass
class Choice:
    started: bool = False
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict] = field(default_factory=dict)
    logprobs: list = field(default_factory=list)
    finish: str | None = None
    text_offset: int = 0  # legacy logprobs: where the next token starts in the choice's text


def finish_reason(d: pb.ChoiceDelta) -> str | None:
    if d.finish_reason == pb.FINISH_REASON_ABORT:
        raise ApiError(503, "the engine aborted the request", SERVER, None, "engine_aborted")
    return FINISH.get(d.finish_reason)


def _lp(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def _token(t: pb.TokenLogprob | pb.TopLogprob, as_ids: bool) -> str:
    return f"token_id:{t.token_id}" if as_ids else t.token


def chat_logprobs(lps, as_ids: bool) -> list[dict]:
    return [{"token": _token(lp, as_ids), "logprob": _lp(lp.logprob), "bytes": list(lp.token_bytes),
             "top_logprobs": [{"token": _token(t, as_ids), "logprob": _lp(t.logprob), "bytes": list(t.token_bytes)}
                              for t in lp.top]} for lp in lps]


def legacy_logprobs(lps, as_ids: bool, choice: Choice) -> dict:
    """OpenAI's Completions shape; text_offset continues from the choice's text so far."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in lps:
        token = _token(lp, as_ids)
        out["tokens"].append(token)
        out["token_logprobs"].append(_lp(lp.logprob))
        top = {_token(t, as_ids): _lp(t.logprob) for t in lp.top}
        top.setdefault(token, _lp(lp.logprob))
        out["top_logprobs"].append(top)
        out["text_offset"].append(choice.text_offset)
        choice.text_offset += len(lp.token)
    return out


def _tool_call_delta(t: pb.ToolCallDelta) -> dict:
    if t.id or t.name:  # a call's first fragment names it
        return {"index": t.index, "id": t.id, "type": "function",
                "function": {"name": t.name, "arguments": t.arguments}}
    return {"index": t.index, "function": {"arguments": t.arguments}}


def merge_tool_calls(choice: Choice, deltas) -> None:
    for t in deltas:
        call = choice.tool_calls.setdefault(t.index, {"id": "", "type": "function",
                                                      "function": {"name": "", "arguments": ""}})
        call["id"] = call["id"] or t.id
        call["function"]["name"] = call["function"]["name"] or t.name
        call["function"]["arguments"] += t.arguments


def chat_chunk_choice(d: pb.ChoiceDelta, choice: Choice, job: Job, want_logprobs: bool) -> dict:
    delta: dict = {}
    if not choice.started:
        choice.started = True
        delta["role"] = "assistant"
        if not d.tool_calls:
            delta["content"] = d.text
    if d.text:
        delta["content"] = d.text
    if d.reasoning:
        delta["reasoning_content"] = d.reasoning
    if d.tool_calls:
        delta["tool_calls"] = [_tool_call_delta(t) for t in d.tool_calls]
    logprobs = {"content": chat_logprobs(d.logprobs, job.tokens_as_ids), "refusal": None} if want_logprobs else None
    return {"index": d.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason(d)}


def accumulate_chat(d: pb.ChoiceDelta, choice: Choice) -> None:
    choice.content.append(d.text)
    choice.reasoning.append(d.reasoning)
    merge_tool_calls(choice, d.tool_calls)
    choice.logprobs.extend(d.logprobs)
    choice.finish = finish_reason(d) or choice.finish


def chat_message_choice(index: int, choice: Choice, job: Job, want_logprobs: bool) -> dict:
    content = "".join(choice.content)
    message = {"role": "assistant", "content": content if content or not choice.tool_calls else None,
               "refusal": None, "reasoning_content": "".join(choice.reasoning) or None}
    if choice.tool_calls:
        message["tool_calls"] = [choice.tool_calls[i] for i in sorted(choice.tool_calls)]
    logprobs = ({"content": chat_logprobs(choice.logprobs, job.tokens_as_ids), "refusal": None}
                if want_logprobs else None)
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": choice.finish}


def head(job: Job, obj: str) -> dict:
    return {"id": job.id, "object": obj, "created": job.created, "model": job.model}


def chunk(job: Job, obj: str, choices: list[dict]) -> dict:
    out = {**head(job, obj), "choices": choices}
    if job.include_usage:
        out["usage"] = None
    return out


def answer(job: Job, obj: str, choices: list[dict], usage: dict) -> dict:
    return {"id": job.id, "object": obj, "created": job.created, "model": job.model, "choices": choices,
            "usage": usage}


def sum_usage(usages: list[pb.Usage]) -> pb.Usage:
    total = pb.Usage()
    for u in usages:
        total.prompt_tokens += u.prompt_tokens
        total.cached_prompt_tokens += u.cached_prompt_tokens
        total.completion_tokens += u.completion_tokens
        total.reasoning_tokens += u.reasoning_tokens
    return total


def usage_json(u: pb.Usage, price: Price) -> dict:
    cost = price.cost(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens, "estimated_cost": cost_number(cost),
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}
