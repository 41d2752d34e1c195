"""Each CPU fast path against its slow twin: prepacked bf16 GEMMs against F.linear, dense
small-batch MoE against the per-expert loop, batched decode attention against the
per-sequence reference, and the whole bf16 model with and without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.attention import MLAPath
from engine.attention.cpu_backend import CpuAttention
from engine.attention.torch_backend import TorchAttention
from engine.loader import load_model
from helpers import LORA_YARN, contiguous_meta, make_checkpoint
from kernels.cpu_gemm import PackedWeight
from kernels.moe_cpu import DenseExperts
from kernels.moe_ref import grouped_topk, moe_reference

needs_onednn_bf16 = pytest.mark.skipif(PackedWeight.of(torch.zeros(2, 2, dtype=torch.bfloat16)) is None,
                                       reason="oneDNN's prepacked bf16 linear is not available in this torch build")


@needs_onednn_bf16
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_packed_bf16_linear_equals_f_linear(rows):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(300, 96, generator=gen).bfloat16()
    x = torch.randn(rows, 96, generator=gen).bfloat16()
    torch.testing.assert_close(PackedWeight.of(w)(x), F.linear(x, w), atol=0, rtol=0)


def routed(tokens: int, dtype: torch.dtype, experts: int = 16, hidden: int = 64, inter: int = 32):
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / inter ** 0.5).to(dtype)
    logits = torch.randn(tokens, experts, generator=gen)
    weights, ids = grouped_topk(logits, torch.zeros(experts), 4, 4, 2, True, 2.5)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_dense_moe_matches_per_expert_loop_fp32(tokens):
    x, w13, w2, weights, ids = routed(tokens, torch.float32)
    torch.testing.assert_close(DenseExperts(w13, w2)(x, weights, ids), moe_reference(x, w13, w2, weights, ids),
                               atol=1e-5, rtol=1e-5)


@needs_onednn_bf16
@pytest.mark.parametrize("tokens", [1, 16])
def test_dense_moe_matches_per_expert_loop_bf16(tokens):
    x, w13, w2, weights, ids = routed(tokens, torch.bfloat16)
    out, ref = DenseExperts(w13, w2)(x, weights, ids).float(), moe_reference(x, w13, w2, weights, ids).float()
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_batched_decode_attention_matches_per_sequence_reference(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    heads, latent, rope, block = 4, 64, 16, 8
    seq_lens = [1, 9, 30, 17]
    cache = torch.randn(4 * 4, block, latent + rope, generator=gen).to(dtype)
    meta = contiguous_meta([1] * 4, seq_lens, block, blocks_per_seq=4, num_decodes=4)
    q_latent = torch.randn(4, heads, latent, generator=gen)
    q_pe = torch.randn(4, heads, rope, generator=gen)
    fast, slow = CpuAttention(), TorchAttention()
    fast.plan(meta)
    out = fast.absorbed(q_latent, q_pe, cache, meta, 0.1)
    torch.testing.assert_close(out, slow.absorbed(q_latent, q_pe, cache, meta, 0.1), atol=tol, rtol=tol)


def test_bf16_prefill_attention_matches_per_sequence_reference():
    """The naive form over a bf16 cache: whole prompts, a chunk after cached tokens (its
    causal mask aligned to the end of the context) and a one-token chunk, in one step."""
    gen = torch.Generator().manual_seed(1)
    heads, nope, rope, v_dim, latent, block = 4, 16, 8, 12, 32, 8
    query_lens, seq_lens = [9, 5, 1, 20], [9, 21, 14, 20]
    cache = torch.randn(4 * 3, block, latent + rope, generator=gen).bfloat16()
    meta = contiguous_meta(query_lens, seq_lens, block, blocks_per_seq=3)
    q_nope = torch.randn(sum(query_lens), heads, nope, generator=gen).bfloat16()
    q_pe = torch.randn(sum(query_lens), heads, rope, generator=gen).bfloat16()
    w_kv_b = torch.randn(heads, nope + v_dim, latent, generator=gen) / latent ** 0.5
    fast = CpuAttention().naive(q_nope, q_pe, cache, w_kv_b, meta, 0.2)
    slow = TorchAttention().naive(q_nope, q_pe, cache, w_kv_b, meta, 0.2)
    assert fast.dtype == torch.bfloat16 and fast.shape == slow.shape
    torch.testing.assert_close(fast.float(), slow.float(), atol=0.03, rtol=0.03)


@needs_onednn_bf16
def test_bf16_model_with_fast_paths_matches_the_reference_paths(tmp_path):
    cfg = dict(LORA_YARN, torch_dtype="bfloat16")
    path = make_checkpoint(tmp_path, cfg, seed=3)
    fast = load_model(path, "bfloat16", attention="cpu", progress=False)
    slow = load_model(path, "bfloat16", attention="torch", progress=False)
    slow.fused_decode = None  # the reference: unpacked GEMMs, per-expert MoE loop, no fused pieces
    for module in slow.modules():
        if hasattr(module, "packed"):
            module.packed = None
        if hasattr(module, "dense"):
            module.dense = None
        if hasattr(module, "fused"):
            module.fused = None
    assert fast.model.layers[1].mlp.experts.dense is not None
    prompts = [[5, 9, 200, 3, 77, 8], [42] * 11]
    lens = [len(p) for p in prompts]
    logits = []
    for model in (fast, slow):
        cache = model.allocate_kv_cache(8, 8)
        meta = contiguous_meta(lens, lens, 8, 4, path=MLAPath.AUTO)
        model(torch.tensor(sum(prompts, [])), meta.positions(), cache, meta)
        step = contiguous_meta([1, 1], [l + 1 for l in lens], 8, 4, num_decodes=2)
        logits.append(model.compute_logits(model(torch.tensor([7, 7]), step.positions(), cache, step)))
    diff = (logits[0] - logits[1]).abs().max()
    assert diff <= 0.05 * logits[1].abs().max(), diff
