"""The usage store: API keys and the usage ledger, on SQLite or PostgreSQL.

`store_for(url)` picks the backend from the URL's scheme and imports it only then, so a
gateway on SQLite never imports the PostgreSQL driver:

    sqlite:///relative/path.db   sqlite:////absolute/path.db   (?synchronous=normal|full)
    postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?...]          (also postgres://)
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from gateway.store.base import (GroupBy, KeyRecord, Outcome, SchemaTooNew, StoreUnavailable, UsageQuery, UsageRecord,
                                UsageStore, UsageTotal)

DEFAULT_URL = "sqlite:///moeserve-usage.db"

__all__ = ["DEFAULT_URL", "GroupBy", "KeyRecord", "Outcome", "SchemaTooNew", "StoreUnavailable", "UsageQuery",
           "UsageRecord", "UsageStore", "UsageTotal", "check_url", "store_for"]


def _sqlite_args(url: str) -> tuple[Path, str]:
    rest = url[len("sqlite:///"):]
    path, _, query = rest.partition("?")
    if not path:
        raise ValueError(f"{url!r} names no file (sqlite:///PATH)")
    options = parse_qs(query, keep_blank_values=True)
    if set(options) - {"synchronous"}:
        raise ValueError(f"{url!r}: the only option is synchronous=full|normal")
    synchronous = options.get("synchronous", ["full"])[-1]
    if synchronous.lower() not in ("full", "normal"):
        raise ValueError(f"{url!r}: synchronous must be full or normal")
    return Path(path), synchronous


def check_url(url: str) -> str:
    """The URL if a store can be made of it; ValueError saying why not."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        if not url.startswith("sqlite:///"):
            raise ValueError(f"{url!r}: a SQLite URL is sqlite:///PATH (three slashes; four for an absolute path)")
        _sqlite_args(url)
    elif scheme in ("postgresql", "postgres"):
        if not urlsplit(url).path.strip("/") and "dbname=" not in url:
            raise ValueError(f"{url!r} names no database (postgresql://USER@HOST:PORT/DB)")
    else:
        raise ValueError(f"{url!r}: expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
    return url


def store_for(url: str) -> UsageStore:
    """An unopened store for the URL (call `await store.open()`)."""
    check_url(url)
    if url.startswith("sqlite:"):
        from gateway.store.sqlite import SqliteStore
        return SqliteStore(*_sqlite_args(url))
    from gateway.store.postgres import PostgresStore
    return PostgresStore(url)
