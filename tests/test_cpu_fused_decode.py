"""The fused bf16 CPU decode step (kernels/csrc/cpu_decode.cpp) against its slow twin, the
Python model with the reference attention backend: hidden states, logits and the cache rows
it writes, over head counts on and off its vectorized blocks, batches crossing block
boundaries, YaRN and routing variants; then whole generations through EngineCore."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pytest
import torch

from engine.attention import MLAPath
from engine.core import EngineConfig, EngineCore
from engine.scheduler import SchedulerConfig
from engine.loader import load_model
from engine.model.fused_cpu import FusedCpuDecoder
from engine.model.layers import RMSNorm
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from helpers import LORA_YARN, PLAIN_ONE_GROUP, contiguous_meta, make_checkpoint, make_serving_checkpoint
from kernels import cpu_decode

# Skipped only where nothing could build it; with a compiler, a failed build fails the tests.
pytestmark = pytest.mark.skipif(cpu_decode.toolchain_missing() is not None,
                                reason=f"the fused CPU decode step cannot be built here: {cpu_decode.toolchain_missing()}")


LOGPROB_TOL = 0.15  # two bf16 paths' log-probabilities (fused step against the Python model)


def test_the_extension_builds_where_there_is_a_compiler():
    assert cpu_decode.load() is not None, cpu_decode.why_unavailable()


@pytest.mark.parametrize("rows, out_features, in_features", [(1, 5, 32), (1, 130, 512), (2, 64, 96), (3, 7, 64),
                                                              (4, 260, 256)])
def test_small_linear_matches_f_linear(rows, out_features, in_features):
    """The decode GEMM for at most 4 rows (AVX512-BF16 dot products on the plain weight)
    against F.linear, over row counts, weight rows not a multiple of its 4-row blocks and K."""
    ext = cpu_decode.load()
    if not ext.small_linear_available():
        pytest.skip("this CPU has no AVX512-BF16: decode GEMMs stay on oneDNN")
    gen = torch.Generator().manual_seed(rows * out_features)
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    w = (torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5).bfloat16()
    torch.testing.assert_close(ext.small_linear(x, w).float(), torch.nn.functional.linear(x, w).float(),
                               atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("strided", [False, True])
def test_one_pass_rms_norm_matches_the_reference(strided):
    """RMSNorm's fused form (set on a bf16 CPU model) against its composite form, on rows
    that are contiguous and on a column slice of a wider tensor (MLA's q_a and latent)."""
    gen = torch.Generator().manual_seed(3)
    wide = (torch.randn(300, 704, generator=gen) * 3).bfloat16()
    x = wide[:, 128:640] if strided else wide[:, :512].contiguous()
    norm = RMSNorm(512, 1e-6, torch.bfloat16, "cpu")
    norm.weight.data.copy_(torch.rand(512, generator=gen) + 0.5)
    ref = norm(x)
    norm.fused = cpu_decode.load().rms_norm
    out = norm(x)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=0, rtol=8e-3)  # one bf16 ulp at most
    assert (out == ref).float().mean() > 0.99  # and almost everywhere bit-equal


def test_small_linear_refuses_shapes_it_does_not_take():
    ext = cpu_decode.load()
    if not ext.small_linear_available():
        pytest.skip("this CPU has no AVX512-BF16")
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="at most 4 rows and K % 32 == 0"):
        ext.small_linear(torch.zeros(5, 64, dtype=torch.bfloat16), w)
    with pytest.raises(RuntimeError, match="at most 4 rows and K % 32 == 0"):
        ext.small_linear(torch.zeros(1, 48, dtype=torch.bfloat16), torch.zeros(8, 48, dtype=torch.bfloat16))

BLOCK = 16
# 4 heads (scalar loops), YaRN, 4 routing groups; 12 heads (one AVX-512 block of 8 + 4),
# latent 96 (vectorized mix); 16 heads, latent 80 (scalar mix), one group, no renormalization.
CONFIGS = {
    "lora-yarn": dict(LORA_YARN, torch_dtype="bfloat16"),
    "12-heads": dict(LORA_YARN, torch_dtype="bfloat16", num_attention_heads=12, num_key_value_heads=12,
                     kv_lora_rank=96, qk_rope_head_dim=32, rope_scaling=None),
    "16-heads-one-group": dict(LORA_YARN, torch_dtype="bfloat16", num_attention_heads=16, num_key_value_heads=16,
                               kv_lora_rank=80, qk_rope_head_dim=16, n_group=1, topk_group=1, norm_topk_prob=False,
                               routed_scaling_factor=1.0, num_experts_per_tok=2, n_shared_experts=0),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request, tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), CONFIGS[request.param], seed=5)
    return load_model(path, "bfloat16", attention="torch", progress=False)


def decode_step(model, seq_lens: list[int], seed: int):
    """A decode step over a cache of random history: (ids, meta, cache)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = -(-max(seq_lens) // BLOCK)
    cache = model.allocate_kv_cache(len(seq_lens) * blocks, BLOCK)
    cache.copy_(torch.randn(cache.shape, generator=gen) * 0.5)
    meta = contiguous_meta([1] * len(seq_lens), seq_lens, BLOCK, blocks, num_decodes=len(seq_lens))
    ids = torch.randint(2, model.cfg.vocab_size, (len(seq_lens),), generator=gen)
    return ids, meta, cache


@contextmanager
def python_only(model):
    """The model with every fused piece off (the decode step, the one-pass RMSNorm): the reference."""
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    saved = model.fused_decode, [m.fused for m in norms]
    model.fused_decode = None
    for m in norms:
        m.fused = None
    try:
        yield model
    finally:
        model.fused_decode = saved[0]
        for m, fused in zip(norms, saved[1]):
            m.fused = fused


def both_paths(model, ids, meta, cache):
    """(hidden, cache after) from the fused step and from the Python model."""
    assert model.fused_decode is not None and model.fused_decode.decodes(meta) == len(meta.query_lens)
    fused = (model(ids, meta.positions(), c := cache.clone(), meta), c)
    with python_only(model):
        return fused, (model(ids, meta.positions(), c := cache.clone(), meta), c)


@pytest.mark.parametrize("seq_lens", [[1], [16], [17], [5, 40, 16, 33], [70] * 9 + [3, 64, 65, 100, 1, 2, 31]],
                         ids=["first-token", "full-block", "block-boundary", "mixed-4", "mixed-16"])
def test_fused_decode_step_matches_the_python_model(model, seq_lens):
    ids, meta, cache = decode_step(model, seq_lens, seed=len(seq_lens) + seq_lens[0])
    (hidden, cache_f), (ref, cache_r) = both_paths(model, ids, meta, cache)
    scale = ref.float().abs().max()
    assert (hidden.float() - ref.float()).abs().max() <= 0.02 * scale
    logits, ref_logits = model.compute_logits(hidden), model.compute_logits(ref)
    assert (logits - ref_logits).abs().max() <= 0.02 * ref_logits.abs().max()
    # the new tokens' rows, in every layer, hold what the Python model writes; nothing else moves
    rows = meta.slot_mapping
    flat_f, flat_r = cache_f.flatten(1, 2), cache_r.flatten(1, 2)
    torch.testing.assert_close(flat_f[:, rows].float(), flat_r[:, rows].float(), atol=0.03, rtol=0.02)
    untouched = torch.ones(flat_f.shape[1], dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(flat_f[:, untouched], cache.flatten(1, 2)[:, untouched])
    assert not torch.equal(flat_f[:, rows], cache.flatten(1, 2)[:, rows])


def test_a_mixed_step_fuses_its_decodes_and_runs_its_chunks_in_python(model):
    """Decodes then prefill chunks (one after cached tokens): two forwards, one result."""
    gen = torch.Generator().manual_seed(0)
    assert model.fused_decode is not None
    meta = contiguous_meta([1, 1, 6, 3], [9, 20, 6, 11], BLOCK, 2, num_decodes=2)
    assert model.fused_decode.decodes(meta) == 2
    cache = model.allocate_kv_cache(8, BLOCK)
    cache.copy_(torch.randn(cache.shape, generator=gen) * 0.5)
    ids = torch.randint(2, model.cfg.vocab_size, (11,), generator=gen)
    with_fused, cache_f = model(ids, meta.positions(), c := cache.clone(), meta), c
    with python_only(model):
        ref, cache_r = model(ids, meta.positions(), c := cache.clone(), meta), c
    assert with_fused.shape == ref.shape == (11, model.cfg.hidden_size)
    assert (with_fused.float() - ref.float()).abs().max() <= 0.02 * ref.float().abs().max()
    torch.testing.assert_close(cache_f.float(), cache_r.float(), atol=0.03, rtol=0.02)


def test_steps_the_fused_path_cannot_take_go_through_the_python_model(model):
    fused = model.fused_decode
    assert fused.decodes(contiguous_meta([6], [6], BLOCK, 1)) == 0  # a prefill only
    assert fused.decodes(contiguous_meta([1], [9], BLOCK, 2, num_decodes=1, path=MLAPath.NAIVE)) == 0
    assert fused.decodes(contiguous_meta([1] * 300, [2] * 300, BLOCK, 1, num_decodes=300)) == 0  # over MAX_TOKENS


def generate(core: EngineCore, prompts: list[list[int]], max_tokens: int, n: int = 1,
             cached: list[int] | None = None) -> list[list[int]]:
    """Greedy tokens of every choice of every prompt, prompt by prompt; `cached` collects
    each finished request's cached prompt tokens."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, n=n)
    for i, ids in enumerate(prompts):
        core.add(EngineRequest(f"r{i}", ids, params))
    tokens: dict[tuple[str, int], list[int]] = {(f"r{i}", c): [] for i in range(len(prompts)) for c in range(n)}
    while core.has_work:
        for out in core.step():
            for choice in out.choices:
                tokens[out.request_id, choice.index] += choice.token_ids
            if out.finished and cached is not None:
                cached.append(out.usage.cached_prompt_tokens)
    return list(tokens.values())


def teacher_forced(model, make_core, run) -> tuple[list, list]:
    """`run(core)` once with the fused step, then once through the Python model fed the tokens
    the fused run chose: its steps hand the fused run's logits to the sampler, so both runs
    schedule alike and every step sees the same cache. Returns both runs' outputs; each step's
    logits of the two paths are compared (`assert_logits_agree`)."""
    fused_logits, python_logits, outputs = [], [], []
    core = make_core()
    execute = core.runner.execute
    core.runner.execute = lambda step: fused_logits.append(execute(step)) or fused_logits[-1]
    outputs.append(run(core))
    with python_only(model):
        core = make_core()
        execute = core.runner.execute

        def forced(step):
            python_logits.append(execute(step))
            return fused_logits[len(python_logits) - 1]
        core.runner.execute = forced
        outputs.append(run(core))
    assert len(python_logits) == len(fused_logits) > 20
    assert_logits_agree(fused_logits, python_logits)
    return outputs


def assert_logits_agree(fused_logits: list, python_logits: list) -> None:
    """Two bf16 paths round differently: log-probabilities within LOGPROB_TOL, greedy choices
    equal except where the two best tokens are nearly tied."""
    for fused, python in zip(fused_logits, python_logits, strict=True):
        assert fused.shape == python.shape
        if not fused.numel():  # a step of prompt chunks that end no prompt: nothing to sample
            continue
        lp_fused, lp_python = fused.float().log_softmax(-1), python.float().log_softmax(-1)
        assert (lp_fused - lp_python).abs().max() <= LOGPROB_TOL  # as close as transformers' own bf16
        top2 = lp_python.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * LOGPROB_TOL
        assert torch.equal(lp_fused.argmax(-1)[clear], lp_python.argmax(-1)[clear])


def test_engine_generations_with_the_fused_step_match_the_python_model(tmp_path):
    """A batch of 4 through EngineCore (continuous batching, paged cache, the CPU attention
    backend), teacher-forced (a free-running comparison would let one near tie change every
    later token)."""
    path = make_serving_checkpoint(tmp_path)
    model = load_model(path, "bfloat16", attention="cpu", progress=False)
    assert model.fused_decode is not None
    tokenizer = Tokenizer.from_dir(path)
    prompts = [[100 + 7 * i + j for j in range(5 + 9 * i)] for i in range(4)]
    config = EngineConfig(max_model_len=256, num_blocks=64, block_size=BLOCK)
    fused, forced = teacher_forced(model, lambda: EngineCore(model, tokenizer, config),
                                   lambda core: generate(core, prompts, max_tokens=24))
    assert forced == fused and all(len(t) == 24 for t in fused)


def test_models_the_extension_cannot_take_decode_in_python(tmp_path, monkeypatch):
    plain = load_model(make_checkpoint(tmp_path / "plain", dict(PLAIN_ONE_GROUP, torch_dtype="bfloat16")),
                       "bfloat16", progress=False)
    assert plain.fused_decode is None  # no q LoRA
    path = make_checkpoint(tmp_path / "lora", CONFIGS["lora-yarn"])
    assert load_model(path, "float32", progress=False).fused_decode is None
    assert load_model(path, "bfloat16", quantization="nvfp4", progress=False).fused_decode is None
    monkeypatch.setenv(cpu_decode.DISABLE_ENV, "torch")
    assert FusedCpuDecoder.of(load_model(path, "bfloat16", progress=False)) == (None, "MOESERVE_CPU_DECODE=torch")
    monkeypatch.setenv(cpu_decode.DISABLE_ENV, "fast")
    with pytest.raises(ValueError, match="MOESERVE_CPU_DECODE must be 'torch' or 'fused'"):
        load_model(path, "bfloat16", progress=False)


def test_without_a_compiler_the_extension_is_reported_unavailable(monkeypatch):
    monkeypatch.setattr(cpu_decode, "_state", {})
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert cpu_decode.load() is None
    assert cpu_decode.why_unavailable() == "no C++ compiler (/nonexistent/c++) on PATH"



def test_fused_generations_survive_prefix_reuse_chunking_and_preemption(tmp_path):
    """A shared 32-token prefix (two cached blocks), prompts chunked 24 tokens at a time among
    running decodes, n=2 choices sharing their prompt's blocks, and a pool too small for
    everyone, so that sequences are preempted and recomputed: the fused step agrees with the
    Python model at every step (teacher-forced, as above), every block comes back."""
    path = make_serving_checkpoint(tmp_path)
    model = load_model(path, "bfloat16", attention="cpu", progress=False)
    tokenizer = Tokenizer.from_dir(path)
    prefix = [300 + j for j in range(32)]
    prompts = [prefix + [900 + 11 * i + j for j in range(3 + 7 * i)] for i in range(4)]
    preempted, cached = [], []

    def make_core():
        core = EngineCore(model, tokenizer, EngineConfig(
            max_model_len=128, num_blocks=14, block_size=BLOCK,
            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=24)))
        schedule, victims = core.scheduler.schedule, []

        def counting_schedule():
            out = schedule()
            victims.extend(out.preempted)
            return out
        core.scheduler.schedule = counting_schedule
        preempted.append(victims)
        return core

    def run(core):
        out = generate(core, prompts, max_tokens=20, n=2, cached=cached)
        assert core.kv.num_free_blocks == 14  # every block back in the pool
        return out
    fused, forced = teacher_forced(model, make_core, run)
    assert forced == fused and all(len(t) == 20 for t in fused)
    assert min(len(v) for v in preempted) > 0, preempted  # the pool really ran dry
    assert max(cached) >= 32  # and the shared prefix was served from the cache
