"""Triton kernels against their torch references: token-to-expert alignment, grouped top-k
routing, and the fused MoE for every expert format (bf16, DeepSeek block FP8, NVFP4, MXFP4),
weights dequantized in registers.

Each test runs on two backends:
- "interpreter": the Triton interpreter on CPU tensors, with fp32 dots (its bf16 tl.dot is
  wrong). Where no CUDA GPU is present, the `kernels` fixture sets TRITON_INTERPRET=1 for
  this file's tests only and imports the kernel modules under it.
- "cuda": the same kernels compiled natively, bf16 dots; skipped without a CUDA GPU.
Shapes are small so the interpreter finishes fast; tolerances are stated per backend.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kernels.fp4 import quantize_mxfp4, quantize_nvfp4
from kernels.fp8 import quantize_fp8_block
from kernels.moe_ref import grouped_topk

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = ("kernels.triton_align", "kernels.triton_routing", "kernels.triton_fused_moe")


@pytest.fixture(scope="module")
def kernels() -> SimpleNamespace:
    """The kernel modules, built for the interpreter unless a CUDA GPU is present.

    Triton reads TRITON_INTERPRET when @triton.jit runs (at import) and again in modules it
    imports lazily at the first launch, so the variable stays set while this file's tests
    run and is restored after them."""
    with pytest.MonkeyPatch.context() as env:
        if not torch.cuda.is_available():
            env.setenv("TRITON_INTERPRET", "1")
        # reload in dependency order in case another file imported them built the other way
        modules = [importlib.reload(sys.modules[n]) if n in sys.modules else importlib.import_module(n)
                   for n in KERNEL_MODULES]
        yield SimpleNamespace(**{n.rsplit("_", 1)[-1]: m for n, m in zip(KERNEL_MODULES, modules)})


@pytest.fixture(params=["interpreter", "cuda"])
def device(request, kernels) -> str:
    if request.param == "interpreter":
        if not kernels.moe.interpreted():
            pytest.skip("kernels were compiled natively (a CUDA GPU is present); set TRITON_INTERPRET=1 "
                        "for the interpreter variants")
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if kernels.moe.interpreted():
        pytest.skip("TRITON_INTERPRET=1: the kernels were built for the interpreter")
    return "cuda"


def random_ids(tokens: int, top_k: int, experts: int, seed: int, only: int | None = None) -> torch.Tensor:
    """[T, K] distinct experts per token, drawn from the first `only` experts if given."""
    gen = torch.Generator().manual_seed(seed)
    pool = only or experts
    return torch.stack([torch.randperm(pool, generator=gen)[:top_k] for _ in range(tokens)])


# --- token-to-expert alignment ------------------------------------------------------------

ALIGN_CASES = {
    "decode_top8_of_256": (1, 8, 256, 16, None),  # 248 experts empty, 8 with 1 slot < block
    "batch_top8_of_256": (37, 8, 256, 16, None),
    "two_chunks_few_experts": (300, 2, 4, 16, None),  # 600 slots > CHUNK, many blocks per expert
    "skewed_big_block": (5, 2, 16, 64, 3),  # all slots on 3 of 16 experts
}


@pytest.mark.parametrize("case", ALIGN_CASES)
def test_reference_alignment_puts_every_slot_once_in_a_block_of_its_expert(case, kernels):
    tokens, top_k, experts, block_m, only = ALIGN_CASES[case]
    ids = random_ids(tokens, top_k, experts, seed=3, only=only)
    a = kernels.align.moe_align_block_size_ref(ids, experts, block_m)
    used, slots = int(a.num_tokens_post_padded), tokens * top_k
    assert used % block_m == 0 and used <= a.sorted_token_ids.numel()
    real = a.sorted_token_ids[:used]
    assert torch.equal(real[real < slots].sort().values, torch.arange(slots, dtype=torch.int32))
    assert (a.sorted_token_ids[used:] == slots).all() and (a.expert_ids[used // block_m:] == -1).all()
    block_expert = a.expert_ids[:used // block_m].long().repeat_interleave(block_m)
    is_slot = real < slots
    assert torch.equal(block_expert[is_slot], ids.flatten()[real[is_slot].long()])
    assert (block_expert.diff() >= 0).all()  # experts in order, each run contiguous
    counts = torch.bincount(ids.flatten(), minlength=experts)
    assert torch.equal(torch.bincount(a.expert_ids[:used // block_m].long(), minlength=experts),
                       (counts + block_m - 1) // block_m)  # no blocks for empty experts


@pytest.mark.parametrize("case", ALIGN_CASES)
def test_triton_alignment_equals_the_reference(case, kernels, device):
    tokens, top_k, experts, block_m, only = ALIGN_CASES[case]
    ids = random_ids(tokens, top_k, experts, seed=4, only=only).to(device)
    got = kernels.align.moe_align_block_size(ids, experts, block_m)
    want = kernels.align.moe_align_block_size_ref(ids, experts, block_m)
    for name in ("sorted_token_ids", "expert_ids", "num_tokens_post_padded"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


# --- grouped top-k routing --------------------------------------------------------------------

ROUTING_CASES = {
    "deepseek_r1_top8_of_256_4_of_8_groups": (16, 256, 8, 4, 8, True, 2.5),
    "one_group_no_renormalization": (5, 16, 1, 1, 4, False, 1.0),
    "non_power_of_two_experts": (4, 12, 3, 2, 5, True, 1.5),
    "groups_of_one_expert": (3, 8, 8, 2, 2, True, 1.0),
}


@pytest.mark.parametrize("case", ROUTING_CASES)
def test_triton_routing_equals_grouped_topk(case, kernels, device):
    tokens, experts, groups, topk_group, top_k, norm, scaling = ROUTING_CASES[case]
    gen = torch.Generator().manual_seed(5)
    logits, bias = torch.randn(tokens, experts, generator=gen), torch.randn(experts, generator=gen) * 0.1
    want_w, want_ids = grouped_topk(logits, bias, top_k, groups, topk_group, norm, scaling)
    got_w, got_ids = kernels.routing.triton_grouped_topk(logits.to(device), bias.to(device), top_k, groups,
                                                         topk_group, norm, scaling)
    assert torch.equal(got_ids.cpu(), want_ids)  # same experts in the same (descending) order
    torch.testing.assert_close(got_w.cpu(), want_w, rtol=1e-5, atol=1e-6)  # fp32 on both backends


def test_routing_refuses_a_configuration_that_cannot_choose_k_experts(kernels):
    with pytest.raises(ValueError, match="cannot choose 9 of 16 experts"):
        kernels.routing.triton_grouped_topk(torch.zeros(1, 16), torch.zeros(16), 9, 4, 2)


# --- fused MoE, every weight format ---------------------------------------------------------

# name: (tokens, hidden D, intermediate I, experts, top_k, x dtype, experts routed to)
MOE_SHAPES = {
    "empty_experts_fewer_slots_than_a_block": (3, 64, 32, 8, 2, torch.float32, None),
    "hidden_and_intermediate_not_multiples_of_the_tiles": (4, 80, 48, 8, 2, torch.float32, None),
    "several_blocks_per_expert": (24, 64, 32, 4, 2, torch.float32, 2),
    "top4_of_16": (5, 96, 32, 16, 4, torch.float32, None),
    "bf16_activations_padded_intermediate": (4, 80, 40, 8, 2, torch.bfloat16, None),
}
# FP8 with 16 x 16 blocks puts several scale rows and columns in every tile, and I = 40 or 48
# off the block grid gives w13's gate and up halves block rows of their own; fp8_128 is
# DeepSeek's 128 x 128 block (one block, smaller than the weight's side).
FORMATS = ("nvfp4", "mxfp4", "bf16", "fp8", "fp8_128")


def quantize(fmt: str, w: torch.Tensor, parts: int = 1):
    """w [E, N, K] fp32 -> the experts' weight in `fmt` (w13 is `parts` = 2 stacked matrices)."""
    if fmt == "nvfp4":
        return quantize_nvfp4(w)
    if fmt == "mxfp4":
        return quantize_mxfp4(w)
    if fmt.startswith("fp8"):
        return quantize_fp8_block(w, (128, 128) if fmt == "fp8_128" else (16, 16), parts)
    return w.to({"bf16": torch.bfloat16, "fp32": torch.float32}[fmt])


def tolerance(device: str, dtype: torch.dtype) -> dict:
    """Against the fp32 reference on the same dequantized weights; outputs are of size ~1.
    Interpreter, fp32 dots: only the summation order differs (fp32 output), plus the output's
    own rounding for bf16 (2^-8 relative: two ulps allowed). Native: bf16 dot operands, x
    and h rounded to 8 significant bits (FP4 and FP8 weights are exact in bf16, bf16 ones are bf16)."""
    if device == "cpu":
        return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    return dict(rtol=2e-2, atol=2e-2)


def moe_inputs(tokens, hidden, inter, experts, top_k, fmt, dtype, only, device, seed=6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = quantize(fmt, torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5, parts=2)
    w2 = quantize(fmt, torch.randn(experts, hidden, inter, generator=gen) / inter ** 0.5)
    weights = torch.rand(tokens, top_k, generator=gen)
    ids = random_ids(tokens, top_k, experts, seed, only)
    return x.to(device), to_device(w13, device), to_device(w2, device), weights.to(device), ids.to(device)


def to_device(t, device: str):
    """A tensor, FP8BlockTensor, NVFP4Tensor or MXFP4Tensor with its tensors on `device`."""
    if torch.is_tensor(t):
        return t.to(device)
    return dataclasses.replace(t, **{f.name: getattr(t, f.name).to(device) for f in dataclasses.fields(t)
                                     if torch.is_tensor(getattr(t, f.name))})


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", MOE_SHAPES)
def test_fused_moe_equals_the_dequantized_reference(case, fmt, kernels, device):
    *shape, dtype, only = MOE_SHAPES[case]
    x, w13, w2, weights, ids = moe_inputs(*shape, fmt, dtype, only, device)
    got = kernels.moe.fused_moe(x, w13, w2, weights, ids)
    want = kernels.moe.fused_moe_reference(x.float(), w13, w2, weights, ids)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), want, **tolerance(device, dtype))


@pytest.mark.parametrize("fmt", ["fp8", "fp32"])
def test_fused_moe_fp8_w13_on_one_block_grid_and_fp32_experts(fmt, kernels, device):
    """w13 quantized as one matrix (I = 32, a multiple of the 16-row blocks, so gate and up
    share the grid), and dense fp32 experts (fp32 dots natively too)."""
    x, _, w2, weights, ids = moe_inputs(5, 64, 32, 8, 2, fmt, torch.float32, None, device)
    w13 = quantize(fmt, torch.randn(8, 64, 64, generator=torch.Generator().manual_seed(1)) / 8)
    w13 = to_device(w13, device)
    got = kernels.moe.fused_moe(x, w13, w2, weights, ids)
    want = kernels.moe.fused_moe_reference(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, want, **tolerance(device if fmt == "fp8" else "cpu", torch.float32))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tiles", ["DECODE_CONFIG", "DENSE_DECODE_CONFIG", "PREFILL_CONFIG"])
def test_fused_moe_native_tile_sizes_give_the_same_result(tiles, fmt, kernels, device):
    """The GPU's tile sizes (here under the interpreter too), with D and I below one tile."""
    x, w13, w2, weights, ids = moe_inputs(6, 80, 48, 8, 2, fmt, torch.float32, None, device)
    got = kernels.moe.fused_moe(x, w13, w2, weights, ids, config=getattr(kernels.moe, tiles))
    want = kernels.moe.fused_moe_reference(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, want, **tolerance(device, torch.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_moe_with_deepseek_r1_routing_top8_of_256_in_4_of_8_groups(fmt, device, kernels):
    """The whole Triton path (routing kernel, alignment, fused GEMMs) against grouped_topk and
    the per-expert loop on the dequantized weights."""
    tokens, hidden, inter, experts = 6, 64, 32, 256
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, hidden, generator=gen)
    logits, bias = torch.randn(tokens, experts, generator=gen), torch.randn(experts, generator=gen) * 0.1
    w13 = quantize(fmt, torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5, parts=2)
    w2 = quantize(fmt, torch.randn(experts, hidden, inter, generator=gen) / inter ** 0.5)
    want = kernels.moe.fused_moe_reference(x, w13, w2, *grouped_topk(logits, bias, 8, 8, 4, True, 2.5))
    weights, ids = kernels.routing.triton_grouped_topk(logits.to(device), bias.to(device), 8, 8, 4, True, 2.5)
    got = kernels.moe.fused_moe(x.to(device), to_device(w13, device), to_device(w2, device), weights, ids)
    torch.testing.assert_close(got.cpu(), want, **tolerance(device, torch.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_backend_adds_nothing_for_experts_held_by_another_rank(fmt, kernels, device):
    """Under expert parallelism ids of -1 name experts other ranks hold: the engine's Triton
    backend gives what the per-expert reference gives, which skips them."""
    from engine.model.moe_backends import TritonMoE
    x, w13, w2, weights, ids = moe_inputs(7, 64, 32, 8, 3, fmt, torch.float32, None, device)
    ids = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)).to(device) < 0.4, -1)
    ids[0] = -1  # a token none of whose experts are held here
    got = TritonMoE(w13, w2)(x, weights, ids)
    want = kernels.moe.fused_moe_reference(x.cpu(), to_device(w13, "cpu"), to_device(w2, "cpu"), weights.cpu(),
                                           ids.cpu())
    assert torch.equal(got[0].cpu(), torch.zeros(64))
    torch.testing.assert_close(got.cpu(), want, **tolerance(device, torch.float32))


def test_fused_moe_refuses_mismatched_weights(kernels):
    x, w13, w2, weights, ids = moe_inputs(2, 64, 32, 4, 2, "nvfp4", torch.float32, None, "cpu")
    with pytest.raises(ValueError, match="shapes do not agree"):
        kernels.moe.fused_moe(x[:, :32], w13, w2, weights, ids)
    with pytest.raises(TypeError, match="must be of one format"):
        kernels.moe.fused_moe(x, w13, quantize_mxfp4(torch.randn(4, 64, 32)), weights, ids)
    with pytest.raises(TypeError, match="must be of one format"):
        kernels.moe.fused_moe(x, w13, torch.randn(4, 64, 32), weights, ids)
    with pytest.raises(ValueError, match="weights and ids"):
        kernels.moe.fused_moe(x, w13, w2, weights[:1], ids)
    _, f13, f2, *_ = moe_inputs(2, 64, 32, 4, 2, "fp8", torch.float32, None, "cpu")
    with pytest.raises(ValueError, match="unsupported FP8 layout"):
        kernels.moe.fused_moe(x, f13, quantize_fp8_block(torch.randn(4, 64, 32), (16, 8)), weights, ids)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_moe_of_no_tokens_is_empty(fmt, kernels):
    x, w13, w2, weights, ids = moe_inputs(2, 64, 32, 4, 2, fmt, torch.float32, None, "cpu")
    assert kernels.moe.fused_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 64)


# --- native compilation, no GPU needed --------------------------------------------------------

POINTERS = {"x_ptr": "*bf16", "h_ptr": "*fp32", "gs_ptr": "*fp32", "rw_ptr": "*fp32", "y_ptr": "*fp32",
            "logits_ptr": "*fp32", "bias_ptr": "*fp32", "weights_ptr": "*fp32", "ids_ptr": "*i64",
            "stride_we": "i64", "scaling": "fp32"}  # any other: *i32 / i32
# Per weight format: (GROUP, SCALE_N) as R1 has them, and the weight and scale pointers (dense
# experts pass the weight as their unread scales, MXFP4 its scales as the unread global scale).
NATIVE_FORMATS = {"DENSE": ((1, 1), {"w_ptr": "*bf16", "s_ptr": "*bf16", "gs_ptr": "*bf16"}),
                  "FP8": ((128, 128), {"w_ptr": "*u8", "s_ptr": "*fp32"}),
                  "NVFP4": ((16, 1), {"w_ptr": "*u8", "s_ptr": "*u8"}),
                  "MXFP4": ((32, 1), {"w_ptr": "*u8", "s_ptr": "*u8", "gs_ptr": "*u8"})}


def compile_natively(arch: int) -> list[str]:
    """Compile every kernel with its native tiles for an NVIDIA arch (e.g. 90 = H100) with
    Triton's bundled ptxas. Needs no GPU, but kernels built by @triton.jit without
    TRITON_INTERPRET, so it runs in a fresh process. Returns the compiled variants."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kernels import triton_align as a, triton_fused_moe as m, triton_routing as r

    def build(kernel, pointers=None, num_warps=4, **constexprs) -> str:
        names, types = kernel.arg_names, POINTERS | (pointers or {})
        signature = {n: "constexpr" if n in constexprs else types.get(n, "*i32" if n.endswith("_ptr") else "i32")
                     for n in names}
        src = ASTSource(kernel, signature, {(names.index(n),): v for n, v in constexprs.items()})
        triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        return f"{kernel.__name__}{constexprs}"

    built = [build(a._count_kernel, CHUNK=a.CHUNK, E_P2=256),
             build(a._offsets_kernel, BLOCK_M=16, E_P2=256, BLOCKS=64),
             build(a._scatter_kernel, CHUNK=a.CHUNK),
             build(r._grouped_topk_kernel, E_P2=256, NUM_GROUPS=8, GROUP_SIZE=32, G_P2=8, TOPK_GROUP=4, TOP_K=8,
                   K_P2=8, NORMALIZE=True)]
    for name, ((group, scale_n), pointers) in NATIVE_FORMATS.items():
        fmt = m.WeightFormat[name]
        for cfg in (m.default_config(8, fmt), m.default_config(4096, fmt)):  # decode, prefill
            block_k = min(cfg.block_k, group) if fmt is m.WeightFormat.FP8 else cfg.block_k
            tiles = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, FORMAT=int(fmt), GROUP=group,
                         SCALE_N=scale_n, DOT_FP32=False, num_warps=cfg.num_warps)
            built += [build(m._gate_up_kernel, pointers, TOP_K=8, **tiles), build(m._down_kernel, pointers, **tiles)]
    return built


def test_kernels_compile_natively_for_hopper_with_bf16_dots(tmp_path):
    """The native path (bf16 dots, DeepSeek-R1's 256 experts, every expert format) compiles for
    sm_90 here too."""
    from triton.compiler import ASTSource
    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip("needs the ASTSource(fn, signature, constexprs) compile API of recent triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    script = ("import sys; sys.path.insert(0, 'tests'); "
              "from test_kernels_triton import compile_natively; print(len(compile_natively(90)))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "20"  # 4 align/routing + 2 configs x 4 formats x 2 GEMMs
