"""The parallel engine on GPUs: NCCL, one rank per visible GPU. These need at least two CUDA
GPUs and skip elsewhere, saying so; the same layouts run on the CPU with gloo in
test_parallel_model.py and test_parallel_serving.py."""

from __future__ import annotations

import pytest
import torch

from engine.loader import load_model
from engine.model import ModelConfig
from engine.plan import Layout, plan_layout
from engine_server import EngineProcess
from helpers import LORA_YARN, make_checkpoint, make_serving_checkpoint
from parallel_ranks import free_port, mixed_scenario, run_ranks, run_scenario

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_two_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs at least 2 CUDA GPUs for NCCL ranks (this host has {GPUS})")
TOL = 1e-4  # fp32 on GPUs: the split sums reorder additions


def gpu_rank_logits(state, path, dispatch: str, seeds: list[int]):
    torch.cuda.reset_peak_memory_stats()
    model = load_model(path, dtype="float32", device=f"cuda:{torch.cuda.current_device()}", attention="torch",
                       progress=False, parallel=state, moe_dispatch=dispatch)
    weights = torch.cuda.memory_allocated()
    logits = run_scenario(model, mixed_scenario(model.cfg.vocab_size, seeds[state.dp_rank]))
    return state.dp_rank, [t.cpu() for t in logits], weights


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gpu") / "lora_yarn", LORA_YARN, seed=3)


@needs_two_gpus
@pytest.mark.parametrize("tp, dp, ep, dispatch", [(2, 1, False, "auto"), (2, 1, True, "alltoall"),
                                                  (1, 2, True, "allgather"), (1, 2, True, "alltoall")])
def test_nccl_ranks_give_the_one_gpu_logits(checkpoint, tp, dp, ep, dispatch):
    model = load_model(checkpoint, dtype="float32", device="cuda", attention="torch", progress=False)
    seeds = [10, 20][:dp]
    reference = {d: [t.cpu() for t in run_scenario(model, mixed_scenario(model.cfg.vocab_size, seeds[d]))]
                 for d in range(dp)}
    del model
    for dp_rank, logits, _ in run_ranks(gpu_rank_logits, tp, dp, ep, (checkpoint, dispatch, seeds), device_type="cuda"):
        for got, want in zip(logits, reference[dp_rank], strict=True):
            assert (got - want).abs().max() <= TOL


@pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
def test_the_plan_matches_the_weight_memory_one_gpu_really_allocates(checkpoint):
    plan = plan_layout(ModelConfig.from_dir(checkpoint), Layout(), 80.0, dtype="bfloat16")
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = load_model(checkpoint, dtype="bfloat16", device="cuda", attention="torch", progress=False)
    allocated = torch.cuda.memory_allocated() - before
    assert abs(allocated - plan.weights.total) <= 0.02 * plan.weights.total + (2 << 20)
    del model


@needs_two_gpus
def test_the_plan_matches_the_weight_memory_each_rank_really_allocates(checkpoint):
    """engine.plan's weights per rank against torch.cuda.memory_allocated() after loading, on
    TP=2 + EP: within 2% (the rest is rope tables and allocator rounding)."""
    plan = plan_layout(ModelConfig.from_dir(checkpoint), Layout(tp=2, ep=True), 80.0, dtype="float32")
    for _, _, allocated in run_ranks(gpu_rank_logits, 2, 1, True, (checkpoint, "alltoall", [1]), device_type="cuda"):
        assert abs(allocated - plan.weights.total) <= 0.02 * plan.weights.total + (2 << 20)


@needs_two_gpus
def test_served_engine_with_one_rank_per_gpu_generates_as_one_gpu(tmp_path):
    from test_parallel_serving import SERVE, generations
    model = make_serving_checkpoint(tmp_path / "serving")
    single = EngineProcess(model, *SERVE, "--device", "cuda")
    try:
        expected = generations(single.address)
    finally:
        assert single.stop() == 0
    tp = 4 if GPUS >= 4 else 2  # the serving checkpoint has 4 heads
    proc = EngineProcess(model, *SERVE, "--device", "cuda", "--tensor-parallel-size", str(tp),
                         "--enable-expert-parallel", "--master-port", str(free_port()), threads=None)
    try:
        assert generations(proc.address) == expected
    finally:
        assert proc.stop() == 0
