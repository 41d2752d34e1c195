"""Runs a function on every rank of a parallel layout: one real process per rank (spawned),
joined through gloo on loopback, each on its own share of the CPU, as `engine serve` starts
them. And the teacher-forced step scenarios the parallel model is compared on: fixed token
ids (no sampling, so no near tie can change the path), varlen prefill, chunked prefill, and
mixed decode steps through a paged cache.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import socket
import traceback
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from engine.distributed import ParallelConfig, destroy
from engine.distributed.launch import init_rank, rank_device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, cfg: ParallelConfig, device_type: str, target, args, results) -> None:
    try:
        state = init_rank(cfg, rank, rank_device(cfg, rank, device_type))
        # pickled by value here: a queue would share tensors through this process, which exits next
        results.put((rank, "ok", pickle.dumps(target(state, *args))))
    except BaseException:  # noqa: BLE001 - reported to the test
        results.put((rank, "error", traceback.format_exc()))
    finally:
        destroy()


def run_ranks(target, tp: int = 1, dp: int = 1, ep: bool = False, args: tuple = (), timeout: float = 240,
              device_type: str = "cpu") -> list:
    """target(state, *args) on each rank of a tp x dp layout (on the CPU with gloo, or one GPU
    per rank with NCCL); returns the results in rank order."""
    cfg = ParallelConfig(tp, dp, ep, master_port=free_port(), collective_timeout=60, rendezvous_timeout=60)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, cfg, device_type, target, args, results), daemon=True)
             for r in range(cfg.world_size)]
    for p in procs:
        p.start()
    try:
        out = {}
        for _ in procs:
            rank, status, value = results.get(timeout=timeout)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
        return [out[r] for r in range(cfg.world_size)]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


@dataclass(frozen=True)
class Scenario:
    """Sequences of fixed tokens and, per step, how many new tokens each gets (0: none)."""

    tokens: list[list[int]]
    steps: list[list[int]]
    block_size: int = 4
    blocks_per_seq: int = 12


def mixed_scenario(vocab: int, seed: int, decode_steps: int = 22) -> Scenario:
    """Three sequences: a varlen prefill, then a step that mixes a decode, the rest of a
    chunked prefill and a new prefill, then `decode_steps` steps of three decodes."""
    gen = torch.Generator().manual_seed(seed)
    prompts = (7, 12, 4)
    tokens = [torch.randint(0, vocab, (n + decode_steps + 1,), generator=gen).tolist() for n in prompts]
    steps = [[7, 5, 0], [1, 7, 4]] + [[1, 1, 1]] * decode_steps
    return Scenario(tokens, steps)


def run_scenario(model, sc: Scenario, steps: int | None = None) -> list[torch.Tensor]:
    """Runs the scenario's first `steps` steps (default all); returns each step's logits
    [sequences in the step, V] (each sequence's last new token), in step order. With
    `steps` short of the scenario on a data-parallel rank, the rest of the steps run idle."""
    kv = model.allocate_kv_cache(len(sc.tokens) * sc.blocks_per_seq, sc.block_size)
    done = [0] * len(sc.tokens)
    out = []
    for i, step in enumerate(sc.steps):
        if steps is not None and i >= steps:
            model.idle_forward()
            continue
        order = sorted((s for s, n in enumerate(step) if n), key=lambda s: not (step[s] == 1 and done[s]))
        ids, pos, slots, q, lens = [], [], [], [], []
        for s in order:
            n = step[s]
            for p in range(done[s], done[s] + n):
                ids.append(sc.tokens[s][p])
                pos.append(p)
                slots.append(_block(sc, s, p) * sc.block_size + p % sc.block_size)
            done[s] += n
            q.append(n)
            lens.append(done[s])
        tables = torch.tensor([[_block(sc, s, b * sc.block_size) for b in range(sc.blocks_per_seq)] for s in order],
                              dtype=torch.int32)
        decodes = sum(1 for s in order if step[s] == 1 and done[s] > 1)
        meta = AttentionMetadata(tuple(q), tuple(lens), tables, torch.tensor(slots), decodes)
        hidden = model(torch.tensor(ids), torch.tensor(pos), kv, meta)
        last = torch.tensor(q).cumsum(0) - 1
        out.append(model.compute_logits(hidden[last]))
    return out


def _block(sc: Scenario, seq: int, pos: int) -> int:
    """Sequence seq's blocks in reverse memory order, so the block table decides."""
    return (seq + 1) * sc.blocks_per_seq - 1 - pos // sc.block_size
