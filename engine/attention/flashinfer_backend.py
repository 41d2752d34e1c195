"""Paged MLA attention on CUDA with FlashInfer's `BatchMLAPagedAttentionWrapper`.

FlashInfer reads the cache the other backends write: its `ckv_cache` [N, B, Ckv] and
`kpe_cache` [N, B, R] are the two column ranges of the same [N, B, Ckv + R] layer cache
(strided views, no copy). The absorbed form runs in FlashInfer; the naive form (prefill)
stays the torch reference's. FlashInfer's kernels exist for DeepSeek's dims only
(Ckv 512, R 64); other shapes (the tests' small models) fall back to the reference.

Per step, the wrapper is planned once, on the first layer that runs the step's absorbed
sub-batch (heads, scale and dtypes are only known there), and run by every layer. Blog post: https://flashinfer.ai/2025/02/10/flashinfer-deepseek-mla.html

Legend: S = sequences, T = query tokens, H = heads, N = cache blocks, B = block size,
Ckv = kv_lora_rank, R = rope dim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .base import AttentionMetadata
from .torch_backend import TorchAttention

WORKSPACE_BYTES = 128 * 1024 * 1024  # FlashInfer's recommended split-k workspace
SUPPORTED_DIMS = (512, 64)  # (Ckv, R) that FlashInfer's MLA kernels are built for


class PageTable(NamedTuple):
    """A sub-batch in FlashInfer's CSR form, all int32 on the cache's device."""

    qo_indptr: torch.Tensor  # [S + 1]: query rows of each sequence
    kv_indptr: torch.Tensor  # [S + 1]: ranges of kv_indices per sequence
    kv_indices: torch.Tensor  # [sum of blocks used]: the blocks of each sequence, in order
    kv_lens: torch.Tensor  # [S]: tokens in cache per sequence


def page_table(meta: AttentionMetadata, block_size: int, device: torch.device) -> PageTable:
    blocks = [-(-s // block_size) for s in meta.seq_lens]
    indices = torch.cat([meta.block_tables[i, :n] for i, n in enumerate(blocks)]).int()
    cumsum = lambda xs: torch.tensor([0, *xs], dtype=torch.int32).cumsum(0, dtype=torch.int32)  # noqa: E731
    return PageTable(cumsum(meta.query_lens).to(device), cumsum(blocks).to(device), indices.to(device),
                     torch.tensor(meta.seq_lens, dtype=torch.int32, device=device))


class FlashInferAttention(TorchAttention):
    name = "flashinfer"

    def __init__(self) -> None:
        import flashinfer.mla  # CUDA only: imported when the backend is chosen, never on a CPU

        self._wrapper_cls = flashinfer.mla.BatchMLAPagedAttentionWrapper
        self._wrapper = None  # one per backend: its workspaces are allocated once
        self._planned_for: tuple | None = None  # the sub-batch the wrapper is planned for, this step

    def plan(self, meta: AttentionMetadata) -> None:
        self._planned_for = None

    def absorbed(self, q_latent, q_pe, cache, meta, scale):
        if (q_latent.shape[-1], q_pe.shape[-1]) != SUPPORTED_DIMS or cache.dtype not in (torch.bfloat16, torch.float16):
            return super().absorbed(q_latent, q_pe, cache, meta, scale)
        ckv, kpe = cache[..., : q_latent.shape[-1]], cache[..., q_latent.shape[-1]:]  # views of one cache
        self._plan_wrapper(meta, cache, q_latent.shape[1], scale)
        out = self._wrapper.run(q_latent.to(cache.dtype), q_pe.to(cache.dtype), ckv, kpe)  # [T, H, Ckv]
        return out.to(q_latent.dtype)

    def _plan_wrapper(self, meta: AttentionMetadata, cache: torch.Tensor, heads: int, scale: float) -> None:
        """Plans on the first layer of a step (or of a new sub-batch); later layers reuse it."""
        key = (meta.query_lens, meta.seq_lens, meta.block_tables.data_ptr(), heads, scale, cache.dtype)
        if key == self._planned_for:
            return
        if self._wrapper is None:
            workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=cache.device)
            self._wrapper = self._wrapper_cls(workspace)
        table = page_table(meta, cache.shape[1], cache.device)
        self._wrapper.plan(table.qo_indptr, table.kv_indptr, table.kv_indices, table.kv_lens, heads,
                           *SUPPORTED_DIMS, cache.shape[1], True, scale, cache.dtype, cache.dtype)
        self._planned_for = key
