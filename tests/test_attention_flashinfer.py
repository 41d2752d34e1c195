"""FlashInfer's paged MLA (the CUDA backend) against the torch reference, on the shared cache
layout: decode batches and absorbed prefill chunks (causal), over block sizes and lengths;
the naive form through its ragged prefill in chunks; FP8 caches; R1's layer at 128k tokens."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from engine.attention import AttentionMetadata, get_attention_backend
from engine.attention.torch_backend import TorchAttention
from helpers import contiguous_meta

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flashinfer") is None,
                                reason="needs a CUDA GPU and flashinfer")

CASES = {  # query_lens, seq_lens, block size
    "decode_batch": ([1, 1, 1, 1], [1, 17, 64, 200], 16),
    "decode_one_block_each": ([1, 1], [3, 5], 64),
    "prefill_chunks_causal": ([7, 33], [7, 90], 16),
    "decodes_then_chunk": ([1, 1, 12], [9, 40, 30], 32),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("heads", [16, 128])
def test_flashinfer_absorbed_mla_matches_torch_reference(case, heads):
    query_lens, seq_lens, block = CASES[case]
    gen = torch.Generator().manual_seed(len(case) + heads)
    blocks_per_seq = -(-max(seq_lens) // block)
    meta = contiguous_meta(query_lens, seq_lens, block, blocks_per_seq,
                           num_decodes=sum(1 for q in query_lens if q == 1))
    meta = type(meta)(meta.query_lens, meta.seq_lens, meta.block_tables.cuda(), meta.slot_mapping.cuda(),
                      meta.num_decodes, meta.path)
    cache = torch.randn(len(seq_lens) * blocks_per_seq, block, 576, generator=gen).bfloat16().cuda()
    tokens = sum(query_lens)
    q_latent = torch.randn(tokens, heads, 512, generator=gen).cuda()
    q_pe = torch.randn(tokens, heads, 64, generator=gen).cuda()
    fast = get_attention_backend("flashinfer")
    fast.plan(meta)
    scale = 192 ** -0.5
    out = fast.absorbed(q_latent, q_pe, cache, meta, scale)
    out_again = fast.absorbed(q_latent, q_pe, cache, meta, scale)  # a second layer reuses the plan
    ref = TorchAttention().absorbed(q_latent, q_pe, cache, meta, scale)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)  # bf16 operands against fp32
    assert torch.equal(out, out_again)


def cuda_meta(query_lens, seq_lens, block, num_decodes=0):
    blocks_per_seq = -(-max(seq_lens) // block)
    meta = contiguous_meta(query_lens, seq_lens, block, blocks_per_seq, num_decodes=num_decodes)
    return blocks_per_seq, type(meta)(meta.query_lens, meta.seq_lens, meta.block_tables.cuda(),
                                      meta.slot_mapping.cuda(), meta.num_decodes, meta.path)


PREFILL_CASES = {  # query_lens, seq_lens: a whole prompt, a chunk after cached tokens, a mixed step
    "prompt": ([1500], [1500]),
    "chunk_after_prefix": ([300], [2500]),
    "several_sequences": ([9, 200, 1], [9, 700, 40]),
}


@pytest.mark.parametrize("case", PREFILL_CASES)
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("chunk", [256, None], ids=["chunk256", "auto"])
def test_flashinfer_chunked_prefill_matches_torch_reference(case, kv_dtype, chunk):
    """The naive form through FlashInfer's ragged prefill, chunk by chunk with the states
    merged (DeepSeek's dims: Dn 128, R 64, Dv 128, C 512), against the unchunked fp32
    reference on the same cache, bf16 or FP8."""
    from engine.attention.base import dequantize_kv, quantize_kv
    from engine.attention.chunked import ChunkedPrefill
    from engine.attention.flashinfer_backend import FlashInferPrefillKernel
    import flashinfer.prefill

    query_lens, seq_lens = PREFILL_CASES[case]
    heads, block = 16, 64
    gen = torch.Generator().manual_seed(len(case))
    blocks_per_seq, meta = cuda_meta(query_lens, seq_lens, block)
    values = torch.randn(len(seq_lens) * blocks_per_seq, block, 576, generator=gen)
    cache = quantize_kv(values, kv_dtype, 1.0).cuda()
    tokens = sum(query_lens)
    q_nope = torch.randn(tokens, heads, 128, generator=gen).bfloat16().cuda()
    q_pe = torch.randn(tokens, heads, 64, generator=gen).bfloat16().cuda()
    w_kv_b = (torch.randn(heads, 256, 512, generator=gen) / 512 ** 0.5).bfloat16().cuda()
    backend = get_attention_backend("flashinfer")
    if chunk is not None:  # small chunks: many merges
        workspace = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
        kernel = FlashInferPrefillKernel(flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper, workspace)
        out = ChunkedPrefill(kernel, chunk)(q_nope, q_pe, cache, w_kv_b, meta, 192 ** -0.5, 1.0)
    else:
        out = backend.naive(q_nope, q_pe, cache, w_kv_b, meta, 192 ** -0.5)
    ref = TorchAttention().naive(q_nope, q_pe, dequantize_kv(cache, 1.0, torch.float32), w_kv_b, meta, 192 ** -0.5)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)  # bf16 operands against fp32


@pytest.mark.parametrize("case", CASES)
def test_flashinfer_absorbed_mla_reads_an_fp8_cache(case):
    """An FP8 cache: FlashInfer's paged MLA on the sub-batch's blocks dequantized, against the
    reference on the same FP8 cache."""
    from engine.attention.base import quantize_kv

    query_lens, seq_lens, block = CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    blocks_per_seq, meta = cuda_meta(query_lens, seq_lens, block, sum(1 for q in query_lens if q == 1))
    cache = quantize_kv(torch.randn(len(seq_lens) * blocks_per_seq, block, 576, generator=gen),
                        torch.float8_e4m3fn, 1.0).cuda()
    tokens = sum(query_lens)
    q_latent = torch.randn(tokens, 16, 512, generator=gen).cuda()
    q_pe = torch.randn(tokens, 16, 64, generator=gen).cuda()
    fast = get_attention_backend("flashinfer")
    fast.plan(meta)
    out = fast.absorbed(q_latent, q_pe, cache, meta, 192 ** -0.5)
    ref = TorchAttention().absorbed(q_latent, q_pe, cache, meta, 192 ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def test_r1_layer_prefills_128k_tokens_on_one_gpu():
    """One layer's prefill attention at R1's dims (128 heads, C 512, R 64, Dn 128, Dv 128) for a
    131,072-token prompt in one step: the attention adds under 48 GiB to what its inputs and
    output take (q 6 GiB, output 4 GiB; the output state in fp32 is 8 GiB of that bound),
    where unchunked [H, Q, S] fp32 scores alone would be 8 TiB."""
    tokens, heads, block = 131072, 128, 64
    blocks = tokens // block
    meta = AttentionMetadata((tokens,), (tokens,), torch.arange(blocks, dtype=torch.int32, device="cuda")[None],
                             torch.arange(tokens, device="cuda"))
    cache = torch.randn(blocks, block, 576, device="cuda", dtype=torch.bfloat16)
    q_nope = torch.randn(tokens, heads, 128, device="cuda", dtype=torch.bfloat16)
    q_pe = torch.randn(tokens, heads, 64, device="cuda", dtype=torch.bfloat16)
    w_kv_b = torch.randn(heads, 256, 512, device="cuda", dtype=torch.bfloat16) / 512 ** 0.5
    backend = get_attention_backend("flashinfer")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = backend.naive(q_nope, q_pe, cache, w_kv_b, meta, 192 ** -0.5)
    torch.cuda.synchronize()
    added = torch.cuda.max_memory_allocated() - before
    assert out.shape == (tokens, heads, 128) and bool(torch.isfinite(out).all())
    assert added < 48 * 2**30, f"{added / 2**30:.1f} GiB"
