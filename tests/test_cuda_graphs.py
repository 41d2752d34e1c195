"""Decode steps replayed from recorded graphs (`engine.cuda_graphs`) must give the logits,
the KV cache and the generations of the eager forward.

On the CPU the recording is `EagerGraph`: a replay reruns the function recorded once, on
the fixed buffers, with the metadata built at recording time, whose host lengths are
placeholders; so equal logits over several steps of growing sequences show that the
recorded forward takes every per-step value from the buffers. On a CUDA GPU the same tests
run with real CUDA graphs (fp32, padded torch attention, Triton FP4 experts) and with
FlashInfer (bf16, DeepSeek's kv_lora 512 and rope 64), and FlashInfer's graph mode is
checked against the torch reference on its own.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, replace

import pytest
import torch

from engine.attention import AttentionMetadata
from engine import cuda_graphs
from engine.attention.torch_backend import TorchAttention
from engine.core import EngineConfig, EngineCore
from engine.cuda_graphs import (CudaGraph, DecodeGraph, DecodeGraphConfig, EagerGraph, capture_blocker, capture_sizes,
                                cuda_graph_config, cuda_graph_factory, padded_decode_attention)
from engine.kv_manager import KVCacheManager
from engine.loader import load_model
from engine.request import EngineRequest
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerConfig
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer
from helpers import LORA_YARN, PLAIN_ONE_GROUP, make_checkpoint, make_serving_checkpoint

HAS_CUDA = torch.cuda.is_available()
HAS_FLASHINFER = HAS_CUDA and importlib.util.find_spec("flashinfer") is not None
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
needs_flashinfer = pytest.mark.skipif(not HAS_FLASHINFER, reason="needs a CUDA GPU and flashinfer")

BLOCK, NUM_BLOCKS, MAX_BLOCKS, MAX_BATCH = 4, 160, 8, 16
# DeepSeek's attention dims (kv_lora 512, rope 64), which FlashInfer's MLA kernels are built for.
DEEPSEEK_DIMS = dict(LORA_YARN, num_attention_heads=16, num_key_value_heads=16)


class Counted(DecodeGraph):
    """A recording that counts its replays."""

    def __init__(self, graph: DecodeGraph) -> None:
        self.graph, self.replays = graph, 0

    def capture(self, fn):
        return self.graph.capture(fn)

    def replay(self):
        self.replays += 1
        self.graph.replay()


@dataclass(frozen=True)
class Setup:
    """How a test runs: the model's device, dtype, experts and attention, the recorder, and
    how close the recorded logits must come to the eager ones."""

    device: str
    dtype: str
    attention: str
    quantization: str | None
    tol: float
    config: dict

    def new_graph(self):
        record = cuda_graph_factory() if self.device == "cuda" else EagerGraph
        return lambda: Counted(record())


SETUPS = {
    # fp32: the recorded path reduces over the padded context in another order than the
    # reference, so the last bits may differ: logits agree to 1e-6 relative.
    "cpu-eager-recording": Setup("cpu", "float32", "torch", None, 1e-6, PLAIN_ONE_GROUP),
    "cuda-graph-fp32": Setup("cuda", "float32", "torch", "nvfp4", 1e-5, PLAIN_ONE_GROUP),
    # bf16, and FlashInfer splits the work differently for the padded batch: a few bf16 ulps.
    "cuda-graph-flashinfer-bf16": Setup("cuda", "bfloat16", "flashinfer", "nvfp4", 5e-2, DEEPSEEK_DIMS),
}
MARKS = {"cpu-eager-recording": [], "cuda-graph-fp32": [needs_cuda], "cuda-graph-flashinfer-bf16": [needs_flashinfer]}


@pytest.fixture(scope="module", params=[pytest.param(k, marks=MARKS[k]) for k in SETUPS])
def setup_model(request, tmp_path_factory):
    setup = SETUPS[request.param]
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), setup.config, seed=5)
    model = load_model(path, dtype=setup.dtype, device=setup.device, attention=setup.attention, progress=False,
                       quantization=setup.quantization)
    return setup, model


class Runners:
    """An eager runner and a recording one on the same model and block tables."""

    def __init__(self, setup: Setup, model) -> None:
        self.kv = KVCacheManager(NUM_BLOCKS, BLOCK, enable_prefix_caching=False)
        self.eager = ModelRunner(model, self.kv, NUM_BLOCKS)
        recording = DecodeGraphConfig(MAX_BATCH, MAX_BLOCKS, setup.new_graph())
        self.graph = ModelRunner(model, self.kv, NUM_BLOCKS, recording)
        self.vocab, self.count = model.cfg.vocab_size, 0

    def replays(self) -> dict[int, int]:
        return {size: graph.replays for size, (graph, _) in self.graph.graphs.graphs.items()}

    def add(self, lengths: list[int], seed: int) -> list[Sequence]:
        gen = torch.Generator().manual_seed(seed)
        seqs = []
        for n in lengths:
            prompt = torch.randint(2, self.vocab, (n,), generator=gen).tolist()
            seqs.append(Sequence(f"s{self.count}", prompt, SamplingParams(max_tokens=16), 16))
            self.count += 1
        return seqs

    def step(self, scheduled: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the step on both runners; advances the sequences with the eager greedy tokens."""
        for seq, n in scheduled:
            assert self.kv.allocate_slots(seq, n)
        eager, sampled = self.eager.run(scheduled)
        graph, sampled_too = self.graph.run(scheduled)
        assert sampled == sampled_too
        for seq, n in scheduled:
            seq.num_computed_tokens += n
        for seq, row in zip(sampled, eager):
            seq.output_ids.append(int(row.argmax()))
        return eager, graph

    def prefill(self, seqs: list[Sequence]) -> None:
        self.step([(s, s.num_tokens) for s in seqs])

    def decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step([(s, 1) for s in seqs])


def test_recorded_sizes_are_a_ladder_up_to_the_batch_limit():
    assert capture_sizes(16) == (1, 2, 4, 8, 16)
    assert capture_sizes(5) == (1, 2, 4, 8)
    assert capture_sizes(20) == (1, 2, 4, 8, 16, 24)
    assert capture_sizes(1) == (1,)
    assert capture_sizes(10_000)[-3:] == (240, 248, 256)


@pytest.mark.parametrize("batch, padded", [(1, 1), (3, 4), (5, 8), (16, 16)])
def test_recorded_decode_steps_give_the_eager_logits_and_cache(setup_model, batch, padded):
    """Four decode steps of sequences of different lengths, crossing block boundaries: every
    step replays the recording of the padded size, with the eager runner's logits."""
    setup, model = setup_model
    runners = Runners(setup, model)
    seqs = runners.add([2 + (7 * i) % 11 for i in range(batch)], seed=batch)  # prompts of 1 would replay too
    runners.prefill(seqs)
    for _ in range(4):
        eager, graph = runners.decode(seqs)
        torch.testing.assert_close(graph, eager, rtol=setup.tol, atol=setup.tol * eager.abs().max().item())
    assert {size: n for size, n in runners.replays().items() if n} == {padded: 4}
    rows = runners.eager.kv_cache[:, :NUM_BLOCKS], runners.graph.kv_cache[:, :NUM_BLOCKS]
    torch.testing.assert_close(rows[1].float(), rows[0].float(), rtol=setup.tol, atol=setup.tol * 10)


def test_padding_rows_write_only_the_scratch_block(setup_model):
    """Three sequences replay the recording of four: the cache rows that change are the
    step's own slots and nothing outside the scratch block, which the block pool never
    hands out (it is the block past the pool's last)."""
    setup, model = setup_model
    runners = Runners(setup, model)
    assert runners.graph.kv_cache.shape[1] == NUM_BLOCKS + 1 and runners.eager.kv_cache.shape[1] == NUM_BLOCKS
    seqs = runners.add([5, 9, 2], seed=1)
    runners.prefill(seqs)
    for seq in seqs:
        runners.kv.allocate_slots(seq, 1)
    last = [(runners.kv.block_table(s), s.num_tokens - 1) for s in seqs]
    slots = {table[p // BLOCK] * BLOCK + p % BLOCK for table, p in last}
    before = runners.graph.kv_cache.clone()
    runners.graph.run([(s, 1) for s in seqs])
    assert runners.replays()[4] == 1
    changed = (runners.graph.kv_cache != before).any(dim=-1).any(dim=0).flatten()  # [N * B] rows
    changed_rows = set(changed.nonzero().flatten().tolist())
    scratch = set(range(NUM_BLOCKS * BLOCK, (NUM_BLOCKS + 1) * BLOCK))
    assert slots <= changed_rows, "the step's own tokens were written"
    assert changed_rows - scratch == slots, "padding rows wrote outside the scratch block"


def test_mixed_and_oversized_steps_run_eagerly(setup_model):
    """A step with a prefill chunk, or with more decodes than the largest recording, runs the
    eager forward: no replay, and exactly the eager runner's logits."""
    setup, model = setup_model
    runners = Runners(setup, model)
    decoders = runners.add([3, 6], seed=2)
    runners.prefill(decoders)
    late = runners.add([7], seed=3)
    eager, graph = runners.step([(s, 1) for s in decoders] + [(late[0], 7)])
    assert torch.equal(graph, eager) and not any(runners.replays().values())
    many = runners.add([2] * (MAX_BATCH + 1), seed=4)
    runners.prefill(many)
    eager, graph = runners.decode(many)
    assert torch.equal(graph, eager) and not any(runners.replays().values())
    eager, graph = runners.decode(many[:MAX_BATCH])  # back within the ladder: replayed again
    assert runners.replays()[MAX_BATCH] == 1


def test_batches_whose_padded_attention_exceeds_the_budget_are_not_recorded(setup_model, monkeypatch):
    """Without a graph mode of its own, attention in a recording gathers whole block-table rows;
    sizes whose temporaries would not fit the budget are left out and run eagerly."""
    setup, model = setup_model
    if setup.attention == "flashinfer":
        pytest.skip("FlashInfer's graph mode reads only the blocks in use: no budget")
    monkeypatch.setattr(cuda_graphs, "PADDED_ATTENTION_BYTES", 0)
    runners = Runners(setup, model)
    assert runners.graph.graphs.sizes == () and not runners.graph.graphs.graphs
    seqs = runners.add([3, 4], seed=6)
    runners.prefill(seqs)
    eager, graph = runners.decode(seqs)
    assert torch.equal(graph, eager)


def test_padded_decode_attention_matches_the_reference():
    """The recordable attention (whole block-table rows gathered, positions past each length
    masked) against the torch reference, with junk blocks past the lengths."""
    gen = torch.Generator().manual_seed(0)
    heads, latent, rope, block, blocks = 4, 32, 16, 4, 6
    seq_lens = [1, 4, 5, 17, 24]
    cache = torch.randn(40, block, latent + rope, generator=gen)
    tables = torch.randint(0, 40, (len(seq_lens), blocks), generator=gen, dtype=torch.int32)
    n = len(seq_lens)
    meta = AttentionMetadata((1,) * n, tuple(seq_lens), tables, torch.zeros(n, dtype=torch.long), num_decodes=n)
    q_latent, q_pe = torch.randn(n, heads, latent, generator=gen), torch.randn(n, heads, rope, generator=gen)
    ref = TorchAttention().absorbed(q_latent, q_pe, cache, meta, 0.125)
    out = padded_decode_attention(q_latent, q_pe, cache, tables, torch.tensor(seq_lens), 0.125)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_the_per_expert_moe_blocks_recording(tmp_path):
    """On CUDA, graphs need the experts in the fused Triton MoE; the reference MoE (dense or
    FP4 experts on the CPU) waits for the device, and the reason says so. A model without
    routed experts has nothing in the way."""
    path = make_checkpoint(tmp_path / "moe", PLAIN_ONE_GROUP, seed=1)
    assert "moe_ref" in capture_blocker(load_model(path, dtype="float32", attention="torch", progress=False))
    fp4 = load_model(path, dtype="float32", attention="torch", progress=False, quantization="nvfp4")
    assert "moe_ref" in capture_blocker(fp4)
    dense = make_checkpoint(tmp_path / "dense", dict(PLAIN_ONE_GROUP, first_k_dense_replace=4), seed=1)
    assert capture_blocker(load_model(dense, dtype="float32", attention="torch", progress=False)) is None


# -- the engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    return make_serving_checkpoint(tmp_path_factory.mktemp("serving"))


ENGINE = EngineConfig(max_model_len=64, num_blocks=96, block_size=4,
                      scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=24))


def greedy_generations(core: EngineCore) -> dict[str, list[int]]:
    """Six requests, three arriving two steps late, so steps mix prefill chunks and decodes
    before they turn decode-only."""
    gen, tokens, steps = torch.Generator().manual_seed(9), {}, 0
    prompts = [torch.randint(2, 30_000, (n,), generator=gen).tolist() for n in (3, 11, 6, 17, 1, 8)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for i in range(3):
        core.add(EngineRequest(f"r{i}", prompts[i], params))
    while core.has_work or steps < 2:
        if steps == 2:
            for i in range(3, 6):
                core.add(EngineRequest(f"r{i}", prompts[i], params))
        for out in core.step():
            for choice in out.choices:
                tokens.setdefault(out.request_id, []).extend(choice.token_ids)
        steps += 1
    return tokens


def test_engine_greedy_generation_with_recorded_decodes_matches_eager(serving):
    model = load_model(serving, dtype="float32", attention="torch", progress=False)
    tokenizer = Tokenizer.from_dir(serving)
    eager = EngineCore(model, tokenizer, replace(ENGINE, cuda_graphs=False))
    expected = greedy_generations(eager)
    core = EngineCore(model, tokenizer, ENGINE)
    assert core.runner.graphs is None, "on the CPU the engine records nothing by itself"
    recording = DecodeGraphConfig(8, 16, lambda: Counted(EagerGraph()))
    core.runner = ModelRunner(model, core.kv, ENGINE.num_blocks, recording)
    assert greedy_generations(core) == expected
    assert sum(g.replays for g, _ in core.runner.graphs.graphs.values()) > 10
    assert {len(t) for t in expected.values()} == {12}


def test_no_graphs_where_the_model_is_not_on_cuda(serving):
    model = load_model(serving, dtype="float32", attention="torch", progress=False)
    assert cuda_graph_config(model, 8, 64, 4) is None


@needs_cuda
def test_engine_on_cuda_replays_graphs_and_generates_as_eager(serving):
    """fp32 with FP4 experts (the Triton MoE): the engine records by default, and its greedy
    generations equal those of the same engine with cuda_graphs off."""
    model = load_model(serving, dtype="float32", device="cuda", attention="torch", progress=False,
                       quantization="nvfp4")
    tokenizer = Tokenizer.from_dir(serving)
    expected = greedy_generations(EngineCore(model, tokenizer, replace(ENGINE, cuda_graphs=False)))
    core = EngineCore(model, tokenizer, ENGINE)
    assert isinstance(core.runner.graphs.graphs[8][0], CudaGraph)
    assert greedy_generations(core) == expected


@needs_cuda
def test_engine_on_cuda_without_fp4_experts_decodes_eagerly_and_says_why(serving, caplog):
    model = load_model(serving, dtype="float32", device="cuda", attention="torch", progress=False)
    with caplog.at_level(logging.WARNING, logger="engine.cuda_graphs"):
        core = EngineCore(model, Tokenizer.from_dir(serving), ENGINE)
    assert core.runner.graphs is None and "moe_ref" in caplog.text


# -- FlashInfer's graph mode on its own ---------------------------------------------------


def random_decode_batch(size: int, block: int, num_blocks: int, gen) -> tuple[list[int], list[list[int]]]:
    """(lengths, block tables) of `size` sequences of up to 300 tokens on distinct blocks each."""
    lens = torch.randint(1, 300, (size,), generator=gen).tolist()
    tables = [torch.randperm(num_blocks, generator=gen)[: -(-n // block)].tolist() for n in lens]
    return lens, tables


def test_flashinfer_graph_plan_describes_the_batch_as_the_eager_plan_does():
    """The host-built CSR that FlashInfer's graph mode is planned with (runs on the CPU: no
    FlashInfer needed) equals the one the eager FlashInfer backend builds from metadata."""
    from engine.attention.flashinfer_backend import host_page_table, page_table

    gen, block = torch.Generator().manual_seed(3), 16
    lens, tables = random_decode_batch(5, block, 100, gen)
    tables = [t + [99] * (i % 3) for i, t in enumerate(tables)]  # rows longer than their lengths need
    width = max(len(t) for t in tables)
    meta = AttentionMetadata((1,) * 5, tuple(lens), torch.tensor([t + [0] * (width - len(t)) for t in tables]),
                             torch.zeros(5, dtype=torch.long), num_decodes=5)
    for ours, eager in zip(host_page_table(lens, tables, block), page_table(meta, block, torch.device("cpu"))):
        assert ours.dtype == torch.int32 and torch.equal(ours, eager)


@needs_flashinfer
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("size", [1, 3, 8, 16])
def test_flashinfer_graph_replays_match_the_torch_reference(heads, size):
    """Recorded with one batch, replayed with another of the same size (other lengths and
    blocks): the replay attends over the new batch, bf16 at DeepSeek's dims."""
    from engine.attention.flashinfer_backend import FlashInferAttention

    gen, block, num_blocks, scale = torch.Generator().manual_seed(size * heads), 16, 400, 192 ** -0.5
    cache = torch.randn(num_blocks, block, 576, generator=gen).bfloat16().cuda()
    graphs = FlashInferAttention().graph_decode(16, -(-300 // block), heads, scale, 512, cache)
    q_latent, q_pe = torch.zeros(size, heads, 512, device="cuda"), torch.zeros(size, heads, 64, device="cuda")
    graphs.plan(*random_decode_batch(size, block, num_blocks, gen))
    recording = CudaGraph(torch.cuda.graph_pool_handle())
    out = recording.capture(lambda: graphs.absorbed(q_latent, q_pe, cache))
    for _ in range(2):
        lens, tables = random_decode_batch(size, block, num_blocks, gen)
        q_latent.copy_(torch.randn(size, heads, 512, generator=gen))
        q_pe.copy_(torch.randn(size, heads, 64, generator=gen))
        graphs.plan(lens, tables)
        recording.replay()
        width = max(len(t) for t in tables)
        meta = AttentionMetadata((1,) * size, tuple(lens), torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                                                        dtype=torch.int32, device="cuda"),
                                 torch.zeros(size, dtype=torch.long, device="cuda"), num_decodes=size)
        ref = TorchAttention().absorbed(q_latent, q_pe, cache, meta, scale)
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)  # bf16 operands against fp32
