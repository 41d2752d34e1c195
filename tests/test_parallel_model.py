"""The model split over ranks (tensor, expert and data-parallel attention layouts, on real
processes joined by gloo) computes the single-process model's logits: teacher-forced
varlen prefill, chunked prefill and 22 mixed decode steps, fp32, within 1e-5."""

from __future__ import annotations

import pytest
import torch

from engine.distributed import Group, ParallelState
from engine.loader import load_model
from helpers import LORA_YARN, PLAIN_ONE_GROUP, make_checkpoint
from parallel_ranks import mixed_scenario, run_ranks, run_scenario

TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    return {"lora_yarn": make_checkpoint(root / "lora_yarn", LORA_YARN, seed=3),
            "plain": make_checkpoint(root / "plain", PLAIN_ONE_GROUP, seed=4)}


def single_process_logits(path, seed: int, steps: int | None = None, quantization=None) -> list[torch.Tensor]:
    model = load_model(path, dtype="float32", progress=False, quantization=quantization)
    return run_scenario(model, mixed_scenario(model.cfg.vocab_size, seed), steps)


def rank_logits(state, path, dispatch: str, seeds: list[int], steps: list[int | None], quantization=None):
    model = load_model(path, dtype="float32", progress=False, parallel=state, moe_dispatch=dispatch,
                       quantization=quantization)
    logits = run_scenario(model, mixed_scenario(model.cfg.vocab_size, seeds[state.dp_rank]), steps[state.dp_rank])
    return state.dp_rank, logits


def assert_matches(results, reference: dict[int, list[torch.Tensor]], tol: float = TOL) -> None:
    """Every rank (TP peers included: they all end with the gathered logits) against the
    single-process logits of its DP group's scenario."""
    for dp_rank, logits in results:
        ref = reference[dp_rank]
        assert len(logits) == len(ref) >= 20
        for step, (got, want) in enumerate(zip(logits, ref)):
            assert got.shape == want.shape
            err = (got - want).abs().max().item()
            assert err <= tol, f"DP rank {dp_rank}, step {step}: max |logit difference| {err:.2e} > {tol}"


LAYOUTS = [  # (tp, dp, expert parallel, dispatch)
    pytest.param(2, 1, False, "auto", id="tp2"),
    pytest.param(2, 1, True, "allgather", id="tp2-ep-allgather"),
    pytest.param(2, 1, True, "alltoall", id="tp2-ep-alltoall"),
    pytest.param(1, 2, True, "allgather", id="dp2-ep2-allgather"),
    pytest.param(1, 2, True, "alltoall", id="dp2-ep2-alltoall"),
    pytest.param(1, 2, False, "auto", id="dp2-experts-split"),
]


@pytest.mark.parametrize("tp, dp, ep, dispatch", LAYOUTS)
def test_parallel_logits_match_single_process(checkpoints, tp, dp, ep, dispatch):
    path = checkpoints["lora_yarn"]
    seeds = [10, 20][:dp]
    reference = {d: single_process_logits(path, seeds[d]) for d in range(dp)}
    results = run_ranks(rank_logits, tp, dp, ep, (path, dispatch, seeds, [None] * dp))
    assert_matches(results, reference)


def test_tp2_without_q_lora_and_two_shared_experts(checkpoints):
    path = checkpoints["plain"]
    results = run_ranks(rank_logits, 2, 1, False, (path, "auto", [5], [None]))
    assert_matches(results, {0: single_process_logits(path, 5)})


def test_four_ranks_tp2_dp2_with_experts_over_all_four(checkpoints):
    path = checkpoints["lora_yarn"]
    seeds = [30, 40]
    reference = {d: single_process_logits(path, seeds[d]) for d in range(2)}
    assert_matches(run_ranks(rank_logits, 2, 2, True, (path, "alltoall", seeds, [None, None])), reference)


@pytest.mark.parametrize("tp, dispatch", [(1, "allgather"), (1, "alltoall"), (2, "alltoall")])
def test_a_dp_rank_that_runs_out_of_work_steps_idle_and_the_other_is_unaffected(checkpoints, tp, dispatch):
    """DP group 1 has work for 3 steps, then joins the MoE collectives with no tokens while
    group 0 runs on: group 0's logits are still the single-process ones."""
    path = checkpoints["lora_yarn"]
    seeds = [50, 60]
    reference = {0: single_process_logits(path, 50), 1: single_process_logits(path, 60, steps=3)}
    results = run_ranks(rank_logits, tp, 2, True, (path, dispatch, seeds, [None, 3]))
    for dp_rank, logits in results:
        if dp_rank == 1:
            assert len(logits) == 3
            assert all((a - b).abs().max() <= TOL for a, b in zip(logits, reference[1]))
        else:
            assert_matches([(0, logits)], reference)


@pytest.mark.parametrize("quantization", ["nvfp4", "mxfp4"])
def test_fp4_experts_under_expert_parallelism_match_single_process_fp4(checkpoints, quantization):
    """Each rank quantizes its own whole experts at load, exactly as one process does."""
    path = checkpoints["lora_yarn"]
    reference = {d: single_process_logits(path, 70 + d, quantization=quantization) for d in range(2)}
    results = run_ranks(rank_logits, 1, 2, True, (path, "alltoall", [70, 71], [None, None], quantization))
    assert_matches(results, reference)


# --- loading: each rank reads its share --------------------------------------------------

def layout_of_rank(rank: int, tp: int, dp: int, ep: bool) -> ParallelState:
    """Rank `rank`'s place in a tp x dp layout, without process groups: loading needs the
    layout only (no collective runs), so no processes are started for these checks."""
    world = list(range(tp * dp))
    d, t = divmod(rank, tp)
    return ParallelState(rank, tp, dp, ep, Group([d * tp + i for i in range(tp)], rank),
                         Group([j * tp + t for j in range(dp)], rank), Group(world, rank))


@pytest.mark.parametrize("tp, dp, ep", [(2, 1, False), (2, 1, True), (1, 2, True), (2, 2, True)])
def test_each_rank_reads_only_its_share_of_the_expert_bytes(checkpoints, tp, dp, ep):
    path = checkpoints["lora_yarn"]
    whole = load_model(path, dtype="float32", progress=False).load_bytes
    per_rank = [load_model(path, dtype="float32", progress=False, parallel=layout_of_rank(r, tp, dp, ep)).load_bytes
                for r in range(tp * dp)]
    for got in per_rank:
        assert got["routed experts"] == whole["routed experts"] // (tp * dp)
        if tp > 1:  # attention, MLPs and vocabulary split too; the latent down-projections are whole on every rank
            assert got["other"] < 0.75 * whole["other"]
    assert sum(got["routed experts"] for got in per_rank) == whole["routed experts"]


def fp8_checkpoint(path, cfg: dict, block: int = 16):
    """DeepSeek's FP8 format with 16 x 16 blocks, so that a TP rank's slice of the dequantized
    linears (attention heads, the dense MLP) starts inside a block row and column of the scales."""
    from engine.checkpoint import fp8_block_quantize, is_fp8_quantizable, random_weights, write_checkpoint
    tensors = {}
    for name, t in random_weights(cfg, seed=8).items():
        if is_fp8_quantizable(name, t):
            tensors[name], tensors[name + "_scale_inv"] = fp8_block_quantize(t, (block, block))
        else:
            tensors[name] = t
    cfg = dict(cfg, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [block, block]})
    return write_checkpoint(path, cfg, tensors)


def test_fp8_checkpoint_sliced_at_load_matches_single_process(tmp_path):
    """The routed experts stay FP8, each rank holding 32 of their 64 intermediate rows (two
    whole scale blocks); the dense MLP (40 of 80 per rank) is dequantized from inside a block."""
    path = fp8_checkpoint(tmp_path / "fp8", dict(LORA_YARN, moe_intermediate_size=64, intermediate_size=80))
    reference = {0: single_process_logits(path, 90)}
    assert_matches(run_ranks(rank_logits, 2, 1, False, (path, "auto", [90], [None])), reference)


def test_fp8_experts_under_expert_parallelism_load_whole_and_match_single_process(tmp_path):
    """Intermediate size 48 would split into 24 rows per rank, inside a 16-row block: whole
    experts per rank need no split."""
    path = fp8_checkpoint(tmp_path / "fp8", dict(LORA_YARN, moe_intermediate_size=48, intermediate_size=80))
    reference = {0: single_process_logits(path, 92)}
    assert_matches(run_ranks(rank_logits, 2, 1, True, (path, "alltoall", [92], [None])), reference)


def test_fp8_experts_split_inside_a_scale_block_are_refused_naming_expert_parallelism(tmp_path):
    from engine.model import CheckpointError
    path = fp8_checkpoint(tmp_path / "fp8", dict(LORA_YARN, moe_intermediate_size=48))
    with pytest.raises(CheckpointError, match="leave 24 of their intermediate size per rank, not a whole number "
                                              "of the checkpoint's 16 x 16 scale blocks; use --enable-expert-parallel"):
        load_model(path, dtype="float32", progress=False, parallel=layout_of_rank(0, 2, 1, False))
    for rank in range(2):  # the same ranks with whole experts, or FP4 experts, load
        load_model(path, dtype="float32", progress=False, parallel=layout_of_rank(rank, 2, 1, True))
    load_model(path, dtype="float32", progress=False, parallel=layout_of_rank(1, 2, 1, False), quantization="nvfp4")


def test_nvfp4_checkpoint_experts_sliced_packed_at_load_match_single_process(tmp_path):
    from engine.checkpoint import random_weights, to_modelopt_nvfp4_checkpoint, write_checkpoint
    cfg, tensors = to_modelopt_nvfp4_checkpoint(LORA_YARN, random_weights(LORA_YARN, seed=9), other_linears=True)
    path = write_checkpoint(tmp_path / "nvfp4", cfg, tensors)
    reference = {0: single_process_logits(path, 91)}
    assert_matches(run_ranks(rank_logits, 2, 1, False, (path, "auto", [91], [None])), reference)
