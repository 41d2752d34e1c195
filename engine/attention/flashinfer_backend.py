"""Paged MLA attention on CUDA with FlashInfer's `BatchMLAPagedAttentionWrapper`.

FlashInfer reads the cache the other backends write: its `ckv_cache` [N, B, Ckv] and
`kpe_cache` [N, B, R] are the two column ranges of the same [N, B, Ckv + R] layer cache
(strided views, no copy). The absorbed form runs in FlashInfer; the naive form (prefill)
stays the torch reference's. FlashInfer's kernels exist for DeepSeek's dims only
(Ckv 512, R 64); other shapes (the tests' small models) fall back to the reference.

Per step, the wrapper is planned once, on the first layer that runs the step's absorbed
sub-batch (heads, scale and dtypes are only known there), and run by every layer. Blog post: https://flashinfer.ai/2025/02/10/flashinfer-deepseek-mla.html

Decode steps recorded in CUDA graphs (`engine.cuda_graphs`) use `FlashInferGraphDecode`:
the wrapper's CUDA-graph mode, planned outside the graph before every replay.

Legend: S = sequences, T = query tokens, H = heads, N = cache blocks, B = block size,
Ckv = kv_lora_rank, R = rope dim.
"""

from __future__ import annotations

from itertools import accumulate
from typing import NamedTuple

import torch

from .base import AttentionMetadata, GraphDecodeAttention
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


def host_page_table(seq_lens: list[int], block_tables: list[list[int]], block_size: int) -> PageTable:
    """A decode batch (one query per sequence) in CSR form, as int32 CPU tensors: FlashInfer's
    plan reads the indptrs on the host anyway, and copies them into its graph-mode buffers."""
    blocks = [-(-s // block_size) for s in seq_lens]
    indices = [b for table, n in zip(block_tables, blocks) for b in table[:n]]
    as_int32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    return PageTable(as_int32(range(len(seq_lens) + 1)), as_int32([0, *accumulate(blocks)]), as_int32(indices),
                     as_int32(seq_lens))


class FlashInferGraphDecode(GraphDecodeAttention):
    """FlashInfer's MLA wrapper in CUDA-graph mode, for decode batches of recorded sizes.

    A graph-mode wrapper has a fixed batch size, so there is one per recorded size P, all
    sharing the float workspace and one set of index buffers sized for the largest batch:
    qo_indptr [P_max + 1], kv_indptr [P_max + 1], kv_indices [P_max * M], kv_lens [P_max]
    (int32). `plan` copies a batch into those buffers and recomputes the work split on the
    host; where the split lives in the workspaces depends only on the batch size and head
    count (FlashInfer's `MLAPlan`), so the graph recorded at size P reads each new plan.
    """

    def __init__(self, wrapper_cls, workspace: torch.Tensor, max_batch: int, max_blocks: int, heads: int,
                 scale: float, cache: torch.Tensor) -> None:
        zeros = lambda n: torch.zeros(n, dtype=torch.int32, device=cache.device)  # noqa: E731
        self._buffers = PageTable(zeros(max_batch + 1), zeros(max_batch + 1), zeros(max_batch * max_blocks),
                                  zeros(max_batch))
        self._wrapper_cls, self._workspace = wrapper_cls, workspace
        self._heads, self._scale, self._dtype, self._block_size = heads, scale, cache.dtype, cache.shape[1]
        self._wrappers: dict[int, object] = {}

    def _wrapper(self, size: int):
        if size not in self._wrappers:
            b = self._buffers
            self._wrappers[size] = self._wrapper_cls(
                self._workspace, use_cuda_graph=True, qo_indptr=b.qo_indptr[: size + 1],
                kv_indptr=b.kv_indptr[: size + 1], kv_indices=b.kv_indices, kv_len_arr=b.kv_lens[:size])
        return self._wrappers[size]

    def plan(self, seq_lens, block_tables):
        table = host_page_table(seq_lens, block_tables, self._block_size)
        self._wrapper(len(seq_lens)).plan(*table, self._heads, *SUPPORTED_DIMS, self._block_size, True,
                                          self._scale, self._dtype, self._dtype)

    def absorbed(self, q_latent, q_pe, cache):
        ckv, kpe = cache[..., : SUPPORTED_DIMS[0]], cache[..., SUPPORTED_DIMS[0]:]  # views of one cache
        out = self._wrappers[q_latent.shape[0]].run(q_latent.to(cache.dtype), q_pe.to(cache.dtype), ckv, kpe)
        return out.to(q_latent.dtype)  # [P, H, Ckv]


class FlashInferAttention(TorchAttention):
    name = "flashinfer"

    def __init__(self) -> None:
        import flashinfer.mla  # CUDA only: imported when the backend is chosen, never on a CPU

        self._wrapper_cls = flashinfer.mla.BatchMLAPagedAttentionWrapper
        self._wrapper = None  # one per backend: its workspaces are allocated once
        self._float_workspace: torch.Tensor | None = None  # shared by this wrapper and the graph-mode ones
        self._planned_for: tuple | None = None  # the sub-batch the wrapper is planned for, this step

    def plan(self, meta: AttentionMetadata) -> None:
        self._planned_for = None

    def graph_decode(self, max_batch, max_blocks, heads, scale, latent_dim, cache):
        if (latent_dim, cache.shape[-1] - latent_dim) != SUPPORTED_DIMS or cache.dtype not in (torch.bfloat16,
                                                                                                torch.float16):
            return None
        return FlashInferGraphDecode(self._wrapper_cls, self._workspace(cache.device), max_batch, max_blocks, heads,
                                     scale, cache)

    def _workspace(self, device: torch.device) -> torch.Tensor:
        if self._float_workspace is None:
            self._float_workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        return self._float_workspace

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
            self._wrapper = self._wrapper_cls(self._workspace(cache.device))
        table = page_table(meta, cache.shape[1], cache.device)
        self._wrapper.plan(table.qo_indptr, table.kv_indptr, table.kv_indices, table.kv_lens, heads,
                           *SUPPORTED_DIMS, cache.shape[1], True, scale, cache.dtype, cache.dtype)
        self._planned_for = key
