"""Paged MLA attention for CPU serving: decode batches in one padded computation, prefill
chunks in bounded memory.

The reference (`torch_backend.TorchAttention`) loops over sequences; at decode that costs a
few small ops per sequence and layer. Here the step's decode sequences are gathered once
into a padded [S, M*B, C] context per layer and scored with two batched GEMMs, with the
padding masked out. The gather index and mask are built once per step in `plan`.

The naive form (prefill chunks) runs `chunked.ChunkedPrefill` with its plain-torch kernel:
the context in chunks, each up-projected to keys and values in the cache's dtype (bf16 for
a bf16 or FP8 cache, one GEMM per chunk), scored in fp32 and merged through its log-sum-exp,
so no [H, Q, S] scores exist. (scaled_dot_product_attention would take its slow math path
here: MLA's value dim differs from the query's, and it returns no log-sum-exp.)

An FP8 cache is dequantized as it is gathered: to bf16 for large decode batches, to fp32 for
small ones, as a bf16 cache is.

Legend: S = decode sequences, L = padded context length, H = heads, C = latent + rope dims.
"""

from __future__ import annotations

import torch

from .base import AttentionMetadata, dequantize_kv, is_fp8
from .chunked import ChunkedPrefill, TorchPrefillKernel
from .torch_backend import TorchAttention


# Context rows (sequences x padded length) up to which decode attention runs in fp32: below
# ~800-1000 rows oneDNN's bf16 batched-GEMM setup costs more than the fp32 conversion
# (measured on 2 cores with AMX; at 16 x 192 rows bf16 takes 0.59 ms against 0.87).
FP32_MAX_ROWS = 1024


class CpuAttention(TorchAttention):
    name = "cpu"

    def __init__(self, prefill: ChunkedPrefill | None = None) -> None:
        """prefill: how the naive form runs (default: plain-torch chunks of 32 MiB of keys and values)."""
        self._plans: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.prefill = prefill or ChunkedPrefill(TorchPrefillKernel())

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
            ctx = dequantize_kv(ctx, self.kv_scale, torch.float32)  # small bf16 GEMMs cost more in setup than math
        elif is_fp8(ctx.dtype):
            ctx = dequantize_kv(ctx, self.kv_scale, torch.bfloat16)
        q = torch.cat((q_latent, q_pe), dim=-1) * scale  # [S, H, C]
        scores = torch.bmm(q.to(ctx.dtype), ctx.transpose(1, 2)).float()  # [S, H, L]
        probs = scores.masked_fill_(pad, float("-inf")).softmax(dim=-1).to(ctx.dtype)
        # Reduce over the whole row and drop the rope part after: cheaper than copying ctx's latent half.
        return torch.bmm(probs, ctx)[..., : q_latent.shape[-1]].to(q_latent.dtype)  # [S, H, Ckv]

    def naive(self, q_nope, q_pe, cache, w_kv_b, meta, scale):
        return self.prefill(q_nope, q_pe, cache, w_kv_b, meta, scale, self.kv_scale)
