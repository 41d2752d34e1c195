"""The MoE layer's compute paths: a DeepSeek FP8 checkpoint's routed experts kept in FP8
(values and block scales as stored), the backend each device gets for every expert format,
and the router's grouped top-k (the Triton kernel on CUDA, the torch reference elsewhere).

FP8 experts dequantize to exactly the values the loader used to produce, so the FP8 model
is compared with the same checkpoint dequantized beforehand: within 1e-5 in fp32 serving,
bit for bit in bf16 serving through the same per-expert loop.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.attention import MLAPath
from engine.checkpoint import fp8_block_dequantize, random_weights, to_fp8_checkpoint, write_checkpoint
from engine.loader import load_model
from engine.model import ModelConfig
from engine.model.moe import Router
from engine.model.moe_backends import TorchMoE
from helpers import LORA_YARN, contiguous_meta
from kernels.fp8 import dequantize_fp8_block, quantize_fp8_block
from kernels.moe_ref import grouped_topk, moe_reference, moe_reference_fp8

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 9, 200, 3, 77, 8], [42] * 11]
# D 160 and I 72 are off the 128 grid: edge blocks, and gate and up with block rows of their own
FP8_CFG = dict(LORA_YARN, hidden_size=160, moe_intermediate_size=72)


def prefill_then_decode_logits(model, prompts=PROMPTS) -> torch.Tensor:
    """Logits [prompt tokens + one decode token per prompt, V] through the engine's forward."""
    lens = [len(p) for p in prompts]
    cache = model.allocate_kv_cache(4 * len(prompts), 8)
    meta = contiguous_meta(lens, lens, 8, 4, path=MLAPath.AUTO)
    prefill = model.compute_logits(model(torch.tensor(sum(prompts, [])).to(model.device), meta.positions(), cache,
                                         meta))
    step = contiguous_meta([1] * len(prompts), [n + 1 for n in lens], 8, 4, num_decodes=len(prompts))
    decode = model.compute_logits(model(torch.tensor([7] * len(prompts)).to(model.device), step.positions(), cache,
                                        step))
    return torch.cat([prefill, decode]).float().cpu()


@pytest.fixture(scope="module")
def fp8_and_dequantized(tmp_path_factory) -> tuple[Path, Path]:
    """The FP8 checkpoint, and the same weights dequantized into a plain one."""
    root = tmp_path_factory.mktemp("fp8")
    cfg, tensors = to_fp8_checkpoint(FP8_CFG, random_weights(FP8_CFG, seed=11))
    dense = {n: fp8_block_dequantize(t, tensors[n + "_scale_inv"]) if t.dtype == torch.float8_e4m3fn else t
             for n, t in tensors.items() if not n.endswith("_scale_inv")}
    return write_checkpoint(root / "fp8", cfg, tensors), write_checkpoint(root / "dense", FP8_CFG, dense)


@pytest.mark.parametrize("block", [16, 128])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_fp8_expert_loop_matches_dequantize_everything_reference(tokens, block):
    gen = torch.Generator().manual_seed(tokens)
    experts, hidden, inter = 16, 72, 40
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = quantize_fp8_block(torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5, (block, block), 2)
    w2 = quantize_fp8_block(torch.randn(experts, hidden, inter, generator=gen) / inter ** 0.5, (block, block))
    weights, ids = grouped_topk(torch.randn(tokens, experts, generator=gen), torch.zeros(experts), 4, 4, 2)
    ids[0, 0] = -1  # held by another rank: adds nothing in both
    reference = moe_reference(x, dequantize_fp8_block(w13), dequantize_fp8_block(w2), weights, ids)
    torch.testing.assert_close(moe_reference_fp8(x, w13, w2, weights, ids), reference, atol=1e-6, rtol=1e-6)


def test_fp8_checkpoint_keeps_its_experts_fp8_one_byte_per_weight_plus_block_scales(fp8_and_dequantized):
    fp8_path, dense_path = fp8_and_dequantized
    fp8, dense = (load_model(p, "bfloat16", progress=False) for p in (fp8_path, dense_path))
    for q, d in zip(fp8.routed_experts(), dense.routed_experts(), strict=True):
        assert q.w13 is None and isinstance(q.backend, TorchMoE) and q.dense is None
        assert q.backend.w13.weight.dtype == q.backend.w2.weight.dtype == torch.float8_e4m3fn
        # 16 experts: w13 144 x 160 with (2 halves x 1) x 2 fp32 scales, w2 160 x 72 with 2 x 1
        assert q.nbytes() == 16 * (144 * 160 + 160 * 72 + 4 * (4 + 2)) == 553_344
        assert d.nbytes() == 16 * 3 * 160 * 72 * 2 == 1_105_920
    assert not any("experts.w13" in n for n, _ in fp8.named_parameters())


def test_fp8_experts_give_the_dequantized_models_logits_in_fp32(fp8_and_dequantized):
    fp8, dense = (load_model(p, "float32", progress=False) for p in fp8_and_dequantized)
    torch.testing.assert_close(prefill_then_decode_logits(fp8), prefill_then_decode_logits(dense), atol=1e-5, rtol=0)


def test_fp8_experts_give_the_dequantized_models_logits_bit_for_bit_in_bf16(fp8_and_dequantized):
    """Each routed expert dequantizes to the bf16 weights the loader gives the dense model, so
    through the same per-expert loop the logits are equal. (A bf16 CPU runs dense experts
    through other paths by default, the all-experts GEMMs and the fused C++ decode step,
    whose summation orders flip near-tied routing choices: not a property of FP8.)"""
    fp8, dense = (load_model(p, "bfloat16", progress=False) for p in fp8_and_dequantized)
    for experts in dense.routed_experts():
        experts.dense = None
    dense.fused_decode = None
    assert torch.equal(prefill_then_decode_logits(fp8), prefill_then_decode_logits(dense))


def test_a_cpu_process_serving_fp8_experts_never_imports_triton(fp8_and_dequantized):
    script = ("import sys; sys.path.insert(0, 'tests'); from test_moe_backends import *; "
              f"m = load_model({str(fp8_and_dequantized[0])!r}, 'float32', progress=False); "
              "prefill_then_decode_logits(m); print(sorted(n for n in sys.modules if n.startswith('triton')))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "[]"


def test_router_on_the_cpu_runs_the_torch_reference():
    router = Router(ModelConfig.from_dict(LORA_YARN), "cpu")
    assert router.grouped_topk is grouped_topk


# --- CUDA ------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernels)")


@needs_cuda
def test_router_on_cuda_runs_the_triton_routing_kernel():
    from kernels.triton_routing import triton_grouped_topk
    cfg = ModelConfig.from_dict(LORA_YARN)
    router = Router(cfg, "cuda")
    assert router.grouped_topk is triton_grouped_topk
    gen = torch.Generator().manual_seed(3)
    router.weight.copy_(torch.randn(16, 64, generator=gen))
    router.e_score_correction_bias.copy_(torch.rand(16, generator=gen) * 0.1)
    x = torch.randn(9, 64, generator=gen)
    weights, ids = router(x.cuda())
    want_w, want_ids = grouped_topk(x @ router.weight.cpu().t(), router.e_score_correction_bias.cpu(), 4, 4, 2,
                                    True, 2.5)
    assert torch.equal(ids.cpu(), want_ids)
    torch.testing.assert_close(weights.cpu(), want_w, rtol=1e-5, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("kind", ["fp8", "bf16"])
def test_cuda_model_runs_every_expert_format_in_the_fused_kernel_and_matches_the_cpu(fp8_and_dequantized, kind):
    """bf16 serving: the fused kernel's bf16 dots against the CPU's per-expert loop (5% of the
    logits' range, as for FP4); and nothing stops a CUDA graph from recording the step."""
    from engine.cuda_graphs import capture_blocker
    from engine.model.moe_backends import TritonMoE
    path = fp8_and_dequantized[0 if kind == "fp8" else 1]
    gpu = load_model(path, "bfloat16", device="cuda", attention="torch", progress=False)
    cpu = load_model(path, "bfloat16", attention="torch", progress=False)
    assert all(isinstance(e.backend, TritonMoE) for e in gpu.routed_experts())
    assert capture_blocker(gpu) is None
    out, ref = prefill_then_decode_logits(gpu), prefill_then_decode_logits(cpu)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
