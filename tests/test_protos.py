"""The gRPC contract: committed stubs match the .proto, every declaration of the .proto is
documented, enums start at *_UNSPECIFIED, and messages survive the wire unchanged."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor

from moeserve.engine.v1 import engine_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
PROTO = "moeserve/engine/v1/engine.proto"
STUBS = ("engine_pb2.py", "engine_pb2.pyi", "engine_pb2_grpc.py")

BLOCK = re.compile(r"(message|enum|oneof|service)\s+(\w+)\s*\{")
FIELD = re.compile(r"(?:(?:optional|repeated)\s+)?(?:map\s*<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*\d+\s*(?:\[.*\])?\s*;")
ENUM_VALUE = re.compile(r"(\w+)\s*=\s*-?\d+\s*(?:\[.*\])?\s*;")
RPC = re.compile(r"rpc\s+(\w+)\s*\(")


def test_committed_stubs_are_what_gen_protos_produces(tmp_path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"protos/{PROTO}"],
                   cwd=ROOT, check=True, capture_output=True)
    stale = [name for name in STUBS
             if (tmp_path / "moeserve/engine/v1" / name).read_bytes()
             != (ROOT / "moeserve/engine/v1" / name).read_bytes()]
    assert not stale, f"stale generated stubs {stale}: run `bash scripts/gen_protos.sh` and commit them"


def documented_declarations(text: str) -> tuple[dict[str, str], list[str]]:
    """Walks the .proto line by line: returns {kind:name: ...} for every declaration
    (message, enum, oneof, service, rpc, field, enum value) and the ones that have no `//`
    comment on the line directly above or at the end of their own line."""
    lines = text.splitlines()
    stack: list[str] = []
    seen: dict[str, str] = {}
    undocumented: list[str] = []
    for i, raw in enumerate(lines):
        code, _, trailing = raw.partition("//")
        code = code.strip()
        above = lines[i - 1].strip() if i else ""
        documented = bool(trailing) or above.startswith("//")
        key = None
        if block := BLOCK.match(code):
            key = f"{block[1]}:{'.'.join(stack + [block[2]])}"
            stack.append(block[2])
        elif rpc := RPC.match(code):
            key = f"rpc:{'.'.join(stack + [rpc[1]])}"
        elif stack and (field := FIELD.match(code)):
            key = f"field:{'.'.join(stack + [field[1]])}"
        elif stack and (value := ENUM_VALUE.match(code)):
            key = f"value:{'.'.join(stack + [value[1]])}"
        if key:
            seen[key] = code
            if not documented:
                undocumented.append(key)
        if code.endswith("}"):
            stack.pop()
    return seen, undocumented


def all_messages(container) -> list[descriptor.Descriptor]:
    """Every message of a file or message, nested ones included, but not map entries."""
    children = getattr(container, "message_types_by_name", None) or container.nested_types_by_name
    found = []
    for message in children.values():
        if not message.GetOptions().map_entry:
            found += [message, *all_messages(message)]
    return found


def all_enums(file: descriptor.FileDescriptor) -> list[descriptor.EnumDescriptor]:
    enums = list(file.enum_types_by_name.values())
    return enums + [e for m in all_messages(file) for e in m.enum_types]


def declared_name(field: descriptor.FieldDescriptor) -> str:
    """`Message.field`, or `Message.oneof.field` inside a written oneof (not the synthetic
    `_field` oneof of a proto3 `optional`), as the walk of the .proto names it."""
    message = field.containing_type.full_name.removeprefix(pb.DESCRIPTOR.package + ".")
    oneof = field.containing_oneof
    return f"{message}.{oneof.name}.{field.name}" if oneof and not oneof.name.startswith("_") \
        else f"{message}.{field.name}"


def test_every_declaration_of_the_proto_has_a_comment():
    seen, undocumented = documented_declarations((ROOT / "protos" / PROTO).read_text())
    assert not undocumented, f"declarations without a `//` comment above or beside them: {undocumented}"
    # The walk must have found every field and enum value the compiler knows, or it proves nothing.
    fields = {f"field:{declared_name(f)}" for m in all_messages(pb.DESCRIPTOR) for f in m.fields}
    values = {f"value:{e.name}.{v.name}" for e in all_enums(pb.DESCRIPTOR) for v in e.values}
    assert fields | values <= set(seen), f"not found by the walk: {sorted((fields | values) - set(seen))}"


def test_every_enum_starts_with_an_unspecified_zero_value():
    enums = all_enums(pb.DESCRIPTOR)
    assert {e.name for e in enums} == {"Role", "ToolChoice", "FinishReason"}
    for enum in enums:
        assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED"), enum.name


def chat_request() -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id="req-1",
        chat=pb.ChatInput(
            messages=[
                pb.ChatMessage(role=pb.ROLE_SYSTEM, content="You are terse."),
                pb.ChatMessage(role=pb.ROLE_USER, content="Weather in Paris?"),
                pb.ChatMessage(role=pb.ROLE_ASSISTANT, tool_calls=[
                    pb.ToolCall(id="call_0", name="get_weather", arguments='{"city": "Paris"}')]),
                pb.ChatMessage(role=pb.ROLE_TOOL, tool_call_id="call_0", content='{"celsius": 21}'),
            ],
            tools=[pb.Tool(name="get_weather", description="Current weather of a city.",
                           parameters_json='{"type": "object", "properties": {"city": {"type": "string"}}}')],
            tool_choice=pb.TOOL_CHOICE_AUTO,
        ),
        sampling=pb.SamplingParameters(max_tokens=64, top_p=0.9, logit_bias={42: -100.0, 7: 2.5},
                                       seed=2**40 + 3, stop=["\n\n"], stop_token_ids=[1]),
        n=2,
        logprobs=pb.LogprobOptions(top_logprobs=5),
    )


def test_a_chat_request_survives_serialization_unchanged():
    sent = chat_request()
    received = pb.GenerateRequest.FromString(sent.SerializeToString())
    assert received == sent
    assert received.WhichOneof("input") == "chat"
    assert received.chat.messages[2].tool_calls[0].arguments == '{"city": "Paris"}'
    assert dict(received.sampling.logit_bias) == {42: -100.0, 7: 2.5}
    assert received.sampling.seed == 2**40 + 3
    assert received.HasField("logprobs") and received.logprobs.top_logprobs == 5
    assert not received.keep_special_tokens  # special tokens are skipped by default


def test_an_unset_temperature_is_distinguishable_from_zero():
    unset = pb.GenerateRequest.FromString(chat_request().SerializeToString()).sampling
    greedy = pb.SamplingParameters.FromString(pb.SamplingParameters(temperature=0.0).SerializeToString())
    assert not unset.HasField("temperature")
    assert greedy.HasField("temperature") and greedy.temperature == 0.0
    assert not unset.HasField("top_k") and not unset.HasField("min_p") and unset.HasField("seed")


def test_logprobs_are_off_unless_their_options_are_present():
    assert not pb.GenerateRequest(prompt="hi").HasField("logprobs")
    assert pb.GenerateRequest(prompt="hi", logprobs=pb.LogprobOptions()).HasField("logprobs")
