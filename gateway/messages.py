"""Chat messages, tools and tool_choice of a Chat Completions request.

Roles system, developer, user, assistant and tool. Content is a string or an array of
text parts, which are joined with newlines (the proto carries one string). Assistant
turns may carry tool calls; their `reasoning_content` is accepted and dropped, as R1's
chat template drops the reasoning of earlier turns.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from gateway.errors import invalid, unsupported
from gateway.validate import Fields, item_param, kind

ROLES = ("system", "developer", "user", "assistant", "tool")
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    name: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters_json: str  # JSON Schema as text; "" means no arguments


def _content(f: Fields, required: bool, allowed_parts: tuple[str, ...] = ("text",)) -> str | None:
    value, param = f.raw("content"), f.param("content")
    if value is None:
        if required:
            raise invalid(param, "is required", "missing_required_parameter")
        return None
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid(param, f"must be a string or an array of content parts, got {kind(value)}", "invalid_type")
    texts = []
    for i, part in enumerate(value):
        p = Fields(part, item_param(param, i))
        part_type = p.string("type", required=True)
        if part_type not in allowed_parts:
            if part_type in ("image_url", "input_audio", "file", "refusal"):
                raise unsupported(p.param("type"), f"content part type {part_type!r}")
            raise invalid(p.param("type"), f"must be one of {', '.join(allowed_parts)}, got {part_type!r}")
        texts.append(p.string(part_type, required=True))
        p.done()
    return "\n".join(texts)


def _tool_calls(f: Fields) -> tuple[ToolCall, ...]:
    calls = f.array("tool_calls") or []
    out = []
    for i, raw in enumerate(calls):
        c = Fields(raw, item_param(f.param("tool_calls"), i))
        call_id = c.string("id", required=True)
        if c.string("type", required=True) != "function":
            raise unsupported(c.param("type"), "a tool call type other than function")
        fn = c.object("function")
        if fn is None:
            raise invalid(c.param("function"), "is required", "missing_required_parameter")
        out.append(ToolCall(call_id, fn.string("name", required=True), fn.string("arguments", required=True)))
        fn.done()
        c.done()
    return tuple(out)


def _message(raw: object, i: int) -> Message:
    f = Fields(raw, item_param("messages", i))
    role = f.string("role", required=True)
    if role == "function":
        raise unsupported(f.param("role"), "the deprecated role 'function' (use 'tool')")
    if role not in ROLES:
        raise invalid(f.param("role"), f"must be one of {', '.join(ROLES)}, got {role!r}", "invalid_value")
    name = f.string("name") or ""
    if role == "assistant":
        content = _content(f, False, ("text", "refusal"))
        calls = _tool_calls(f)
        f.raw("reasoning_content")  # dropped: the template drops earlier reasoning
        f.only("refusal", (), "refusal in an assistant message")
        f.refuse({"audio": "audio in an assistant message", "function_call": "the deprecated function_call"})
        if content is None and not calls:
            raise invalid(f.param("content"), "is required unless tool_calls is given", "missing_required_parameter")
        f.done()
        return Message(role, content or "", name, calls)
    content = _content(f, True)
    tool_call_id = f.string("tool_call_id", required=True) if role == "tool" else ""
    f.done()
    return Message(role, content, name, (), tool_call_id)


def read_messages(messages: list) -> tuple[Message, ...]:
    return tuple(_message(m, i) for i, m in enumerate(messages))


def _tool(raw: object, i: int) -> Tool:
    f = Fields(raw, item_param("tools", i))
    tool_type = f.string("type", required=True)
    if tool_type != "function":
        raise unsupported(f.param("type"), f"tool type {tool_type!r} (only function)")
    fn = f.object("function")
    if fn is None:
        raise invalid(f.param("function"), "is required", "missing_required_parameter")
    name = fn.string("name", required=True)
    if not FUNCTION_NAME.match(name):
        raise invalid(fn.param("name"), "must be 1-64 letters, digits, '_', '-', '.' or ':'", "invalid_value")
    description = fn.string("description") or ""
    params = fn.object("parameters")
    fn.only("strict", (False,), "strict: true (constrained decoding)")
    fn.done()
    f.done()
    return Tool(name, description, json.dumps(params.obj) if params is not None else "")


def read_tools(tools: list | None) -> tuple[Tool, ...]:
    out = tuple(_tool(t, i) for i, t in enumerate(tools or []))
    if len({t.name for t in out}) != len(out):
        raise invalid("tools", "function names must be unique", "invalid_value")
    return out


def read_tool_choice(value: object) -> str:
    if value is None or value in ("auto", "none"):
        return value or "auto"
    if value == "required":
        raise unsupported("tool_choice", "tool_choice 'required' (until constrained decoding exists)")
    if isinstance(value, dict):
        raise unsupported("tool_choice", "a named or allowed-tools tool_choice (until constrained decoding exists)")
    raise invalid("tool_choice", f"must be 'auto', 'none', 'required' or an object, got {value!r}", "invalid_value")
