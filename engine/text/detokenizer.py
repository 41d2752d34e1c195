"""Incremental detokenization that never emits half a UTF-8 character.

Byte-level BPE tokens can end in the middle of a multi-byte character (an emoji is often
two or three tokens); decoding such a prefix yields a trailing U+FFFD. We use the
prefix-offset / read-offset technique (as in vLLM and TGI): decode a small window of recent
tokens twice, with and without the newest ones, and emit only the difference, so each step
costs O(window) rather than O(sequence length).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """The one tokenizer method the detokenizer needs (engine.tokenizer.Tokenizer has it)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas for one sequence.

    Invariant: tokens before `_read_offset` have been emitted; tokens from `_prefix_offset`
    to `_read_offset` are the last emitted chunk, decoded again as context so the
    difference against the longer window is exactly the new text.
    """

    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far by push() and flush()."""
        return "".join(self._text)

    def push(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the text they complete (maybe "", if a char is still open)."""
        self._ids.extend(token_ids)
        delta = self._new_text()
        if delta and not delta.endswith(REPLACEMENT_CHAR):
            return self._emit(delta)
        return ""

    def flush(self) -> str:
        """Release held-back tokens at the end; U+FFFD here means the model emitted bad bytes."""
        return self._emit(self._new_text())

    def _new_text(self) -> str:
        """Text of the tokens after `_read_offset`, decoded in context of the last chunk."""
        window = self._ids[self._prefix_offset :]
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return self._decode(window)[len(prefix) :]

    def _emit(self, delta: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if delta:
            self._text.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""
