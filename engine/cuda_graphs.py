"""CUDA graphs for decode steps: the model's forward recorded once per padded batch size,
then replayed with each step's inputs copied into fixed buffers.

A decode step (one new token per sequence) launches a few hundred small kernels whose
launch costs more than their work at small batches; replaying a recorded CUDA graph
launches them all at once. A recording fixes every tensor's address and shape and every
value the host computed while it was made, so:
- a step's B sequences are padded to the smallest recorded size P >= B (`capture_sizes`);
  padding rows write and read only a scratch KV block that the block pool never hands out;
- every per-step input (token ids, positions, cache slots, lengths, block tables) lives in
  a fixed buffer (`StaticInputs`) that the step copies into before the replay;
- attention reads the lengths from that buffer (`GraphAttention`), never from host ints;
  FlashInfer is planned outside the graph before each replay; an FP8 cache is written
  (quantized) by the same scatter and read (dequantized) by the padded torch attention;
- nothing in the recorded region may wait for the device: the routed experts must run in
  the fused Triton MoE, which sizes its buffers from shapes alone (`capture_blocker`).
Steps with a prefill chunk, or more sequences than the largest recorded size, run eagerly.

Recording sits behind `DecodeGraph`: `CudaGraph` on a GPU, `EagerGraph` (a replay reruns
the recorded function on the buffers) on the CPU, so that all of the above but the
recording itself is tested without a GPU.

Legend: B = sequences in the step, P = recorded (padded) batch size, M = max blocks per
sequence, L = M * block size, H = heads, C = kv_lora_rank + rope dim, D = hidden size.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from engine.attention import AttentionBackend, AttentionMetadata
from engine.attention.base import GraphDecodeAttention, dequantize_kv
from engine.model import DeepseekV3ForCausalLM
from engine.model.moe_backends import TritonMoE

log = logging.getLogger(__name__)

MAX_RECORDED_BATCH = 256  # larger decode batches are compute-bound: launches no longer matter
PADDED_ATTENTION_BYTES = 1 << 30  # temporaries of the padded torch attention the largest graph may hold


def capture_sizes(max_batch: int) -> tuple[int, ...]:
    """The recorded batch sizes, 1, 2, 4, 8, then every multiple of 8, up to the first that
    holds max_batch sequences (at most MAX_RECORDED_BATCH)."""
    ladder = [1, 2, 4, 8, *range(16, MAX_RECORDED_BATCH + 1, 8)]
    limit = min(max_batch, MAX_RECORDED_BATCH)
    return tuple(s for s in ladder if s < limit) + (next(s for s in ladder if s >= limit),)


class DecodeGraph(ABC):
    """One recorded forward. `capture(fn)` records fn, which must read and write only
    tensors that outlive it, and returns fn's output; `replay()` reruns the recording on
    those tensors' current contents and refreshes that output in place."""

    @abstractmethod
    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor: ...

    @abstractmethod
    def replay(self) -> None: ...


class CudaGraph(DecodeGraph):
    """A torch.cuda.CUDAGraph; the graphs of one runner share a memory pool (only one runs
    at a time), so each holds little beyond its output."""

    def __init__(self, pool) -> None:
        self.pool, self.graph = pool, torch.cuda.CUDAGraph()

    def capture(self, fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy set-up (cuBLAS workspaces, Triton/FlashInfer JIT) outside the recording
            fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph, pool=self.pool):
            out = fn()
        return out

    def replay(self):
        self.graph.replay()


def cuda_graph_factory() -> Callable[[], DecodeGraph]:
    """New CudaGraphs sharing one memory pool."""
    pool = torch.cuda.graph_pool_handle()
    return lambda: CudaGraph(pool)


class EagerGraph(DecodeGraph):
    """The CPU stand-in: a replay calls fn again and copies its result into the output that
    `capture` returned. As with a real recording, fn is built once, so a value it took from
    the host at capture (a Python int of that step) goes stale: the CPU tests catch it."""

    def capture(self, fn):
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self):
        self.out.copy_(self.fn())


class DecodeBatch(NamedTuple):
    """The host side of a decode step: one new token for each of B sequences."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]  # cache row each new token is written to (block * block size + offset)
    seq_lens: list[int]  # tokens in cache after the step
    block_tables: list[list[int]]


class StaticInputs:
    """The buffers every recording reads, sized for the largest recorded batch (a graph of P
    sequences reads the first P rows):
        ints [4, P_max] int64: token ids, positions, cache slots, sequence lengths
        block_tables [P_max, M] int32, unused columns holding stale blocks or `fill`
    """

    def __init__(self, max_batch: int, max_blocks: int, fill: int, device: torch.device) -> None:
        self.ints = torch.zeros(4, max_batch, dtype=torch.int64, device=device)
        self.ints[3] = 1
        self.block_tables = torch.full((max_batch, max_blocks), fill, dtype=torch.int32, device=device)
        self.fill = fill

    def load(self, batch: DecodeBatch) -> None:
        """Copies a (padded) batch in: two host-to-device copies."""
        size, width = len(batch.token_ids), max(len(t) for t in batch.block_tables)
        self.ints[:, :size].copy_(torch.tensor([batch.token_ids, batch.positions, batch.slots, batch.seq_lens]))
        tables = [t + [self.fill] * (width - len(t)) for t in batch.block_tables]
        self.block_tables[:size, :width].copy_(torch.tensor(tables, dtype=torch.int32))

    def metadata(self, size: int) -> AttentionMetadata:
        """The step description a graph of `size` sequences is recorded with: device tensors
        only, and placeholder host lengths that no recorded code may read."""
        return AttentionMetadata((1,) * size, (1,) * size, self.block_tables[:size], self.ints[2, :size],
                                 num_decodes=size, seq_lens_tensor=self.ints[3, :size])


def padded_decode_attention(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                            kv_scale: float = 1.0) -> torch.Tensor:
    """Absorbed decode attention with no shape set by the lengths, so a graph can record it:
    every sequence's whole block-table row is gathered and positions at or past its length
    are masked. The slow twin is `TorchAttention.absorbed` (fp32 likewise).

    q_latent [P, H, Ckv]; q_pe [P, H, R]; cache [N, B, C] (model dtype, or FP8 holding values
    / kv_scale); block_tables [P, M] int32 (valid block ids throughout); seq_lens [P] int64
    (>= 1). Returns [P, H, Ckv] in q_latent's dtype.
    """
    size, blocks = block_tables.shape
    ctx = cache.index_select(0, block_tables.flatten().long()).view(size, -1, cache.shape[-1])
    ctx = dequantize_kv(ctx, kv_scale, torch.float32)  # [P, L, C]
    q = torch.cat((q_latent, q_pe), dim=-1).float() * scale  # [P, H, C]
    scores = torch.bmm(q, ctx.transpose(1, 2))  # [P, H, L]
    past_end = torch.arange(ctx.shape[1], device=ctx.device)[None, :] >= seq_lens[:, None]  # [P, L]
    probs = scores.masked_fill_(past_end[:, None, :], float("-inf")).softmax(dim=-1)
    return torch.bmm(probs, ctx[..., : q_latent.shape[-1]]).to(q_latent.dtype)


class GraphAttention(AttentionBackend):
    """The model's attention backend, with the decode steps recorded in CUDA graphs added.

    Ordinary steps go to `inner` unchanged. A recorded step (meta.seq_lens_tensor set) is
    planned by the graph runner before each replay (`prepare`), not by the model's forward;
    its absorbed attention runs in the inner backend's own graph mode where it has one for
    the model's dims (FlashInfer), else in `padded_decode_attention`.
    """

    def __init__(self, inner: AttentionBackend, native: GraphDecodeAttention | None) -> None:
        self.inner, self.native, self.name, self.kv_scale = inner, native, inner.name, inner.kv_scale

    def prepare(self, batch: DecodeBatch) -> None:
        """Outside the recording: plans the padded batch about to be recorded or replayed."""
        if self.native is not None:
            self.native.plan(batch.seq_lens, batch.block_tables)

    def plan(self, meta):
        if meta.seq_lens_tensor is None:
            self.inner.plan(meta)

    def write_kv(self, cache, latent, k_pe, meta):
        if meta.seq_lens_tensor is None:
            return self.inner.write_kv(cache, latent, k_pe, meta)
        return super().write_kv(cache, latent, k_pe, meta)  # a scatter at device slots: recordable

    def absorbed(self, q_latent, q_pe, cache, meta, scale):
        if meta.seq_lens_tensor is None:
            return self.inner.absorbed(q_latent, q_pe, cache, meta, scale)
        if self.native is not None:
            return self.native.absorbed(q_latent, q_pe, cache)
        return padded_decode_attention(q_latent, q_pe, cache, meta.block_tables, meta.seq_lens_tensor, scale,
                                       self.kv_scale)

    def naive(self, q_nope, q_pe, cache, w_kv_b, meta, scale):
        if meta.seq_lens_tensor is not None:
            raise RuntimeError("a recorded decode step runs the absorbed form only")
        return self.inner.naive(q_nope, q_pe, cache, w_kv_b, meta, scale)


def capture_blocker(model: DeepseekV3ForCausalLM) -> str | None:
    """Why a CUDA graph cannot record the model's decode forward, or None if it can."""
    for experts in model.routed_experts():
        if not isinstance(experts.backend, TritonMoE):
            return ("the routed experts are not on CUDA, so they run the per-expert torch MoE "
                    "(kernels.moe_ref), which loops over ids.unique().tolist(): a wait for the device "
                    "and shapes set by each step's routing. Only the fused Triton MoE sizes its work "
                    "from shapes alone")
    return None


@dataclass(frozen=True)
class DecodeGraphConfig:
    """What to record: batches of up to max_batch sequences (capped at MAX_RECORDED_BATCH) of
    up to max_blocks cache blocks each, with graphs from `new_graph`."""

    max_batch: int
    max_blocks: int
    new_graph: Callable[[], DecodeGraph]

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_blocks < 1:
            raise ValueError("max_batch and max_blocks must be positive")


def cuda_graph_config(model: DeepseekV3ForCausalLM, max_batch: int, max_model_len: int,
                      block_size: int) -> DecodeGraphConfig | None:
    """CUDA graphs for the model's decode steps where it runs on CUDA and can be recorded;
    None (eager decode, with the reason logged) elsewhere."""
    if model.device.type != "cuda":
        return None
    reason = capture_blocker(model)
    if reason is not None:
        log.warning("decode steps run without CUDA graphs: %s", reason)
        return None
    return DecodeGraphConfig(max_batch, -(-max_model_len // block_size), cuda_graph_factory())


class CudaGraphRunner:
    """Records the decode forward (to the final norm's hidden states) at each size of the
    ladder, largest first, and replays the smallest recording that holds a step.

    The logits stay outside the recordings: kept inside, every recording would hold its own
    [P, V] fp32 output (about 2 GiB over the whole ladder at DeepSeek's vocabulary), where
    hidden states take [P, D]; and outside they are computed for the sampled rows only, as
    in an eager step.

    Installs a `GraphAttention` as the model's backend (ordinary steps pass through it
    unchanged): the model hands its backend to every layer, and a recorded step needs its
    own. Not thread-safe: the engine loop is the only caller.
    """

    def __init__(self, model: DeepseekV3ForCausalLM, kv_cache: torch.Tensor, config: DecodeGraphConfig,
                 scratch_block: int) -> None:
        self.model, self.kv_cache = model, kv_cache
        self.block_size, self.max_blocks, self.scratch = kv_cache.shape[2], config.max_blocks, scratch_block
        inner = model.attention.inner if isinstance(model.attention, GraphAttention) else model.attention
        cfg = model.cfg
        sizes = capture_sizes(config.max_batch)
        native = inner.graph_decode(sizes[-1], config.max_blocks, cfg.num_attention_heads, cfg.softmax_scale,
                                    cfg.kv_lora_rank, kv_cache[0])
        self.sizes = sizes if native is not None else self._fit_padded_attention(sizes)
        self.max_size = max(self.sizes, default=0)
        self.attention = model.attention = GraphAttention(inner, native)
        self.inputs = StaticInputs(max(self.max_size, 1), config.max_blocks, scratch_block, model.device)
        self.graphs: dict[int, tuple[DecodeGraph, torch.Tensor]] = {}
        with torch.inference_mode():
            for size in sorted(self.sizes, reverse=True):
                self.graphs[size] = self._record(size, config.new_graph())

    def _fit_padded_attention(self, sizes: tuple[int, ...]) -> tuple[int, ...]:
        """The sizes whose padded torch attention temporaries ([P, L, C] context, [P, H, L]
        scores, fp32) fit PADDED_ATTENTION_BYTES; larger batches run eagerly."""
        cfg, rows = self.model.cfg, self.max_blocks * self.block_size
        per_seq = 4 * rows * (cfg.kv_cache_dim + 2 * cfg.num_attention_heads)
        fitting = tuple(s for s in sizes if s * per_seq <= PADDED_ATTENTION_BYTES)
        if len(fitting) < len(sizes):
            log.warning("decode batches over %d sequences run without CUDA graphs: the padded torch attention "
                        "of a larger one needs over %d MiB", fitting[-1] if fitting else 0,
                        PADDED_ATTENTION_BYTES >> 20)
        return fitting

    def _record(self, size: int, graph: DecodeGraph) -> tuple[DecodeGraph, torch.Tensor]:
        batch = self._pad(DecodeBatch([], [], [], [], []), size)
        self.inputs.load(batch)
        self.attention.prepare(batch)
        meta, ids, positions = self.inputs.metadata(size), self.inputs.ints[0, :size], self.inputs.ints[1, :size]
        model, cache = self.model, self.kv_cache
        try:
            return graph, graph.capture(lambda: model(ids, positions, cache, meta))
        except RuntimeError as exc:
            raise RuntimeError(f"recording the decode step of {size} sequences failed ({exc}); "
                               "turn CUDA graphs off to serve this model (engine serve --enforce-eager)") from exc

    def fits(self, query_lens: list[int], block_tables: list[list[int]]) -> bool:
        """Whether a step can replay a recording: decodes only, few enough, tables narrow enough."""
        return (0 < len(query_lens) <= self.max_size and all(q == 1 for q in query_lens)
                and all(len(t) <= self.max_blocks for t in block_tables))

    def run(self, batch: DecodeBatch) -> torch.Tensor:
        """Replays the decode step of a batch that `fits`. Returns hidden states [B, D], a view
        of the recording's output: valid until the next replay."""
        b = len(batch.token_ids)
        size = next(s for s in self.sizes if s >= b)  # sizes ascend
        padded = self._pad(batch, size)
        graph, hidden = self.graphs[size]
        with torch.inference_mode():
            self.inputs.load(padded)
            self.attention.prepare(padded)
            graph.replay()
        return hidden[:b]

    def _pad(self, batch: DecodeBatch, size: int) -> DecodeBatch:
        """Adds rows for token 0 at position 0 of a one-token sequence in the scratch block."""
        n = size - len(batch.token_ids)
        return DecodeBatch(batch.token_ids + [0] * n, batch.positions + [0] * n,
                           batch.slots + [self.scratch * self.block_size] * n, batch.seq_lens + [1] * n,
                           batch.block_tables + [[self.scratch]] * n)
