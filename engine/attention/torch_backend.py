"""Paged MLA attention in plain torch: the specification every fast backend is held to.

One sequence at a time, in fp32: gather the sequence's cache rows through its block
table, score, mask causally, softmax, reduce. Slow and obviously right.
"""

from __future__ import annotations

import torch

from .base import AttentionBackend, AttentionMetadata


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """cache [N, B, C]; block_table [M] int32 -> the sequence's first seq_len rows [S, C]."""
    block_size = cache.shape[1]
    n_blocks = -(-seq_len // block_size)
    return cache[block_table[:n_blocks].long()].flatten(0, 1)[:seq_len]


def _causal_softmax(scores: torch.Tensor, seq_len: int) -> torch.Tensor:
    """scores [H, Q, S] fp32 for the last Q positions of a sequence of S tokens."""
    q = scores.shape[1]
    query_pos = torch.arange(seq_len - q, seq_len, device=scores.device)[:, None]
    key_pos = torch.arange(seq_len, device=scores.device)[None, :]
    return scores.masked_fill(key_pos > query_pos, float("-inf")).softmax(dim=-1)


class TorchAttention(AttentionBackend):
    name = "torch"

    @staticmethod
    def _each_sequence(meta: AttentionMetadata, cache: torch.Tensor, rope_dim: int):
        """Yields (token rows, seq_len, latent [S, Ckv] fp32, k_pe [S, R] fp32) per sequence."""
        start = 0
        for i, (q_len, seq_len) in enumerate(zip(meta.query_lens, meta.seq_lens)):
            ctx = gather_context(cache, meta.block_tables[i], seq_len).float()
            yield slice(start, start + q_len), seq_len, ctx[:, :-rope_dim], ctx[:, -rope_dim:]
            start += q_len

    def absorbed(self, q_latent, q_pe, cache, meta, scale):
        out = torch.empty_like(q_latent)
        for rows, seq_len, latent, k_pe in self._each_sequence(meta, cache, q_pe.shape[-1]):
            # Q = query tokens, S = context tokens, H = heads, C = latent dim, R = rope dim
            scores = (torch.einsum("qhc,sc->hqs", q_latent[rows].float(), latent)
                      + torch.einsum("qhr,sr->hqs", q_pe[rows].float(), k_pe)) * scale
            probs = _causal_softmax(scores, seq_len)
            out[rows] = torch.einsum("hqs,sc->qhc", probs, latent).to(out.dtype)
        return out

    def naive(self, q_nope, q_pe, cache, w_kv_b, meta, scale):
        nope_dim = q_nope.shape[-1]
        out = q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], w_kv_b.shape[1] - nope_dim)
        w = w_kv_b.float()
        for rows, seq_len, latent, k_pe in self._each_sequence(meta, cache, q_pe.shape[-1]):
            kv = torch.einsum("sc,hdc->shd", latent, w)  # [S, H, Dn + Dv]
            k_nope, v = kv[..., :nope_dim], kv[..., nope_dim:]
            scores = (torch.einsum("qhd,shd->hqs", q_nope[rows].float(), k_nope)
                      + torch.einsum("qhr,sr->hqs", q_pe[rows].float(), k_pe)) * scale
            probs = _causal_softmax(scores, seq_len)
            out[rows] = torch.einsum("hqs,shd->qhd", probs, v).to(out.dtype)
        return out
