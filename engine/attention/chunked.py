"""Prefill attention (MLA's naive form) in memory bounded by a chunk, not by context x query.

The reference (`TorchAttention.naive`, the spec) up-projects a sequence's whole context to
per-head keys and values and scores every query against every key at once: [H, Q, S]
scores, 16 GiB in fp32 for a 32k-token prompt of four heads. Here the context is cut into
chunks of K tokens. Each chunk's latents are up-projected on their own, every query that
sees the chunk attends to it, and the partial results are merged through their
log-sum-exp: the online softmax of FlashAttention (Dao et al. 2022, section 3.1), in the
form of FlashInfer's attention states (docs.flashinfer.ai, "Attention States and Recursive
Attention").

Chunk boundaries (`plan_chunks`): the cached prefix [0, S - Q) in chunks of K, then the
queries' own positions in chunks of K. Later queries see a chunk of the second kind whole;
its own queries see it through a causal square (query i, key j: j <= i), so every piece is
either unmasked or a square causal mask, which is what ragged prefill kernels take.

One plan, two kernels (`PrefillKernel`): `TorchPrefillKernel` here (plain torch, fp32,
queries in row blocks so the scores stay [H, rows, K]), which the CPU backend runs; and
FlashInfer's ragged prefill (`flashinfer_backend.FlashInferPrefillKernel`) on CUDA. The
merge is the same fp32 torch code for both.

Peak memory per sequence: the output state [Q, H, Dv] and its log-sum-exp [Q, H] (fp32, the
size of the output), one chunk's keys and values [K, H, Dn + R + Dv], one piece's partial
state [K, H, Dv] (pieces have at most K rows) and one block of scores.

Legend: T = query tokens of the step, Q = one sequence's query tokens, S = its context,
K = chunk tokens, H = heads, Dn = nope dim, R = rope dim, Dq = Dn + R, Dv = value dim,
C = kv_lora_rank.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .base import AttentionMetadata, dequantize_kv, is_fp8


class Piece(NamedTuple):
    """Query rows (of one sequence's Q) that see a chunk, and whether through a causal square."""

    rows: slice
    causal: bool


class Chunk(NamedTuple):
    keys: slice  # context positions [start, stop)
    pieces: tuple[Piece, ...]


def plan_chunks(query_len: int, seq_len: int, chunk: int) -> list[Chunk]:
    """The chunks of a sequence whose last `query_len` of `seq_len` positions are queries,
    with pieces of at most `chunk` rows. The first chunk is seen by every query row: the
    merge starts from it."""

    def pieces(first: int, causal_rows: int) -> tuple[Piece, ...]:
        own = (Piece(slice(first, first + causal_rows), True),) if causal_rows else ()
        start = first + causal_rows
        return own + tuple(Piece(slice(r, min(r + chunk, query_len)), False) for r in range(start, query_len, chunk))

    start = seq_len - query_len
    plan = [Chunk(slice(a, min(a + chunk, start)), pieces(0, 0)) for a in range(0, start, chunk)]
    plan += [Chunk(slice(a, min(a + chunk, seq_len)), pieces(a - start, min(chunk, seq_len - a)))
             for a in range(start, seq_len, chunk)]
    return plan


def merge_state_(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Merges attention state b into (out, lse) in place (out_b is overwritten): the result is
    attention over both key sets. out, out_b [R, H, Dv] fp32; lse, lse_b [R, H] fp32, natural log."""
    merged = torch.logaddexp(lse, lse_b)
    out.mul_(torch.exp(lse - merged)[..., None]).add_(out_b.mul_(torch.exp(lse_b - merged)[..., None]))
    lse.copy_(merged)


class PrefillKernel(ABC):
    """Attention of some query rows against one chunk of keys and values, with its log-sum-exp.

    `dtype` is what `attend` takes its q, k and v in."""

    dtype: torch.dtype

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """q [R, H, Dq]; k [K, H, Dq]; v [K, H, Dv]; causal: R == K and row i sees keys 0..i.
        Returns (out [R, H, Dv] fp32, lse [R, H] fp32, natural log) of softmax(scale q.k) v."""


class TorchPrefillKernel(PrefillKernel):
    """Plain torch in fp32, query rows in blocks so that one block's scores [H, rows, K] stay
    under `score_bytes`. A causal square's block of rows [r0, r1) reads keys [0, r1) only."""

    dtype = torch.float32

    def __init__(self, score_bytes: int = 32 << 20) -> None:
        self.score_bytes = score_bytes

    def attend(self, q, k, v, causal, scale):
        rows, heads = q.shape[:2]
        qt, kt, vt = q.transpose(0, 1), k.permute(1, 2, 0), v.transpose(0, 1)  # [H, R, Dq], [H, Dq, K], [H, K, Dv]
        out = q.new_empty(rows, heads, v.shape[-1])
        lse = q.new_empty(rows, heads)
        block = max(16, self.score_bytes // (4 * heads * k.shape[0]))
        for r0 in range(0, rows, block):
            r1 = min(r0 + block, rows)
            keys = r1 if causal else k.shape[0]
            scores = torch.bmm(qt[:, r0:r1], kt[..., :keys]).mul_(scale)  # [H, r1 - r0, keys]
            if causal:  # row r0 + i sees keys 0..r0 + i: only the block's own square is masked
                above = torch.ones(r1 - r0, r1 - r0, dtype=torch.bool, device=q.device).triu_(1)
                scores[..., r0:].masked_fill_(above, float("-inf"))
            top = scores.amax(dim=-1, keepdim=True)
            probs = scores.sub_(top).exp_()
            total = probs.sum(dim=-1, keepdim=True)  # [H, rows, 1]
            out[r0:r1] = torch.bmm(probs, vt[:, :keys]).div_(total).transpose(0, 1)
            lse[r0:r1] = (top + total.log()).squeeze(-1).transpose(0, 1)
        return out, lse


def attend_chunked(q: torch.Tensor, seq_len: int, chunk_kv: Callable[[slice], tuple[torch.Tensor, torch.Tensor]],
                   kernel: PrefillKernel, chunk: int, scale: float) -> torch.Tensor:
    """One sequence: q [Q, H, Dq] (its last Q positions, in kernel.dtype); chunk_kv(keys) gives
    (k [K, H, Dq], v [K, H, Dv]) of the context positions `keys`. Returns [Q, H, Dv] fp32."""
    out = lse = None
    for i, part in enumerate(plan_chunks(q.shape[0], seq_len, chunk)):
        k, v = chunk_kv(part.keys)
        for rows, causal in part.pieces:
            out_p, lse_p = kernel.attend(q[rows], k, v, causal, scale)
            if out is None:
                out = out_p.new_empty(q.shape[0], *out_p.shape[1:])
                lse = lse_p.new_empty(q.shape[0], lse_p.shape[1])
            if i == 0:  # the first chunk covers every row, in disjoint pieces
                out[rows], lse[rows] = out_p, lse_p
            else:
                merge_state_(out[rows], lse[rows], out_p, lse_p)
    return out


def chunk_tokens(heads: int, dims: int, itemsize: int, budget_bytes: int, most: int) -> int:
    """Chunk length whose keys and values ([K, H, dims] of itemsize bytes) fit budget_bytes:
    a multiple of 128 in [128, most]."""
    return max(128, min(most, budget_bytes // (heads * dims * itemsize)) // 128 * 128)


def context_rows(cache: torch.Tensor, block_table: torch.Tensor, keys: slice) -> torch.Tensor:
    """cache [N, B, C + R]; block_table [M] int32 -> rows [K, C + R] of positions `keys`, in
    the cache's dtype: whole blocks gathered, then trimmed."""
    block = cache.shape[1]
    first, last = keys.start // block, -(-keys.stop // block)
    rows = cache.index_select(0, block_table[first:last].long()).flatten(0, 1)
    offset = keys.start - first * block
    return rows[offset:offset + keys.stop - keys.start]


class ChunkedPrefill:
    """The naive MLA form of a step's sequences, chunk by chunk through one kernel (see the
    module docstring). Keeps each layer's kv_b_proj weight in the up-projection's dtype.

    chunk: tokens per chunk, or None to size chunks to `chunk_bytes` of keys and values."""

    def __init__(self, kernel: PrefillKernel, chunk: int | None = None, chunk_bytes: int = 32 << 20,
                 max_chunk: int = 8192) -> None:
        self.kernel, self.chunk, self.chunk_bytes, self.max_chunk = kernel, chunk, chunk_bytes, max_chunk
        # (layer's w_kv_b, dtype) -> (that w_kv_b, its [H * (Dn + Dv), C] copy); holding w_kv_b
        # keeps its address from being reused by another tensor while the copy is cached
        self._weights: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def up_dtype(self, cache: torch.Tensor, query_dtype: torch.dtype) -> torch.dtype:
        """The dtype latents are up-projected in: the cache's; an FP8 cache's values go up in
        bf16, or in fp32 for fp32 queries (an fp32 model)."""
        if is_fp8(cache.dtype):
            return torch.float32 if query_dtype == torch.float32 else torch.bfloat16
        return cache.dtype

    def _weight(self, w_kv_b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """w_kv_b [H, Dn + Dv, C] -> [H * (Dn + Dv), C] in dtype (a view where it already is)."""
        if w_kv_b.dtype == dtype:
            return w_kv_b.flatten(0, 1)
        key = (w_kv_b.data_ptr(), dtype)
        if key not in self._weights or self._weights[key][0] is not w_kv_b:
            self._weights[key] = w_kv_b, w_kv_b.flatten(0, 1).to(dtype)
        return self._weights[key][1]

    def __call__(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, w_kv_b: torch.Tensor,
                 meta: AttentionMetadata, scale: float, kv_scale: float) -> torch.Tensor:
        """As `AttentionBackend.naive` (q_nope [T, H, Dn]; q_pe [T, H, R]; cache [N, B, C + R];
        w_kv_b [H, Dn + Dv, C]), for a cache holding values / kv_scale. Returns [T, H, Dv]."""
        heads, nope, latent_dim = q_nope.shape[1], q_nope.shape[-1], w_kv_b.shape[-1]
        v_dim = w_kv_b.shape[1] - nope
        up = self._weight(w_kv_b, self.up_dtype(cache, q_nope.dtype))
        item = max(self.kernel.dtype.itemsize, up.dtype.itemsize)
        chunk = self.chunk or chunk_tokens(heads, nope + q_pe.shape[-1] + v_dim, item, self.chunk_bytes,
                                           self.max_chunk)
        q = torch.cat((q_nope, q_pe), dim=-1).to(self.kernel.dtype)  # [T, H, Dq]
        out = q_nope.new_empty(q_nope.shape[0], heads, v_dim)

        def chunk_kv(table: torch.Tensor, keys: slice) -> tuple[torch.Tensor, torch.Tensor]:
            ctx = dequantize_kv(context_rows(cache, table, keys), kv_scale, up.dtype)  # [K, C + R]
            kv = F.linear(ctx[:, :latent_dim], up).view(-1, heads, nope + v_dim).to(self.kernel.dtype)
            k_pe = ctx[:, None, latent_dim:].to(self.kernel.dtype).expand(-1, heads, -1)
            return torch.cat((kv[..., :nope], k_pe), dim=-1), kv[..., nope:]  # [K, H, Dq], [K, H, Dv]

        start = 0
        for i, (q_len, seq_len) in enumerate(zip(meta.query_lens, meta.seq_lens)):
            rows = slice(start, start + q_len)
            table = meta.block_tables[i]
            out[rows] = attend_chunked(q[rows], seq_len, lambda keys: chunk_kv(table, keys), self.kernel, chunk,
                                       scale).to(out.dtype)
            start += q_len
        return out
