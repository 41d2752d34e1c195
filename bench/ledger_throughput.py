"""Ledger records per second on SQLite and PostgreSQL while the durability rule holds.

    .venv/bin/python bench/ledger_throughput.py [--writers 1,16,64,256] [--seconds 3]
        [--postgres URL] [--sqlite-dir DIR]

Each of W writers stands for one request in flight: it builds a record, awaits
`store.append` (which returns only once the record is committed: on SQLite the WAL
fsynced with synchronous=FULL, on PostgreSQL a COMMIT with synchronous_commit on) and
only then "answers" and starts its next record, as the gateway does before an answer's
last bytes. Records go to 8 keys held in the store, so each commit also adds to their
spend, as for the gateway's store keys. Printed per store and W: records/s over `--seconds`, and the median and 99th
percentile of one append (what the durability rule adds to a request's latency).

Rows: SQLite FULL (the default), SQLite NORMAL (SIGKILL-safe, not power-loss-safe), and
PostgreSQL, each with group commit (concurrent appends share a transaction) and, for
comparison, with one record per transaction (max_batch=1). Without --postgres the
bench starts a throwaway server from Debian's binaries (tests/postgres.py), on this
machine's disk with fsync on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from gateway.store import KeyRecord, Outcome, UsageRecord, UsageStore  # noqa: E402
from gateway.store.postgres import PostgresStore  # noqa: E402
from gateway.store.sqlite import SqliteStore  # noqa: E402


def record(key_id: str) -> UsageRecord:
    return UsageRecord(f"chatcmpl-{uuid.uuid4().hex}", f"req-{uuid.uuid4().hex}", key_id, "deepseek-r1", 812, 256,
                       394, 301, Decimal("0.0019742"), Outcome.STOP, 3.2, 41.7, 2210.5, datetime.now(UTC))


async def measure(store: UsageStore, writers: int, seconds: float, keys: list[str]) -> tuple[int, float, list[float]]:
    """(records, elapsed seconds, per-append latencies) with `writers` awaiting their own commits."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def writer(i: int) -> int:
        done = 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await store.append(record(keys[i % len(keys)]))
            latencies.append(time.perf_counter() - t0)
            done += 1
        return done
    await store.append(record(keys[0]))
    start = time.perf_counter()
    counts = await asyncio.gather(*(writer(i) for i in range(writers)))
    return sum(counts), time.perf_counter() - start, latencies


KEYS = 8


async def run_row(label: str, make, writers: list[int], seconds: float) -> None:
    for w in writers:
        store = make()
        await store.open()
        for i in range(KEYS):
            await store.create_key(KeyRecord(f"key_{i}_{uuid.uuid4().hex[:6]}", "bench", uuid.uuid4().hex, False,
                                             datetime.now(UTC)))
        ids = [k.id for k in await store.list_keys()][-KEYS:]
        try:
            n, elapsed, lat = await measure(store, w, seconds, ids)
        finally:
            await store.close()
        lat.sort()
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(f"{label:<34} writers={w:<4} {n / elapsed:>9.0f} records/s   "
              f"append p50 {statistics.median(lat) * 1e3:6.2f} ms   p99 {p99 * 1e3:6.2f} ms   "
              f"({n} records in {elapsed:.1f} s)", flush=True)


def postgres_url(given: str | None):
    if given:
        return given, None
    from postgres import PostgresServer, PostgresUnavailable
    try:
        server = PostgresServer()
    except PostgresUnavailable as exc:
        print(f"PostgreSQL skipped: {exc}")
        return None, None
    return server.url(), server


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writers", default="1,16,64,256", help="concurrent writers, comma-separated")
    ap.add_argument("--seconds", type=float, default=3.0, help="measured time per row and writer count")
    ap.add_argument("--postgres", metavar="URL", help="an existing database (default: a throwaway server)")
    ap.add_argument("--sqlite-dir", type=Path, help="where the SQLite files go (default: a temporary folder)")
    args = ap.parse_args()
    writers = [int(w) for w in args.writers.split(",")]
    folder = args.sqlite_dir or Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    print(f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, SQLite "
          f"{__import__('sqlite3').sqlite_version}, files in {folder}; {args.seconds:g} s per row")

    def sqlite(sync: str, batch: int):
        return lambda: SqliteStore(folder / f"{sync}-{batch}-{uuid.uuid4().hex[:6]}.db", sync, max_batch=batch)
    await run_row("sqlite synchronous=FULL, group", sqlite("FULL", 256), writers, args.seconds)
    await run_row("sqlite synchronous=FULL, 1/commit", sqlite("FULL", 1), writers, args.seconds)
    await run_row("sqlite synchronous=NORMAL, group", sqlite("NORMAL", 256), writers, args.seconds)
    if args.sqlite_dir is None:
        shutil.rmtree(folder, ignore_errors=True)
    url, server = postgres_url(args.postgres)
    if url is None:
        return
    try:
        if server is not None:
            version = server.psql("SHOW server_version")
            settings = server.psql("SELECT string_agg(name || '=' || setting, ', ') FROM pg_settings WHERE name IN "
                                   "('fsync', 'synchronous_commit', 'wal_sync_method')")
            print(f"PostgreSQL {version} ({settings})")
        await run_row("postgres, group (4 lanes)", lambda: PostgresStore(url), writers, args.seconds)
        await run_row("postgres, 1/commit (8 conns)", lambda: PostgresStore(url, lanes=8, max_batch=1), writers,
                      args.seconds)
    finally:
        if server is not None:
            server.destroy()


if __name__ == "__main__":
    asyncio.run(main())
