"""Scheduler and KV-cache manager, with no model and no tensors: a fake step marks the
scheduled tokens computed and appends a token to every sequence that caught up."""

from __future__ import annotations

import pytest

from engine.kv_manager import KVCacheManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import FinishReason, Sequence, SeqStatus

BS = 4


def make(seq_id, prompt_len, max_tokens=4, group="", index=0, first=0):
    return Sequence(seq_id, list(range(first, first + prompt_len)), SamplingParams(max_tokens=max_tokens),
                    max_tokens, group=group, index=index)


def step(sched: Scheduler):
    """One engine step without a model; returns {seq_id: n_tokens}."""
    out = sched.schedule()
    sched.on_step_done(out)
    for seq, _ in out.scheduled:
        if seq.status is SeqStatus.RUNNING and seq.num_computed_tokens == seq.num_tokens:
            seq.output_ids.append(1000 + len(seq.output_ids))
            if len(seq.output_ids) >= seq.max_tokens:
                sched.finish(seq, FinishReason.LENGTH)
    return {s.seq_id: n for s, n in out.scheduled}


def run_all(sched, limit=500):
    steps = []
    while sched.has_work and len(steps) < limit:
        steps.append(step(sched))
    assert not sched.has_work, "did not drain"
    return steps


def test_chunked_prefill_mixes_with_decodes_under_the_token_budget():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8), KVCacheManager(64, BS))
    sched.add(make("a", 3, max_tokens=6))
    assert step(sched) == {"a": 3}
    sched.add(make("b", 20))
    assert step(sched) == {"a": 1, "b": 7}  # a's decode first, b's chunk fills the budget
    assert step(sched) == {"a": 1, "b": 7}
    assert step(sched) == {"a": 1, "b": 6}
    assert step(sched) == {"a": 1, "b": 1}


def test_max_num_seqs_caps_the_running_batch():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2), KVCacheManager(64, BS))
    for i in range(3):
        sched.add(make(f"s{i}", 2))
    assert set(step(sched)) == {"s0", "s1"}
    assert [s.seq_id for s in sched.waiting] == ["s2"]


def test_prefix_cache_hit_skips_the_shared_blocks_and_counts_them():
    kv = KVCacheManager(64, BS)
    sched = Scheduler(SchedulerConfig(), kv)
    first = make("a", 10, max_tokens=1)
    sched.add(first)
    run_all(sched)
    second = make("b", 13, max_tokens=1)  # same first 10 tokens, then 3 more
    sched.add(second)
    assert step(sched) == {"b": 13 - 8}  # two full blocks (8 tokens) came from the cache
    assert second.num_cached_prompt_tokens == 8


def test_fully_cached_prompt_still_computes_its_last_token():
    sched = Scheduler(SchedulerConfig(), KVCacheManager(64, BS))
    sched.add(make("a", 8, max_tokens=1))
    run_all(sched)
    sched.add(make("b", 8, max_tokens=1))
    assert step(sched) == {"b": 4}  # the last block is recomputed to produce logits


def test_preemption_by_recompute_completes_every_sequence():
    kv = KVCacheManager(6, BS)  # 24 token slots for 3 sequences needing 12 each
    sched = Scheduler(SchedulerConfig(), kv)
    seqs = [make(f"s{i}", 6, max_tokens=6, first=100 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    steps = run_all(sched)
    assert all(s.finish_reason is FinishReason.LENGTH and len(s.output_ids) == 6 for s in seqs)
    assert any(len(st) < 3 for st in steps[2:])  # someone was preempted along the way
    assert kv.num_free_blocks == 6


def test_preempted_sequence_returns_to_the_head_of_the_queue():
    kv = KVCacheManager(4, BS)
    sched = Scheduler(SchedulerConfig(), kv)
    a, b = make("a", 8, max_tokens=8), make("b", 8, max_tokens=8, first=50)
    sched.add(a)
    sched.add(b)
    step(sched)
    out = sched.schedule()  # a needs a third block: the later arrival b gives its two up
    assert [s.seq_id for s in out.preempted] == ["b"] and sched.waiting[0] is b
    assert b.num_computed_tokens == 0 and b.output_ids == [1000]


def test_siblings_share_the_prompt_blocks():
    kv = KVCacheManager(64, BS)
    sched = Scheduler(SchedulerConfig(), kv)
    sibs = [make(f"r/{i}", 9, max_tokens=3, group="r", index=i) for i in range(3)]
    for s in sibs:
        sched.add(s)
    assert step(sched) == {"r/0": 9}
    assert step(sched) == {"r/0": 1, "r/1": 1, "r/2": 1}  # 8 of 9 prompt tokens from the cache
    shared = kv.block_table(sibs[1])[:2]
    assert shared == kv.block_table(sibs[0])[:2] == kv.block_table(sibs[2])[:2]
    run_all(sched)
    assert kv.num_free_blocks == 64


def test_finish_frees_blocks_of_running_and_waiting_sequences():
    kv = KVCacheManager(8, BS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1), kv)
    a, b = make("a", 9), make("b", 3)
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.finish(a, FinishReason.ABORT)
    sched.finish(b, FinishReason.ABORT)
    assert not sched.has_work and kv.num_free_blocks == 8


def test_evicted_cached_blocks_lose_their_hash():
    kv = KVCacheManager(3, BS)
    sched = Scheduler(SchedulerConfig(), kv)
    sched.add(make("a", 8, max_tokens=1))
    run_all(sched)
    sched.add(make("b", 12, max_tokens=1, first=50))  # needs every block: a's cached ones go
    run_all(sched)
    c = make("c", 8, max_tokens=1)
    sched.add(c)
    step(sched)
    assert c.num_cached_prompt_tokens == 0


def test_pool_needs_a_block():
    with pytest.raises(ValueError):
        KVCacheManager(0, BS)
