"""`--kv-cache-dtype fp8_e4m3`: the latent cache in float8_e4m3fn with a per-tensor scale.

Every backend that runs on the CPU (the torch reference, the CPU backend, the padded
attention of recorded decode steps) writes values / scale and reads them back as the values
a cache in the model dtype would have held after rounding; a bf16 model with an FP8 cache
keeps its teacher-forced next-token distributions within a stated KL of the bf16 cache's;
the cache's blocks take half the bytes; the fused C++ decode step steps aside; a bad value
is one error line at start. FlashInfer's FP8 paths are tested in test_attention_flashinfer.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata, get_attention_backend
from engine.attention.base import FP8_KV_DTYPE, dequantize_kv, quantize_kv
from engine.attention.torch_backend import TorchAttention
from engine.cuda_graphs import DecodeGraphConfig, EagerGraph, padded_decode_attention
from engine.engine_process import ServeConfig
from engine.kv_manager import KVCacheManager
from engine.kv_sizing import block_bytes
from engine.loader import load_model
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from helpers import LORA_YARN, PLAIN_ONE_GROUP, contiguous_meta, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCALE = 0.5  # not 1.0, so that a scale applied twice or not at all shows


def fp8_cache(blocks: int, block: int, dims: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return quantize_kv(torch.randn(blocks, block, dims, generator=gen), FP8_KV_DTYPE, SCALE)


def with_scale(name: str):
    backend = get_attention_backend(name)
    backend.kv_scale = SCALE
    return backend


def test_fp8_write_stores_values_over_the_scale_and_saturates():
    latent = torch.tensor([[0.3, -1.7, 2.2, 0.0], [1000.0, -0.01, 5.0, 7.5]])
    k_pe = torch.tensor([[0.25, -3.0], [-1000.0, 0.125]])
    cache = torch.zeros(2, 4, 6, dtype=FP8_KV_DTYPE)
    meta = AttentionMetadata((2,), (2,), torch.tensor([[1, 0]], dtype=torch.int32), torch.tensor([5, 6]))
    with_scale("torch").write_kv(cache, latent, k_pe, meta)
    rows = dequantize_kv(cache.view(-1, 6)[[5, 6]], SCALE, torch.float32)
    expected = torch.cat((latent, k_pe), dim=-1)
    finite = expected.abs() < 448 * SCALE
    assert torch.isfinite(rows).all()
    torch.testing.assert_close(rows[finite], expected[finite], rtol=2 ** -4, atol=2 ** -9 * SCALE)
    assert rows[~finite].tolist() == [448 * SCALE, -448 * SCALE], "out-of-range values saturate"


# query_lens, seq_lens, decodes: a decode batch past the CPU backend's fp32 row limit (its
# bf16 path), a small decode batch (fp32), and prefill chunks after cached tokens.
CASES = {"large_decode_batch": ([1] * 12, [40 + 9 * i for i in range(12)], 12),
         "small_decode_batch": ([1, 1, 1], [1, 17, 30], 3),
         "prefill_chunks": ([9, 5, 20], [9, 21, 40], 0)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ["torch", "cpu"])
def test_backends_read_an_fp8_cache_as_its_dequantized_values(name, case):
    """Both forms on an FP8 cache equal the reference on an fp32 cache holding the
    dequantized values: within 1e-5 in fp32, 2e-2 where the CPU backend computes in bf16."""
    query_lens, seq_lens, decodes = CASES[case]
    heads, nope, rope, v_dim, latent, block = 4, 16, 8, 12, 32, 8
    blocks = -(-max(seq_lens) // block)
    cache = fp8_cache(len(seq_lens) * blocks, block, latent + rope, seed=len(case))
    values = dequantize_kv(cache, SCALE, torch.float32)
    meta = contiguous_meta(query_lens, seq_lens, block, blocks, num_decodes=decodes)
    gen = torch.Generator().manual_seed(1)
    tokens = sum(query_lens)
    q_latent, q_pe = torch.randn(tokens, heads, latent, generator=gen), torch.randn(tokens, heads, rope, generator=gen)
    q_nope = torch.randn(tokens, heads, nope, generator=gen)
    w_kv_b = torch.randn(heads, nope + v_dim, latent, generator=gen) / latent ** 0.5
    backend, reference = with_scale(name), TorchAttention()
    backend.plan(meta)
    tol = 2e-2 if name == "cpu" and case == "large_decode_batch" else 1e-5
    torch.testing.assert_close(backend.absorbed(q_latent, q_pe, cache, meta, 0.2),
                               reference.absorbed(q_latent, q_pe, values, meta, 0.2), atol=tol, rtol=tol)
    torch.testing.assert_close(backend.naive(q_nope, q_pe, cache, w_kv_b, meta, 0.2),
                               reference.naive(q_nope, q_pe, values, w_kv_b, meta, 0.2), atol=1e-5, rtol=1e-5)


def test_recorded_decode_attention_reads_an_fp8_cache():
    """The padded attention that CUDA graphs record dequantizes as it gathers."""
    block, seq_lens = 4, [3, 9, 14]
    cache = fp8_cache(16, block, 40, seed=2)
    tables = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [11, 10, 9, 8]], dtype=torch.int32)
    gen = torch.Generator().manual_seed(3)
    q_latent, q_pe = torch.randn(3, 2, 32, generator=gen), torch.randn(3, 2, 8, generator=gen)
    padded = padded_decode_attention(q_latent, q_pe, cache, tables, torch.tensor(seq_lens), 0.3, SCALE)
    meta = AttentionMetadata((1,) * 3, tuple(seq_lens), tables, torch.zeros(3, dtype=torch.int64), num_decodes=3)
    reference = TorchAttention().absorbed(q_latent, q_pe, dequantize_kv(cache, SCALE, torch.float32), meta, 0.3)
    torch.testing.assert_close(padded, reference, atol=1e-5, rtol=1e-5)


def teacher_forced_logprobs(model, prompt: list[int], forced: list[int], block: int = 8) -> torch.Tensor:
    """Log-probabilities [1 + len(forced) - 1, V] after the prompt's prefill and after each
    forced token but the last, fed one decode step at a time through the paged cache."""
    blocks = -(-(len(prompt) + len(forced)) // block)
    cache, table = model.allocate_kv_cache(blocks, block), torch.arange(blocks, dtype=torch.int32)[None]
    meta = AttentionMetadata((len(prompt),), (len(prompt),), table, torch.arange(len(prompt)))
    rows = [model.compute_logits(model(torch.tensor(prompt), meta.positions(), cache, meta)[-1:])]
    for pos, token in enumerate(forced[:-1], start=len(prompt)):
        meta = AttentionMetadata((1,), (pos + 1,), table, torch.tensor([pos]), num_decodes=1)
        rows.append(model.compute_logits(model(torch.tensor([token]), meta.positions(), cache, meta)))
    return F.log_softmax(torch.cat(rows), dim=-1)


MAX_MEAN_KL = 0.02  # nats per position; the next-token entropy of these random models is ~5.3 nats


@pytest.mark.parametrize("name", ["cpu", "torch"])
@pytest.mark.parametrize("config", ["lora_yarn", "plain_one_group"])
def test_fp8_cache_keeps_teacher_forced_distributions_near_bf16(tmp_path, name, config):
    """A bf16 model's next-token distributions, prompts prefilled and 12 tokens forced one
    decode step at a time: an FP8 cache stays within a mean KL(bf16 cache || FP8 cache) of
    0.02 nats per position. (Free-running tokens are not compared: these random models'
    distributions are nearly flat, so greedy choices flip on any rounding.)"""
    cfg = {"lora_yarn": LORA_YARN, "plain_one_group": PLAIN_ONE_GROUP}[config]
    model = load_model(make_checkpoint(tmp_path, dict(cfg, torch_dtype="bfloat16"), seed=7), "bfloat16",
                       attention=name, progress=False)
    gen = torch.Generator().manual_seed(0)
    cases = [(torch.randint(2, cfg["vocab_size"], (n,), generator=gen).tolist(),
              torch.randint(2, cfg["vocab_size"], (12,), generator=gen).tolist()) for n in (6, 23, 41, 80)]
    bf16 = [teacher_forced_logprobs(model, prompt, forced) for prompt, forced in cases]
    model.set_kv_cache_dtype("fp8_e4m3")
    fp8 = [teacher_forced_logprobs(model, prompt, forced) for prompt, forced in cases]
    assert model.allocate_kv_cache(1, 8).dtype == FP8_KV_DTYPE
    kl = F.kl_div(torch.cat(fp8), torch.cat(bf16), log_target=True, reduction="none").sum(-1)
    assert kl.mean() <= MAX_MEAN_KL, kl


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("fp8kv"), dict(LORA_YARN, torch_dtype="bfloat16"), seed=3)
    return path


def test_fp8_blocks_take_half_the_bytes_and_the_fused_decode_steps_aside(bf16_model, caplog):
    model = load_model(bf16_model, "bfloat16", progress=False)
    fused = model.fused_decode is not None
    auto = block_bytes(model, 16)
    with caplog.at_level(logging.INFO, logger="engine.model.model"):
        model.set_kv_cache_dtype("fp8_e4m3")
    assert block_bytes(model, 16) * 2 == auto
    assert model.fused_decode is None
    if fused:  # where the C++ step was built at all, the log says why it no longer runs
        assert "the KV cache is float8_e4m3fn" in caplog.text
    with pytest.raises(ValueError, match="--kv-cache-dtype must be one of auto, fp8_e4m3"):
        model.set_kv_cache_dtype("fp8")


def test_recorded_decode_steps_on_an_fp8_cache_give_the_eager_logits(bf16_model):
    """Decode steps replayed from recordings (the CPU stand-in for CUDA graphs) write and
    read the FP8 cache as the eager steps do."""
    model = load_model(bf16_model, "bfloat16", attention="torch", progress=False)
    model.set_kv_cache_dtype("fp8_e4m3")
    kv = KVCacheManager(64, 4, enable_prefix_caching=False)
    eager = ModelRunner(model, kv, 64)
    recorded = ModelRunner(model, kv, 64, DecodeGraphConfig(4, 8, EagerGraph))
    assert eager.kv_cache.dtype == recorded.kv_cache.dtype == FP8_KV_DTYPE
    seqs = [Sequence(f"s{i}", [5 + i, 9, 200, 3 + i][: 2 + i], SamplingParams(max_tokens=8), 8) for i in range(3)]
    steps = [[(s, s.num_tokens) for s in seqs]] + [[(s, 1) for s in seqs]] * 4
    for step in steps:
        for seq, n in step:
            assert kv.allocate_slots(seq, n)
        want, sampled = eager.run(step)
        got, _ = recorded.run(step)
        torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)
        for seq, n in step:
            seq.num_computed_tokens += n
        for seq, row in zip(sampled, want):
            seq.output_ids.append(int(row.argmax()))
    assert torch.equal(recorded.kv_cache[:, :64].view(torch.uint8), eager.kv_cache.view(torch.uint8))


def test_bad_kv_cache_dtype_is_one_error_line_at_start(bf16_model):
    with pytest.raises(ValueError, match="--kv-cache-dtype must be one of auto, fp8_e4m3, got 'int4'"):
        ServeConfig(str(bf16_model), kv_cache_dtype="int4")
    done = subprocess.run([sys.executable, "-m", "engine", "serve", "--model", str(bf16_model), "--port", "0",
                           "--kv-cache-dtype", "int4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: --kv-cache-dtype must be one of auto, fp8_e4m3, got 'int4'"
