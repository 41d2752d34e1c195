"""Typed OpenAI requests -> engine protos, and the engine's field names -> OpenAI params."""

from __future__ import annotations

from moeserve.engine.v1 import engine_pb2 as pb

from gateway.messages import Message
from gateway.openai_schema import ChatRequest, CompletionRequest, Output, Sampling

ROLES = {"system": pb.ROLE_SYSTEM, "developer": pb.ROLE_DEVELOPER, "user": pb.ROLE_USER,
         "assistant": pb.ROLE_ASSISTANT, "tool": pb.ROLE_TOOL}
TOOL_CHOICE = {"auto": pb.TOOL_CHOICE_AUTO, "none": pb.TOOL_CHOICE_NONE}


def sampling_to_proto(s: Sampling) -> pb.SamplingParameters:
    msg = pb.SamplingParameters(presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                                logit_bias=dict(s.logit_bias), stop=s.stop, stop_token_ids=s.stop_token_ids,
                                ignore_eos=s.ignore_eos)
    for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        value = getattr(s, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def message_to_proto(m: Message) -> pb.ChatMessage:
    return pb.ChatMessage(role=ROLES[m.role], content=m.content, name=m.name, tool_call_id=m.tool_call_id,
                          tool_calls=[pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in m.tool_calls])


def _base(request_id: str, s: Sampling, out: Output, top_logprobs: int | None) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(request_id=request_id, sampling=sampling_to_proto(s), n=s.n,
                             keep_special_tokens=out.keep_special_tokens)
    if top_logprobs is not None:
        msg.logprobs.top_logprobs = top_logprobs
    return msg


def chat_to_proto(req: ChatRequest, request_id: str) -> pb.GenerateRequest:
    msg = _base(request_id, req.sampling, req.output, req.top_logprobs)
    msg.chat.messages.extend(message_to_proto(m) for m in req.messages)
    msg.chat.tools.extend(pb.Tool(name=t.name, description=t.description, parameters_json=t.parameters_json)
                          for t in req.tools)
    msg.chat.tool_choice = TOOL_CHOICE[req.tool_choice]
    return msg


def completion_to_protos(req: CompletionRequest, request_id: str) -> list[pb.GenerateRequest]:
    """One engine request per prompt; ids are `request_id-i`."""
    out = []
    for i, prompt in enumerate(req.prompts):
        msg = _base(f"{request_id}-{i}", req.sampling, req.output, req.logprobs)
        if isinstance(prompt, str):
            msg.prompt = prompt
        else:
            msg.token_ids.ids.extend(prompt)
        out.append(msg)
    return out


def chat_params(req: ChatRequest) -> dict[str, str]:
    """Engine field -> request param, for the engine's INVALID_ARGUMENT details."""
    return {"logprobs": "top_logprobs", "prompt": "messages", "max_tokens": req.max_tokens_param,
            "input": "messages", "token_ids": "messages"}


def completion_params(req: CompletionRequest) -> dict[str, str]:
    return {"token_ids": "prompt", "input": "prompt"}


def prompt_too_long_for(max_tokens: int | None, prompt_len: int, max_model_len: int) -> bool:
    """Whether a known prompt length plus max_tokens overflows the context."""
    return prompt_len >= max_model_len or max_tokens is not None and prompt_len + max_tokens > max_model_len
