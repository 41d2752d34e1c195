"""Splits DeepSeek-R1 output into reasoning (inside <think>...</think>) and the answer.

Our chat template ends the prompt with "<think>\\n", so the model's output starts inside
the reasoning block (`started=True`). Other templates leave opening the block to the
model (`started=False`): then an output that begins with "<think>" (after optional
whitespace) opens reasoning, and any other output is all answer.

The tags are not output. Whitespace right after "</think>" (R1 writes "\\n\\n") is
dropped from the content, mirroring the template, which `lstrip()`s earlier answers: the
client sees exactly the answer the model will see in its next turn. Reasoning is verbatim.
"""

from __future__ import annotations

from enum import Enum, auto

from engine.text.stop import partial_match_len

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class _Phase(Enum):
    DETECT = auto()  # started=False and the output so far is whitespace or a prefix of <think>
    REASONING = auto()
    CONTENT = auto()


class ReasoningParser:
    """Streaming splitter; a tag split across pushes is held back until it is complete."""

    def __init__(self, started: bool):
        self._phase = _Phase.REASONING if started else _Phase.DETECT
        self._pending = ""
        self._strip_whitespace = False

    @property
    def reasoning_done(self) -> bool:
        """True once no more reasoning can follow: after </think>, or if none was opened."""
        return self._phase is _Phase.CONTENT

    def push(self, text: str) -> tuple[str, str]:
        """Return (reasoning delta, content delta) for the next chunk of output text."""
        buf, self._pending = self._pending + text, ""
        if self._phase is _Phase.DETECT:
            buf = self._detect(buf)
        reasoning = ""
        if self._phase is _Phase.REASONING:
            reasoning, buf = self._take_reasoning(buf)
        content = self._take_content(buf) if self._phase is _Phase.CONTENT else ""
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """Release held-back text at the end: a partial </think> is reasoning, a partial <think> content."""
        held, self._pending = self._pending, ""
        if self._phase is _Phase.REASONING:
            return held, ""
        return "", held

    def _detect(self, buf: str) -> str:
        """Decide whether the output opens <think>; hold it back while it still might."""
        stripped = buf.lstrip()
        if stripped.startswith(THINK_OPEN):
            self._phase = _Phase.REASONING
            return stripped[len(THINK_OPEN) :]
        if THINK_OPEN.startswith(stripped):
            self._pending = buf
            return ""
        self._phase = _Phase.CONTENT
        return buf

    def _take_reasoning(self, buf: str) -> tuple[str, str]:
        """Split off reasoning up to </think>; returns (reasoning, text after the tag)."""
        end = buf.find(THINK_CLOSE)
        if end >= 0:
            self._phase = _Phase.CONTENT
            self._strip_whitespace = True
            return buf[:end], buf[end + len(THINK_CLOSE) :]
        keep = partial_match_len(buf, (THINK_CLOSE,))
        self._pending = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], ""

    def _take_content(self, buf: str) -> str:
        if self._strip_whitespace:
            buf = buf.lstrip()
            self._strip_whitespace = not buf
        return buf
