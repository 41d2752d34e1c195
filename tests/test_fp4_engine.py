"""FP4 routed experts in the engine: quantized at load (`--quantization nvfp4|mxfp4`) and
loaded pre-quantized from an NVFP4 checkpoint in NVIDIA ModelOpt's layout.

Each FP4 model is checked against its dense twin, the same model with the experts
dequantized beforehand (identical math, so fp32 tolerances of 1e-4), and the NVFP4 model's
next-token distributions against the unquantized model's (mean KL, printed).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.attention import MLAPath
from engine.checkpoint import random_weights, to_fp8_checkpoint, to_modelopt_nvfp4_checkpoint, write_checkpoint
from engine.demo import DEMO_CONFIG
from engine.loader import load_model
from engine.model import CheckpointError
from engine.model.fp4_experts import ExpertQuantization, QuantizingExpertSlots
from engine.model.moe_backends import TorchMoE
from helpers import LORA_YARN, contiguous_meta
from kernels.fp4 import dequantize_fp4, dequantize_nvfp4, quantize_mxfp4, quantize_nvfp4
from kernels.fp8 import dequantize_fp8_block
from kernels.moe_ref import grouped_topk, moe_reference, moe_reference_fp4

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 9, 200, 3, 77, 8], [42] * 11]
EXPERTS = "model.layers.1.mlp.experts."


def prefill_then_decode_logits(model, prompts=PROMPTS) -> torch.Tensor:
    """Logits [prompt tokens + one decode token per prompt, V] through the engine's forward."""
    lens = [len(p) for p in prompts]
    cache = model.allocate_kv_cache(4 * len(prompts), 8)
    meta = contiguous_meta(lens, lens, 8, 4, path=MLAPath.AUTO)
    prefill = model.compute_logits(model(torch.tensor(sum(prompts, [])), meta.positions(), cache, meta))
    step = contiguous_meta([1] * len(prompts), [n + 1 for n in lens], 8, 4, num_decodes=len(prompts))
    decode = model.compute_logits(model(torch.tensor([7] * len(prompts)), step.positions(), cache, step))
    return torch.cat([prefill, decode])


def dequantized_twin(path: Path, fp4_model, dtype: str = "float32"):
    """The checkpoint's model with every layer's routed experts replaced by fp4_model's,
    dequantized to the serving dtype."""
    twin = load_model(path, dtype, progress=False)
    for dense, fp4 in zip(twin.routed_experts(), fp4_model.routed_experts()):
        dense.w13.copy_(dequantize_fp4(fp4.backend.w13, dense.w13.dtype))
        dense.w2.copy_(dequantize_fp4(fp4.backend.w2, dense.w2.dtype))
        dense.dense = None  # the per-expert loop, like the FP4 reference
    return twin


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    tensors = random_weights(LORA_YARN, seed=3)
    return write_checkpoint(tmp_path_factory.mktemp("fp32"), LORA_YARN, tensors), tensors


# --- the CPU backend against the kernels' spec --------------------------------------------

@pytest.mark.parametrize("quantize", [quantize_nvfp4, quantize_mxfp4], ids=["nvfp4", "mxfp4"])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_packed_expert_loop_matches_dequantize_everything_reference(quantize, tokens):
    """D = 72 is not a multiple of either block; with one token most experts get none. The
    reference is the kernels' spec (fused_moe_fp4_reference): dequantize all, then the loop;
    written out here so that this CPU test never imports triton, whose interpreter mode the
    kernel tests must choose before triton is first imported."""
    gen = torch.Generator().manual_seed(tokens)
    experts, hidden, inter = 16, 72, 40
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = quantize(torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5)
    w2 = quantize(torch.randn(experts, hidden, inter, generator=gen) / inter ** 0.5)
    weights, ids = grouped_topk(torch.randn(tokens, experts, generator=gen), torch.zeros(experts), 4, 4, 2)
    reference = moe_reference(x, dequantize_fp4(w13, x.dtype), dequantize_fp4(w2, x.dtype), weights, ids)
    torch.testing.assert_close(moe_reference_fp4(x, w13, w2, weights, ids), reference, atol=1e-6, rtol=1e-6)


# --- quantized at load ---------------------------------------------------------------------

@pytest.mark.parametrize("quantization", ["nvfp4", "mxfp4"])
def test_experts_quantized_at_load_match_their_dequantized_twin(checkpoint, quantization):
    path, _ = checkpoint
    model = load_model(path, "float32", progress=False, quantization=quantization)
    experts = model.model.layers[1].mlp.experts
    assert experts.w13 is None and experts.w2 is None and isinstance(experts.backend, TorchMoE)
    assert not any("experts.w13" in n or "experts.w2" in n for n, _ in model.named_parameters())
    out = prefill_then_decode_logits(model)
    ref = prefill_then_decode_logits(dequantized_twin(path, model))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quantization", ["nvfp4", "mxfp4"])
def test_quantizing_while_loading_equals_quantizing_the_loaded_weights_and_holds_one_dense_expert(
        checkpoint, quantization, monkeypatch):
    """Experts are quantized one by one as their tensors arrive (so a model whose dense experts
    would not fit still loads), with the same bits as quantizing the whole stacked weights."""
    path, _ = checkpoint
    most_pending = 0
    receive = QuantizingExpertSlots.receive

    def watched(self, expert, part, tensor):
        nonlocal most_pending
        receive(self, expert, part, tensor)
        most_pending = max(most_pending, sum(len(parts) for parts in self.pending.values()))
    monkeypatch.setattr(QuantizingExpertSlots, "receive", watched)
    fp4 = load_model(path, "float32", progress=False, quantization=quantization)
    assert 0 < most_pending <= 2  # dense tensors held at once: at most one expert's first two of three
    dense = load_model(path, "float32", progress=False)
    quant = ExpertQuantization(quantization)
    for d, q in zip(dense.routed_experts(), fp4.routed_experts(), strict=True):
        for want, got in ((quant.quantize(d.w13), q.backend.w13), (quant.quantize(d.w2), q.backend.w2)):
            assert torch.equal(got.packed, want.packed)
            assert torch.equal(got.scale.view(torch.uint8), want.scale.view(torch.uint8))
            assert torch.equal(getattr(got, "global_scale", torch.ones(())), getattr(want, "global_scale", torch.ones(())))


def test_bf16_experts_quantized_at_load_keep_a_quarter_of_the_bytes_and_no_dense_path(tmp_path):
    cfg = dict(LORA_YARN, torch_dtype="bfloat16")
    path = write_checkpoint(tmp_path, cfg, random_weights(cfg, seed=1, dtype=torch.bfloat16))
    dense, fp4 = load_model(path, "bfloat16", progress=False), load_model(path, "bfloat16", progress=False,
                                                                         quantization="nvfp4")
    for d, q in zip(dense.routed_experts(), fp4.routed_experts()):
        assert q.dense is None and q.backend.w13.packed.dtype == torch.uint8
        assert q.nbytes() < 0.29 * d.nbytes()  # 4.5 bits per value (scale included) against 16
    assert torch.isfinite(prefill_then_decode_logits(fp4)).all()


def test_fp8_checkpoint_experts_quantize_to_nvfp4_of_the_dequantized_weights(tmp_path):
    fp8_cfg, fp8_tensors = to_fp8_checkpoint(LORA_YARN, random_weights(LORA_YARN, seed=5))
    path = write_checkpoint(tmp_path, fp8_cfg, fp8_tensors)
    fp8 = load_model(path, "float32", progress=False)  # experts stay FP8
    fp4 = load_model(path, "float32", progress=False, quantization="nvfp4")
    want = quantize_nvfp4(dequantize_fp8_block(fp8.routed_experts()[0].backend.w13.expert(3)))
    assert torch.equal(fp4.routed_experts()[0].backend.w13.packed[3], want.packed)


# --- pre-quantized NVFP4 checkpoints (ModelOpt layout) -------------------------------------

def test_modelopt_nvfp4_checkpoint_round_trip_equals_quantizing_at_load(checkpoint, tmp_path):
    path, tensors = checkpoint
    cfg, nvfp4 = to_modelopt_nvfp4_checkpoint(LORA_YARN, tensors)
    assert nvfp4[EXPERTS + "3.up_proj.weight"].dtype == torch.uint8
    assert nvfp4[EXPERTS + "3.up_proj.weight"].shape == (32, 32)
    assert nvfp4[EXPERTS + "3.up_proj.weight_scale"].dtype == torch.float8_e4m3fn
    assert nvfp4[EXPERTS + "3.up_proj.weight_scale_2"].shape == ()
    loaded = load_model(write_checkpoint(tmp_path, cfg, nvfp4), "float32", progress=False)
    at_load = load_model(path, "float32", progress=False, quantization="nvfp4")
    bf16_bytes = lambda e: (e.backend.w13.shape[0] * (e.backend.w13.shape[1] * e.backend.w13.shape[2]  # noqa: E731
                                                      + e.backend.w2.shape[1] * e.backend.w2.shape[2]) * 2)
    for experts in loaded.routed_experts():
        assert experts.w13 is None and experts.backend.w13.packed.dtype == torch.uint8
        assert 0.25 <= experts.nbytes() / bf16_bytes(experts) < 0.29
    assert torch.equal(prefill_then_decode_logits(loaded), prefill_then_decode_logits(at_load))


def test_hf_quant_config_json_form_loads_like_quantization_config(checkpoint, tmp_path):
    cfg, nvfp4 = to_modelopt_nvfp4_checkpoint(LORA_YARN, checkpoint[1])
    quant = cfg.pop("quantization_config")
    path = write_checkpoint(tmp_path / "old", cfg, nvfp4)
    (path / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt", "version": "0.23.0"},
         "quantization": {k: v for k, v in quant.items() if k != "quant_method"}}))
    new = write_checkpoint(tmp_path / "new", dict(cfg, quantization_config=quant), nvfp4)
    assert torch.equal(prefill_then_decode_logits(load_model(path, "float32", progress=False)),
                       prefill_then_decode_logits(load_model(new, "float32", progress=False)))


def test_quantized_attention_and_shared_experts_are_dequantized_at_load(checkpoint, tmp_path):
    """Every linear NVFP4; the reference has all but the routed experts dequantized by the test."""
    cfg, nvfp4 = to_modelopt_nvfp4_checkpoint(LORA_YARN, checkpoint[1], other_linears=True)
    assert nvfp4["model.layers.1.self_attn.kv_b_proj.weight"].dtype == torch.uint8
    ref = {}
    for name, t in nvfp4.items():
        if ".mlp.experts." in name or not name.endswith("weight") or t.dtype != torch.uint8:
            ref.setdefault(name, t)
            continue
        ref[name] = dequantize_nvfp4(quantized_as_in(nvfp4, name, tuple(checkpoint[1][name].shape)))
        for side in ("_scale", "_scale_2"):
            ref.pop(name + side, None)
        ref.pop(name.removesuffix("weight") + "input_scale", None)
    ref = {n: t for n, t in ref.items() if ".mlp.experts." in n or not n.endswith(("_scale", "_scale_2", "input_scale"))}
    model = load_model(write_checkpoint(tmp_path / "all", cfg, nvfp4), "float32", progress=False)
    assert model.model.layers[1].self_attn.kv_b_proj.weight.dtype == torch.float32
    twin = load_model(write_checkpoint(tmp_path / "ref", cfg, ref), "float32", progress=False)
    torch.testing.assert_close(prefill_then_decode_logits(model), prefill_then_decode_logits(twin), atol=1e-5, rtol=0)


def quantized_as_in(tensors: dict, name: str, shape: tuple[int, int]):
    from kernels.fp4 import NVFP4Tensor
    return NVFP4Tensor(tensors[name], tensors[name + "_scale"], tensors[name + "_scale_2"], shape)


def test_expert_whose_gate_and_up_scales_differ_is_requantized_with_one_global_scale(checkpoint, tmp_path):
    cfg, nvfp4 = to_modelopt_nvfp4_checkpoint(LORA_YARN, checkpoint[1])
    up = EXPERTS + "2.up_proj.weight"
    q = quantize_nvfp4(checkpoint[1][up] * 3)  # up alone, and bigger: its own weight_scale_2
    nvfp4[up], nvfp4[up + "_scale"], nvfp4[up + "_scale_2"] = q.packed, q.scale, q.global_scale
    gate = quantized_as_in(nvfp4, EXPERTS + "2.gate_proj.weight", (32, 64))
    assert gate.global_scale != q.global_scale
    experts = load_model(write_checkpoint(tmp_path, cfg, nvfp4), "float32", progress=False).routed_experts()[0]
    want = torch.cat([dequantize_nvfp4(gate), dequantize_nvfp4(q)])
    assert experts.backend.w13.global_scale[2] == quantize_nvfp4(want).global_scale
    got = dequantize_nvfp4(experts.backend.w13)[2]
    assert torch.equal(got[32:], want[32:])  # up sets the common scale: its values stay exact
    assert (got[:32] - want[:32]).abs().max() <= 0.1 * want[:32].abs().max()  # gate: one more rounding
    untouched = quantized_as_in(nvfp4, EXPERTS + "1.gate_proj.weight", (32, 64))
    assert torch.equal(dequantize_nvfp4(experts.backend.w13)[1, :32], dequantize_nvfp4(untouched))


# --- quality: NVFP4 against the unquantized model ------------------------------------------

def mean_next_token_kl(reference, quantized, prompts) -> float:
    """Mean over positions of KL(reference || quantized) of the next-token distributions."""
    p = F.log_softmax(prefill_then_decode_logits(reference, prompts), dim=-1)
    q = F.log_softmax(prefill_then_decode_logits(quantized, prompts), dim=-1)
    return float(F.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean())


def test_nvfp4_next_token_distributions_stay_close_to_the_unquantized_model(tmp_path):
    """The demo model's architecture (its vocabulary cut to 4096 to keep this fast), fp32."""
    cfg = dict(DEMO_CONFIG, vocab_size=4096, torch_dtype="float32")
    path = write_checkpoint(tmp_path, cfg, random_weights(cfg, seed=7))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 4096, (n,), generator=gen).tolist() for n in (24, 17, 31)]
    kl = mean_next_token_kl(load_model(path, "float32", progress=False),
                            load_model(path, "float32", progress=False, quantization="nvfp4"), prompts)
    print(f"mean next-token KL(unquantized || NVFP4 experts), demo architecture, fp32 = {kl:.4f} nats")
    assert 0 < kl < 0.5


# --- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["generate", "serve"])
def test_unknown_quantization_gives_one_error_line_and_exit_2(checkpoint, command):
    args = ["--prompt", "hi"] if command == "generate" else ["--port", "0"]
    result = subprocess.run([sys.executable, "-m", "engine", command, "--model", str(checkpoint[0]),
                             "--quantization", "int3", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "--quantization 'int3' is not supported (choose nvfp4, mxfp4)" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_shaped_weight_scale_is_named(checkpoint, tmp_path):
    cfg, nvfp4 = to_modelopt_nvfp4_checkpoint(LORA_YARN, checkpoint[1])
    nvfp4[EXPERTS + "4.down_proj.weight_scale"] = nvfp4[EXPERTS + "4.down_proj.weight_scale"][:, :1].contiguous()
    with pytest.raises(CheckpointError, match=rf"tensor {EXPERTS}4\.down_proj\.weight_scale has shape \(64, 1\), "
                                              r"expected \(64, 2\)"):
        load_model(write_checkpoint(tmp_path, cfg, nvfp4), "float32", progress=False)


def test_wrong_shaped_scale_of_a_dequantized_linear_is_named(checkpoint, tmp_path):
    cfg, nvfp4 = to_modelopt_nvfp4_checkpoint(LORA_YARN, checkpoint[1], other_linears=True)
    name = "model.layers.0.mlp.down_proj.weight"
    nvfp4[name + "_scale"] = nvfp4[name + "_scale"][:, :2].contiguous()
    with pytest.raises(CheckpointError, match=rf"tensor {name}: not NVFP4 of logical shape \(64, 96\)"):
        load_model(write_checkpoint(tmp_path, cfg, nvfp4), "float32", progress=False)


def test_unquantized_experts_in_an_nvfp4_checkpoint_are_refused(checkpoint, tmp_path):
    cfg, _ = to_modelopt_nvfp4_checkpoint(LORA_YARN, checkpoint[1])
    with pytest.raises(CheckpointError, match=r"experts\.\d+\.\w+_proj\.weight has dtype torch.float32, "
                                              r"expected torch.uint8"):
        load_model(write_checkpoint(tmp_path, cfg, checkpoint[1]), "float32", progress=False)


@pytest.mark.parametrize("quant, message", [
    ({"quant_method": "modelopt", "quant_algo": "FP8"}, "ModelOpt quant_algo 'FP8' is not supported"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 32}, "NVFP4 group_size 32 is not supported"),
])
def test_unsupported_modelopt_configs_are_refused(checkpoint, tmp_path, quant, message):
    write_checkpoint(tmp_path, dict(LORA_YARN, quantization_config=quant), {})
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path, "float32", progress=False)


def test_nvfp4_checkpoint_cannot_be_requantized_to_mxfp4(checkpoint, tmp_path):
    cfg, nvfp4 = to_modelopt_nvfp4_checkpoint(LORA_YARN, checkpoint[1])
    path = write_checkpoint(tmp_path, cfg, nvfp4)
    with pytest.raises(CheckpointError, match="experts are NVFP4 already; --quantization mxfp4 cannot apply"):
        load_model(path, "float32", progress=False, quantization="mxfp4")
    assert load_model(path, "float32", progress=False, quantization="nvfp4").routed_experts()[0].backend is not None


def test_quantization_names_parse_once():
    assert ExpertQuantization.parse(None) is None and ExpertQuantization.parse("mxfp4") is ExpertQuantization.MXFP4
    with pytest.raises(CheckpointError, match="'NVFP4' is not supported"):
        ExpertQuantization.parse("NVFP4")


# --- CUDA: the Triton backend in the model -------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the fused Triton MoE backend)")
def test_cuda_model_runs_the_fused_kernel_and_matches_the_cpu_reference(checkpoint):
    from engine.model.moe_backends import TritonMoE
    gpu = load_model(checkpoint[0], "bfloat16", device="cuda", attention="torch", progress=False, quantization="nvfp4")
    cpu = load_model(checkpoint[0], "bfloat16", attention="torch", progress=False, quantization="nvfp4")
    assert isinstance(gpu.routed_experts()[0].backend, TritonMoE)
    out, ref = prefill_then_decode_logits(gpu).cpu(), prefill_then_decode_logits(cpu)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
