"""Offline generation for one prompt: prefill, then one decode step per token through the
paged cache. The serving engine replaces this loop with continuous batching; this one
exists to run a checkpoint end to end from the command line and in benchmarks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.attention import AttentionMetadata
from engine.model import DeepseekV3ForCausalLM

if TYPE_CHECKING:
    from engine.distributed import ParallelConfig, ParallelState

BLOCK_SIZE = 64


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.token_ids) - 1  # the first token comes out of the prefill
        return steps / self.decode_seconds if steps and self.decode_seconds else 0.0


class SingleSequence:
    """One sequence's KV blocks (numbered 0..n-1) and the metadata for its next step."""

    def __init__(self, model: DeepseekV3ForCausalLM, max_len: int) -> None:
        n_blocks = -(-max_len // BLOCK_SIZE)
        self.kv_cache = model.allocate_kv_cache(n_blocks, BLOCK_SIZE)
        self.block_table = torch.arange(n_blocks, dtype=torch.int32)[None, :]
        self.length = 0

    def step(self, n_new: int) -> AttentionMetadata:
        start, self.length = self.length, self.length + n_new
        slots = torch.arange(start, self.length)  # blocks are in order, so slot = position
        return AttentionMetadata((n_new,), (self.length,), self.block_table, slots,
                                 num_decodes=1 if start and n_new == 1 else 0)


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    """logits [V] fp32 -> one token id; temperature 0 is greedy."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = (logits / temperature).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(model: DeepseekV3ForCausalLM, prompt: list[int], max_tokens: int, temperature: float = 0.0,
             seed: int = 0, stop_ids: frozenset[int] = frozenset()) -> Generation:
    if not prompt:
        raise ValueError("the prompt is empty")
    seq = SingleSequence(model, len(prompt) + max_tokens)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor(prompt, device=model.device)
    out: list[int] = []
    t0 = time.perf_counter()
    t_prefill = None
    while len(out) < max_tokens:
        meta = seq.step(len(ids))
        hidden = model(ids, meta.positions(model.device), seq.kv_cache, meta)
        out.append(sample(model.compute_logits(hidden[-1:])[0], temperature, gen))
        t_prefill = t_prefill or time.perf_counter()
        if out[-1] in stop_ids:
            break
        ids = torch.tensor(out[-1:], device=model.device)
    t1 = time.perf_counter()
    return Generation(out, (t_prefill or t1) - t0, t1 - (t_prefill or t1))


@dataclass(frozen=True)
class GenerateJob:
    """`python -m engine generate`'s work, as each rank of a parallel layout runs it."""

    model: str
    prompt: list[int]
    max_tokens: int
    temperature: float
    seed: int
    eos_id: int
    dtype: str = "auto"
    device: str = "cpu"
    quantization: str | None = None
    moe_dispatch: str = "auto"

    def load(self, state: "ParallelState | None" = None, device: str | None = None) -> DeepseekV3ForCausalLM:
        from engine.loader import load_model

        return load_model(self.model, dtype=self.dtype, device=device or self.device, quantization=self.quantization,
                          parallel=state, moe_dispatch=self.moe_dispatch, progress=state is None or state.rank == 0)

    def run(self, model: DeepseekV3ForCausalLM) -> Generation:
        return generate(model, self.prompt, self.max_tokens, self.temperature, self.seed, frozenset({self.eos_id}))


def generate_on_rank(rank: int, job: GenerateJob, parallel: "ParallelConfig") -> None:
    """One rank of a parallel `generate`: every rank (each data-parallel group on the same
    prompt) runs the same steps, the logits gathered to all, so they sample alike; rank 0
    prints the text."""
    from engine.distributed import destroy
    from engine.distributed.launch import init_rank, rank_device
    from engine.tokenizer import Tokenizer

    device = rank_device(parallel, rank, torch.device(job.device).type)
    state = init_rank(parallel, rank, device)
    try:
        result = job.run(job.load(state, str(device)))
    finally:
        destroy()
    if rank == 0:
        print_generation(Tokenizer.from_dir(job.model), job.prompt, result)


def print_generation(tokenizer, prompt: list[int], result: Generation) -> None:
    """The text on stdout, the speed on stderr."""
    import sys

    print(tokenizer.decode(result.token_ids, skip_special_tokens=True), flush=True)
    print(f"[{len(prompt)} prompt tokens, {len(result.token_ids)} generated; prefill "
          f"{len(prompt) / result.prefill_seconds:.1f} tok/s, decode {result.decode_tokens_per_second:.1f} tok/s]",
          file=sys.stderr, flush=True)
