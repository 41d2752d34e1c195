"""Paged MLA attention for CPU serving: decode batches in one padded computation, prefill
chunks through one up-projection GEMM.

The reference (`torch_backend.TorchAttention`) loops over sequences; at decode that costs a
few small ops per sequence and layer. Here the step's decode sequences are gathered once
into a padded [S, M*B, C] context per layer and scored with two batched GEMMs, with the
padding masked out. The gather index and mask are built once per step in `plan`.

The naive form (prefill chunks) of a bf16 cache gathers every chunk's context at once,
up-projects it to keys and values in one bf16 GEMM (the reference does one fp32 einsum per
sequence), then scores and reduces each sequence in fp32 with its causal mask aligned to
the end of its context. An fp32 cache takes the reference. (scaled_dot_product_attention
would take its slow math path here: MLA's value dim differs from the query's.)

Legend: S = decode sequences, L = padded context length, H = heads, C = latent + rope dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionMetadata
from .torch_backend import TorchAttention


# Context rows (sequences x padded length) up to which decode attention runs in fp32: below
# ~800-1000 rows oneDNN's bf16 batched-GEMM setup costs more than the fp32 conversion
# (measured on 2 cores with AMX; at 16 x 192 rows bf16 takes 0.59 ms against 0.87).
FP32_MAX_ROWS = 1024


class CpuAttention(TorchAttention):
    name = "cpu"

    def __init__(self) -> None:
        self._plans: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._up_proj: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # each layer's w_kv_b in bf16, made once

    def plan(self, meta: AttentionMetadata) -> None:
        self._plans.clear()

    def _decode_plan(self, meta: AttentionMetadata, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block ids [S, M] int64, padding mask [S, 1, L] bool), shared by every layer."""
        key = (meta.seq_lens, meta.block_tables.data_ptr())
        if key not in self._plans:
            longest = max(meta.seq_lens)
            blocks = meta.block_tables[:, : -(-longest // block_size)].long()
            pos = torch.arange(blocks.shape[1] * block_size, device=blocks.device)
            lens = torch.tensor(meta.seq_lens, device=blocks.device)
            self._plans[key] = blocks, (pos[None, :] >= lens[:, None])[:, None, :]
        return self._plans[key]

    def absorbed(self, q_latent, q_pe, cache, meta, scale):
        if any(q != 1 for q in meta.query_lens):
            return super().absorbed(q_latent, q_pe, cache, meta, scale)
        blocks, pad = self._decode_plan(meta, cache.shape[1])
        ctx = cache.index_select(0, blocks.flatten()).view(blocks.shape[0], -1, cache.shape[-1])  # [S, L, C]
        if ctx.shape[0] * ctx.shape[1] <= FP32_MAX_ROWS:
            ctx = ctx.float()  # small bf16 batched GEMMs cost more in oneDNN's setup than in math
        q = torch.cat((q_latent, q_pe), dim=-1) * scale  # [S, H, C]
        scores = torch.bmm(q.to(ctx.dtype), ctx.transpose(1, 2)).float()  # [S, H, L]
        probs = scores.masked_fill_(pad, float("-inf")).softmax(dim=-1).to(ctx.dtype)
        # Reduce over the whole row and drop the rope part after: cheaper than copying ctx's latent half.
        return torch.bmm(probs, ctx)[..., : q_latent.shape[-1]].to(q_latent.dtype)  # [S, H, Ckv]

    def naive(self, q_nope, q_pe, cache, w_kv_b, meta, scale):
        if cache.dtype != torch.bfloat16:
            return super().naive(q_nope, q_pe, cache, w_kv_b, meta, scale)
        heads, nope_dim, latent_dim = q_nope.shape[1], q_nope.shape[-1], w_kv_b.shape[-1]
        v_dim = w_kv_b.shape[1] - nope_dim
        block_size = cache.shape[1]
        offsets = torch.arange(block_size, device=cache.device)
        rows = torch.cat([(meta.block_tables[i, : -(-s // block_size)].long()[:, None] * block_size + offsets)
                          .flatten()[:s] for i, s in enumerate(meta.seq_lens)])
        ctx = cache.view(-1, cache.shape[-1]).index_select(0, rows)  # [sum of contexts, C + R]
        key = (w_kv_b.data_ptr(), cache.dtype)
        if key not in self._up_proj:
            self._up_proj[key] = w_kv_b.flatten(0, 1).to(cache.dtype)  # [H * (Dn + Dv), C]
        kv = F.linear(ctx[:, :latent_dim], self._up_proj[key]).view(-1, heads, nope_dim + v_dim)
        q = torch.cat((q_nope, q_pe), dim=-1).float().transpose(0, 1)  # [H, T, Dn + R]
        out = q_nope.new_empty(q_nope.shape[0], heads, v_dim)
        masks: dict[tuple[int, int], torch.Tensor] = {}
        q_start = k_start = 0
        for q_len, seq_len in zip(meta.query_lens, meta.seq_lens):
            ks = slice(k_start, k_start + seq_len)
            k = torch.cat((kv[ks, :, :nope_dim], ctx[ks, None, latent_dim:].expand(-1, heads, -1)), dim=-1)
            if (q_len, seq_len) not in masks:  # query i sees keys up to seq_len - q_len + i
                masks[q_len, seq_len] = torch.zeros(q_len, seq_len, device=q.device).masked_fill_(
                    torch.ones(q_len, seq_len, dtype=torch.bool, device=q.device).triu_(seq_len - q_len + 1),
                    float("-inf"))
            scores = torch.baddbmm(masks[q_len, seq_len], q[:, q_start:q_start + q_len],
                                   k.float().permute(1, 2, 0), alpha=scale)  # [H, q_len, seq_len] fp32
            o = torch.bmm(scores.softmax(dim=-1), kv[ks, :, nope_dim:].float().transpose(0, 1))
            out[q_start:q_start + q_len] = o.transpose(0, 1)
            q_start, k_start = q_start + q_len, k_start + seq_len
        return out
