"""Group commit: concurrent appends share one transaction, each awaiting its own commit.

The durability rule (a record is committed before its answer's last byte) makes every
request wait for a commit; committing one record per transaction would cap the ledger at
one fsync per request. Here appends queue up while a commit is in flight and the next
commit takes all of them (up to `max_batch`): the same guarantee per record, one fsync per
batch. `lanes` commits may run at once (1 for SQLite's single writer; a few for a server).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    def __init__(self, commit: Callable[[list[T]], Awaitable[list[R]]], lanes: int = 1, max_batch: int = 256) -> None:
        """commit(items) writes the items in one transaction and returns one result per item."""
        self._commit, self._lanes, self._max_batch = commit, lanes, max_batch
        self._pending: list[tuple[T, asyncio.Future]] = []
        self._tasks: set[asyncio.Task] = set()
        # Lanes draining now; counted down inside _drain itself, so that a caller woken by
        # the last commit never sees a lane that is about to end as busy.
        self._active = 0

    async def submit(self, item: T) -> R:
        """Returns once the transaction holding `item` committed; raises what the commit raised.

        Cancelling the caller does not withdraw the item: it is committed all the same."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._active < self._lanes:
            self._active += 1
            task = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        try:
            await self._drain_pending()
        finally:
            self._active -= 1

    async def _drain_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:self._max_batch], self._pending[self._max_batch:]
            try:
                results = await self._commit([item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - handed to every waiter of the batch
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                        future.exception()  # a cancelled waiter must not leave it unretrieved
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    async def wait_idle(self) -> None:
        """Waits until every item submitted so far is committed (or failed)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
