"""The usage store in one SQLite file (WAL), for a gateway on one machine.

Durability: journal_mode=WAL with synchronous=FULL. In WAL mode a COMMIT appends the
transaction to the -wal file with write() before it returns, so a committed record
survives the gateway process being killed (SIGKILL) even with synchronous=NORMAL; FULL
also fsyncs the WAL at each commit, so it survives a power loss or kernel crash too, as a
PostgreSQL COMMIT does. The fsync is paid once per group commit (store.batch), not per
record. `sqlite:///PATH?synchronous=normal` trades that for latency, SIGKILL-safe still.

Threads: one writer thread owns the writing connection (SQLite has one writer at a time
anyway); one reader thread owns a second connection for lookups and queries, which WAL
lets run beside a commit. Several gateway processes may share the file (busy_timeout).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from gateway.store import migrations
from gateway.store.base import KeyRecord, Outcome, UsageQuery, UsageRecord, UsageStore, UsageTotal
from gateway.store.batch import GroupCommit

FAILURES = (sqlite3.Error, OSError)
BUSY_TIMEOUT_MS = 10_000
RECORD_COLUMNS = ("seq, id, request_id, key_id, model, prompt_tokens, cached_prompt_tokens, completion_tokens, "
                  "reasoning_tokens, cost, outcome, queue_ms, ttft_ms, total_ms, created_us")
KEY_COLUMNS = "id, name, key_hash, admin, budget, rpm, tpm, spent, created_us, revoked_us"
GROUP_EXPR = {"key": "key_id", "model": "model", "day": "strftime('%Y-%m-%d', created_us / 1000000, 'unixepoch')"}


def to_us(t: datetime) -> int:
    return round(t.timestamp() * 1_000_000)


def from_us(us: int | None) -> datetime | None:
    return None if us is None else datetime.fromtimestamp(us / 1_000_000, UTC)


def _dec_add(a: str, b: str) -> str:
    return str(Decimal(a) + Decimal(b))


class _DecSum:
    """SUM over TEXT decimals, exact (SQLite's own SUM would go through floats)."""

    def __init__(self) -> None:
        self.total = Decimal(0)

    def step(self, value: str | None) -> None:
        if value is not None:
            self.total += Decimal(value)

    def finalize(self) -> str:
        return str(self.total)


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; each write says BEGIN IMMEDIATE.
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if _switch_to_wal(conn).lower() != "wal":
        raise sqlite3.OperationalError(f"{path}: cannot switch to WAL mode")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.create_function("dec_add", 2, _dec_add, deterministic=True)
    conn.create_aggregate("dec_sum", 1, _DecSum)
    return conn


def _switch_to_wal(conn: sqlite3.Connection) -> str:
    """PRAGMA journal_mode = WAL, retried while another connection holds the lock it needs.

    SQLite answers "database is locked" at once, without its busy handler, when connections
    opening the same new file at the same moment race for the switch (several gateways
    starting together); the one that loses retries until the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(0.005)


def _key(row: tuple) -> KeyRecord:
    id_, name, key_hash, admin, budget, rpm, tpm, spent, created, revoked = row
    return KeyRecord(id_, name, key_hash, bool(admin), from_us(created), None if budget is None else Decimal(budget),
                     rpm, tpm, from_us(revoked), Decimal(spent))


def _record(row: tuple) -> UsageRecord:
    seq, id_, rid, key_id, model, p, c, o, r, cost, outcome, q, ttft, total, created = row
    return UsageRecord(id_, rid, key_id, model, p, c, o, r, Decimal(cost), Outcome(outcome), q, ttft, total,
                       from_us(created), seq)


class SqliteStore(UsageStore):
    def __init__(self, path: Path, synchronous: str = "FULL", max_batch: int = 256) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, got {synchronous!r}")
        self.path, self.synchronous = Path(path), synchronous.upper()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ledger-sqlite-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="ledger-sqlite-reader")
        self._w: sqlite3.Connection | None = None
        self._r: sqlite3.Connection | None = None
        self._batches = GroupCommit(self._commit_records, lanes=1, max_batch=max_batch)

    def __repr__(self) -> str:
        return f"SqliteStore({self.path}, synchronous={self.synchronous})"

    async def _on(self, pool: ThreadPoolExecutor, what: str, fn, *args):
        with self._guard(what, FAILURES):
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        await self._on(self._writer, "open", self._open_writer)
        await self._on(self._reader, "open", self._open_reader)
        self.healthy = True

    def _open_writer(self) -> None:
        self._w = _connect(self.path, self.synchronous)
        self._w.execute(migrations.BOOKKEEPING["sqlite"])
        self._w.execute("BEGIN IMMEDIATE")  # the write lock: another gateway migrating waits here
        try:
            applied = {v for (v,) in self._w.execute("SELECT version FROM schema_migrations")}
            for m in migrations.pending(migrations.SQLITE, applied):
                for statement in m.statements:
                    self._w.execute(statement)
                self._w.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (m.version, m.name, to_us(_now())))
            self._w.execute("COMMIT")
        except BaseException:
            if self._w.in_transaction:
                self._w.execute("ROLLBACK")
            raise

    def _open_reader(self) -> None:
        self._r = _connect(self.path, self.synchronous)
        self._r.execute("PRAGMA query_only = 1")

    async def close(self) -> None:
        await self._batches.wait_idle()
        for pool, attr in ((self._writer, "_w"), (self._reader, "_r")):
            conn = getattr(self, attr)
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(pool, conn.close)
                setattr(self, attr, None)
            pool.shutdown(wait=True)

    async def ping(self) -> None:
        await self._on(self._reader, "ping", self._read, "SELECT count(*) FROM schema_migrations", ())
        self.healthy = True

    # -- keys ---------------------------------------------------------------------------

    async def create_key(self, key: KeyRecord) -> None:
        row = (key.id, key.name, key.key_hash, int(key.admin), None if key.budget is None else str(key.budget),
               key.rpm, key.tpm, str(key.spent), to_us(key.created_at), None)
        await self._on(self._writer, "create key", self._write, f"INSERT INTO api_keys ({KEY_COLUMNS}) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

    def _write(self, sql: str, args: tuple) -> list[tuple]:
        self._w.execute("BEGIN IMMEDIATE")
        try:
            rows = self._w.execute(sql, args).fetchall()
            self._w.execute("COMMIT")
        except BaseException:
            if self._w.in_transaction:
                self._w.execute("ROLLBACK")
            raise
        return rows

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        rows = await self._on(self._reader, "find key", self._read,
                              f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?", (key_hash,))
        return _key(rows[0]) if rows else None

    def _read(self, sql: str, args: tuple) -> list[tuple]:
        return self._r.execute(sql, args).fetchall()

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self._on(self._reader, "list keys", self._read,
                              f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_us, id", ())
        return [_key(r) for r in rows]

    async def revoke_key(self, key_id: str, at: datetime) -> KeyRecord | None:
        rows = await self._on(self._writer, "revoke key", self._write,
                              f"UPDATE api_keys SET revoked_us = coalesce(revoked_us, ?) WHERE id = ? "
                              f"RETURNING {KEY_COLUMNS}", (to_us(at), key_id))
        return _key(rows[0]) if rows else None

    # -- ledger -------------------------------------------------------------------------

    async def append(self, record: UsageRecord) -> Decimal | None:
        return await self._batches.submit(record)

    async def _commit_records(self, records: list[UsageRecord]) -> list[Decimal | None]:
        return await self._on(self._writer, "append usage", self._insert, records)

    def _insert(self, records: list[UsageRecord]) -> list[Decimal | None]:
        rows = [(r.id, r.request_id, r.key_id, r.model, r.prompt_tokens, r.cached_prompt_tokens, r.completion_tokens,
                 r.reasoning_tokens, str(r.cost), r.outcome.value, r.queue_ms, r.ttft_ms, r.total_ms,
                 to_us(r.created_at)) for r in records]
        per_key: dict[str, Decimal] = defaultdict(Decimal)
        for r in records:
            per_key[r.key_id] += r.cost
        spent: dict[str, Decimal] = {}
        self._w.execute("BEGIN IMMEDIATE")
        try:
            self._w.executemany(f"INSERT INTO usage_records ({RECORD_COLUMNS.removeprefix('seq, ')}) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            for key_id in sorted(per_key):
                row = self._w.execute("UPDATE api_keys SET spent = dec_add(spent, ?) WHERE id = ? RETURNING spent",
                                      (str(per_key[key_id]), key_id)).fetchone()
                if row is not None:
                    spent[key_id] = Decimal(row[0])
            self._w.execute("COMMIT")
        except BaseException:
            if self._w.in_transaction:
                self._w.execute("ROLLBACK")
            raise
        return [spent.get(r.key_id) for r in records]

    async def totals(self, query: UsageQuery) -> list[UsageTotal]:
        where, args = _where((("created_us >= ?", query.start and to_us(query.start)),
                              ("created_us < ?", query.end and to_us(query.end)), ("key_id = ?", query.key_id)))
        group = GROUP_EXPR[query.group_by.value] if query.group_by else "NULL"
        sql = (f"SELECT {group} AS g, count(*), coalesce(sum(prompt_tokens), 0), "
               "coalesce(sum(cached_prompt_tokens), 0), coalesce(sum(completion_tokens), 0), "
               f"coalesce(sum(reasoning_tokens), 0), coalesce(dec_sum(cost), '0') FROM usage_records {where}"
               f"{' GROUP BY g ORDER BY g' if query.group_by else ''}")
        rows = await self._on(self._reader, "usage totals", self._read, sql, args)
        return [UsageTotal(g, n, p, c, o, r, Decimal(cost)) for g, n, p, c, o, r, cost in rows]

    async def records(self, key_id: str | None, limit: int, before_seq: int | None = None) -> list[UsageRecord]:
        where, args = _where((("key_id = ?", key_id), ("seq < ?", before_seq)))
        sql = f"SELECT {RECORD_COLUMNS} FROM usage_records {where} ORDER BY seq DESC LIMIT ?"
        rows = await self._on(self._reader, "usage records", self._read, sql, (*args, limit))
        return [_record(r) for r in rows]


def _where(conditions) -> tuple[str, tuple]:
    """'WHERE a AND b' over the (condition, value) pairs whose value is not None, and the values."""
    used = [(cond, value) for cond, value in conditions if value is not None]
    return ("WHERE " + " AND ".join(c for c, _ in used) if used else ""), tuple(v for _, v in used)


def _now() -> datetime:
    return datetime.fromtimestamp(time.time(), UTC)
