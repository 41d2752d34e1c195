"""The KV cache's size (`engine.kv_sizing`): what is left of --gpu-memory-utilization after a
profiled step at the largest batch, --kv-cache-memory winning when given, every rank agreeing
on one size, and the flags' bad values refused with one line.

On the CPU the device is a stand-in (`FakeMemory`) that reports chosen numbers, while the
profiled step itself runs for real on the serving model; the tests marked `needs_cuda`
measure a GPU and skip without one.
"""

from __future__ import annotations

import argparse
import math
import re

import pytest
import torch

from engine.__main__ import CPU_KV_CACHE_GIB, _kv_cache_memory, main
from engine.distributed import ParallelState
from engine.engine_process import ServeConfig
from engine.kv_sizing import (GIB, SCRATCH_BLOCKS, KVCacheSpec, MemoryProfile, block_bytes, blocks_in,
                              kv_cache_budget, profile_batch, size_kv_cache)
from engine.loader import load_model
from engine_server import EngineProcess
from helpers import SERVING, make_serving_checkpoint
from moeserve.engine.v1 import engine_pb2 as pb
from parallel_ranks import run_ranks

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: --gpu-memory-utilization measures one")
# SERVING's cache in fp32: 2 layers x 16 tokens x (kv_lora_rank 128 + rope 32) x 4 bytes
SERVING_BLOCK_BYTES = 2 * 16 * (128 + 32) * 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_serving_checkpoint(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir, dtype="float32", progress=False)


class FakeMemory:
    """A device that reports the numbers it is given, and records what it was asked."""

    def __init__(self, profile: MemoryProfile) -> None:
        self.profile, self.calls = profile, []

    def reset_peak(self) -> None:
        self.calls.append("reset_peak")

    def measure(self, scratch_bytes: int) -> MemoryProfile:
        self.calls.append(("measure", scratch_bytes))
        return self.profile


def profile_of(total_gib: float, peak_gib: float, *, free_gib: float | None = None, allocated_gib: float | None = None,
               non_torch_gib: float = 0.0) -> MemoryProfile:
    free = total_gib - peak_gib if free_gib is None else free_gib
    allocated = peak_gib if allocated_gib is None else allocated_gib
    return MemoryProfile(int(total_gib * GIB), int(free * GIB), int(allocated * GIB), int(peak_gib * GIB),
                         int(non_torch_gib * GIB))


# --- the arithmetic -------------------------------------------------------------------------

def test_the_cache_gets_what_is_left_of_the_share_after_the_peak_and_memory_outside_torch():
    profile = profile_of(80, 40, free_gib=39, allocated_gib=38, non_torch_gib=1)
    assert kv_cache_budget(profile, 0.9) == int(0.9 * 80 * GIB) - 40 * GIB - 1 * GIB  # 31 GiB


def test_memory_that_others_hold_caps_the_cache_at_what_is_free_beside_a_step():
    # another process holds 30 GiB: only 10 GiB are free, of which a step needs 2 GiB
    profile = profile_of(80, 40, free_gib=10, allocated_gib=38)
    assert kv_cache_budget(profile, 0.9) == 8 * GIB


def test_the_profiled_step_spreads_the_token_budget_over_at_most_max_num_seqs_sequences():
    assert profile_batch(2048, 64) == [32] * 64
    assert profile_batch(100, 8) == [13] * 4 + [12] * 4
    assert profile_batch(5, 64) == [1] * 5
    assert sum(profile_batch(8191, 256)) == 8191


def test_kv_cache_memory_that_holds_no_block_is_refused_naming_both_sizes():
    with pytest.raises(ValueError, match=r"--kv-cache-memory 1e-06 GiB holds no block of 20480 bytes"):
        blocks_in(1e-6, 20480)


# --- sizing the real model --------------------------------------------------------------------

def test_the_block_size_in_bytes_is_what_the_runner_allocates(model):
    assert block_bytes(model, 16) == SERVING_BLOCK_BYTES


def test_a_profiled_step_at_the_largest_batch_sizes_the_cache_from_the_utilization(model):
    spec = KVCacheSpec(16, max_num_batched_tokens=512, max_num_seqs=8, memory_gib=None, utilization=0.5)
    memory = FakeMemory(profile_of(8, 1, allocated_gib=0.5))
    size = size_kv_cache(spec, model, ParallelState.single(), memory)
    assert size.num_blocks == (4 * GIB - 1 * GIB) // SERVING_BLOCK_BYTES - SCRATCH_BLOCKS
    assert size.tokens == size.num_blocks * 16
    # the step ran after the peak was reset, on a cache of exactly its blocks: 8 sequences of 64 tokens
    assert memory.calls == ["reset_peak", ("measure", 8 * 4 * SERVING_BLOCK_BYTES)]
    assert re.match(r"KV cache: [\d,]+ blocks of 16 tokens = [\d,]+ tokens \([\d.]+ GiB per rank\), from "
                    r"--gpu-memory-utilization 0.5 of 8.00 GiB on rank 0", size.describe())


def test_kv_cache_memory_wins_and_nothing_is_profiled(model):
    spec = KVCacheSpec(16, 512, 8, memory_gib=0.02, utilization=0.5)
    size = size_kv_cache(spec, model, ParallelState.single(), memory=None)
    assert size.num_blocks == int(0.02 * GIB) // SERVING_BLOCK_BYTES
    assert size.source == "--kv-cache-memory 0.02 GiB"


def test_no_room_left_for_the_cache_is_refused_naming_the_numbers(model):
    spec = KVCacheSpec(16, 512, 8, memory_gib=None, utilization=0.5)
    with pytest.raises(ValueError) as err:
        size_kv_cache(spec, model, ParallelState.single(), FakeMemory(profile_of(8, 4.5)))
    message = str(err.value)
    for part in ("no room for the KV cache", "--gpu-memory-utilization 0.5 of 8.00 GiB on rank 0 = 4.00 GiB",
                 "peak of 4.50 GiB", "512 tokens over 8 sequences", "raise --gpu-memory-utilization"):
        assert part in message, message


# --- every rank holds the same cache -------------------------------------------------------

def rank_size(state, path, totals_gib: list[float]):
    """On each rank: its part of the model, sized on a device of totals_gib[rank] GiB."""
    model = load_model(path, dtype="float32", progress=False, parallel=state)
    spec = KVCacheSpec(16, max_num_batched_tokens=256, max_num_seqs=4, memory_gib=None, utilization=0.5)
    try:
        return size_kv_cache(spec, model, state, FakeMemory(profile_of(totals_gib[state.rank], 1))).num_blocks
    except ValueError as exc:
        return str(exc)


@pytest.mark.parametrize("tp,dp,ep", [(2, 1, False), (1, 2, True)], ids=["tp2", "dp2-ep"])
def test_every_rank_takes_the_smallest_cache_any_rank_can_hold(model_dir, tp, dp, ep):
    results = run_ranks(rank_size, tp, dp, ep, (model_dir, [9.0, 8.0]))
    smallest = (4 * GIB - 1 * GIB) // SERVING_BLOCK_BYTES - SCRATCH_BLOCKS  # rank 1's: 0.5 x 8 GiB less 1 GiB
    assert results == [smallest, smallest]


def test_every_rank_refuses_when_one_has_no_room_naming_that_rank(model_dir):
    results = run_ranks(rank_size, 2, 1, False, (model_dir, [9.0, 2.0]))
    assert all(isinstance(r, str) and "on rank 1" in r and "no room for the KV cache" in r for r in results), results


# --- flags --------------------------------------------------------------------------------

def test_serve_config_refuses_a_utilization_outside_0_to_1():
    for value in (0.0, -0.1, 1.01, math.nan):
        with pytest.raises(ValueError, match=r"--gpu-memory-utilization must be in \(0, 1\]"):
            ServeConfig("model", device="cuda", kv_cache_memory_gib=None, gpu_memory_utilization=value)
    ServeConfig("model", device="cuda", kv_cache_memory_gib=None, gpu_memory_utilization=1.0)


def test_serve_config_sizes_a_cpu_cache_only_from_kv_cache_memory():
    with pytest.raises(ValueError, match="on the CPU give --kv-cache-memory"):
        ServeConfig("model", device="cpu", kv_cache_memory_gib=None)
    with pytest.raises(ValueError, match="--kv-cache-memory must be positive"):
        ServeConfig("model", kv_cache_memory_gib=math.nan)


def flags(kv=None, utilization=None) -> argparse.Namespace:
    return argparse.Namespace(kv_cache_memory=kv, gpu_memory_utilization=utilization)


def test_kv_cache_memory_wins_over_the_utilization_and_the_cpu_default_is_one_gib():
    assert _kv_cache_memory(flags(), "cuda") == (None, 0.9)
    assert _kv_cache_memory(flags(utilization=0.7), "cuda") == (None, 0.7)
    assert _kv_cache_memory(flags(kv=4.0, utilization=0.7), "cuda") == (4.0, 0.7)
    assert _kv_cache_memory(flags(), "cpu") == (CPU_KV_CACHE_GIB, 0.9)
    assert _kv_cache_memory(flags(kv=0.5, utilization=0.7), "cpu") == (0.5, 0.7)


@pytest.mark.parametrize("argv,message", [
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be in (0, 1], got 1.5"),
    (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization must be in (0, 1], got 0.0"),
    (["--gpu-memory-utilization", "0.5"], "on the CPU give --kv-cache-memory GIB"),
], ids=["above-1", "zero", "cpu-without-kv-cache-memory"])
def test_serve_refuses_bad_memory_flags_with_one_error_line_and_exit_2(model_dir, capsys, argv, message):
    code = main(["serve", "--model", str(model_dir), "--device", "cpu", "--port", "0", *argv])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert not any("Traceback" in line for line in err)


# --- served -----------------------------------------------------------------------------------

def test_a_served_engine_reports_the_tokens_its_kv_cache_memory_holds(model_dir):
    engine = EngineProcess(model_dir, "--kv-cache-memory", "0.02", "--gpu-memory-utilization", "0.5")
    try:
        info = engine.stub().GetModelInfo(pb.GetModelInfoRequest())
    finally:
        assert engine.stop() == 0
    blocks = int(0.02 * GIB) // SERVING_BLOCK_BYTES
    assert info.kv_cache.total_blocks == blocks and info.kv_cache.capacity_tokens == blocks * 16
    assert info.max_model_len == min(SERVING["max_position_embeddings"], blocks * 16)
    logged = [line for line in engine.log if "KV cache:" in line]
    assert logged and f"= {blocks * 16:,} tokens" in logged[0] and "from --kv-cache-memory 0.02 GiB" in logged[0]


# --- on a GPU ---------------------------------------------------------------------------------

@needs_cuda
def test_on_a_gpu_weights_cache_and_a_largest_step_stay_within_the_share(model_dir):
    from engine.kv_sizing import CudaMemory, profile_step

    memory = CudaMemory("cuda")
    gpu_model = load_model(model_dir, dtype="bfloat16", device="cuda", progress=False)
    spec = KVCacheSpec(16, max_num_batched_tokens=2048, max_num_seqs=64, memory_gib=None, utilization=0.3)
    size = size_kv_cache(spec, gpu_model, ParallelState.single(), memory)
    cache = gpu_model.allocate_kv_cache(size.num_blocks + SCRATCH_BLOCKS, 16)
    memory.reset_peak()
    scratch = profile_step(gpu_model, 2048, 64, 16)
    after = memory.measure(scratch)
    cache_bytes = cache.numel() * cache.element_size()
    assert after.peak + after.non_torch <= 0.3 * after.total  # weights, cache and the largest step fit the share
    room = 0.3 * after.total - (after.peak - cache_bytes) - after.non_torch
    assert cache_bytes >= 0.8 * room  # and the cache took most of what they leave
    del cache


@needs_cuda
def test_on_a_gpu_a_served_engine_reports_the_tokens_that_fit_its_share(model_dir):
    engine = EngineProcess(model_dir, "--device", "cuda", "--dtype", "bfloat16", "--gpu-memory-utilization", "0.3")
    try:
        info = engine.stub().GetModelInfo(pb.GetModelInfoRequest())
    finally:
        assert engine.stop() == 0
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0 < info.kv_cache.capacity_tokens and info.kv_cache.total_blocks * 2 * 16 * 160 * 2 < 0.3 * total
    logged = [line for line in engine.log if "KV cache:" in line]
    assert logged and f"= {info.kv_cache.capacity_tokens:,} tokens" in logged[0]
    assert "from --gpu-memory-utilization 0.3" in logged[0]
