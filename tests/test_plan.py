"""`engine.plan`: per-rank weights, KV cache and collectives of a parallel layout, and the
verdict `serve` and `python -m engine plan` give. Every expected figure is worked out by hand
in the test from the layout rules, not by the planner's helpers."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import LORA_YARN

from engine.model import CheckpointError, ModelConfig
from engine.plan import Layout, MoEForm, add_plan_arguments, plan_layout, run_plan

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

# DeepSeek-R1's published config.json (huggingface.co/deepseek-ai/DeepSeek-R1), the fields the engine reads.
R1 = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128,
    num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
    v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
    vocab_size=129280, max_position_embeddings=163840,
    rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                      mscale=1.0, mscale_all_dim=1.0),
    routed_scaling_factor=2.5, num_nextn_predict_layers=1, torch_dtype="bfloat16", scoring_func="sigmoid",
    topk_method="noaux_tc", norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1,
    quantization_config=dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                             weight_block_size=[128, 128]))

# The same model with bf16 weights (the FP8 release dequantized, as the bf16 conversions are).
R1_BF16 = {k: v for k, v in R1.items() if k != "quantization_config"}

# R1 by hand. Per layer, attention: replicated fused down-projection (1536 + 512 + 64) x 7168 and the norms
# 1536 + 512 + 2 x 7168; per head q_b 192 x 1536, kv_b 256 x 512, o_proj 7168 x 128.
R1_ATTN_REPLICATED = (1536 + 512 + 64) * 7168 + 1536 + 512 + 2 * 7168  # 15,155,200
R1_ATTN_PER_HEAD = 192 * 1536 + 256 * 512 + 7168 * 128  # 1,310,720
R1_EXPERT = 3 * 7168 * 2048  # 44,040,192 weights: gate, up, down
# One NVFP4 expert: w13 4096 x 7168 and w2 7168 x 2048, each row 1/2 byte per value + 1 scale byte per 16,
# plus one fp32 global scale per matrix.
R1_NVFP4_EXPERT = 4096 * (3584 + 448) + 4 + 7168 * (1024 + 128) + 4  # 24,772,616 bytes
# One FP8 expert as the release stores it: a byte per weight, and an fp32 scale per 128 x 128 block: gate
# and up 16 x 56 blocks each, down 56 x 16.
R1_FP8_EXPERT = R1_EXPERT + 4 * (2 * 16 * 56 + 56 * 16)  # 44,050,944 bytes
R1_KV_PER_TOKEN = 61 * (512 + 64) * 2  # 70,272 bytes in bf16


def r1_tp8_weights(routed_experts: int) -> int:
    """Bytes per rank of R1 in bf16 with TP=8 (16 heads, vocab rows 16160), given the routed experts' bytes."""
    attention = 61 * (R1_ATTN_REPLICATED + 16 * R1_ATTN_PER_HEAD) * 2  # 4,471,422,976
    dense = 3 * 3 * 7168 * (18432 // 8) * 2  # 297,271,296
    shared = 58 * 3 * 7168 * (2048 // 8) * 2  # 638,582,784
    router = 58 * (256 * 7168 + 256) * 4  # 425,781,248
    embedding = (2 * 16160 * 7168 + 7168) * 2  # 463,353,856
    return attention + dense + shared + router + embedding + routed_experts


@pytest.fixture(scope="module")
def r1() -> ModelConfig:
    return ModelConfig.from_dict(R1)


@pytest.fixture(scope="module")
def small() -> ModelConfig:
    return ModelConfig.from_dict(LORA_YARN)


def test_small_model_weights_by_kind_with_tp2_and_expert_parallelism(small):
    # LORA_YARN: V 320, D 64, F 96, I 32, L 3 (K 1 dense), H 4, Q 48, C 512, R 64, Dn 32, Dv 48, E 16, S 1.
    plan = plan_layout(small, Layout(tp=2, ep=True), 1.0)
    w = plan.weights
    # per layer: replicated (48+512+64)*64 + 48+512+64+64 = 40,624; 2 heads: q_b 2*96*48 = 9,216,
    # kv_b 2*80*512 = 81,920, o_proj 64*2*48 = 6,144 -> 137,904 values; 3 layers, 2 bytes
    assert w.attention == 3 * 137904 * 2 == 827424
    assert w.mla_absorbed == 0  # on GPUs MLA reads kv_b_proj itself
    assert w.dense_mlp == 1 * 3 * 64 * 48 * 2 == 18432  # F/tp = 48
    assert w.shared_experts == 2 * 3 * 64 * 16 * 2 == 12288  # I*S/tp = 16
    assert w.routed_experts == 2 * 8 * 3 * 64 * 32 * 2 == 196608  # 8 whole experts per rank
    assert w.router == 2 * (16 * 64 + 16) * 4 == 8320  # fp32, replicated
    assert w.embedding == (2 * 160 * 64 + 64) * 2 == 41088  # ceil(320/2) rows each
    assert w.total == 1104160
    assert plan.kv_bytes_per_token == 3 * (512 + 64) * 2 == 3456
    assert plan.expert_format == "bfloat16"


def test_small_model_fp4_experts_count_packed_values_scales_and_padding(small):
    nvfp4 = plan_layout(small, Layout(tp=2, ep=True), 1.0, quantization="nvfp4")
    # 8 experts per rank; w13 64 x 64: 64*(32+4) + 4 = 2,308; w2 64 x 32: 64*(16+2) + 4 = 1,156
    assert nvfp4.weights.routed_experts == 2 * 8 * (2308 + 1156) == 55424
    assert nvfp4.expert_format == "nvfp4"
    mxfp4 = plan_layout(small, Layout(tp=2), 1.0, quantization="mxfp4")
    # no EP: all 16 experts, intermediate 32/2 = 16; w13 32 x 64: 32*(32+2) = 1,088;
    # w2 64 x 16 pads its rows to one 32-value block: 64*(16+1) = 1,088
    assert mxfp4.weights.routed_experts == 2 * 16 * (1088 + 1088) == 69632


def test_an_nvfp4_checkpoint_keeps_nvfp4_experts_whatever_quantization_says():
    cfg = ModelConfig.from_dict(dict(LORA_YARN, quantization_config=dict(quant_method="modelopt", quant_algo="NVFP4")))
    assert plan_layout(cfg, Layout(tp=2, ep=True), 1.0).weights.routed_experts == 55424
    assert plan_layout(cfg, Layout(tp=2, ep=True), 1.0, quantization="mxfp4").expert_format == "nvfp4"


def test_small_model_collectives_per_decoded_token(small):
    plan = plan_layout(small, Layout(tp=2, ep=True), 1.0)
    got = {c.name: c.bytes for c in plan.collectives}
    row = 64 * 2  # one hidden state in bf16
    assert got == {
        "attention o_proj all-reduce (TP)": 3 * 2 * 1 / 2 * row,  # 384
        "dense MLP all-reduce (TP)": 1 * row,
        "MoE dispatch + combine all-to-all": 2 * 2 * min(4, 1) * row,  # 2 layers, 1 other rank
        "MoE all-reduce (TP)": 2 * row,
        "logits all-gather (TP, fp32)": 1 * 160 * 4,
    }
    assert plan.collective_bytes(MoEForm.ALL_GATHER) == 384 + 128 + 256 + 640
    assert plan.collective_bytes(MoEForm.ALL_TO_ALL) == 384 + 128 + 512 + 256 + 640
    dp = {c.name: c.bytes for c in plan_layout(small, Layout(tp=2, dp=2, ep=True), 1.0).collectives}
    assert dp["MoE dispatch all-gather (DP)"] == 2 * 1 * (128 + 4 * (4 + 8))  # hidden + fp32 weights, int64 ids
    assert dp["MoE combine reduce-scatter (DP)"] == 2 * 1 * 128
    assert dp["MoE dispatch + combine all-to-all"] == 2 * 2 * min(4, 3) * 128


def test_one_rank_has_no_collectives(small):
    plan = plan_layout(small, Layout(), 1.0)
    assert plan.collectives == () and plan.collective_bytes() == 0
    assert "none (one rank)" in plan.format()


def test_on_the_cpu_mla_keeps_fp32_copies_of_kv_b_and_an_fp8_cache_halves_kv_bytes(small):
    cpu = plan_layout(small, Layout(tp=2, ep=True), 1.0, device="cpu")
    assert cpu.weights.mla_absorbed == 3 * 2 * 2 * 80 * 512 * 4 == 1966080  # 3 layers: kv_b (2 x 80 x 512) twice
    assert cpu.weights.total == 1104160 + 1966080
    fp8 = plan_layout(small, Layout(tp=2, ep=True), 1.0, kv_cache_dtype="fp8_e4m3")
    assert fp8.kv_bytes_per_token == 3 * (512 + 64) * 1 == 1728
    with pytest.raises(CheckpointError, match="--kv-cache-dtype must be one of auto, fp8_e4m3, got 'int4'"):
        plan_layout(small, Layout(), 1.0, kv_cache_dtype="int4")


def test_r1_has_671b_parameters_without_its_mtp_layer():
    # fp32 serving of the bf16 weights makes bytes / 4 the parameter count (the router is fp32 anyway)
    weights = plan_layout(ModelConfig.from_dict(R1_BF16), Layout(), 4000.0, dtype="float32").weights
    params = (weights.total - weights.mla_absorbed) // 4
    attention = 61 * (R1_ATTN_REPLICATED + 128 * R1_ATTN_PER_HEAD)  # 11,414,421,504
    dense = 3 * 3 * 7168 * 18432  # 1,189,085,184
    shared = 58 * 3 * 7168 * 2048  # 2,554,331,136
    routed = 58 * 256 * R1_EXPERT  # 653,908,770,816
    router = 58 * (256 * 7168 + 256)  # 106,445,312
    embedding = 2 * 129280 * 7168 + 7168  # 1,853,366,272
    assert params == attention + dense + shared + routed + router + embedding == 671026419200


@pytest.mark.parametrize("ep", [False, True])
def test_r1_in_bf16_on_8_h200_is_refused(ep):
    plan = plan_layout(ModelConfig.from_dict(R1_BF16), Layout(tp=8, ep=ep), 141.0)
    assert plan.weights.routed_experts == 58 * 256 * R1_EXPERT // 8 * 2 == 163477192704  # 152.25 GiB alone
    assert plan.weights.total == r1_tp8_weights(163477192704)
    assert not plan.fits and plan.tokens_per_dp_rank == 0
    assert plan.reason.startswith("does not fit: weights 158.11 GiB + KV cache 10.72 GiB per rank exceed "
                                  "the budget 126.90 GiB")
    assert "--quantization nvfp4" in plan.reason


@pytest.mark.parametrize("ep", [False, True])
def test_r1_as_released_in_fp8_on_8_h200_fits_with_its_experts_kept_fp8(r1, ep):
    """The FP8 checkpoint's experts stay FP8: 32 whole experts per rank with EP, or an eighth (256 rows,
    two whole 128-row blocks) of all 256 without; the same bytes either way."""
    plan = plan_layout(r1, Layout(tp=8, ep=ep), 141.0)
    assert plan.expert_format == "fp8"
    assert plan.weights.routed_experts == 58 * 32 * R1_FP8_EXPERT == 81758552064  # 76.14 GiB
    without_ep = 58 * 256 * (3 * 7168 * 256 + 4 * (2 * 2 * 56 + 56 * 2))  # 2 of 16 block rows / columns each
    assert without_ep == 81758552064
    weights = r1_tp8_weights(81758552064)
    assert plan.weights.total == weights == 88054964224  # 82.01 GiB
    budget = int(141 * 0.9 * GIB)
    assert plan.tokens_per_dp_rank == (budget - weights) // 70272 == 685947
    assert plan.fits and "FP8 checkpoint: the other linears dequantized at load" in plan.format()
    # on 8 x H100 it does not fit, and the way out is FP4 experts
    h100 = plan_layout(r1, Layout(tp=8, ep=ep), 80.0)
    assert not h100.fits and "--quantization nvfp4" in h100.reason
    assert plan_layout(r1, Layout(tp=8, ep=ep), 141.0, quantization="nvfp4").expert_format == "nvfp4"


def test_fp8_experts_split_inside_a_scale_block_are_refused(r1):
    with pytest.raises(CheckpointError, match="FP8 experts split over 32 ranks leave 64 of their intermediate size "
                                              "per rank, not a whole number of .* 128 x 128 scale blocks: use "
                                              "--enable-expert-parallel"):
        plan_layout(r1, Layout(tp=32), 141.0)
    assert plan_layout(r1, Layout(tp=32, ep=True), 141.0).expert_format == "fp8"
    assert plan_layout(r1, Layout(tp=32), 141.0, quantization="nvfp4").expert_format == "nvfp4"


def test_r1_with_nvfp4_experts_on_8_h200_tp8_ep_fits(r1):
    plan = plan_layout(r1, Layout(tp=8, ep=True), 141.0, quantization="nvfp4")
    assert plan.weights.routed_experts == 58 * 32 * R1_NVFP4_EXPERT == 45977975296  # 42.82 GiB
    weights = r1_tp8_weights(45977975296)
    assert plan.weights.total == weights == 52274387456  # 48.68 GiB
    assert plan.kv_bytes_per_token == R1_KV_PER_TOKEN
    budget = int(141 * 0.9 * GIB)  # 126.9 GiB
    assert plan.tokens_per_dp_rank == plan.total_tokens == (budget - weights) // 70272 == 1195119
    assert plan.fits and plan.reason.startswith("fits:")
    assert plan.collective_bytes(MoEForm.ALL_GATHER) == 61 * 25088 + 3 * 25088 + 58 * 25088 + 7 * 16160 * 4
    assert plan.collective_bytes(MoEForm.ALL_TO_ALL) == 3513216 + 58 * 2 * 7 * 14336  # 7 other ranks


def test_r1_with_nvfp4_experts_on_two_nodes_of_8_h100_tp8_dp2_ep_fits(r1):
    plan = plan_layout(r1, Layout(tp=8, dp=2, ep=True), 80.0, quantization="nvfp4")
    assert plan.weights.routed_experts == 58 * 16 * R1_NVFP4_EXPERT == 22988987648  # 16 experts per rank
    weights = r1_tp8_weights(22988987648)  # attention, dense, shared and head split over tp=8 only
    assert plan.weights.total == weights == 29285399808  # 27.27 GiB
    assert plan.tokens_per_dp_rank == (72 * GIB - weights) // 70272 == 683401
    assert plan.total_tokens == 2 * 683401
    assert plan.fits
    dispatch = 58 * 1 * (14336 + 8 * 12)  # all-gather over dp=2: the hidden state and 8 routing choices
    combine = 58 * 1 * 14336
    assert plan.collective_bytes(MoEForm.ALL_GATHER) == 3513216 + dispatch + combine


def test_r1_kv_cache_and_context_length_limits(r1):
    # 8 x H100 with TP=8 + EP and NVFP4: the weights fit (48.68 GiB of 72), one 163,840-token context (10.72 GiB) too
    assert plan_layout(r1, Layout(tp=8, ep=True), 80.0, quantization="nvfp4").fits
    # an explicit --kv-cache-memory must hold one context: 5 GiB holds 5 * 2**30 // 70,272 = 76,398 tokens
    small_kv = plan_layout(r1, Layout(tp=8, ep=True), 141.0, quantization="nvfp4", kv_cache_gib=5.0)
    assert small_kv.tokens_per_dp_rank == 76398 and not small_kv.fits
    assert "--max-model-len" in small_kv.reason and "76,398" in small_kv.reason
    assert plan_layout(r1, Layout(tp=8, ep=True), 141.0, quantization="nvfp4", kv_cache_gib=5.0,
                       max_model_len=65536).fits
    too_much = plan_layout(r1, Layout(tp=8, ep=True), 141.0, quantization="nvfp4", kv_cache_gib=100.0)
    assert not too_much.fits and "--kv-cache-memory" in too_much.reason


def test_layout_rules_refuse_splits_the_engine_cannot_make(r1, small):
    with pytest.raises(CheckpointError, match="--tensor-parallel-size 3 does not divide .* 128 attention heads"):
        plan_layout(r1, Layout(tp=3), 141.0)
    with pytest.raises(CheckpointError, match="--enable-expert-parallel: 256 routed experts .* 24 ranks"):
        plan_layout(r1, Layout(tp=8, dp=3, ep=True), 141.0)
    # without EP the experts' intermediate 32 splits over tp*dp: 4 x 2 = 8 ranks divide it, 4 x 3 = 12 do not
    plan_layout(small, Layout(tp=4, dp=2), 1.0)
    with pytest.raises(CheckpointError, match="--tensor-parallel-size x --data-parallel-size = 12 ranks"):
        plan_layout(small, Layout(tp=4, dp=3), 1.0)
    with pytest.raises(CheckpointError, match="--tensor-parallel-size 0 does not divide|--tensor-parallel-size must"):
        Layout(tp=0)
    with pytest.raises(CheckpointError, match="--data-parallel-size must be a positive integer"):
        Layout(dp=-1)


@pytest.mark.parametrize("kwargs, flag", [
    (dict(memory_gib=0.0), "--gpu-memory-gib"),
    (dict(utilization=1.5), "--gpu-memory-utilization"),
    (dict(utilization=0.0), "--gpu-memory-utilization"),
    (dict(max_model_len=0), "--max-model-len"),
    (dict(max_model_len=163841), "--max-model-len"),
    (dict(kv_cache_gib=-1.0), "--kv-cache-memory"),
    (dict(dtype="auto"), "--dtype"),
    (dict(quantization="fp8"), "--quantization"),
])
def test_bad_arguments_name_their_flag(r1, kwargs, flag):
    args = dict(memory_gib=141.0) | kwargs
    with pytest.raises(CheckpointError, match=f"^{flag}"):
        plan_layout(r1, Layout(tp=8, ep=True), args.pop("memory_gib"), **args)


def write_r1(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(R1))
    return tmp_path


def plan_cli(*argv: str) -> int:
    p = argparse.ArgumentParser()
    add_plan_arguments(p)
    return run_plan(p.parse_args(list(argv)))


def test_run_plan_prints_the_table_and_returns_the_verdict(tmp_path, capsys):
    model = write_r1(tmp_path)
    assert plan_cli("--model", str(model), "--tensor-parallel-size", "8", "--enable-expert-parallel",
                    "--quantization", "nvfp4") == 0
    out = capsys.readouterr().out
    assert "routed experts                 42.82" in out and "1,195,119 tokens per DP rank" in out
    assert out.rstrip().splitlines()[-1].startswith("verdict: fits")
    # a config.json path works as well as its directory; FP8 experts (82.01 GiB per rank) do not fit 8 x H100
    assert plan_cli("--model", str(model / "config.json"), "--tensor-parallel-size", "8", "--gpu-memory-gib",
                    "80") == 1
    assert "verdict: does not fit" in capsys.readouterr().out


def test_run_plan_bad_input_names_the_flag(tmp_path):
    with pytest.raises(CheckpointError, match="^--model .*no such"):
        plan_cli("--model", str(tmp_path / "missing"))
    model = write_r1(tmp_path)
    with pytest.raises(CheckpointError, match="^--tensor-parallel-size must"):
        plan_cli("--model", str(model), "--tensor-parallel-size", "0")
    with pytest.raises(CheckpointError, match="^--gpu-memory-gib must"):
        plan_cli("--model", str(model), "--gpu-memory-gib", "-80")


def plan_subcommand_wired() -> bool:
    from engine.__main__ import _parser
    try:
        _parser().parse_args(["plan", "--model", "x"])
    except SystemExit:
        return False
    return True


def test_python_m_engine_plan_exit_codes(tmp_path):
    if not plan_subcommand_wired():
        pytest.skip("`python -m engine plan` is not wired into engine/__main__.py yet")
    model = str(write_r1(tmp_path))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "engine", "plan", "--model", model, *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    fits = cli("--tensor-parallel-size", "8", "--enable-expert-parallel", "--quantization", "nvfp4")
    assert fits.returncode == 0 and "verdict: fits" in fits.stdout
    refused = cli("--tensor-parallel-size", "8", "--enable-expert-parallel", "--gpu-memory-gib", "80")
    assert refused.returncode == 1 and "verdict: does not fit" in refused.stdout
    bad = cli("--tensor-parallel-size", "3")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --tensor-parallel-size 3")
    assert "Traceback" not in bad.stderr
