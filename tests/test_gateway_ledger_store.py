"""The usage stores behind their one interface, on real files and a real PostgreSQL:
migrations applied once however many gateways open a store together, money summed
exactly, keys found by hash, records paged newest first, group commit."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from gateway.store import (GroupBy, KeyRecord, Outcome, SchemaTooNew, StoreUnavailable, UsageQuery, UsageRecord,
                           store_for)
from gateway.store import migrations
from gateway.store.batch import GroupCommit
from ledger_helpers import STORES, sqlite_path, store_url
from postgres import postgres_or_skip

T0 = datetime(2025, 3, 1, 23, 59, 59, tzinfo=UTC)


def record(i: int, key: str = "key_a", model: str = "m", cost: str = "0.1", at: datetime = T0) -> UsageRecord:
    return UsageRecord(f"chatcmpl-{i}", f"req-{i}", key, model, 10, 2, 5, 1, Decimal(cost), Outcome.STOP, 1.5, 2.5,
                       9.0, at)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(params=STORES)
def url(request):
    return store_url(request.param)


async def opened(url: str):
    store = store_for(url)
    await store.open()
    return store


def applied_versions(url: str) -> list[int]:
    if url.startswith("sqlite"):
        with sqlite3.connect(sqlite_path(url)) as conn:
            return [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
    out = postgres_or_skip().psql("SELECT version FROM schema_migrations ORDER BY version", url.rsplit("/", 1)[1])
    return [int(v) for v in out.split()]


def test_migrations_apply_once_when_many_gateways_open_the_store_together(url):
    async def main():
        stores = await asyncio.gather(*(opened(url) for _ in range(6)))
        await asyncio.gather(*(s.close() for s in stores))
        again = await opened(url)  # and again later: nothing to do
        await again.close()
    run(main())
    assert applied_versions(url) == [m.version for m in migrations.SQLITE] == [m.version for m in migrations.POSTGRES]


def test_a_store_written_by_a_newer_gateway_is_refused(url):
    run(opened(url)).healthy  # noqa: B018 - migrated
    if url.startswith("sqlite"):
        with sqlite3.connect(sqlite_path(url)) as conn:
            conn.execute("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
    else:
        postgres_or_skip().psql("INSERT INTO schema_migrations (version, name) VALUES (99, 'from the future')",
                                url.rsplit("/", 1)[1])
    with pytest.raises(SchemaTooNew, match="version 99"):
        run(opened(url))


def test_money_is_summed_exactly_and_spend_follows_each_append(url):
    async def main():
        store = await opened(url)
        await store.create_key(KeyRecord("key_a", "a", "hash-a", False, T0, Decimal("1"), 5, None))
        # 0.1 + 0.2 is not 0.3 in floats; a thousand sub-micro-dollar costs drift too.
        spends = await asyncio.gather(store.append(record(0, cost="0.1")), store.append(record(1, cost="0.2")),
                                      *(store.append(record(i, cost="0.0000001234567")) for i in range(2, 1002)),
                                      store.append(record(1002, key="local:1", cost="0.3")))
        totals = await store.totals(UsageQuery(group_by=GroupBy.KEY))
        key = await store.find_key("hash-a")
        await store.close()
        return spends, totals, key
    spends, totals, key = run(main())
    exact = Decimal("0.3") + 1000 * Decimal("0.0000001234567")
    assert key.spent == exact and max(s for s in spends if s is not None) == exact and spends[-1] is None
    assert [(t.group, t.requests, t.cost) for t in totals] == [("key_a", 1002, exact), ("local:1", 1, Decimal("0.3"))]
    assert totals[0].prompt_tokens == 10020 and totals[0].completion_tokens == 5010


def test_totals_by_day_model_and_range_are_utc(url):
    async def main():
        store = await opened(url)
        later = T0 + timedelta(seconds=2)  # past midnight UTC: the next day
        for i, (model, at) in enumerate([("a", T0), ("b", T0), ("a", later)]):
            await store.append(record(i, model=model, at=at))
        queries = (UsageQuery(group_by=GroupBy.DAY), UsageQuery(group_by=GroupBy.MODEL), UsageQuery(start=later),
                   UsageQuery(end=later), UsageQuery(start=later + timedelta(days=1)))
        out = [await store.totals(q) for q in queries]
        await store.close()
        return out
    by_day, by_model, after, before, empty = run(main())
    assert [(t.group, t.requests) for t in by_day] == [("2025-03-01", 2), ("2025-03-02", 1)]
    assert [(t.group, t.requests, t.cost) for t in by_model] == [("a", 2, Decimal("0.2")), ("b", 1, Decimal("0.1"))]
    assert (after[0].requests, before[0].requests) == (1, 2)
    assert [(t.group, t.requests, t.cost, t.prompt_tokens) for t in empty] == [(None, 0, Decimal(0), 0)]


def test_records_page_newest_first_per_key(url):
    async def main():
        store = await opened(url)
        for i in range(7):
            await store.append(record(i, key="key_a" if i % 2 else "key_b"))
        pages, before = [], None
        while page := await store.records(None, 3, before):
            pages.append([r.id for r in page])
            before = page[-1].seq
        mine = [r.id for r in await store.records("key_a", 10)]
        await store.close()
        return pages, mine
    pages, mine = run(main())
    assert pages == [["chatcmpl-6", "chatcmpl-5", "chatcmpl-4"], ["chatcmpl-3", "chatcmpl-2", "chatcmpl-1"],
                     ["chatcmpl-0"]]
    assert mine == ["chatcmpl-5", "chatcmpl-3", "chatcmpl-1"]


def test_keys_are_found_by_hash_and_revoked_once(url):
    async def main():
        store = await opened(url)
        key = KeyRecord("key_x", "ops", "h" * 64, True, T0, None, None, 1000)
        await store.create_key(key)
        found, missing = await store.find_key("h" * 64), await store.find_key("nope")
        first = await store.revoke_key("key_x", T0 + timedelta(hours=1))
        second = await store.revoke_key("key_x", T0 + timedelta(hours=2))
        unknown = await store.revoke_key("key_y", T0)
        listed = await store.list_keys()
        await store.close()
        return found, missing, first, second, unknown, listed
    found, missing, first, second, unknown, listed = run(main())
    assert found.id == "key_x" and found.admin and found.tpm == 1000 and found.spent == 0 and missing is None
    assert first.revoked_at == second.revoked_at == T0 + timedelta(hours=1) and unknown is None
    assert [k.id for k in listed] == ["key_x"]


def test_a_failing_backend_raises_store_unavailable_and_clears_healthy():
    url = store_url("sqlite")
    store = run(opened(url))
    with sqlite3.connect(sqlite_path(url), isolation_level=None) as conn:
        conn.execute("DROP TABLE usage_records")

    async def main():
        with pytest.raises(StoreUnavailable, match="append usage"):
            await store.append(record(1))
        healthy_after_failure = store.healthy
        await store.ping()  # the file answers: healthy again (the next append fails again)
        return healthy_after_failure, store.healthy
    assert run(main()) == (False, True)


def test_group_commit_shares_commits_and_commits_the_items_of_cancelled_callers():
    async def main():
        batches: list[list[int]] = []

        async def commit(items):
            await asyncio.sleep(0.01)
            batches.append(items)
            if 13 in items:
                raise RuntimeError("batch with 13 failed")
            return [i * 10 for i in items]
        group = GroupCommit(commit, lanes=1)
        first = asyncio.create_task(group.submit(0))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(group.submit(1))
        rest = [asyncio.create_task(group.submit(i)) for i in range(2, 10)]
        await asyncio.sleep(0)
        waiter.cancel()
        results = await asyncio.gather(first, *rest)
        failing = await asyncio.gather(group.submit(13), return_exceptions=True)
        await group.wait_idle()
        return batches, results, failing
    batches, results, failing = run(main())
    assert batches[:2] == [[0], list(range(1, 10))]  # 1's caller left; 1 was committed all the same
    assert results == [0, 20, 30, 40, 50, 60, 70, 80, 90]
    assert isinstance(failing[0], RuntimeError)
