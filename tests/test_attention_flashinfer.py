"""FlashInfer's paged MLA (the CUDA backend) against the torch reference, on the shared cache
layout: decode batches and absorbed prefill chunks (causal), over block sizes and lengths."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from engine.attention import get_attention_backend
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
