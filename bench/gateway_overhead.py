"""What the gateway costs: tokens/s through it against calling the engine over gRPC
directly, and the latency it adds to a one-token request, measured in the same run.

    .venv/bin/python bench/gateway_overhead.py [--streams 16] [--rounds 6] [--latency-requests 200]

One `engine serve` process on the small serving checkpoint of the tests (real tokenizer,
2 layers) and one `gateway serve` process in front of it, both on loopback.

Throughput: `--streams` concurrent streams, each running `--per-stream` requests of a
32-token prompt (token ids) and 64 new tokens, greedy, ignore_eos; directly as
StreamGenerate, through the gateway as streamed /v1/completions (SSE, a JSON chunk per
token). Rounds alternate direct and gateway so drift hits both; the ratio is of the
harmonic means (total tokens over total time), and the median of the rounds' ratios is
printed beside it. The gateway's CPU time per streamed token (Linux /proc) is printed too:
it is what the gateway takes from the engine on a machine whose cores they share.
Targets (issue 4): gateway >= 95% of direct tokens/s at 16 streams.

Latency: sequential one-token requests (unary Generate directly; non-streamed
/v1/completions through the gateway), alternating; the median of each and the difference.
Target: under 2 ms added at the median.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from engine_server import tokens  # noqa: E402
from gateway_helpers import KEY, MODEL, GatewayProcess, start_engine  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 32, 64


def prompt(rng: random.Random) -> list[int]:
    return [0] + [rng.randrange(100, 120000) for _ in range(PROMPT_LEN - 1)]


async def direct_stream(stub, ids: list[int]) -> int:
    produced = 0
    async for msg in stub.StreamGenerate(tokens(ids, max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)):
        produced += sum(len(c.token_ids) for c in msg.choices)
    return produced


async def gateway_stream(session: aiohttp.ClientSession, url: str, ids: list[int]) -> int:
    body = {"model": MODEL, "prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    usage = None
    async with session.post(url + "/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"usage":{' in line:  # the last chunk's usage counts
                usage = json.loads(line[6:])["usage"]
    return usage["completion_tokens"]


async def throughput(run_one, streams: int, per_stream: int, seed: int) -> tuple[int, float]:
    rng = random.Random(seed)
    work = [[prompt(rng) for _ in range(per_stream)] for _ in range(streams)]

    async def client(batch):
        return sum([await run_one(ids) for ids in batch])
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(client(b) for b in work))
    return sum(counts), time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def latencies(engine, gateway, n: int) -> tuple[list[float], list[float]]:
    stub = engine.aio_stub()
    rng = random.Random(1)
    direct, through = [], []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
        for i in range(n + 10):  # the first 10 of each warm up
            ids = prompt(rng)
            t0 = time.perf_counter()
            await stub.Generate(tokens(ids, max_tokens=1, temperature=0))
            t1 = time.perf_counter()
            body = {"model": MODEL, "prompt": ids, "max_tokens": 1, "temperature": 0}
            async with session.post(gateway.base_url + "/completions", json=body) as resp:
                assert resp.status == 200
                await resp.read()
            t2 = time.perf_counter()
            if i >= 10:
                direct.append(t1 - t0)
                through.append(t2 - t1)
    return direct, through


async def run_rounds(args: argparse.Namespace, engine, gateway) -> tuple[dict[str, list[float]], float, int]:
    """Tokens/s of each mode per round, the gateway's CPU seconds, tokens through the gateway."""
    stub = engine.aio_stub()
    rates: dict[str, list[float]] = {"direct": [], "gateway": []}
    gateway_cpu, gateway_tokens = 0.0, 0
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"},
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        modes = {"direct": lambda ids: direct_stream(stub, ids),
                 "gateway": lambda ids: gateway_stream(session, gateway.base_url, ids)}
        for mode in modes:  # warm-up of both paths
            await throughput(modes[mode], args.streams, 1, seed=0)
        for r in range(args.rounds):
            for mode in ("direct", "gateway") if r % 2 == 0 else ("gateway", "direct"):
                cpu0 = cpu_seconds(gateway.proc.pid)
                count, seconds = await throughput(modes[mode], args.streams, args.per_stream, seed=100 + r)
                assert count == args.streams * args.per_stream * NEW_TOKENS
                if mode == "gateway":
                    gateway_cpu += cpu_seconds(gateway.proc.pid) - cpu0
                    gateway_tokens += count
                rates[mode].append(count / seconds)
                print(f"  round {r} {mode:8s} {count / seconds:8.1f} tokens/s")
    return rates, gateway_cpu, gateway_tokens


async def run(args: argparse.Namespace, engine, gateway) -> None:
    rates, gateway_cpu, gateway_tokens = await run_rounds(args, engine, gateway)
    direct_tps, gateway_tps = (len(rates[m]) / sum(1 / x for x in rates[m]) for m in ("direct", "gateway"))
    paired = statistics.median(g / d for g, d in zip(rates["gateway"], rates["direct"], strict=True))
    print(f"throughput at {args.streams} streams: direct {direct_tps:.1f} tokens/s, through the gateway "
          f"{gateway_tps:.1f} tokens/s -> {100 * gateway_tps / direct_tps:.1f}% (median of rounds "
          f"{100 * paired:.1f}%; target >= 95%); gateway CPU {1e6 * gateway_cpu / gateway_tokens:.0f} us per "
          f"streamed token")
    direct, through = await latencies(engine, gateway, args.latency_requests)
    d, g = statistics.median(direct), statistics.median(through)
    print(f"one-token request, median of {args.latency_requests}: direct {1e3 * d:.2f} ms, through the gateway "
          f"{1e3 * g:.2f} ms -> {1e3 * (g - d):.2f} ms added (target < 2 ms)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--per-stream", type=int, default=4, help="requests per stream and round")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--latency-requests", type=int, default=200)
    args = p.parse_args()
    engine = start_engine("--max-model-len", "1024", "--kv-cache-memory", "0.1", "--max-waiting", "256")
    gateway = GatewayProcess([engine.address], "--log-level", "WARNING")
    try:
        gateway.wait_ready()
        asyncio.run(run(args, engine, gateway))
    finally:
        gateway.stop()
        engine.stop()


if __name__ == "__main__":
    main()
