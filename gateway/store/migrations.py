"""Versioned schema of the usage store, one list per dialect; applied in order at open.

A store records each applied version in `schema_migrations`. Versions are never edited
once released: a change is a new version appended here, in both dialects. Opening a
store whose newest version is above the last one here fails (a newer gateway wrote it).

Money is exact in both: NUMERIC in PostgreSQL; in SQLite, TEXT holding the Decimal's
string, added and summed by the store's own SQL functions (`dec_add`, `dec_sum`), since
SQLite's numbers are floats or 64-bit integers. Times are UTC: TIMESTAMPTZ in PostgreSQL,
integer microseconds since the Unix epoch in SQLite.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.store.base import SchemaTooNew


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


OUTCOMES = "('stop', 'length', 'tool_calls', 'aborted', 'error')"

SQLITE: tuple[Migration, ...] = (
    Migration(1, "api keys", (
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            admin INTEGER NOT NULL CHECK (admin IN (0, 1)),
            budget TEXT,
            rpm INTEGER CHECK (rpm > 0),
            tpm INTEGER CHECK (tpm > 0),
            spent TEXT NOT NULL DEFAULT '0',
            created_us INTEGER NOT NULL,
            revoked_us INTEGER)""",
    )),
    Migration(2, "usage ledger", (
        f"""CREATE TABLE usage_records (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            request_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            model TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL CHECK (prompt_tokens >= 0),
            cached_prompt_tokens INTEGER NOT NULL CHECK (cached_prompt_tokens >= 0),
            completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
            reasoning_tokens INTEGER NOT NULL CHECK (reasoning_tokens >= 0),
            cost TEXT NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome IN {OUTCOMES}),
            queue_ms REAL NOT NULL,
            ttft_ms REAL,
            total_ms REAL NOT NULL,
            created_us INTEGER NOT NULL)""",
        "CREATE INDEX usage_records_key_seq ON usage_records (key_id, seq)",
        "CREATE INDEX usage_records_created ON usage_records (created_us)",
    )),
)

POSTGRES: tuple[Migration, ...] = (
    Migration(1, "api keys", (
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            admin BOOLEAN NOT NULL,
            budget NUMERIC,
            rpm INTEGER CHECK (rpm > 0),
            tpm INTEGER CHECK (tpm > 0),
            spent NUMERIC NOT NULL DEFAULT 0,
            created_at TIMESTAMPTZ NOT NULL,
            revoked_at TIMESTAMPTZ)""",
    )),
    Migration(2, "usage ledger", (
        f"""CREATE TABLE usage_records (
            seq BIGSERIAL PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            request_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            model TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL CHECK (prompt_tokens >= 0),
            cached_prompt_tokens INTEGER NOT NULL CHECK (cached_prompt_tokens >= 0),
            completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
            reasoning_tokens INTEGER NOT NULL CHECK (reasoning_tokens >= 0),
            cost NUMERIC NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome IN {OUTCOMES}),
            queue_ms DOUBLE PRECISION NOT NULL,
            ttft_ms DOUBLE PRECISION,
            total_ms DOUBLE PRECISION NOT NULL,
            created_at TIMESTAMPTZ NOT NULL)""",
        "CREATE INDEX usage_records_key_seq ON usage_records (key_id, seq)",
        "CREATE INDEX usage_records_created ON usage_records (created_at)",
    )),
)

# Creating the bookkeeping table itself is idempotent, outside the versions.
BOOKKEEPING = {
    "sqlite": "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
              "applied_us INTEGER NOT NULL)",
    "postgres": "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
}


def pending(migrations: tuple[Migration, ...], applied: set[int]) -> list[Migration]:
    """The migrations still to apply, in order; raises SchemaTooNew for unknown versions."""
    latest = migrations[-1].version
    if applied and max(applied) > latest:
        raise SchemaTooNew(f"the usage store's schema is at version {max(applied)}, newer than this gateway's "
                           f"{latest}; upgrade the gateway")
    return [m for m in migrations if m.version not in applied]
