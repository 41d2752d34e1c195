"""`python -m gateway keys create|list|revoke`: API keys in the usage store.

`create` prints the new key once; the store keeps its keyed hash only (gateway.keys), so
`create` refuses to run without the key secret. `list` never shows keys (they are not
stored); `revoke ID` marks a key revoked, which every gateway honours within its key
cache time (5 s by default).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path

from gateway.keys import key_hash, new_key, new_key_id
from gateway.store import KeyRecord, SchemaTooNew, StoreUnavailable, UsageStore, store_for


class KeysError(ValueError):
    """A bad argument or an unusable store; the message says which."""


def budget_arg(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number of dollars: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number of dollars, got {text!r}")
    return value


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def add_parser(sub) -> None:
    k = sub.add_parser("keys", help="create, list and revoke API keys in the usage store")
    ks = k.add_subparsers(dest="keys_command", required=True, parser_class=type(k))
    common = {"--usage-db": dict(metavar="URL", help="the usage store (default: sqlite:///moeserve-usage.db)")}
    c = ks.add_parser("create", help="create a key and print it (once)")
    c.add_argument("--name", required=True, help="who or what the key is for")
    c.add_argument("--budget", type=budget_arg, metavar="USD", help="refuse requests once this much is spent")
    c.add_argument("--rpm", type=positive_int, metavar="N", help="requests per minute (per gateway process)")
    c.add_argument("--tpm", type=positive_int, metavar="N", help="tokens per minute (per gateway process)")
    c.add_argument("--admin", action="store_true", help="may read every key's usage")
    c.add_argument("--key-secret-file", type=Path, metavar="FILE", help="the HMAC secret (else $MOESERVE_KEY_SECRET)")
    l_ = ks.add_parser("list", help="list keys (never the keys themselves)")
    l_.add_argument("--json", action="store_true", help="one JSON object per key, one per line")
    r = ks.add_parser("revoke", help="revoke a key by its id")
    r.add_argument("id", help="the key's id (key_...)")
    for p in (c, l_, r):
        p.add_argument("--usage-db", **common["--usage-db"])


async def _with_store(url: str, action):
    store = store_for(url)
    try:
        await store.open()
        return await action(store)
    except (StoreUnavailable, SchemaTooNew) as exc:
        raise KeysError(f"--usage-db: cannot use the usage store {store!r}: {exc}") from None
    finally:
        await store.close()


async def create(url: str, secret: bytes, name: str, budget: Decimal | None, rpm: int | None, tpm: int | None,
                 admin: bool) -> tuple[KeyRecord, str]:
    key = new_key()
    record = KeyRecord(new_key_id(), name, key_hash(secret, key), admin, datetime.now(UTC), budget, rpm, tpm)

    async def action(store: UsageStore) -> None:
        await store.create_key(record)
    await _with_store(url, action)
    return record, key


def key_json(k: KeyRecord) -> dict:
    dollars = lambda d: None if d is None else format(d.normalize(), "f")  # noqa: E731
    when = lambda t: None if t is None else t.isoformat(timespec="seconds").replace("+00:00", "Z")  # noqa: E731
    return {"id": k.id, "name": k.name, "budget": dollars(k.budget), "spent": dollars(k.spent), "rpm": k.rpm,
            "tpm": k.tpm, "admin": k.admin, "created": when(k.created_at), "revoked": when(k.revoked_at)}


def print_table(keys: list[KeyRecord]) -> None:
    rows = [key_json(k) for k in keys]
    columns = ["id", "name", "budget", "spent", "rpm", "tpm", "admin", "created", "revoked"]
    cells = [columns] + [["-" if r[c] is None else str(r[c]).lower() if isinstance(r[c], bool) else str(r[c])
                          for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


async def run(args: argparse.Namespace, secret: bytes | None) -> int:
    if args.keys_command == "create":
        if secret is None:
            raise KeysError("no key secret: give --key-secret-file FILE or set MOESERVE_KEY_SECRET "
                            "(the same secret the gateways serve with)")
        record, key = await create(args.usage_db, secret, args.name, args.budget, args.rpm, args.tpm, args.admin)
        print(f"id: {record.id}\nname: {record.name}\nkey: {key}")
        print("The key is shown this once; the store keeps only its hash.", file=sys.stderr)
        return 0
    if args.keys_command == "list":
        keys = await _with_store(args.usage_db, lambda store: store.list_keys())
        if args.json:
            for k in keys:
                print(json.dumps(key_json(k)))
        else:
            print_table(keys)
        return 0
    revoked = await _with_store(args.usage_db, lambda store: store.revoke_key(args.id, datetime.now(UTC)))
    if revoked is None:
        raise KeysError(f"no key with id {args.id!r}")
    print(f"revoked {revoked.id} ({revoked.name}) at {key_json(revoked)['revoked']}")
    return 0
