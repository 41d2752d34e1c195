"""Extracts DeepSeek-V3/R1 tool calls from the answer text.

The format (see engine/chat_template.jinja, which renders the same for history):

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"arg": "value"}
    ```<｜tool▁call▁end｜>\\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

Text outside the block streams through as content. Each call is buffered until its end
tag, then validated. Arguments are re-serialized as compact JSON (`separators=(",", ":")`,
non-ASCII kept), as OpenAI sends them: clients get valid JSON whatever spacing the model
used. Nothing the model wrote is ever lost: a malformed call (bad JSON, not an object,
missing separator, a type other than "function") becomes content verbatim, tags
included, and so does a block left open at the end of generation.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from engine.text.stop import partial_match_len

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"

# The text between CALL_BEGIN and CALL_END: type, sep, name, then the fenced JSON arguments.
_CALL_BODY = re.compile(
    r"\s*function" + re.escape(TOOL_SEP) + r"(\S+)[ \t]*\n```(?:json)?[ \t]*\n(.*)```\s*", re.DOTALL
)


@dataclass(frozen=True)
class ToolCall:
    """One completed call; `index` counts calls in this sequence, `arguments` is compact JSON."""

    index: int
    id: str
    name: str
    arguments: str


def random_call_ids(seed: int | None = None) -> Callable[[int], str]:
    """An id factory giving OpenAI-style ids, "call_" + 24 hex chars; seed it for tests."""
    rng = random.Random(seed)
    return lambda index: f"call_{rng.getrandbits(96):024x}"


def parse_call_body(body: str) -> tuple[str, str] | None:
    """(name, compact JSON arguments) of one call's inner text, or None if it is malformed."""
    match = _CALL_BODY.fullmatch(body)
    if match is None:
        return None
    try:
        args = json.loads(match.group(2))
        if not isinstance(args, dict):
            return None
        # allow_nan=False: NaN/Infinity parse in Python but are not JSON a client can read.
        return match.group(1), json.dumps(args, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return None


class ToolCallParser:
    """Streaming parser for one sequence's answer text."""

    def __init__(self, id_factory: Callable[[int], str] | None = None):
        self._new_id = id_factory or random_call_ids()
        self._pending = ""
        self._in_block = False
        self._opener_pending = False  # CALLS_BEGIN not yet accounted for (dropped or output)
        self._block_ok = False  # the current block produced at least one call
        self._calls: list[ToolCall] = []

    @property
    def calls(self) -> list[ToolCall]:
        """All calls completed so far."""
        return list(self._calls)

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        """Return (content delta, calls completed by this text)."""
        self._pending += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while self._step_block(content, calls) if self._in_block else self._step_content(content):
            pass
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """End of generation: held-back text and any unterminated block become content."""
        tail, self._pending = self._pending, ""
        if self._in_block:
            self._in_block = False
            # A block whose calls all completed but whose closing tag never came loses nothing.
            tail = "" if self._block_ok and not tail.strip() else self._take_opener() + tail
        return tail, []

    def _step_content(self, content: list[str]) -> bool:
        """Stream text up to a block opener; return True if a block was entered."""
        buf = self._pending
        start = buf.find(CALLS_BEGIN)
        if start < 0:
            keep = partial_match_len(buf, (CALLS_BEGIN,))
            content.append(buf[: len(buf) - keep])
            self._pending = buf[len(buf) - keep :]
            return False
        content.append(buf[:start])
        self._pending = buf[start + len(CALLS_BEGIN) :]
        self._in_block, self._opener_pending, self._block_ok = True, True, False
        return True

    def _step_block(self, content: list[str], calls: list[ToolCall]) -> bool:
        """Consume one call or the closing tag; return False while waiting for more text."""
        body = self._pending.lstrip()  # drops the "\n" separating calls
        if body.startswith(CALLS_END):
            if not self._block_ok:
                content.append(self._take_opener() + CALLS_END)
            self._pending, self._in_block = body[len(CALLS_END) :], False
            return True
        if body.startswith(CALL_BEGIN):
            end = body.find(CALL_END)
            if end < 0:
                return False
            raw = body[: end + len(CALL_END)]
            self._pending = body[len(raw) :]
            self._complete_call(raw, content, calls)
            return True
        if CALL_BEGIN.startswith(body) or CALLS_END.startswith(body):
            return False
        # Free text inside the block: the model left the format, so the rest is plain content.
        content.append(self._take_opener())
        self._in_block = False
        return True

    def _complete_call(self, raw: str, content: list[str], calls: list[ToolCall]) -> None:
        parsed = parse_call_body(raw[len(CALL_BEGIN) : -len(CALL_END)])
        if parsed is None:
            content.append(self._take_opener() + raw)
            return
        index = len(self._calls)
        call = ToolCall(index=index, id=self._new_id(index), name=parsed[0], arguments=parsed[1])
        self._calls.append(call)
        calls.append(call)
        self._opener_pending, self._block_ok = False, True

    def _take_opener(self) -> str:
        """The block's opening tag as content, the first time a fallback needs it."""
        opener = CALLS_BEGIN if self._opener_pending else ""
        self._opener_pending = False
        return opener
