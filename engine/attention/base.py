"""The attention backend interface and the per-step batch description it reads.

A step's batch is a flat run of tokens from many sequences: decodes (one new token
each) first, then prefill chunks of any length. Each sequence's KV lives in fixed-size
blocks of a paged cache, found through its row of `block_tables`. MLA caches, per token
and layer, only the compressed latent and the rope key, so the cache row is
`kv_lora_rank + qk_rope_head_dim` wide and carries no head dimension.

Cache layout, shared by every backend (FlashInfer's paged MLA reads the same memory as
its `ckv` and `kpe` views):
    kv_cache [L, N, B, C]   L layers, N blocks, B tokens per block, C = kv_lora_rank + rope dim

The cache is in the model dtype, or in FP8 (float8_e4m3fn, `--kv-cache-dtype fp8_e4m3`) with
one per-tensor scale: a stored value times `AttentionBackend.kv_scale` is the latent or rope
key. Every backend quantizes in `write_kv` and dequantizes what it reads (`quantize_kv`,
`dequantize_kv`); FP8 halves the bytes per token of a bf16 cache.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_MAX = torch.finfo(FP8_KV_DTYPE).max  # 448: larger magnitudes saturate rather than turn into NaN
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")  # --kv-cache-dtype: the model dtype, or FP8 with a per-tensor scale


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_KV_DTYPE


def quantize_kv(rows: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """rows [..., C] of latents and rope keys -> what a cache of `dtype` stores for them."""
    if not is_fp8(dtype):
        return rows.to(dtype)
    return (rows.float() / scale).clamp_(-FP8_KV_MAX, FP8_KV_MAX).to(dtype)


def dequantize_kv(rows: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows [..., C] -> their values in `dtype` (rows of a cache in the model dtype are only cast)."""
    if not is_fp8(rows.dtype):
        return rows.to(dtype)
    values = rows.to(dtype)
    return values if scale == 1.0 else values.mul_(scale)


class MLAPath(enum.Enum):
    """Which form of MLA a step uses. AUTO: absorbed for decodes, naive for prefills."""

    AUTO = "auto"
    ABSORBED = "absorbed"
    NAIVE = "naive"


@dataclass(frozen=True)
class AttentionMetadata:
    """What every layer needs to find each token's sequence, position and cache rows.

    S = sequences in the step, T = tokens in the step, M = max blocks per sequence.
    query_lens:   new tokens per sequence (host ints, length S)
    seq_lens:     tokens in cache after this step, new ones included (host ints, length S)
    block_tables: [S, M] int32, the cache blocks of each sequence in order
    slot_mapping: [T] int64, flat cache row (block * B + offset) each new token is written to
    num_decodes:  how many leading sequences are decodes (query_len 1 and decoding, not prefill)
    seq_lens_tensor: [S] int64 on the device, set only for a decode step recorded in a CUDA
                  graph (`engine.cuda_graphs`). A recording replays with other lengths, so
                  there `seq_lens` holds the lengths it was recorded with, and the attention
                  that runs in it reads this tensor instead.
    """

    query_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    num_decodes: int = 0
    path: MLAPath = MLAPath.AUTO
    seq_lens_tensor: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.query_lens) != len(self.seq_lens) or len(self.seq_lens) != self.block_tables.shape[0]:
            raise ValueError("query_lens, seq_lens and block_tables disagree on the number of sequences")
        if any(q > s or q <= 0 for q, s in zip(self.query_lens, self.seq_lens)):
            raise ValueError("every sequence needs 0 < query_len <= seq_len")
        if any(q != 1 for q in self.query_lens[: self.num_decodes]):
            raise ValueError("decodes must come first in the batch, one token each")
        if self.slot_mapping.numel() != self.num_tokens:
            raise ValueError(f"slot_mapping has {self.slot_mapping.numel()} rows for {self.num_tokens} tokens")
        if self.seq_lens_tensor is not None and self.seq_lens_tensor.shape != (len(self.seq_lens),):
            raise ValueError(f"seq_lens_tensor has shape {list(self.seq_lens_tensor.shape)} for "
                             f"{len(self.seq_lens)} sequences")

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[T] int64: each new token's position in its sequence."""
        parts = [torch.arange(s - q, s) for q, s in zip(self.query_lens, self.seq_lens)]
        return torch.cat(parts).to(device)

    def sequences(self, start: int, stop: int) -> "AttentionMetadata":
        """The sub-batch of sequences [start, stop), with its own token rows."""
        t0, t1 = sum(self.query_lens[:start]), sum(self.query_lens[:stop])
        lens = None if self.seq_lens_tensor is None else self.seq_lens_tensor[start:stop]
        return AttentionMetadata(
            self.query_lens[start:stop], self.seq_lens[start:stop], self.block_tables[start:stop],
            self.slot_mapping[t0:t1], max(0, min(self.num_decodes, stop) - start), self.path, lens)

    def token_range(self, start: int, stop: int) -> slice:
        return slice(sum(self.query_lens[:start]), sum(self.query_lens[:stop]))

    @cached_property
    def forms(self) -> tuple[tuple[slice, "AttentionMetadata", bool], ...]:
        """The step split by MLA form, once per step: (token rows, sub-batch, absorbed?) for
        the absorbed sequences (decodes under AUTO) and then the naive ones, omitting empty parts."""
        n_seqs = len(self.query_lens)
        n = {MLAPath.AUTO: self.num_decodes, MLAPath.ABSORBED: n_seqs, MLAPath.NAIVE: 0}[self.path]
        parts = [(self.token_range(0, n), self.sequences(0, n), True)] if n else []
        if n < n_seqs:
            parts.append((self.token_range(n, n_seqs), self.sequences(n, n_seqs), False))
        return tuple(parts)


class GraphDecodeAttention(ABC):
    """A backend's own way to run the absorbed attention of decode steps inside CUDA graphs
    (see `AttentionBackend.graph_decode`), for the fixed batch sizes a graph runner records.

    Contract: `plan` runs outside any recording, before a batch size is recorded and before
    each of its replays, with that replay's batch; `absorbed` runs inside the recording, once
    per layer, and reads only buffers whose addresses never change. P = recorded batch size.
    """

    @abstractmethod
    def plan(self, seq_lens: list[int], block_tables: list[list[int]]) -> None:
        """The batch about to run, padding rows included: lengths (host ints, length P, each
        >= 1) and each sequence's cache blocks (at least ceil(seq_len / B) of them)."""

    @abstractmethod
    def absorbed(self, q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        """As `AttentionBackend.absorbed` for the batch last planned with P sequences:
        q_latent [P, H, Ckv]; q_pe [P, H, R]; cache [N, B, Ckv + R]. Returns [P, H, Ckv]."""


class AttentionBackend(ABC):
    """Paged MLA attention for one model on one device.

    Contract: `plan(meta)` is called once per step before any layer runs; `write_kv`,
    `absorbed` and `naive` are then called once per layer with that same metadata (or a
    sub-batch of it from `meta.sequences`). Queries attend causally to every cached token
    of their sequence up to their own position, the tokens written by `write_kv` in this
    step included. A backend holds no cache memory of its own: the caller owns `kv_cache`
    and must not let two steps use it at once.

    An FP8 cache holds values / `kv_scale`. The scale is 1.0, as vLLM and SGLang use for an
    uncalibrated FP8 KV cache: MLA's latent leaves an RMSNorm, so it sits well inside e4m3's
    range (|x| <= 448); the rope key saturates at 448 if it ever leaves it.
    """

    name: str = ""
    kv_scale: float = 1.0

    def plan(self, meta: AttentionMetadata) -> None:
        """Prepares per-step work (index buffers, kernel plans). Default: nothing to do."""

    def graph_decode(self, max_batch: int, max_blocks: int, heads: int, scale: float, latent_dim: int,
                     cache: torch.Tensor) -> GraphDecodeAttention | None:
        """This backend's CUDA-graph mode for decode batches of up to max_batch sequences of up
        to max_blocks blocks each, for a model with `heads` heads, softmax `scale` and
        latent width `latent_dim` (Ckv); cache is one layer's [N, B, Ckv + R] (block size,
        dtype, device). None where it has none for these dims (the default): recorded steps
        then run the graph runner's padded torch attention."""
        return None

    def write_kv(self, cache: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        """Stores the step's new tokens. cache [N, B, C]; latent [T, Ckv]; k_pe [T, R] (roped)."""
        rows = cache.view(-1, cache.shape[-1])
        rows[meta.slot_mapping] = quantize_kv(torch.cat((latent, k_pe), dim=-1), cache.dtype, self.kv_scale)

    @abstractmethod
    def absorbed(self, q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                 meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Weight-absorbed MLA: attention of latent queries against the latent cache.

        q_latent [T, H, Ckv] (q_nope already multiplied by W_UK); q_pe [T, H, R];
        cache [N, B, Ckv + R]. Returns [T, H, Ckv] in q_latent's dtype: softmax(q.k) @ latent,
        to be multiplied by W_UV by the caller.
        """

    @abstractmethod
    def naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
              w_kv_b: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Naive MLA: latents up-projected to per-head keys and values, then plain attention.

        q_nope [T, H, Dn]; q_pe [T, H, R]; cache [N, B, Ckv + R];
        w_kv_b [H, Dn + Dv, Ckv] (kv_b_proj's weight). Returns [T, H, Dv] in q_nope's dtype.
        """
