"""Tokenizer and chat template: what the model sees for a given chat request."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from jinja2.exceptions import SecurityError

from engine.tokenizer import ChatTemplateError, Tokenizer, write_demo_tokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city, 天气",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a time zone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo-tokenizer")
    write_demo_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tok(demo_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(demo_dir)


def test_unicode_text_round_trips_through_encode_and_decode(tok: Tokenizer) -> None:
    text = "Hello, 世界! 深度求索 🚀🌍 naïve café\n\tend"
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>", [128798]),
        ("</think>", [128799]),
        ("<｜User｜>", [128803]),
        ("<｜Assistant｜>", [128804]),
        ("<｜tool▁calls▁begin｜>", [128806]),
        (EOS, [1]),
    ],
)
def test_special_token_strings_encode_to_their_single_id(
    tok: Tokenizer, text: str, expected: list[int]
) -> None:
    assert tok.encode(text) == expected
    assert tok.id_to_token(expected[0]) == text
    assert tok.token_to_id(text) == expected[0]


def test_bos_and_eos_come_from_the_config(tok: Tokenizer) -> None:
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.encode("hi", add_bos=True) == [0, *tok.encode("hi")]
    assert tok.vocab_size >= 128815


def test_decode_can_drop_bos_and_eos(tok: Tokenizer) -> None:
    ids = tok.encode(f"{BOS}hi{EOS}")
    assert tok.decode(ids) == f"{BOS}hi{EOS}"
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_generation_prompt_opens_the_reasoning_block(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert tok.apply_chat_template(messages) == (
        f"{BOS}You are terse.<｜User｜>What is 2+2?<｜Assistant｜><think>\n"
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        f"{BOS}You are terse.<｜User｜>What is 2+2?"
    )


def test_all_system_and_developer_messages_form_the_system_prompt(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Rule one."},
        {"role": "user", "content": "Hi"},
        {"role": "developer", "content": "Rule two."},
    ]
    assert tok.apply_chat_template(messages) == (
        f"{BOS}Rule one.\n\nRule two.<｜User｜>Hi<｜Assistant｜><think>\n"
    )


def test_history_keeps_only_the_answer_after_reasoning(tok: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>reasoning</think>answer"},
        {"role": "user", "content": "Again"},
    ]
    rendered = tok.apply_chat_template(messages)
    assert rendered == (
        f"{BOS}<｜User｜>Hi<｜Assistant｜>answer{EOS}<｜User｜>Again<｜Assistant｜><think>\n"
    )
    assert "reasoning" not in rendered


def test_tool_calls_and_outputs_render_in_deepseek_format(tok: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": {"tz": "巴黎"}},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
    ]
    expected = (
        f"{BOS}<｜User｜>Weather and time in Paris?"
        "<｜Assistant｜><｜tool▁calls▁begin｜>"
        "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜>\n'
        "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n"
        '```json\n{"tz": "巴黎"}\n```<｜tool▁call▁end｜>'
        f"<｜tool▁calls▁end｜>{EOS}"
        "<｜tool▁outputs▁begin｜>"
        "<｜tool▁output▁begin｜>18C, sunny<｜tool▁output▁end｜>"
        "<｜tool▁output▁begin｜>14:05<｜tool▁output▁end｜>"
        "<｜tool▁outputs▁end｜>"
        "<｜Assistant｜><think>\n"
    )
    assert tok.apply_chat_template(messages) == expected
    ids = tok.encode_chat(messages)
    assert ids.count(128806) == 1 and ids.count(128808) == 2 and ids.count(128814) == 2


def test_tools_are_described_in_the_system_prompt(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You help travellers."},
        {"role": "user", "content": "Weather?"},
    ]
    rendered = tok.apply_chat_template(messages, tools=[WEATHER_TOOL, TIME_TOOL])
    system_prompt = rendered.split("<｜User｜>")[0]
    assert system_prompt.startswith(f"{BOS}You help travellers.\n\n")
    for tool in (WEATHER_TOOL, TIME_TOOL):
        fn = tool["function"]
        assert fn["name"] in system_prompt
        assert fn["description"] in system_prompt
        assert json.dumps(fn["parameters"], ensure_ascii=False) in system_prompt
    assert "<｜tool▁call▁begin｜>function<｜tool▁sep｜>" in system_prompt


def test_content_given_as_text_parts_is_joined(tok: Tokenizer) -> None:
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}],
        }
    ]
    assert tok.apply_chat_template(messages) == (
        f"{BOS}<｜User｜>first\nsecond<｜Assistant｜><think>\n"
    )


@pytest.mark.parametrize(
    "message",
    [
        {"role": "narrator", "content": "Once upon a time"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
    ],
)
def test_unsupported_input_is_rejected_with_a_clear_error(tok: Tokenizer, message: dict) -> None:
    with pytest.raises(ChatTemplateError, match="unsupported"):
        tok.apply_chat_template([message])


def test_encode_chat_starts_with_exactly_one_bos(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    ids = tok.encode_chat(messages)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert ids == tok.encode(tok.apply_chat_template(messages))
    assert ids[-2:] == [128798, tok.encode("\n")[0]]


def test_sandbox_refuses_python_internals(demo_dir: Path, tmp_path: Path) -> None:
    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}", encoding="utf-8")
    tok = Tokenizer.from_dir(demo_dir, chat_template_file=evil)
    with pytest.raises(ChatTemplateError, match="unsafe") as caught:
        tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert isinstance(caught.value.__cause__, SecurityError)


def test_missing_tokenizer_json_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "tokenizer.json"))):
        Tokenizer.from_dir(tmp_path)


def test_demo_tokenizer_is_byte_identical_and_loads_back(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    write_demo_tokenizer(first)
    write_demo_tokenizer(second)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    config = json.loads((first / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["bos_token"] == BOS and config["pad_token"] == EOS
    assert config["model_max_length"] == 163840
    tok = Tokenizer.from_dir(first)
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
        f"{BOS}<｜User｜>Hi<｜Assistant｜><think>\n"
    )
