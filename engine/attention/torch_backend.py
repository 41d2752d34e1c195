"""Paged MLA attention in plain torch: the specification every fast backend is held to.

One sequence at a time, in fp32: gather the sequence's cache rows through its block
table (dequantized, for an FP8 cache), score, mask causally, softmax, reduce. Slow and
obviously right; its [H, Q, S] scores make long prompts the chunked backends' job
(`chunked.py`).
"""

from __future__ import annotations

import torch

from .base import AttentionBackend, AttentionMetadata, dequantize_kv


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """cache [N, B, C]; block_table [M] int32 -> the sequence's first seq_len rows [S, C]."""
    block_size = cache.shape[1]
    n_blocks = -(-seq_len // block_size)
    return cache.index_select(0, block_table[:n_blocks].long()).flatten(0, 1)[:seq_len]


def _causal_softmax(scores: torch.Tensor, seq_len: int) -> torch.Tensor:
    """scores [H, Q, S] fp32 for the last Q positions of a sequence of S tokens; masked in place."""
    q = scores.shape[1]
    query_pos = torch.arange(seq_len - q, seq_len, device=scores.device)[:, None]
    key_pos = torch.arange(seq_len, device=scores.device)[None, :]
    return scores.masked_fill_(key_pos > query_pos, float("-inf")).softmax(dim=-1)


class TorchAttention(AttentionBackend):
    name = "torch"

    def _each_sequence(self, meta: AttentionMetadata, cache: torch.Tensor):
        """Yields (token rows, seq_len, context [S, C + R] fp32) per sequence."""
        start = 0
        for i, (q_len, seq_len) in enumerate(zip(meta.query_lens, meta.seq_lens)):
            ctx = gather_context(cache, meta.block_tables[i], seq_len)
            yield slice(start, start + q_len), seq_len, dequantize_kv(ctx, self.kv_scale, torch.float32)
            start += q_len

    def absorbed(self, q_latent, q_pe, cache, meta, scale):
        # Q = query tokens, S = context tokens, H = heads, C = latent dim, R = rope dim.
        # The cache row [latent, k_pe] is the key; its latent part is also the value.
        q = torch.cat((q_latent, q_pe), dim=-1).float() * scale  # [T, H, C + R]
        latent_dim = q_latent.shape[-1]
        out = torch.empty_like(q_latent)
        for rows, seq_len, ctx in self._each_sequence(meta, cache):
            probs = _causal_softmax(torch.einsum("qhc,sc->hqs", q[rows], ctx), seq_len)
            out[rows] = torch.einsum("hqs,sc->qhc", probs, ctx[:, :latent_dim]).to(out.dtype)
        return out

    def naive(self, q_nope, q_pe, cache, w_kv_b, meta, scale):
        heads, nope_dim, rope_dim = q_nope.shape[1], q_nope.shape[-1], q_pe.shape[-1]
        q = torch.cat((q_nope, q_pe), dim=-1).float() * scale  # [T, H, Dn + R]
        out = q_nope.new_empty(q_nope.shape[0], heads, w_kv_b.shape[1] - nope_dim)
        w = w_kv_b.float()
        for rows, seq_len, ctx in self._each_sequence(meta, cache):
            kv = torch.einsum("sc,hdc->shd", ctx[:, :-rope_dim], w)  # [S, H, Dn + Dv]
            k_pe = ctx[:, None, -rope_dim:].expand(-1, heads, -1)
            k = torch.cat((kv[..., :nope_dim], k_pe), dim=-1)  # [S, H, Dn + R]
            probs = _causal_softmax(torch.einsum("qhd,shd->hqs", q[rows], k), seq_len)
            out[rows] = torch.einsum("hqs,shd->qhd", probs, kv[..., nope_dim:]).to(out.dtype)
        return out
