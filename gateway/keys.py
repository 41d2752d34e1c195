"""API keys: making them, hashing them, and knowing who a request's key belongs to.

A key is `sk-` + 43 random url-safe characters (256 bits), shown once when created. The
store keeps only HMAC-SHA256(server secret, key) in hex: a copy of the database alone
neither yields keys nor lets one test guesses offline without the secret. The secret
comes from --key-secret-file or MOESERVE_KEY_SECRET (at least 32 bytes) and must stay the
same for the keys it hashed to keep working.

Keys given on the command line (--api-key, --api-keys-file) are for local use: admin,
unlimited, never stored, compared by their SHA-256; the ledger names them
`local:<first 8 hex digits of that SHA-256>`, stable across restarts.

Lookups of store keys are cached in memory for `cache_seconds` (default 5 s), found or
not: a revoke, a new budget or a new key takes effect within that time on every gateway.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from gateway.errors import ApiError, store_unavailable
from gateway.store import KeyRecord, StoreUnavailable, UsageStore

MIN_SECRET_BYTES = 32
KEY_PREFIX = "sk-"
CACHE_LIMIT = 100_000  # entries; past it the cache starts over (bounds memory under key spraying)
EPOCH = datetime.fromtimestamp(0, UTC)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def check_secret(secret: bytes) -> bytes:
    """The secret, stripped of surrounding whitespace; ValueError when it is too short."""
    secret = secret.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the key secret must hold at least {MIN_SECRET_BYTES} bytes "
                         f"(e.g. `openssl rand -hex 32`), got {len(secret)}")
    return secret


def key_hash(secret: bytes, key: str) -> str:
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


def local_key(key: str) -> KeyRecord:
    digest = hashlib.sha256(key.encode()).hexdigest()
    return KeyRecord(f"local:{digest[:8]}", "command line", digest, admin=True, created_at=EPOCH)


# Who a gateway run with --no-auth bills: everyone, as one admin.
ANONYMOUS = KeyRecord("anonymous", "no authentication", "", admin=True, created_at=EPOCH)


def unauthorized(message: str, code: str) -> ApiError:
    return ApiError(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})


@dataclass
class _Cached:
    key: KeyRecord | None
    until: float


class KeyDirectory:
    """Turns an Authorization header into the KeyRecord it belongs to (or a 401).

    `spent` of a cached key is raised by this gateway's own appends (`note_spent`), so a
    budget binds here at once and at most `cache_seconds` late for other gateways' spending.
    """

    def __init__(self, store: UsageStore, local_keys: tuple[str, ...], secret: bytes | None, no_auth: bool,
                 cache_seconds: float = 5.0) -> None:
        self.store, self.secret, self.no_auth, self.cache_seconds = store, secret, no_auth, cache_seconds
        self._local = {k.key_hash: k for k in map(local_key, local_keys)}
        self._cache: dict[str, _Cached] = {}
        self._fetching: dict[str, asyncio.Future] = {}
        self._spent: dict[str, Decimal] = {}

    async def authenticate(self, header: str) -> KeyRecord:
        if self.no_auth:
            return ANONYMOUS
        if not header:
            raise unauthorized("Missing API key: send the header 'Authorization: Bearer KEY'", "missing_api_key")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("Incorrect API key provided", "invalid_api_key")
        local = self._local.get(hashlib.sha256(token.encode()).hexdigest())
        if local is not None:
            return local
        key = await self._lookup(token) if self.secret is not None else None
        if key is None:
            raise unauthorized("Incorrect API key provided", "invalid_api_key")
        if key.revoked_at is not None:
            raise unauthorized("The API key was revoked", "invalid_api_key")
        return key

    async def _lookup(self, token: str) -> KeyRecord | None:
        digest = key_hash(self.secret, token)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is None or hit.until <= now:
            try:
                found = await asyncio.shield(self._fetch(digest))
            except StoreUnavailable:
                raise store_unavailable() from None
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            hit = self._cache[digest] = _Cached(found, now + self.cache_seconds)
            if found is not None:
                self.note_spent(found.id, found.spent)
        return hit.key

    def _fetch(self, digest: str) -> asyncio.Future:
        """One store lookup per key at a time, however many requests wait for it."""
        pending = self._fetching.get(digest)
        if pending is None:
            pending = self._fetching[digest] = asyncio.ensure_future(self.store.find_key(digest))
            pending.add_done_callback(lambda f: self._fetched(digest, f))
        return pending

    def _fetched(self, digest: str, future: asyncio.Future) -> None:
        self._fetching.pop(digest, None)
        if not future.cancelled():
            future.exception()  # retrieved: its waiters may all have gone

    def spent(self, key: KeyRecord) -> Decimal:
        """What the key has spent, as last known here."""
        return self._spent.get(key.id, key.spent)

    def note_spent(self, key_id: str, spent: Decimal) -> None:
        """Spend only grows; a lookup older than an append must not lower it."""
        self._spent[key_id] = max(spent, self._spent.get(key_id, spent))

    def over_budget(self, key: KeyRecord) -> bool:
        return key.budget is not None and self.spent(key) >= key.budget
