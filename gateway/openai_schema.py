"""OpenAI request bodies -> typed requests. Every field is handled or refused.

Chat Completions and (legacy) Completions as in OpenAI's API reference, plus the
extensions vLLM names: top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids,
skip_special_tokens, return_tokens_as_token_ids. Known fields we cannot honour yet are
refused with 400 "not supported yet" (`unsupported_value`) unless null or at their no-op
value; unknown fields are refused with 400 `unknown_parameter`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import invalid, unsupported
from gateway.messages import Message, Tool, read_messages, read_tool_choice, read_tools
from gateway.validate import Fields, check_range, item_param, kind

MAX_N = 128
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20
MAX_LEGACY_LOGPROBS = 5
MAX_PROMPTS = 64
UINT32 = (1 << 32) - 1

# Chat fields of the OpenAI API that need what the engine does not have yet.
CHAT_NOT_YET = {
    "audio": "audio (audio output)", "prediction": "prediction (predicted outputs)",
    "web_search_options": "web_search_options (web search)", "functions": "functions (deprecated; use tools)",
    "function_call": "function_call (deprecated; use tool_choice)", "reasoning_effort": "reasoning_effort",
    "verbosity": "verbosity", "metadata": "metadata (completions are not stored)",
    "prompt_cache_key": "prompt_cache_key (prefix caching is automatic)",
    "prompt_cache_retention": "prompt_cache_retention (prefix caching is automatic)",
    "prompt_cache_options": "prompt_cache_options (prefix caching is automatic)", "moderation": "moderation",
}


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float | None
    logit_bias: tuple[tuple[int, float], ...]
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    n: int


@dataclass(frozen=True)
class Output:
    """How the answer is returned, common to both endpoints."""

    stream: bool
    include_usage: bool
    tokens_as_ids: bool  # return_tokens_as_token_ids
    keep_special_tokens: bool  # not skip_special_tokens
    user: str | None


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]
    tools: tuple[Tool, ...]
    tool_choice: str  # "auto" or "none"
    sampling: Sampling
    output: Output
    top_logprobs: int | None  # None: logprobs off
    max_tokens_param: str  # the name the client used, for errors


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: tuple[str | tuple[int, ...], ...]
    echo: bool
    sampling: Sampling
    output: Output
    logprobs: int | None


def _stop(f: Fields) -> tuple[str, ...]:
    value = f.raw("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid("stop", f"must be a string or an array of strings, got {kind(value)}", "invalid_type")
    if len(items) > MAX_STOP or any(s == "" for s in items):
        raise invalid("stop", f"must hold at most {MAX_STOP} non-empty strings", "invalid_value")
    return tuple(items)


def _logit_bias(f: Fields) -> tuple[tuple[int, float], ...]:
    bias = f.object("logit_bias")
    if bias is None:
        return ()
    out = []
    for key in bias.obj:
        if not (key.isascii() and key.isdigit()) or int(key) > UINT32:
            raise invalid("logit_bias", f"keys must be token ids (non-negative integers), got {key!r}", "invalid_value")
        out.append((int(key), bias.number(key, -100, 100)))
    return tuple(sorted(out))


def _token_ids(value: object, param: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise invalid(param, "must be an array of token ids (integers)", "invalid_type")
    for i, t in enumerate(value):
        check_range(t, 0, UINT32, item_param(param, i))
    return tuple(value)


def _seed(f: Fields) -> int | None:
    seed = f.integer("seed", -(1 << 63), (1 << 64) - 1)
    return None if seed is None else seed % (1 << 64)  # negative int64 seeds, as two's complement


def read_sampling(f: Fields, max_tokens: int | None) -> Sampling:
    top_k = f.integer("top_k", -1, UINT32 >> 1)
    stop_ids = f.raw("stop_token_ids")
    return Sampling(
        max_tokens=max_tokens, temperature=f.number("temperature", 0, 2), top_p=f.number("top_p", 0, 1, open_lo=True),
        top_k=None if top_k in (None, 0, -1) else top_k, min_p=f.number("min_p", 0, 1),
        presence_penalty=f.number("presence_penalty", -2, 2, 0.0),
        frequency_penalty=f.number("frequency_penalty", -2, 2, 0.0),
        repetition_penalty=f.number("repetition_penalty", 0, 2, open_lo=True), logit_bias=_logit_bias(f),
        seed=_seed(f), stop=_stop(f),
        stop_token_ids=() if stop_ids is None else _token_ids(stop_ids, "stop_token_ids"),
        ignore_eos=f.boolean("ignore_eos"), n=f.integer("n", 1, MAX_N, 1))


def read_output(f: Fields) -> Output:
    stream = f.boolean("stream")
    options = f.object("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options", "is only allowed when stream is true")
        include_usage = options.boolean("include_usage")
        options.only("include_obfuscation", (False,), "include_obfuscation: true")
        options.done()
    return Output(stream, include_usage, f.boolean("return_tokens_as_token_ids"),
                  not f.boolean("skip_special_tokens", True), f.string("user"))


def _chat_max_tokens(f: Fields) -> tuple[int | None, str]:
    legacy = f.integer("max_tokens", 1, UINT32)
    new = f.integer("max_completion_tokens", 1, UINT32)
    if legacy is not None and new is not None and legacy != new:
        raise invalid("max_tokens", "contradicts max_completion_tokens; give one of them")
    return (new, "max_completion_tokens") if new is not None else (legacy, "max_tokens")


def _chat_refusals(f: Fields) -> None:
    f.refuse(CHAT_NOT_YET)
    f.only("store", (False,), "store: true (completions are not stored)")
    f.only("parallel_tool_calls", (True,), "parallel_tool_calls: false")
    f.only("service_tier", ("auto", "default"), "service_tier other than auto or default")
    f.only("modalities", (["text"],), "modalities other than [\"text\"]")
    response_format = f.object("response_format")
    if response_format is not None:
        fmt = response_format.string("type", required=True)
        if fmt in ("json_object", "json_schema"):
            raise unsupported("response_format", f"response_format {fmt}")
        if fmt != "text":
            raise invalid("response_format.type", f"must be text, json_object or json_schema, got {fmt!r}")
        response_format.done()


def parse_chat(body: object) -> ChatRequest:
    f = Fields(body)
    model = f.string("model", required=True, non_empty=True)
    messages = read_messages(f.array("messages", required=True, non_empty=True))
    tools = read_tools(f.array("tools"))
    tool_choice = read_tool_choice(f.raw("tool_choice"))
    logprobs = f.boolean("logprobs")
    top = f.integer("top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise invalid("top_logprobs", "requires logprobs: true")
    max_tokens, max_param = _chat_max_tokens(f)
    sampling, output = read_sampling(f, max_tokens), read_output(f)
    f.string("safety_identifier")  # an end-user id like `user`: accepted, logged
    _chat_refusals(f)
    f.done()
    return ChatRequest(model, messages, tools, tool_choice, sampling, output,
                       (top or 0) if logprobs else None, max_param)


def _prompts(value: object) -> tuple[str | tuple[int, ...], ...]:
    if isinstance(value, str):
        items: list = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        items = [value]
    elif isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        items = value
    else:
        raise invalid("prompt", "must be a string, an array of strings, an array of token ids or an array of "
                                f"such arrays, got {kind(value)}", "invalid_type")
    if len(items) > MAX_PROMPTS:
        raise invalid("prompt", f"at most {MAX_PROMPTS} prompts per request", "invalid_value")
    out = []
    for i, p in enumerate(items):
        param = "prompt" if len(items) == 1 else item_param("prompt", i)
        if p == "" or p == []:
            raise invalid(param, "must not be empty", "invalid_value")
        out.append(p if isinstance(p, str) else _token_ids(p, param))
    return tuple(out)


def parse_completion(body: object) -> CompletionRequest:
    f = Fields(body)
    model = f.string("model", required=True, non_empty=True)
    if not f.has("prompt"):
        f.raw("prompt")
        raise invalid("prompt", "is required", "missing_required_parameter")
    prompts = _prompts(f.raw("prompt"))
    echo = f.boolean("echo")
    logprobs = f.integer("logprobs", 0, MAX_LEGACY_LOGPROBS)
    sampling, output = read_sampling(f, f.integer("max_tokens", 1, UINT32, 16)), read_output(f)
    best_of = f.integer("best_of", 1, MAX_N)
    if best_of is not None and best_of != sampling.n:
        if best_of < sampling.n:
            raise invalid("best_of", f"must be at least n ({sampling.n})", "invalid_value")
        raise unsupported("best_of", "best_of greater than n")
    f.only("suffix", (), "suffix")
    if echo and any(not isinstance(p, str) for p in prompts):
        raise unsupported("echo", "echo with token-id prompts")
    if echo and logprobs is not None:
        raise unsupported("echo", "echo with logprobs (prompt logprobs)")
    if len(prompts) * sampling.n > MAX_N:
        raise invalid("n", f"prompts x n must be at most {MAX_N}", "invalid_value")
    f.done()
    return CompletionRequest(model, prompts, echo, sampling, output, logprobs)
