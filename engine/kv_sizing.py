"""How many KV cache blocks each rank holds.

Two ways to size the cache:
- `--kv-cache-memory GIB` names its bytes per rank. When given it wins; on the CPU it is the
  only way (default 1 GiB), because host memory is shared with other processes and ranks,
  and a zeroed cache touches every page it is given.
- `--gpu-memory-utilization F` (CUDA): once the weights are loaded, one profiled step at the
  largest batch the scheduler can form runs on the device, and the cache gets what is left
  of F x the device's memory after the peak of that step (as vLLM's worker does in
  `determine_available_memory`). The profiled step: `max_num_batched_tokens` fresh tokens
  over `min(max_num_seqs, tokens)` sequences, all prefill from position 0, then the logits
  and a softmax of every sequence (the sampler's largest tensors). Not profiled, so left to
  the (1 - F) margin: CUDA graphs' memory pool, recorded after the cache is allocated.

Every rank must hold the same number of blocks (a TP rank mirrors its DP head's cache, and
the head of the engine counts `num_blocks * dp` blocks), so the ranks exchange what each
could hold and all take the smallest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from engine.attention import AttentionMetadata
from engine.distributed import ParallelState

log = logging.getLogger(__name__)
GIB = 1 << 30
SCRATCH_BLOCKS = 1  # the block ModelRunner adds as CUDA graphs' scratch


@dataclass(frozen=True)
class KVCacheSpec:
    """What sizing the cache needs from the serve flags."""

    block_size: int
    max_num_batched_tokens: int  # the profiled step's tokens
    max_num_seqs: int  # and at most this many sequences
    memory_gib: float | None  # --kv-cache-memory per rank; None: from utilization
    utilization: float = 0.9  # --gpu-memory-utilization

    def __post_init__(self) -> None:
        if self.memory_gib is not None and not self.memory_gib > 0:
            raise ValueError(f"--kv-cache-memory must be positive, got {self.memory_gib}")
        if not 0 < self.utilization <= 1:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.utilization}")


@dataclass(frozen=True)
class MemoryProfile:
    """Bytes of one device, measured after the profiled step."""

    total: int  # the device's memory
    free: int  # free now for anyone (the step's tensors released, the allocator's cache emptied)
    allocated: int  # held by live tensors now: the weights and what the model keeps
    peak: int  # torch's peak during the step: `allocated` plus the step's activations
    non_torch: int  # what this process added outside torch's allocator since it started (NCCL, cuBLAS)

    @property
    def activations(self) -> int:
        """Bytes a step at the largest batch needs beside the weights and the cache."""
        return max(0, self.peak - self.allocated)


def kv_cache_budget(profile: MemoryProfile, utilization: float) -> int:
    """Bytes the cache may take: F x the device less this process's peak, and no more than
    is free beside a step's activations (other processes may hold some of the device)."""
    share = int(utilization * profile.total) - profile.peak - profile.non_torch
    return min(share, profile.free - profile.activations)


@dataclass(frozen=True)
class KVCacheSize:
    """The blocks every rank holds, and how that was decided (for the log)."""

    num_blocks: int
    block_size: int
    block_bytes: int
    source: str

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self, dp_size: int = 1) -> str:
        groups = f"; {dp_size} DP groups hold {self.tokens * dp_size:,}" if dp_size > 1 else ""
        return (f"KV cache: {self.num_blocks:,} blocks of {self.block_size} tokens = {self.tokens:,} tokens "
                f"({self.num_blocks * self.block_bytes / GIB:.2f} GiB per rank){groups}, from {self.source}")


class DeviceMemory(Protocol):
    """Measures one device around the profiled step."""

    def reset_peak(self) -> None:
        """Forgets the peak so far (loading's temporaries are gone before the step runs)."""

    def measure(self, scratch_bytes: int) -> MemoryProfile:
        """The device after the step; `scratch_bytes` of the peak were its temporary cache."""


class CudaMemory:
    """A CUDA device through torch's allocator statistics and the driver's free/total.
    Create it before the weights load: memory that other processes held then is not ours."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.outside_at_start = self._outside_torch()

    def _outside_torch(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free - torch.cuda.memory_reserved(self.device)

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def measure(self, scratch_bytes: int) -> MemoryProfile:
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - scratch_bytes
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        return MemoryProfile(total, free, torch.cuda.memory_allocated(self.device), peak,
                             max(0, self._outside_torch() - self.outside_at_start))


def block_bytes(model, block_size: int) -> int:
    """Bytes of one cache block on every layer, in whatever dtype the model caches."""
    one = model.allocate_kv_cache(1, block_size)
    return one.numel() * one.element_size()


def blocks_in(memory_gib: float, per_block: int) -> int:
    """Blocks that --kv-cache-memory holds; raises ValueError when not even one."""
    blocks = int(memory_gib * GIB // per_block)
    if blocks < 1:
        raise ValueError(f"--kv-cache-memory {memory_gib} GiB holds no block of {per_block} bytes")
    return blocks


def profile_batch(tokens: int, max_seqs: int) -> list[int]:
    """The profiled step's sequence lengths: `tokens` split as evenly as can be over
    min(max_seqs, tokens) sequences."""
    seqs = max(1, min(max_seqs, tokens))
    return [tokens // seqs + (i < tokens % seqs) for i in range(seqs)]


@torch.inference_mode()
def profile_step(model, tokens: int, max_seqs: int, block_size: int) -> int:
    """Runs the largest step on `model`'s device (on every rank of a parallel model at
    once: the forward's collectives pair up) with a cache of just the blocks it needs,
    then frees it; returns that cache's bytes. Token ids are fixed, the same on every rank."""
    lens = profile_batch(tokens, max_seqs)
    dev = model.device
    widths = [-(-n // block_size) for n in lens]
    firsts = [sum(widths[:i]) for i in range(len(lens))]
    tables = torch.tensor([[f + j if j < w else 0 for j in range(max(widths))] for f, w in zip(firsts, widths)],
                          dtype=torch.int32, device=dev)  # [S, M]
    slots = torch.cat([torch.arange(n) + f * block_size for f, n in zip(firsts, lens)]).to(dev)  # [T]
    positions = torch.cat([torch.arange(n) for n in lens]).to(dev)  # [T]
    ids = torch.randint(0, model.cfg.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0)).to(dev)
    cache = model.allocate_kv_cache(sum(widths), block_size)
    meta = AttentionMetadata(tuple(lens), tuple(lens), tables, slots)
    hidden = model(ids, positions, cache, meta)  # [T, D]
    last = torch.tensor(lens, device=dev).cumsum(0) - 1  # [S]
    torch.softmax(model.compute_logits(hidden[last]), dim=-1)  # [S, V] fp32, as the sampler does
    scratch = cache.numel() * cache.element_size()
    del cache, hidden
    return scratch


def size_kv_cache(spec: KVCacheSpec, model, state: ParallelState, memory: DeviceMemory | None) -> KVCacheSize:
    """The blocks every rank holds. With `spec.memory_gib` None this profiles the model (on
    every rank together, after they all loaded) and needs `memory`; raises ValueError,
    naming the numbers of the rank with the least room, when the cache gets no block."""
    per_block = block_bytes(model, spec.block_size)
    if spec.memory_gib is not None:
        return KVCacheSize(blocks_in(spec.memory_gib, per_block), spec.block_size, per_block,
                           f"--kv-cache-memory {spec.memory_gib:g} GiB")
    memory.reset_peak()
    scratch = profile_step(model, spec.max_num_batched_tokens, spec.max_num_seqs, spec.block_size)
    profile = memory.measure(scratch)
    blocks = kv_cache_budget(profile, spec.utilization) // per_block - SCRATCH_BLOCKS
    blocks, report = _least(state, blocks, _report(spec, profile, per_block, state.rank))
    if blocks < 1:
        raise ValueError(f"no room for the KV cache: {report}; raise --gpu-memory-utilization, lower "
                         f"--max-num-batched-tokens or --max-num-seqs, or add ranks")
    return KVCacheSize(blocks, spec.block_size, per_block, report)


def _report(spec: KVCacheSpec, profile: MemoryProfile, per_block: int, rank: int) -> str:
    g = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
    return (f"--gpu-memory-utilization {spec.utilization:g} of {g(profile.total)} on rank {rank} = "
            f"{g(int(spec.utilization * profile.total))}, less a peak of {g(profile.peak)} (weights and a "
            f"profiled step of {spec.max_num_batched_tokens} tokens over "
            f"{len(profile_batch(spec.max_num_batched_tokens, spec.max_num_seqs))} sequences) and "
            f"{g(profile.non_torch)} outside torch; {g(profile.free)} free on the device; "
            f"a block takes {per_block:,} bytes")


def _least(state: ParallelState, blocks: int, report: str) -> tuple[int, str]:
    """The smallest block count over every rank, and that rank's report. Over the group that
    waits as long as loading may (ranks profile at their own pace)."""
    if state.start_pg is None:
        return blocks, report
    everyone = [None] * state.world.size
    dist.all_gather_object(everyone, (blocks, report), group=state.start_pg)
    return min(everyone, key=lambda item: item[0])
