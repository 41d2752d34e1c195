"""The usage store in PostgreSQL (asyncpg pool), for several gateways sharing one ledger.

Durability is PostgreSQL's: a COMMIT returns once its WAL is flushed (synchronous_commit
on, the server default), and the store never turns that off. Concurrent appends share a
transaction (store.batch), in a few lanes at once; each transaction adds its records'
costs to their keys' spend, locking key rows in id order so that two gateways never
deadlock. Migrations run under a transaction-scoped advisory lock, so gateways that
start together apply each version once.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import datetime
from decimal import Decimal

import asyncpg

from gateway.store import migrations
from gateway.store.base import KeyRecord, Outcome, UsageQuery, UsageRecord, UsageStore, UsageTotal
from gateway.store.batch import GroupCommit

FAILURES = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)
# pg_advisory_xact_lock's key: "moeserve" in ASCII, as a bigint.
MIGRATION_LOCK = int.from_bytes(b"moeserve", "big") & ((1 << 63) - 1)
RECORD_COLUMNS = ("seq, id, request_id, key_id, model, prompt_tokens, cached_prompt_tokens, completion_tokens, "
                  "reasoning_tokens, cost, outcome, queue_ms, ttft_ms, total_ms, created_at")
KEY_COLUMNS = "id, name, key_hash, admin, budget, rpm, tpm, spent, created_at, revoked_at"
GROUP_EXPR = {"key": "key_id", "model": "model",
              "day": "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')"}
TIMEOUT = 10.0


def _key(row: asyncpg.Record) -> KeyRecord:
    return KeyRecord(row["id"], row["name"], row["key_hash"], row["admin"], row["created_at"], row["budget"],
                     row["rpm"], row["tpm"], row["revoked_at"], row["spent"])


def _record(row: asyncpg.Record) -> UsageRecord:
    return UsageRecord(row["id"], row["request_id"], row["key_id"], row["model"], row["prompt_tokens"],
                       row["cached_prompt_tokens"], row["completion_tokens"], row["reasoning_tokens"], row["cost"],
                       Outcome(row["outcome"]), row["queue_ms"], row["ttft_ms"], row["total_ms"], row["created_at"],
                       row["seq"])


class PostgresStore(UsageStore):
    def __init__(self, dsn: str, min_size: int = 1, max_size: int = 8, lanes: int = 4, max_batch: int = 256) -> None:
        self.dsn, self.min_size, self.max_size = dsn, min_size, max_size
        self._pool: asyncpg.Pool | None = None
        self._batches = GroupCommit(self._commit_records, lanes=lanes, max_batch=max_batch)

    def __repr__(self) -> str:
        return f"PostgresStore({self.dsn.split('@')[-1]})"  # never the password

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        with self._guard("open", FAILURES):
            self._pool = await asyncpg.create_pool(self.dsn, min_size=self.min_size, max_size=self.max_size,
                                                   command_timeout=TIMEOUT, timeout=TIMEOUT)
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                await conn.execute(migrations.BOOKKEEPING["postgres"])
                applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
                for m in migrations.pending(migrations.POSTGRES, applied):
                    for statement in m.statements:
                        await conn.execute(statement)
                    await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version,
                                       m.name)
        self.healthy = True

    async def close(self) -> None:
        await self._batches.wait_idle()
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), TIMEOUT)
            except (asyncio.TimeoutError, *FAILURES):
                self._pool.terminate()
            self._pool = None

    async def ping(self) -> None:
        with self._guard("ping", FAILURES):
            await self._pool.fetchval("SELECT 1", timeout=2.0)
        self.healthy = True

    # -- keys ---------------------------------------------------------------------------

    async def create_key(self, key: KeyRecord) -> None:
        with self._guard("create key", FAILURES):
            await self._pool.execute(f"INSERT INTO api_keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, "
                                     "$9, NULL)", key.id, key.name, key.key_hash, key.admin, key.budget, key.rpm,
                                     key.tpm, key.spent, key.created_at)

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        with self._guard("find key", FAILURES):
            row = await self._pool.fetchrow(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1", key_hash)
        return None if row is None else _key(row)

    async def list_keys(self) -> list[KeyRecord]:
        with self._guard("list keys", FAILURES):
            rows = await self._pool.fetch(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id")
        return [_key(r) for r in rows]

    async def revoke_key(self, key_id: str, at: datetime) -> KeyRecord | None:
        with self._guard("revoke key", FAILURES):
            row = await self._pool.fetchrow(f"UPDATE api_keys SET revoked_at = coalesce(revoked_at, $1) WHERE id = $2 "
                                            f"RETURNING {KEY_COLUMNS}", at, key_id)
        return None if row is None else _key(row)

    # -- ledger -------------------------------------------------------------------------

    async def append(self, record: UsageRecord) -> Decimal | None:
        return await self._batches.submit(record)

    async def _commit_records(self, records: list[UsageRecord]) -> list[Decimal | None]:
        rows = [(r.id, r.request_id, r.key_id, r.model, r.prompt_tokens, r.cached_prompt_tokens, r.completion_tokens,
                 r.reasoning_tokens, r.cost, r.outcome.value, r.queue_ms, r.ttft_ms, r.total_ms, r.created_at)
                for r in records]
        per_key: dict[str, Decimal] = defaultdict(Decimal)
        for r in records:
            per_key[r.key_id] += r.cost
        spent: dict[str, Decimal] = {}
        with self._guard("append usage", FAILURES):
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.executemany(f"INSERT INTO usage_records ({RECORD_COLUMNS.removeprefix('seq, ')}) VALUES "
                                       "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)", rows)
                for key_id in sorted(per_key):
                    value = await conn.fetchval("UPDATE api_keys SET spent = spent + $1 WHERE id = $2 RETURNING spent",
                                                per_key[key_id], key_id)
                    if value is not None:
                        spent[key_id] = value
        return [spent.get(r.key_id) for r in records]

    async def totals(self, query: UsageQuery) -> list[UsageTotal]:
        where, args = [], []
        for cond, value in (("created_at >= ${}", query.start), ("created_at < ${}", query.end),
                            ("key_id = ${}", query.key_id)):
            if value is not None:
                args.append(value)
                where.append(cond.format(len(args)))
        group = GROUP_EXPR[query.group_by.value] if query.group_by else "NULL::text"
        sql = (f"SELECT {group} AS g, count(*) AS n, coalesce(sum(prompt_tokens), 0) AS p, "
               f"coalesce(sum(cached_prompt_tokens), 0) AS c, coalesce(sum(completion_tokens), 0) AS o, "
               f"coalesce(sum(reasoning_tokens), 0) AS r, coalesce(sum(cost), 0) AS cost FROM usage_records "
               f"{'WHERE ' + ' AND '.join(where) if where else ''}{' GROUP BY g ORDER BY g' if query.group_by else ''}")
        with self._guard("usage totals", FAILURES):
            rows = await self._pool.fetch(sql, *args)
        return [UsageTotal(r["g"], r["n"], int(r["p"]), int(r["c"]), int(r["o"]), int(r["r"]), r["cost"]) for r in rows]

    async def records(self, key_id: str | None, limit: int, before_seq: int | None = None) -> list[UsageRecord]:
        where, args = [], []
        for cond, value in (("key_id = ${}", key_id), ("seq < ${}", before_seq)):
            if value is not None:
                args.append(value)
                where.append(cond.format(len(args)))
        args.append(limit)
        sql = (f"SELECT {RECORD_COLUMNS} FROM usage_records {'WHERE ' + ' AND '.join(where) if where else ''} "
               f"ORDER BY seq DESC LIMIT ${len(args)}")
        with self._guard("usage records", FAILURES):
            rows = await self._pool.fetch(sql, *args)
        return [_record(r) for r in rows]
