"""Continuous batching with one rule, as in vLLM v1: every sequence has
`num_computed_tokens`, and each step hands out `{seq: n_tokens}` under a token budget.
A decode is a sequence one token behind; a prefill chunk is one many tokens behind; a
prefix-cache hit simply starts a sequence with tokens already computed.

Order: running sequences first (first come, first served), then waiting ones. When the KV
pool runs dry, the most recently arrived running sequence is preempted: its blocks are
freed and it goes back to the head of the queue, to be recomputed later (its prefix may
still be in the cache). A lone sequence always fits, because admission refuses any request
whose prompt plus max_tokens exceeds the whole pool; so there is no deadlock.

Siblings of an n > 1 request wait while the first of them prefills the shared prompt, then take
its blocks from the prefix cache instead of computing the prompt again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.kv_manager import KVCacheManager
from engine.sequence import FinishReason, Sequence, SeqStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.max_waiting < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_waiting must be positive")


@dataclass
class SchedulerOutput:
    """Sequences to run this step and how many new tokens each, in running order."""

    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Ends seq (done, aborted or failed) wherever it is, and frees its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
        self.kv.free(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if self._make_room(seq, n, out):
                out.scheduled.append((seq, n))
                budget -= n
                i += 1
            # else seq itself was preempted; running[i] is now the next sequence
        if not out.preempted:
            self._admit(out, budget)
        return out

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Allocates n slots for seq, preempting from the back of the running list."""
        while not self.kv.allocate_slots(seq, n):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens, seq.status = 0, SeqStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self._sibling_prefilling(seq):
                break
            seq.num_computed_tokens = self.kv.allocate_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not self.kv.allocate_slots(seq, n):
                self.kv.free(seq)
                seq.num_computed_tokens = 0
                break
            if seq.num_cached_prompt_tokens < 0:
                seq.num_cached_prompt_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n

    def _sibling_prefilling(self, seq: Sequence) -> bool:
        if not seq.group or seq.index == 0:
            return False
        return any(s.group == seq.group and s.index == 0 and s.num_computed_tokens < s.num_prompt_tokens
                   for s in self.running)

    def on_step_done(self, out: SchedulerOutput) -> None:
        """Advances each scheduled sequence past the tokens it just computed."""
        for seq, n in out.scheduled:
            if seq.status is SeqStatus.RUNNING:
                seq.num_computed_tokens += n
                self.kv.cache_computed_blocks(seq)
