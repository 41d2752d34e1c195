"""One sequence's path from token ids to what the client sees.

    token ids -> IncrementalDetokenizer -> StopMatcher (whole output, reasoning included)
              -> ReasoningParser -> ToolCallParser (answer only) -> TextDelta

Each stage holds back only what the next chunk could still change, so deltas stream with
at most a partial character or tag of delay. Stop token ids and eos are the caller's job:
this pipeline sees text only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.text.detokenizer import Decoder, IncrementalDetokenizer
from engine.text.reasoning import ReasoningParser
from engine.text.stop import StopMatcher
from engine.text.tool_calls import ToolCall, ToolCallParser


@dataclass
class TextDelta:
    """New output since the previous delta, already split into answer, reasoning and calls."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.content or self.reasoning or self.tool_calls)


class TextPipeline:
    """Chains the text stages for one sequence; push() per step, finish() once at the end.

    When a stop string matches, that push() already returns everything that will ever come
    (all stages flushed); later push() and finish() calls return empty deltas.
    """

    def __init__(
        self,
        tokenizer: Decoder,
        stops: tuple[str, ...],
        reasoning_started: bool,
        parse_reasoning: bool,
        parse_tools: bool,
        skip_special_tokens: bool = True,
        id_factory: Callable[[int], str] | None = None,
    ):
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self._stop = StopMatcher(stops)
        self._reasoning = ReasoningParser(reasoning_started) if parse_reasoning else None
        self._tools = ToolCallParser(id_factory) if parse_tools else None
        self._finished = False

    @property
    def matched_stop(self) -> str:
        """The stop string that ended the output, or ""."""
        return self._stop.matched

    @property
    def tool_calls(self) -> list[ToolCall]:
        """Every tool call parsed so far."""
        return self._tools.calls if self._tools is not None else []

    def push(self, token_ids: Sequence[int]) -> tuple[TextDelta, bool]:
        """Feed newly sampled tokens; return (delta, whether a stop string ended the output)."""
        if self._finished:
            return TextDelta(), self._stop.stopped
        text, stopped = self._stop.push(self._detok.push(token_ids))
        return self._route(text, final=stopped), stopped

    def finish(self) -> TextDelta:
        """End of generation (eos, stop token, length): release everything held back, in order."""
        if self._finished:
            return TextDelta()
        text, stopped = self._stop.push(self._detok.flush())
        if not stopped:
            text += self._stop.flush()
        return self._route(text, final=True)

    def _route(self, text: str, final: bool) -> TextDelta:
        reasoning, content = self._split_reasoning(text, final)
        content, calls = self._split_tools(content, final)
        self._finished = final
        return TextDelta(content=content, reasoning=reasoning, tool_calls=calls)

    def _split_reasoning(self, text: str, final: bool) -> tuple[str, str]:
        if self._reasoning is None:
            return "", text
        reasoning, content = self._reasoning.push(text)
        if final:
            tail_reasoning, tail_content = self._reasoning.flush()
            reasoning, content = reasoning + tail_reasoning, content + tail_content
        return reasoning, content

    def _split_tools(self, content: str, final: bool) -> tuple[str, list[ToolCall]]:
        if self._tools is None:
            return content, []
        content, calls = self._tools.push(content)
        if final:
            tail, tail_calls = self._tools.finish()
            content, calls = content + tail, calls + tail_calls
        return content, calls
