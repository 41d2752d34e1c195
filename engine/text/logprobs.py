"""Sampled-token logprobs as the API shows them: token text and raw bytes per token.

A byte-level BPE token is a string over GPT-2's byte-to-unicode alphabet; its raw bytes
(OpenAI's `bytes` field) come from inverting that map. Added tokens (`<think>`, ...) are
plain text and are their UTF-8 encoding. Results are memoized per token id.
"""

from __future__ import annotations

from functools import lru_cache

from engine.request import TokenLogprob, TopLogprob
from engine.sampler import SampleOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256+."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_DECODER = _byte_decoder()


class LogprobFormatter:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.added = set(tokenizer.added_tokens())
        self.describe = lru_cache(maxsize=1 << 16)(self._describe)

    def _describe(self, token_id: int) -> tuple[str, bytes]:
        """token_id -> (text, raw bytes)."""
        piece = self.tokenizer.id_to_token(token_id) or ""
        if piece in self.added or any(ch not in BYTE_DECODER for ch in piece):
            return piece, piece.encode("utf-8")
        raw = bytes(BYTE_DECODER[ch] for ch in piece)
        return raw.decode("utf-8", errors="replace"), raw

    def row(self, samples: SampleOutput, i: int, params: SamplingParams) -> TokenLogprob | None:
        """The i-th sampled token's logprob entry, or None when the request asked for none."""
        if params.logprobs is None or samples.logprobs[i] is None:
            return None
        token = samples.token_ids[i]
        top = tuple(TopLogprob(t, *self.describe(t), lp)
                    for t, lp in zip(samples.top_ids[i] or [], samples.top_logprobs[i] or []))
        return TokenLogprob(token, *self.describe(token), samples.logprobs[i], top)
