"""MLA's absorbed matrices (W_UK, W_UV^T, kv_b_proj as [H, Dn + Dv, C]): fp32 copies on the
CPU only. In the model dtype (the GPU's choice) they are views of kv_b_proj's weight, so they
cost no memory, and the decode they drive stays within bf16 rounding of the fp32 copies."""

from __future__ import annotations

import pytest
import torch

from engine.attention import AttentionMetadata
from engine.attention.torch_backend import TorchAttention
from engine.loader import load_model
from helpers import LORA_YARN, contiguous_meta, make_checkpoint


def shares_storage(view: torch.Tensor, base: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def absorbed(model) -> list[tuple[torch.Tensor, ...]]:
    return [(a.w_kv_b, a.w_uk, a.w_uv_t) for a in (layer.self_attn for layer in model.model.layers)]


def absorbed_attention(attn, device: str = "cpu") -> torch.Tensor:
    """One decode batch through MLA's absorbed form (the torch reference attention): [3, H, Dv] fp32."""
    gen = torch.Generator().manual_seed(0)
    cfg, heads, block = attn.cfg, attn.heads, 8
    seq_lens = [5, 17, 30]
    meta = contiguous_meta([1, 1, 1], seq_lens, block, 4, num_decodes=3)
    meta = AttentionMetadata(meta.query_lens, meta.seq_lens, meta.block_tables.to(device),
                             meta.slot_mapping.to(device), meta.num_decodes)
    cache = torch.randn(12, block, cfg.kv_cache_dim, generator=gen).bfloat16().to(device)
    q_nope = torch.randn(3, heads, cfg.qk_nope_head_dim, generator=gen).bfloat16().to(device)
    q_pe = torch.randn(3, heads, cfg.qk_rope_head_dim, generator=gen).bfloat16().to(device)
    return attn._absorbed(q_nope, q_pe, cache, meta, TorchAttention()).float().cpu()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("mla"), dict(LORA_YARN, torch_dtype="bfloat16"), seed=4)


def test_cpu_keeps_fp32_copies(checkpoint):
    model = load_model(checkpoint, "bfloat16", progress=False)
    for layer, (w_kv_b, w_uk, w_uv_t) in zip(model.model.layers, absorbed(model)):
        assert w_kv_b.dtype == w_uk.dtype == w_uv_t.dtype == torch.float32
        assert not shares_storage(w_uk, layer.self_attn.kv_b_proj.weight)


def test_absorbed_matrices_in_the_model_dtype_are_views_and_decode_alike(checkpoint):
    """absorb_weights(bf16), as finish_loading does on CUDA: no new storage, and the absorbed
    form's output within bf16 rounding (2%) of the fp32 copies'."""
    model = load_model(checkpoint, "bfloat16", progress=False)
    fp32 = [absorbed_attention(layer.self_attn) for layer in model.model.layers]
    for layer in model.model.layers:
        layer.self_attn.absorb_weights(torch.bfloat16)
    for layer, (w_kv_b, w_uk, w_uv_t), want in zip(model.model.layers, absorbed(model), fp32):
        weight = layer.self_attn.kv_b_proj.weight
        assert w_kv_b.dtype == w_uk.dtype == w_uv_t.dtype == torch.bfloat16
        assert all(shares_storage(w, weight) for w in (w_kv_b, w_uk, w_uv_t))
        torch.testing.assert_close(absorbed_attention(layer.self_attn), want, atol=0.02 * want.abs().max().item(),
                                   rtol=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_model_holds_no_copy_of_the_absorbed_matrices(checkpoint):
    """On CUDA, finish_loading keeps the bf16 views (no fp32 copy: ~8 GB at R1's size), and
    their absorbed form gives the CPU's fp32 copies' output within bf16 rounding."""
    model = load_model(checkpoint, "bfloat16", device="cuda", attention="torch", progress=False)
    cpu = load_model(checkpoint, "bfloat16", attention="torch", progress=False)
    for layer, matrices, twin in zip(model.model.layers, absorbed(model), cpu.model.layers):
        assert all(w.dtype == torch.bfloat16 and shares_storage(w, layer.self_attn.kv_b_proj.weight)
                   for w in matrices)
        want = absorbed_attention(twin.self_attn)
        torch.testing.assert_close(absorbed_attention(layer.self_attn, "cuda"), want,
                                   atol=0.02 * want.abs().max().item(), rtol=0.02)
