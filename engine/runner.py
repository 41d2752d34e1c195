"""Turns a scheduler step into model inputs and returns the logits to sample from.

Owns the KV cache tensor. Within a step, decodes (one new token) go first, then prefill
chunks, which is the order the attention metadata requires. Only sequences that catch up
with their last token this step (a decode, or the final chunk of a prefill) get logits.

Legend: T = tokens in the step, S = sequences in the step, N = sequences sampled, V = vocab.
"""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata
from engine.kv_manager import KVCacheManager
from engine.model import DeepseekV3ForCausalLM
from engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: DeepseekV3ForCausalLM, kv: KVCacheManager, num_blocks: int) -> None:
        self.model, self.kv = model, kv
        self.block_size = kv.block_size
        self.kv_cache = model.allocate_kv_cache(num_blocks, kv.block_size)

    def run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """Runs one forward step; returns (logits [N, V] fp32, the N sequences to sample)."""
        batch = sorted(scheduled, key=lambda item: item[1] != 1)  # stable: decodes first
        ids, positions, slots, tables, q_lens, s_lens, last_rows, sampled = [], [], [], [], [], [], [], []
        for seq, n in batch:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            table = self.kv.block_table(seq)
            ids += seq.token_ids(start, end)
            positions += range(start, end)
            slots += [table[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)]
            tables.append(table)
            q_lens.append(n)
            s_lens.append(end)
            if end == seq.num_tokens:
                last_rows.append(len(ids) - 1)
                sampled.append(seq)
        num_decodes = sum(1 for n in q_lens if n == 1)
        meta = AttentionMetadata(tuple(q_lens), tuple(s_lens), self._block_tables(tables),
                                 torch.tensor(slots, device=self.model.device), num_decodes)
        dev = self.model.device
        hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), self.kv_cache, meta)
        if not sampled:
            return hidden.new_empty(0, self.model.cfg.vocab_size, dtype=torch.float32), []
        return self.model.compute_logits(hidden[torch.tensor(last_rows, device=dev)]), sampled

    def _block_tables(self, tables: list[list[int]]) -> torch.Tensor:
        """[S, M] int32, each row padded with block 0 (never read past seq_len)."""
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(padded, dtype=torch.int32, device=self.model.device)
