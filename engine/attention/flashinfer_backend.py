"""Paged MLA attention on CUDA with FlashInfer's `BatchMLAPagedAttentionWrapper`.

FlashInfer reads the cache the other backends write: its `ckv_cache` [N, B, Ckv] and
`kpe_cache` [N, B, R] are the two column ranges of the same [N, B, Ckv + R] layer cache
(strided views, no copy). The absorbed form runs in FlashInfer's paged MLA kernel. The
naive form (prefill) runs `chunked.ChunkedPrefill` with FlashInfer's ragged prefill
(`BatchPrefillWithRaggedKVCacheWrapper`, qk head dim 192 and v head dim 128) as its kernel:
context in chunks, attention states merged in fp32, so a long prompt's memory is bounded by
one chunk. FlashInfer's kernels exist for DeepSeek's dims only (Ckv 512, R 64, Dn 128,
Dv 128); other shapes (the tests' small models) take the reference for the absorbed form
and the plain-torch chunked twin for the naive one.

An FP8 cache: the paged MLA kernel reads bf16 here, so each step's absorbed sub-batch
dequantizes its own blocks into a compact bf16 copy (planned on renumbered blocks); that
costs a copy of the batch's context per layer and saves nothing in bandwidth, only cache
capacity. Decode steps recorded in CUDA graphs then take the padded torch attention
(`graph_decode` returns None), which dequantizes as it gathers.

Per step, the wrapper is planned once, on the first layer that runs the step's absorbed
sub-batch (heads, scale and dtypes are only known there), and run by every layer. Blog post: https://flashinfer.ai/2025/02/10/flashinfer-deepseek-mla.html

Decode steps recorded in CUDA graphs (`engine.cuda_graphs`) use `FlashInferGraphDecode`:
the wrapper's CUDA-graph mode, planned outside the graph before every replay.

Legend: S = sequences, T = query tokens, H = heads, N = cache blocks, B = block size,
Ckv = kv_lora_rank, R = rope dim.
"""

from __future__ import annotations

import math
from itertools import accumulate
from typing import NamedTuple

import torch

from .base import AttentionMetadata, GraphDecodeAttention, dequantize_kv, is_fp8
from .chunked import ChunkedPrefill, PrefillKernel, TorchPrefillKernel
from .torch_backend import TorchAttention

WORKSPACE_BYTES = 128 * 1024 * 1024  # FlashInfer's recommended split-k workspace
SUPPORTED_DIMS = (512, 64)  # (Ckv, R) that FlashInfer's MLA kernels are built for
PREFILL_DIMS = (192, 128)  # (Dn + R, Dv) of DeepSeek's naive form, which its ragged prefill is built for
PREFILL_CHUNK_BYTES = 512 << 20  # keys and values of one prefill chunk (bf16): 6.5k tokens of 128 heads
HALF = (torch.bfloat16, torch.float16)


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


class FlashInferPrefillKernel(PrefillKernel):
    """`chunked.PrefillKernel` on FlashInfer's ragged prefill: one request, bf16, causal masks
    aligned to the bottom right (so a causal square is query i seeing keys 0..i).

    FlashInfer's log-sum-exp is in base 2 (its kernels write log2(d) + m of log2e-scaled
    scores, which its own merge_state assumes); it is turned into natural log for the fp32
    merge that `chunked.attend_chunked` shares with the torch twin."""

    dtype = torch.bfloat16

    def __init__(self, wrapper_cls, workspace: torch.Tensor) -> None:
        self._wrapper = wrapper_cls(workspace, "NHD")

    def attend(self, q, k, v, causal, scale):
        heads, dims = q.shape[1], (q.shape[-1], v.shape[-1])
        indptr = lambda n: torch.tensor([0, n], dtype=torch.int32)  # noqa: E731 - plan copies host indptrs over
        self._wrapper.plan(indptr(q.shape[0]), indptr(k.shape[0]), heads, heads, dims[0], head_dim_vo=dims[1],
                           causal=causal, sm_scale=scale, q_data_type=q.dtype, kv_data_type=k.dtype)
        out, lse = self._wrapper.run(q.contiguous(), k.contiguous(), v.contiguous(), return_lse=True)
        return out.float(), lse.float() * math.log(2)


class FlashInferAttention(TorchAttention):
    name = "flashinfer"

    def __init__(self) -> None:
        import flashinfer.mla  # CUDA only: imported when the backend is chosen, never on a CPU
        import flashinfer.prefill

        self._wrapper_cls = flashinfer.mla.BatchMLAPagedAttentionWrapper
        self._ragged_cls = flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper
        self._wrapper = None  # one per backend: its workspaces are allocated once
        self._float_workspace: torch.Tensor | None = None  # shared by every wrapper (they run one at a time)
        self._planned_for: tuple | None = None  # the sub-batch the wrapper is planned for, this step
        self._fp8_blocks: torch.Tensor | None = None  # an FP8 cache: the planned sub-batch's blocks, in plan order
        self._prefill: ChunkedPrefill | None = None  # FlashInfer's chunked prefill, made on first use
        self._prefill_twin = ChunkedPrefill(TorchPrefillKernel(), chunk_bytes=PREFILL_CHUNK_BYTES // 2)

    def plan(self, meta: AttentionMetadata) -> None:
        self._planned_for = None

    def graph_decode(self, max_batch, max_blocks, heads, scale, latent_dim, cache):
        if (latent_dim, cache.shape[-1] - latent_dim) != SUPPORTED_DIMS or cache.dtype not in HALF:
            return None
        return FlashInferGraphDecode(self._wrapper_cls, self._workspace(cache.device), max_batch, max_blocks, heads,
                                     scale, cache)

    def _workspace(self, device: torch.device) -> torch.Tensor:
        if self._float_workspace is None:
            self._float_workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        return self._float_workspace

    def absorbed(self, q_latent, q_pe, cache, meta, scale):
        if (q_latent.shape[-1], q_pe.shape[-1]) != SUPPORTED_DIMS or not (cache.dtype in HALF or is_fp8(cache.dtype)):
            return super().absorbed(q_latent, q_pe, cache, meta, scale)
        self._plan_wrapper(meta, cache, q_latent.shape[1], scale)
        if is_fp8(cache.dtype):  # the sub-batch's blocks, dequantized in plan order
            cache = dequantize_kv(cache.index_select(0, self._fp8_blocks), self.kv_scale, torch.bfloat16)
        ckv, kpe = cache[..., : q_latent.shape[-1]], cache[..., q_latent.shape[-1]:]  # views of one cache
        out = self._wrapper.run(q_latent.to(cache.dtype), q_pe.to(cache.dtype), ckv, kpe)  # [T, H, Ckv]
        return out.to(q_latent.dtype)

    def naive(self, q_nope, q_pe, cache, w_kv_b, meta, scale):
        dims = (q_nope.shape[-1] + q_pe.shape[-1], w_kv_b.shape[1] - q_nope.shape[-1])
        if dims != PREFILL_DIMS or not (cache.dtype in HALF or is_fp8(cache.dtype)):
            return self._prefill_twin(q_nope, q_pe, cache, w_kv_b, meta, scale, self.kv_scale)
        if self._prefill is None:
            kernel = FlashInferPrefillKernel(self._ragged_cls, self._workspace(cache.device))
            self._prefill = ChunkedPrefill(kernel, chunk_bytes=PREFILL_CHUNK_BYTES, max_chunk=16384)
        return self._prefill(q_nope, q_pe, cache, w_kv_b, meta, scale, self.kv_scale)

    def _plan_wrapper(self, meta: AttentionMetadata, cache: torch.Tensor, heads: int, scale: float) -> None:
        """Plans on the first layer of a step (or of a new sub-batch); later layers reuse it.
        An FP8 cache is planned on its sub-batch's blocks renumbered 0..n-1 (see `absorbed`)."""
        key = (meta.query_lens, meta.seq_lens, meta.block_tables.data_ptr(), heads, scale, cache.dtype)
        if key == self._planned_for:
            return
        if self._wrapper is None:
            self._wrapper = self._wrapper_cls(self._workspace(cache.device))
        table = page_table(meta, cache.shape[1], cache.device)
        dtype = cache.dtype
        if is_fp8(dtype):
            self._fp8_blocks, dtype = table.kv_indices, torch.bfloat16
            table = table._replace(kv_indices=torch.arange(len(table.kv_indices), dtype=torch.int32,
                                                           device=cache.device))
        self._wrapper.plan(table.qo_indptr, table.kv_indptr, table.kv_indices, table.kv_lens, heads,
                           *SUPPORTED_DIMS, cache.shape[1], True, scale, dtype, dtype)
        self._planned_for = key
