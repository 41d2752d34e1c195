"""Decode tokens/s of `engine serve` on the CPU, one process against its parallel layouts
(gloo ranks sharing the machine's cores), at 16 concurrent streams, in one run.

    .venv/bin/python bench/parallel_cpu.py [--requests-per-client 2] [--repeats 3] [--concurrency 16]

Workload and checkpoint: bench/engine_grpc.py's (prompts of 128 random ids, 64 new tokens,
greedy, ignore_eos, bf16). Layouts: TP=1 through the fused C++ decode step (the default) and
through the Python model (MOESERVE_CPU_DECODE=torch, the path every parallel engine runs, so
the fair baseline of the ratios); TP=2; DP-attention=2 with EP=2, all-to-all and all-gather
dispatch. Each rank of a parallel engine gets cores // ranks threads, the single process all
of them. Collectives and steps come from rank 0's line when the engine stops
(engine/parallel_loop.py); they count the warm-up requests, every repeat and the prefill
steps too. Each layout reports the best of --repeats runs on one engine, and the cores other
processes kept busy meanwhile ("other cores", read from /proc): on a shared machine the figures
are only comparable where that is near 0. The fused C++ step slows down most under such load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from engine.checkpoint import random_weights, write_checkpoint  # noqa: E402
from engine.tokenizer import write_demo_tokenizer  # noqa: E402
from engine_grpc import BENCH_CONFIG, NEW_TOKENS, PROMPT_LEN, measure_engine  # noqa: E402
from engine_server import EngineProcess  # noqa: E402
from parallel_ranks import free_port  # noqa: E402

COLLECTIVES = re.compile(r"rank 0: (\d+) steps, collectives ([\d.]+) ms per step")
DECODE_PATH = re.compile(r"decode steps: ([^(]*)")


@dataclass(frozen=True)
class Layout:
    name: str
    flags: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    @property
    def parallel(self) -> bool:
        return bool(self.flags)


BASELINE = "TP=1 python"
LAYOUTS = (
    Layout("TP=1 fused C++"),
    Layout(BASELINE, env=(("MOESERVE_CPU_DECODE", "torch"),)),
    Layout("TP=2", ("--tensor-parallel-size", "2")),
    Layout("DP=2+EP=2 alltoall", ("--data-parallel-size", "2", "--enable-expert-parallel")),
    Layout("DP=2+EP=2 allgather", ("--data-parallel-size", "2", "--enable-expert-parallel",
                                   "--moe-dispatch", "allgather")),
)


@dataclass(frozen=True)
class Result:
    layout: Layout
    tokens_per_s: float
    other_cores: float  # CPU busy outside the benchmark during the run (0 on a quiet machine)
    decode_path: str
    steps: int | None = None
    collective_ms: float | None = None


def start(path: Path, layout: Layout, dtype: str) -> EngineProcess:
    """The engine on all cores (threads=None: its own split), with the layout's environment."""
    flags = [*layout.flags, "--master-port", str(free_port())] if layout.parallel else []
    saved = {key: os.environ.get(key) for key, _ in layout.env}
    os.environ.update(dict(layout.env))
    try:  # EngineProcess copies os.environ into the child when it starts it
        return EngineProcess(path, "--dtype", dtype, "--max-model-len", "1024", "--kv-cache-memory", "1", *flags,
                             threads=None)
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def _proc_stats() -> dict[int, tuple[int, int]]:
    """pid: (ppid, user + system jiffies) of every process we may read."""
    stats = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone
            continue
        stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return stats


def other_jiffies() -> int:
    """CPU time the machine spent outside this process and its descendants (the engine, its ranks)."""
    cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(cpu) - cpu[3] - cpu[4]  # less idle and iowait
    stats, ours, frontier = _proc_stats(), set(), {os.getpid()}
    while frontier:
        ours |= frontier
        frontier = {pid for pid, (ppid, _) in stats.items() if ppid in frontier} - ours
    return busy - sum(stats[pid][1] for pid in ours if pid in stats)


async def timed(engine: EngineProcess, concurrency: int, per_client: int) -> tuple[float, float]:
    """(tokens/s, cores busy outside this benchmark meanwhile: another job sharing the machine)."""
    t0, other0 = time.perf_counter(), other_jiffies()
    tps = await measure_engine(engine, concurrency, per_client, seed=concurrency)
    elapsed = time.perf_counter() - t0
    return tps, max(0.0, (other_jiffies() - other0) / os.sysconf("SC_CLK_TCK") / elapsed)  # ticks differ a bit


def last_match(pattern: re.Pattern, log: list[str]) -> re.Match | None:
    return next((m for m in map(pattern.search, reversed(log)) if m), None)


def measure(path: Path, layout: Layout, args: argparse.Namespace) -> Result:
    """The best of args.repeats runs on one engine (another job on the machine only slows a run down)."""
    engine = start(path, layout, args.dtype)
    try:
        asyncio.run(measure_engine(engine, 4, 1, seed=1))  # warm-up
        runs = [asyncio.run(timed(engine, args.concurrency, args.requests_per_client)) for _ in range(args.repeats)]
    finally:
        code = engine.stop()
    if code != 0:
        raise RuntimeError(f"{layout.name}: the engine exited {code}")
    tps, other = max(runs)
    print(f"  {layout.name}: " + ", ".join(f"{t:.1f} tok/s ({o:.2f} other cores)" for t, o in runs), flush=True)
    decode, collectives = last_match(DECODE_PATH, engine.log), last_match(COLLECTIVES, engine.log)
    if layout.parallel and collectives is None:
        raise RuntimeError(f"{layout.name}: no collectives line from rank 0:\n" + "".join(engine.log[-20:]))
    steps, ms = (int(collectives.group(1)), float(collectives.group(2))) if layout.parallel else (None, None)
    return Result(layout, tps, other, decode.group(1).strip() if decode else "?", steps, ms)


def table(results: list[Result]) -> str:
    base = next(r.tokens_per_s for r in results if r.layout.name == BASELINE)
    rows = [f"{'layout':<21} {'tok/s':>7} {'vs TP=1 python':>14} {'steps':>6} {'collectives ms/step':>19} "
            f"{'other cores':>11}  decode"]
    for r in results:
        steps = "-" if r.steps is None else str(r.steps)
        coll = "-" if r.collective_ms is None else f"{r.collective_ms:.3f}"
        rows.append(f"{r.layout.name:<21} {r.tokens_per_s:7.1f} {r.tokens_per_s / base:13.2f}x {steps:>6} "
                    f"{coll:>19} {r.other_cores:11.2f}  {r.decode_path}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per layout; the best is reported")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores; avx512_bf16 {torch.cpu._is_avx512_bf16_supported()}; dtype {args.dtype}; "
          f"prompt {PROMPT_LEN}, {NEW_TOKENS} new tokens, greedy; {args.concurrency} clients x "
          f"{args.requests_per_client} requests, best of {args.repeats}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "bench", BENCH_CONFIG, random_weights(BENCH_CONFIG, 3, torch.bfloat16))
        write_demo_tokenizer(path)
        results = [measure(path, x, args) for x in LAYOUTS]
    print(table(results))


if __name__ == "__main__":
    main()
