"""Proto <-> engine types. The only place that knows both."""

from __future__ import annotations

import json
import uuid

from moeserve.engine.v1 import engine_pb2 as pb

from engine.errors import InvalidRequest
from engine.request import ChoiceDelta, EngineRequest, RequestOutput, TokenLogprob, Usage
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason
from engine.tokenizer import ChatTemplateError, Tokenizer

ROLES = {pb.ROLE_SYSTEM: "system", pb.ROLE_DEVELOPER: "developer", pb.ROLE_USER: "user",
         pb.ROLE_ASSISTANT: "assistant", pb.ROLE_TOOL: "tool"}
FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, FinishReason.STOP: pb.FINISH_REASON_STOP,
          FinishReason.LENGTH: pb.FINISH_REASON_LENGTH, FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
          FinishReason.ABORT: pb.FINISH_REASON_ABORT}
THINK_OPEN = "<think>"


def sampling_from_proto(msg: pb.GenerateRequest) -> SamplingParams:
    s = msg.sampling
    opt = lambda name, default: getattr(s, name) if s.HasField(name) else default  # noqa: E731
    return SamplingParams(
        max_tokens=opt("max_tokens", None), temperature=opt("temperature", 1.0), top_p=opt("top_p", 1.0),
        top_k=opt("top_k", -1), min_p=opt("min_p", 0.0), presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty, repetition_penalty=opt("repetition_penalty", 1.0),
        logit_bias=tuple(sorted(s.logit_bias.items())), seed=opt("seed", None), stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos,
        logprobs=msg.logprobs.top_logprobs if msg.HasField("logprobs") else None,
        n=msg.n or 1, skip_special_tokens=not msg.keep_special_tokens)


def _messages(chat: pb.ChatInput) -> list[dict]:
    if not chat.messages:
        raise InvalidRequest("messages", "must not be empty")
    out = []
    for i, m in enumerate(chat.messages):
        if m.role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role", "unknown role (expected system, developer, user, assistant or tool)")
        msg: dict = {"role": ROLES[m.role], "content": m.content}
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    return out


def _tools(chat: pb.ChatInput) -> list[dict] | None:
    if not chat.tools or chat.tool_choice == pb.TOOL_CHOICE_NONE:
        return None
    tools = []
    for i, t in enumerate(chat.tools):
        try:
            params = json.loads(t.parameters_json) if t.parameters_json else {"type": "object", "properties": {}}
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"tools[{i}].parameters", f"is not valid JSON ({exc})") from None
        tools.append({"type": "function", "function": {"name": t.name, "description": t.description,
                                                       "parameters": params}})
    return tools


def request_from_proto(msg: pb.GenerateRequest, tokenizer: Tokenizer) -> EngineRequest:
    params = sampling_from_proto(msg)
    rid = msg.request_id or f"req-{uuid.uuid4().hex}"
    kind = msg.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("input", "one of chat, prompt or token_ids is required")
    if kind == "token_ids":
        return EngineRequest(rid, list(msg.token_ids.ids), params)
    if kind == "prompt":
        if not msg.prompt:
            raise InvalidRequest("prompt", "must not be empty")
        return EngineRequest(rid, tokenizer.encode(msg.prompt, add_bos=True), params)
    tools, messages, caps = _tools(msg.chat), _messages(msg.chat), tokenizer.capabilities
    if not caps.tools:
        _refuse_tools(tools, messages)
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise InvalidRequest("messages", str(exc)) from None
    return EngineRequest(rid, tokenizer.encode(text), params, parse_reasoning=caps.reasoning,
                         reasoning_started=caps.reasoning and text.rstrip().endswith(THINK_OPEN),
                         parse_tools=tools is not None)


def _refuse_tools(tools: list[dict] | None, messages: list[dict]) -> None:
    """For a checkpoint without tools (Tokenizer.capabilities): its template would drop them."""
    why = "this model does not support tools (its chat template or tokenizer lacks DeepSeek's tool-call format)"
    if tools is not None:
        raise InvalidRequest("tools", why)
    for i, m in enumerate(messages):
        if m.get("tool_calls") or m["role"] == "tool":
            raise InvalidRequest(f"messages[{i}]", why)


def _logprob(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, token=lp.token, token_bytes=lp.token_bytes, logprob=lp.logprob,
                           top=[pb.TopLogprob(token_id=t.token_id, token=t.token, token_bytes=t.token_bytes,
                                              logprob=t.logprob) for t in lp.top])


def usage_to_proto(u: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=u.prompt_tokens, cached_prompt_tokens=u.cached_prompt_tokens,
                    completion_tokens=u.completion_tokens, reasoning_tokens=u.reasoning_tokens)


def delta_to_proto(d: ChoiceDelta) -> pb.ChoiceDelta:
    return pb.ChoiceDelta(
        index=d.index, text=d.text, reasoning=d.reasoning, token_ids=d.token_ids,
        tool_calls=[pb.ToolCallDelta(index=c.index, id=c.id, name=c.name, arguments=c.arguments) for c in d.tool_calls],
        logprobs=[_logprob(lp) for lp in d.logprobs], finish_reason=FINISH[d.finish_reason],
        matched_stop=d.matched_stop)


def stream_to_proto(out: RequestOutput, first: bool) -> pb.GenerateStreamResponse:
    msg = pb.GenerateStreamResponse(request_id=out.request_id, choices=[delta_to_proto(d) for d in out.choices])
    if out.usage is not None:
        msg.usage.CopyFrom(usage_to_proto(out.usage))
    if first and out.prompt is not None:
        msg.prompt.prompt_tokens, msg.prompt.cached_prompt_tokens = out.prompt
    return msg


class ResponseBuilder:
    """Accumulates a request's deltas into the unary GenerateResponse."""

    def __init__(self, request_id: str, n: int) -> None:
        self.msg = pb.GenerateResponse(request_id=request_id, choices=[pb.Choice(index=i) for i in range(n)])

    def add(self, out: RequestOutput) -> None:
        for d in out.choices:
            c = self.msg.choices[d.index]
            c.text += d.text
            c.reasoning += d.reasoning
            c.token_ids.extend(d.token_ids)
            c.logprobs.extend(_logprob(lp) for lp in d.logprobs)
            c.tool_calls.extend(pb.ToolCall(id=t.id, name=t.name, arguments=t.arguments) for t in d.tool_calls)
            if d.finish_reason is not None:
                c.finish_reason, c.matched_stop = FINISH[d.finish_reason], d.matched_stop
        if out.usage is not None:
            self.msg.usage.CopyFrom(usage_to_proto(out.usage))
