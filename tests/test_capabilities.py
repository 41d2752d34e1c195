"""What a checkpoint supports in a chat, read from its own chat template and tokenizer
(`Tokenizer.capabilities`), reported by GetModelInfo, and held to: an engine whose
checkpoint has no tools refuses them (INVALID_ARGUMENT naming the field, a 400 at the
gateway) rather than dropping them from the prompt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import openai
import pytest
from moeserve.engine.v1 import engine_pb2 as pb

from engine.tokenizer import TOOL_CALL_TOKENS, ChatCapabilities, Tokenizer, write_demo_tokenizer
from engine_server import EngineProcess, chat
from gateway_helpers import KEY, MODEL, GatewayProcess
from helpers import make_serving_checkpoint

THINK_TOKENS = ("<think>", "</think>")
# A plain chat template, as a base model's might be: it knows nothing of tools.
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] or '' }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")
# Renders the tools' definitions, but rejects a conversation that already holds a call.
NO_CALLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}{% for t in tools %}{{ t['function']['name'] }}\n{% endfor %}{% endif %}"
    "{% for m in messages %}{% if m['tool_calls'] %}{{ raise_exception('no tool calls') }}{% endif %}"
    "{{ m['content'] or '' }}{% endfor %}")


def tokenizer_dir(path: Path, template: str | None = None, drop: tuple[str, ...] = ()) -> Path:
    """The demo tokenizer in `path`, with `template` for its chat template and the tokens in
    `drop` no longer tokens (they would be spelled out by BPE like any other text)."""
    write_demo_tokenizer(path)
    if drop:
        raw = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] not in drop]
        (path / "tokenizer.json").write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    if template is not None:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["chat_template"] = template
        (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return path


def capabilities(path: Path) -> ChatCapabilities:
    return Tokenizer.from_dir(path).capabilities


def test_the_demo_checkpoint_supports_tools_and_reasoning(tmp_path):
    assert capabilities(tokenizer_dir(tmp_path)) == ChatCapabilities(tools=True, reasoning=True)


def test_a_template_that_does_not_render_tools_means_no_tools(tmp_path):
    assert capabilities(tokenizer_dir(tmp_path, PLAIN_TEMPLATE)) == ChatCapabilities(tools=False, reasoning=True)


def test_a_template_that_cannot_render_past_tool_calls_means_no_tools(tmp_path):
    assert not capabilities(tokenizer_dir(tmp_path, NO_CALLS_TEMPLATE)).tools


def test_without_deepseeks_tool_call_tokens_the_template_alone_is_not_enough(tmp_path):
    for token in TOOL_CALL_TOKENS:
        path = tokenizer_dir(tmp_path / str(TOOL_CALL_TOKENS.index(token)), drop=(token,))
        assert capabilities(path) == ChatCapabilities(tools=False, reasoning=True), token


def test_without_think_tokens_there_is_no_reasoning(tmp_path):
    assert capabilities(tokenizer_dir(tmp_path, drop=THINK_TOKENS)) == ChatCapabilities(tools=True, reasoning=False)


# --- served -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    """The serving checkpoint with a plain template and neither tool-call nor think tokens."""
    path = make_serving_checkpoint(tmp_path_factory.mktemp("plain"))
    scratch = tokenizer_dir(tmp_path_factory.mktemp("tokenizer"), PLAIN_TEMPLATE, TOOL_CALL_TOKENS + THINK_TOKENS)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(scratch / name, path / name)
    return path


@pytest.fixture(scope="module")
def plain_engine(plain_model):
    proc = EngineProcess(plain_model, "--served-model-name", MODEL, "--max-model-len", "1024",
                         "--kv-cache-memory", "0.02")
    yield proc
    assert proc.stop() == 0


TOOL = pb.Tool(name="get_weather", description="the weather", parameters_json='{"type": "object"}')


def test_model_info_of_a_checkpoint_without_tools_or_reasoning_says_so(plain_engine):
    caps = plain_engine.stub().GetModelInfo(pb.GetModelInfoRequest()).capabilities
    assert caps.chat and not caps.tools and not caps.reasoning and caps.logprobs


def test_tools_sent_to_a_model_without_them_are_refused_naming_the_field(plain_engine):
    request = chat("weather?", max_tokens=2)
    request.chat.tools.append(TOOL)
    with pytest.raises(grpc.RpcError) as err:
        plain_engine.stub().Generate(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("tools: this model does not support tools")


def test_tool_calls_in_the_history_are_refused_too(plain_engine):
    request = chat("weather?", max_tokens=2)
    request.chat.messages.append(pb.ChatMessage(role=pb.ROLE_ASSISTANT, tool_calls=[
        pb.ToolCall(id="call_1", name="get_weather", arguments="{}")]))
    with pytest.raises(grpc.RpcError) as err:
        plain_engine.stub().Generate(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("messages[1]:")


def test_tool_choice_none_and_plain_chat_are_served(plain_engine):
    request = chat("hello", max_tokens=3, temperature=0.0)
    request.chat.tools.append(TOOL)
    request.chat.tool_choice = pb.TOOL_CHOICE_NONE
    reply = plain_engine.stub().Generate(request)
    assert 1 <= reply.usage.completion_tokens <= 3 and reply.usage.reasoning_tokens == 0
    assert not reply.choices[0].reasoning


def test_the_gateway_answers_tools_for_a_model_without_them_with_a_400(plain_engine):
    gateway = GatewayProcess([plain_engine.address])
    try:
        gateway.wait_ready()
        client = openai.OpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0)
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=tools,
                                           max_tokens=2)
        assert err.value.body["param"] == "tools" and "does not support tools" in err.value.body["message"]
    finally:
        assert gateway.stop() == 0
