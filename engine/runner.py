"""Turns a scheduler step into model inputs and returns the logits to sample from.

Owns the KV cache tensor. Within a step, decodes (one new token) go first, then prefill
chunks, which is the order the attention metadata requires. Only sequences that catch up
with their last token this step (a decode, or the final chunk of a prefill) get logits.
Decode-only steps replay a recorded CUDA graph where one is configured and holds the
batch (`engine.cuda_graphs`); the cache then has one more block, the graphs' scratch.

Legend: T = tokens in the step, S = sequences in the step, N = sequences sampled, D = hidden,
V = vocab.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from engine.attention import AttentionMetadata
from engine.cuda_graphs import CudaGraphRunner, DecodeBatch, DecodeGraphConfig
from engine.kv_manager import KVCacheManager
from engine.model import DeepseekV3ForCausalLM
from engine.sequence import Sequence


class StepInputs(NamedTuple):
    """The host side of one step, sequences in batch order (decodes first)."""

    token_ids: list[int]  # [T]
    positions: list[int]  # [T]
    slots: list[int]  # [T]: cache row of each new token
    query_lens: list[int]  # [S]
    seq_lens: list[int]  # [S]
    block_tables: list[list[int]]  # [S][blocks of the sequence]
    last_rows: list[int]  # [N]: the token row whose logits each sampled sequence gets
    sampled: list[Sequence]  # [N]


class ModelRunner:
    def __init__(self, model: DeepseekV3ForCausalLM, kv: KVCacheManager | None, num_blocks: int,
                 graphs: DecodeGraphConfig | None = None, block_size: int | None = None) -> None:
        """graphs: record decode steps (block `num_blocks` of the cache is then their scratch).
        kv None: a TP peer's runner, which only executes steps its DP head prepared (with
        `block_size`), on its own copy of the cache."""
        self.model, self.kv = model, kv
        self.block_size = kv.block_size if kv is not None else block_size
        self.kv_cache = model.allocate_kv_cache(num_blocks + (graphs is not None), self.block_size)
        self.graphs = None if graphs is None else CudaGraphRunner(model, self.kv_cache, graphs, num_blocks)

    def run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """Runs one forward step; returns (logits [N, V] fp32, the N sequences to sample)."""
        step = self.prepare(scheduled)
        return self.execute(step), step.sampled

    def execute(self, step: StepInputs) -> torch.Tensor:
        """The forward of a prepared step (here, or on a TP peer that received it, whose
        `sampled` is empty): logits [N, V] fp32 of its `last_rows`."""
        dev = self.model.device
        if self.graphs is not None and self.graphs.fits(step.query_lens, step.block_tables):
            hidden = self.graphs.run(DecodeBatch(step.token_ids, step.positions, step.slots, step.seq_lens,
                                                 step.block_tables))
        else:
            hidden = self._forward(step)
        if not step.last_rows:
            return hidden.new_empty(0, self.model.cfg.vocab_size, dtype=torch.float32)
        return self.model.compute_logits(hidden[torch.tensor(step.last_rows, device=dev)])

    def _forward(self, step: StepInputs) -> torch.Tensor:
        """The eager forward: hidden states [T, D]."""
        dev = self.model.device
        num_decodes = sum(1 for n in step.query_lens if n == 1)
        meta = AttentionMetadata(tuple(step.query_lens), tuple(step.seq_lens), self._block_tables(step.block_tables),
                                 torch.tensor(step.slots, device=dev), num_decodes)
        return self.model(torch.tensor(step.token_ids, device=dev), torch.tensor(step.positions, device=dev),
                          self.kv_cache, meta)

    def prepare(self, scheduled: list[tuple[Sequence, int]]) -> StepInputs:
        """The host side of a step: token ids, positions, cache slots and block tables."""
        step = StepInputs([], [], [], [], [], [], [], [])
        for seq, n in sorted(scheduled, key=lambda item: item[1] != 1):  # stable: decodes first
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            table = self.kv.block_table(seq)
            step.token_ids.extend(seq.token_ids(start, end))
            step.positions.extend(range(start, end))
            step.slots.extend(table[p // self.block_size] * self.block_size + p % self.block_size
                              for p in range(start, end))
            step.block_tables.append(table)
            step.query_lens.append(n)
            step.seq_lens.append(end)
            if end == seq.num_tokens:
                step.last_rows.append(len(step.token_ids) - 1)
                step.sampled.append(seq)
        return step

    def _block_tables(self, tables: list[list[int]]) -> torch.Tensor:
        """[S, M] int32, each row padded with block 0 (never read past seq_len)."""
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(padded, dtype=torch.int32, device=self.model.device)
