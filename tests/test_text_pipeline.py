"""Per-sequence text pipeline: streamed decoding, stop strings, R1 reasoning, tool calls."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from engine.text.detokenizer import IncrementalDetokenizer
from engine.text.pipeline import TextDelta, TextPipeline
from engine.text.reasoning import ReasoningParser
from engine.text.stop import StopMatcher
from engine.text.tool_calls import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    TOOL_SEP,
    ToolCall,
    ToolCallParser,
    random_call_ids,
)
from engine.tokenizer import Tokenizer, write_demo_tokenizer

FFFD = "\ufffd"


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out: Path = tmp_path_factory.mktemp("text-pipeline-tokenizer")
    write_demo_tokenizer(out)
    return Tokenizer.from_dir(out)


def counting_ids(index: int) -> str:
    """Deterministic ids so tests can assert whole ToolCall values."""
    return f"call_{index:024x}"


def call_text(name: str, args: str, kind: str = "function") -> str:
    return f"{CALL_BEGIN}{kind}{TOOL_SEP}{name}\n```json\n{args}\n```{CALL_END}"


def push_each(stage, pieces: Sequence[str]) -> list:
    """Outputs of one push() per piece, to assert exactly what each chunk releases."""
    return [stage.push(piece) for piece in pieces]


# --- detokenizer -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Hello 🚀🌍 世界 深度求索 naïve café",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👨‍👩‍👧 family, 🌦️ weather",
        "plain ASCII, with punctuation!\n\tand an indented line",
        "日本語とEnglishの混在テキスト。句読点も、含む",
    ],
)
def test_streamed_decode_equals_decoding_everything_and_never_shows_broken_chars(
    tok: Tokenizer, text: str
) -> None:
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push([i]) for i in ids]
    assert not any(FFFD in p for p in pieces)
    assert detok.flush() == ""
    assert "".join(pieces) == tok.decode(ids) == text
    assert detok.text == text


def test_an_emoji_split_over_tokens_is_held_back_until_it_is_complete(tok: Tokenizer) -> None:
    ids = tok.encode("Hi 🚀")
    assert len(ids) == 4  # "Hi", " \xf0\x9f", "\x9a", "\x80": the rocket spans three tokens
    detok = IncrementalDetokenizer(tok)
    assert [detok.push([i]) for i in ids] == ["Hi", "", "", " 🚀"]


def test_a_dangling_partial_character_appears_only_in_flush(tok: Tokenizer) -> None:
    first_byte_token = tok.encode("🚀")[0]
    detok = IncrementalDetokenizer(tok)
    assert detok.push(tok.encode("Hi")) == "Hi"
    assert detok.push([first_byte_token]) == ""
    assert detok.flush() == FFFD
    assert detok.text == "Hi" + FFFD


def test_special_tokens_are_skipped_but_think_and_tool_tags_survive(tok: Tokenizer) -> None:
    ids = [tok.bos_id, *tok.encode(f"<think>\nhm</think>ok{CALLS_BEGIN}"), tok.eos_id]
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
    text = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert text == f"<think>\nhm</think>ok{CALLS_BEGIN}"


def test_each_step_decodes_a_bounded_window_not_the_whole_sequence(tok: Tokenizer) -> None:
    longest: list[int] = [0]

    class CountingDecoder:
        def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
            longest[0] = max(longest[0], len(ids))
            return tok.decode(ids, skip_special_tokens)

    ids = tok.encode("Streaming text with emoji 🚀 and 中文 repeated. " * 40)
    assert len(ids) > 400
    detok = IncrementalDetokenizer(CountingDecoder())
    for i in ids:
        detok.push([i])
    assert longest[0] <= 4


# --- stop strings ------------------------------------------------------------------------


def test_stop_string_split_across_pushes_is_matched_and_not_output() -> None:
    stop = StopMatcher(("STOP",))
    assert push_each(stop, ["abc ST", "OP and more"]) == [("abc ", False), ("", True)]


def test_stop_string_at_the_very_start_outputs_nothing() -> None:
    assert StopMatcher(("STOP",)).push("STOP right away") == ("", True)


def test_earliest_of_several_stop_strings_wins() -> None:
    assert StopMatcher(("world", "lo")).push("hello world") == ("hel", True)


def test_text_after_a_stop_is_dropped_for_good() -> None:
    stop = StopMatcher(("\n\n",))
    assert push_each(stop, ["one\n", "\ntwo", "three"]) == [("one", False), ("", True), ("", True)]
    assert stop.flush() == ""


def test_possible_stop_prefix_is_held_back_then_released() -> None:
    stop = StopMatcher(("STOP",))
    assert push_each(stop, ["ST", "ART", "the end S"]) == [("", False), ("START", False), ("the end ", False)]
    assert stop.flush() == "S"


def test_without_stop_strings_text_passes_straight_through() -> None:
    assert StopMatcher(()).push("anything <at all>") == ("anything <at all>", False)


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        StopMatcher(("ok", ""))


# --- reasoning ---------------------------------------------------------------------------


def test_started_reasoning_ends_at_a_close_tag_split_across_pushes() -> None:
    parser = ReasoningParser(started=True)
    out = push_each(parser, ["Let me think.</th", "ink>\n\nThe answer", " is 4."])
    assert out == [("Let me think.", ""), ("", "The answer"), ("", " is 4.")]
    assert parser.reasoning_done
    assert parser.flush() == ("", "")


def test_whitespace_after_the_close_tag_is_dropped_even_when_streamed_alone() -> None:
    parser = ReasoningParser(started=True)
    out = push_each(parser, ["x</think>", "\n", "\n", "Answer\n\nmore"])
    assert out == [("x", ""), ("", ""), ("", ""), ("", "Answer\n\nmore")]


def test_started_reasoning_streamed_per_character_equals_all_at_once() -> None:
    text = "step 1 <b>bold</b> </thin\n</think>\n\nfinal </think> stays"
    parser = ReasoningParser(started=True)
    parts = [parser.push(ch) for ch in text] + [parser.flush()]
    assert "".join(r for r, _ in parts) == "step 1 <b>bold</b> </thin\n"
    assert "".join(c for _, c in parts) == "final </think> stays"


def test_unstarted_output_opening_think_after_whitespace_is_reasoning() -> None:
    parser = ReasoningParser(started=False)
    out = push_each(parser, ["\n <thi", "nk>plan</think>\n\nok"])
    assert out == [("", ""), ("plan", "ok")]


def test_unstarted_output_without_think_is_all_content() -> None:
    parser = ReasoningParser(started=False)
    out = push_each(parser, ["<t", "r>Hello", " </think> too"])
    assert out == [("", ""), ("", "<tr>Hello"), ("", " </think> too")]
    assert parser.reasoning_done


def test_unstarted_output_that_ends_as_a_partial_think_tag_is_content() -> None:
    parser = ReasoningParser(started=False)
    assert parser.push(" <th") == ("", "")
    assert not parser.reasoning_done
    assert parser.flush() == ("", " <th")


def test_started_reasoning_without_close_tag_is_all_reasoning() -> None:
    parser = ReasoningParser(started=True)
    assert parser.push("still thinking </thi") == ("still thinking ", "")
    assert not parser.reasoning_done
    assert parser.flush() == ("</thi", "")


# --- tool calls --------------------------------------------------------------------------

WEATHER = call_text("get_weather", '{"city": "Paris"}')
TIME = call_text("get_time", '{\n  "tz": "Europe/Paris"\n}')
WEATHER_CALL = ToolCall(index=0, id=counting_ids(0), name="get_weather", arguments='{"city":"Paris"}')


def test_one_call_is_parsed_with_compact_arguments() -> None:
    parser = ToolCallParser(counting_ids)
    assert parser.push(f"Checking.{CALLS_BEGIN}{WEATHER}{CALLS_END}") == ("Checking.", [WEATHER_CALL])
    assert parser.finish() == ("", [])
    assert parser.calls == [WEATHER_CALL]


def test_two_calls_separated_by_newline_get_consecutive_indexes() -> None:
    parser = ToolCallParser(counting_ids)
    content, calls = parser.push(f"{CALLS_BEGIN}{WEATHER}\n{TIME}{CALLS_END}")
    assert content == ""
    assert calls == [
        WEATHER_CALL,
        ToolCall(index=1, id=counting_ids(1), name="get_time", arguments='{"tz":"Europe/Paris"}'),
    ]


def test_calls_streamed_per_character_equal_calls_parsed_at_once() -> None:
    text = f"Let me see <b>.{CALLS_BEGIN}{WEATHER}\n{TIME}{CALLS_END}"
    whole = ToolCallParser(counting_ids).push(text)
    parser = ToolCallParser(counting_ids)
    parts = [parser.push(ch) for ch in text] + [parser.finish()]
    assert "".join(c for c, _ in parts) == whole[0] == "Let me see <b>."
    assert [call for _, calls in parts for call in calls] == whole[1]
    assert len(whole[1]) == 2


def test_content_before_the_block_streams_immediately_except_a_partial_tag() -> None:
    parser = ToolCallParser(counting_ids)
    out = push_each(parser, ["Sure, ", "one moment<｜tool▁ca", f"lls▁begin｜>{WEATHER}", CALLS_END])
    assert out == [("Sure, ", []), ("one moment", []), ("", [WEATHER_CALL]), ("", [])]


def test_malformed_json_call_falls_back_to_content_verbatim() -> None:
    text = f"{CALLS_BEGIN}{call_text('get_weather', '{city: Paris}')}{CALLS_END}"
    parser = ToolCallParser(counting_ids)
    assert parser.push(text) == (text, [])
    assert parser.calls == []


@pytest.mark.parametrize(
    "bad_call",
    [
        call_text("get_weather", "[1, 2]"),
        call_text("get_weather", '{"x": NaN}'),
        call_text("get_weather", '{"city": "Paris"}', kind="retrieval"),
        f"{CALL_BEGIN}function get_weather\n```json\n{{}}\n```{CALL_END}",
    ],
    ids=["array-args", "nan", "wrong-type", "missing-sep"],
)
def test_malformed_call_becomes_content_and_parsing_continues(bad_call: str) -> None:
    parser = ToolCallParser(counting_ids)
    content, calls = parser.push(f"{CALLS_BEGIN}{bad_call}\n{WEATHER}{CALLS_END}after")
    assert (content, calls) == (f"{CALLS_BEGIN}{bad_call}after", [WEATHER_CALL])


def test_unterminated_block_at_finish_falls_back_to_content() -> None:
    parser = ToolCallParser(counting_ids)
    partial = f'{CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{{"city": "Par'
    assert parser.push(f"Answer{CALLS_BEGIN}{partial}") == ("Answer", [])
    assert parser.finish() == (f"{CALLS_BEGIN}{partial}", [])


def test_block_missing_only_its_closing_tag_keeps_its_calls_and_loses_nothing() -> None:
    parser = ToolCallParser(counting_ids)
    assert parser.push(f"{CALLS_BEGIN}{WEATHER}\n") == ("", [WEATHER_CALL])
    assert parser.finish() == ("", [])


def test_non_ascii_arguments_are_kept_unescaped() -> None:
    parser = ToolCallParser(counting_ids)
    args = '{"city": "北京", "note": "café ☕"}'
    _, calls = parser.push(f"{CALLS_BEGIN}{call_text('get_weather', args)}{CALLS_END}")
    assert calls[0].arguments == '{"city":"北京","note":"café ☕"}'


def test_seeded_call_ids_are_reproducible_and_openai_shaped() -> None:
    first, second = random_call_ids(seed=7), random_call_ids(seed=7)
    ids = [first(i) for i in range(3)]
    assert ids == [second(i) for i in range(3)]
    assert len(set(ids)) == 3
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)


# --- pipeline ----------------------------------------------------------------------------


def run_pipeline(tok: Tokenizer, text: str, **kwargs) -> tuple[TextDelta, list[bool]]:
    """Push the tokens of `text` (plus eos) one at a time; merge all deltas into one."""
    options = dict(stops=(), reasoning_started=True, parse_reasoning=True, parse_tools=True)
    pipeline = TextPipeline(tok, **(options | kwargs), id_factory=counting_ids)
    total, stopped, deltas = TextDelta(), [], []
    for token_id in [*tok.encode(text), tok.eos_id]:
        delta, hit = pipeline.push([token_id])
        deltas.append(delta)
        stopped.append(hit)
    deltas.append(pipeline.finish())
    for delta in deltas:
        assert FFFD not in delta.content + delta.reasoning
        total.content += delta.content
        total.reasoning += delta.reasoning
        total.tool_calls += delta.tool_calls
    return total, stopped


R1_ANSWER = (
    "The user wants the weather in Paris 🌦️. I should call get_weather.\n</think>\n\n"
    "Let me look that up.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"
    'get_weather\n```json\n{"city": "Paris", "unit": "°C"}\n```<｜tool▁call▁end｜>'
    "<｜tool▁calls▁end｜>"
)


def test_r1_answer_streamed_token_by_token_splits_into_reasoning_content_and_calls(
    tok: Tokenizer,
) -> None:
    total, stopped = run_pipeline(tok, R1_ANSWER)
    assert total.reasoning == "The user wants the weather in Paris 🌦️. I should call get_weather.\n"
    assert total.content == "Let me look that up."
    assert total.tool_calls == [
        ToolCall(index=0, id=counting_ids(0), name="get_weather", arguments='{"city":"Paris","unit":"°C"}')
    ]
    assert not any(stopped)


def test_stop_string_in_the_answer_ends_the_output_in_the_same_push(tok: Tokenizer) -> None:
    text = "Think 🤔.</think>\n\nThe answer is 42. THE END and then more"
    total, stopped = run_pipeline(tok, text, stops=("THE END",))
    assert (total.reasoning, total.content) == ("Think 🤔.", "The answer is 42. ")
    assert stopped.index(True) == len(tok.encode(text[: text.index("THE END") + 7])) - 1
    assert all(stopped[stopped.index(True) :])


def test_stop_strings_also_apply_inside_the_reasoning(tok: Tokenizer) -> None:
    total, _ = run_pipeline(tok, "plan: abort here</think>answer", stops=("abort",))
    assert (total.reasoning, total.content, total.tool_calls) == ("plan: ", "", [])


def test_with_parsing_off_every_character_is_content(tok: Tokenizer) -> None:
    total, _ = run_pipeline(tok, R1_ANSWER, parse_reasoning=False, parse_tools=False)
    assert (total.reasoning, total.content, total.tool_calls) == ("", R1_ANSWER, [])


def test_finish_releases_text_held_back_as_a_possible_tag(tok: Tokenizer) -> None:
    total, _ = run_pipeline(tok, "x</think>a <｜tool", stops=("<｜tool▁x",))
    assert (total.reasoning, total.content) == ("x", "a <｜tool")
