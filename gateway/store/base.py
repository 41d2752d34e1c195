"""The usage store's interface and the records that cross it: API keys and ledger entries.

Two backends implement `UsageStore`: SQLite (one file, one machine) and PostgreSQL
(several gateways sharing one ledger). The gateway talks to the interface only.
"""

from __future__ import annotations

import enum
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

log = logging.getLogger(__name__)


class StoreUnavailable(RuntimeError):
    """The store could not be reached or refused an operation; nothing was returned."""


class SchemaTooNew(RuntimeError):
    """The store's schema was written by a newer gateway than this one."""


class Outcome(enum.StrEnum):
    """How a request ended, as the ledger records it."""

    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    ABORTED = "aborted"  # the client went away before the answer ended
    ERROR = "error"  # the engine failed mid-way, or the final record could not be answered


class GroupBy(enum.StrEnum):
    KEY = "key"
    MODEL = "model"
    DAY = "day"


@dataclass(frozen=True)
class KeyRecord:
    """An API key as stored: never the key itself, only its keyed hash (see gateway.keys)."""

    id: str
    name: str
    key_hash: str
    admin: bool
    created_at: datetime
    budget: Decimal | None = None  # dollars; None: unlimited
    rpm: int | None = None  # requests per minute; None: unlimited
    tpm: int | None = None  # tokens per minute; None: unlimited
    revoked_at: datetime | None = None
    spent: Decimal = Decimal(0)  # the sum of the key's ledger costs, kept with each append


@dataclass(frozen=True)
class UsageRecord:
    """One request that reached an engine. `seq` is the store's order of commit (None until stored)."""

    id: str  # the answer's id (chatcmpl-..., cmpl-...), unique
    request_id: str  # X-Request-Id
    key_id: str
    model: str
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost: Decimal  # dollars, exact
    outcome: Outcome
    queue_ms: float  # until the engine's first message
    ttft_ms: float | None  # until the first generated token; None when none came
    total_ms: float
    created_at: datetime  # UTC
    seq: int | None = None


@dataclass(frozen=True)
class UsageTotal:
    """Sums over the records of one group (`group` is None without grouping)."""

    group: str | None
    requests: int
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost: Decimal


@dataclass(frozen=True)
class UsageQuery:
    """Records with start <= created_at < end (either bound optional), of one key or of all."""

    start: datetime | None = None
    end: datetime | None = None
    group_by: GroupBy | None = None
    key_id: str | None = None  # None: every key


class UsageStore(ABC):
    """Keys and the usage ledger, behind one interface; one instance per gateway process.

    Contract: every method is a coroutine awaited on the gateway's event loop, safe to call
    from many tasks at once. A write (`create_key`, `revoke_key`, `append`) is durable when
    it returns: committed, and flushed as far as the backend promises (SQLite WAL with
    synchronous=FULL; PostgreSQL COMMIT with synchronous_commit on), so it survives the
    gateway being killed the moment after. Concurrent appends may share one commit (group
    commit); each still returns only once its own record is committed. Any failure of the
    backend raises `StoreUnavailable` and clears `healthy` until `ping` succeeds again;
    nothing returns partial results. `open` connects and applies pending schema
    migrations, safely when several gateways open one store at once; `close` waits for
    the writes in flight.
    """

    healthy: bool = False  # set by a successful open or ping; a failure at open is the caller's to report

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ping(self) -> None:
        """A cheap round trip; sets `healthy` on success, raises StoreUnavailable otherwise."""

    @abstractmethod
    async def create_key(self, key: KeyRecord) -> None: ...

    @abstractmethod
    async def find_key(self, key_hash: str) -> KeyRecord | None:
        """The key with this hash, revoked or not, with its current spend."""

    @abstractmethod
    async def list_keys(self) -> list[KeyRecord]:
        """Every key, oldest first."""

    @abstractmethod
    async def revoke_key(self, key_id: str, at: datetime) -> KeyRecord | None:
        """Marks the key revoked (once: a second revoke keeps the first time); None if unknown."""

    @abstractmethod
    async def append(self, record: UsageRecord) -> Decimal | None:
        """Commits the record and adds its cost to its key's spend, in one transaction.

        Returns the key's spend after the commit (None for a key the store does not hold,
        such as command-line keys)."""

    @abstractmethod
    async def totals(self, query: UsageQuery) -> list[UsageTotal]:
        """Sums per group, ordered by group; without grouping one row, zeros when empty."""

    @abstractmethod
    async def records(self, key_id: str | None, limit: int, before_seq: int | None = None) -> list[UsageRecord]:
        """Up to `limit` records of one key (or all), newest first, with seq < before_seq when given."""

    # -- shared by the backends ------------------------------------------------------

    @contextmanager
    def _guard(self, what: str, failures: tuple[type[BaseException], ...]) -> Iterator[None]:
        """Turns the backend's errors into StoreUnavailable and marks the store unhealthy."""
        try:
            yield
        except failures as exc:
            if self.healthy:
                log.error("usage store failed (%s): %s: %s", what, type(exc).__name__, exc)
            self.healthy = False
            raise StoreUnavailable(f"{what}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
