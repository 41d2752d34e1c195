"""What the usage ledger, keys and limits tests share: one engine for all of them, stores
on SQLite files or a real PostgreSQL, the `keys` CLI, and raw HTTP with headers.

`shared_engine()` starts one small engine for the whole session (stopped at exit), with
a queue deep enough for the load tests. `store_url(kind)` is a fresh store: a SQLite file
in a new temporary folder, or a new database of the session's PostgreSQL server (the
test skips, saying why, where PostgreSQL cannot start).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from functools import cache
from pathlib import Path

import aiohttp

from engine_server import ROOT
from gateway_helpers import KEY, MODEL, GatewayProcess, start_engine
from postgres import postgres_or_skip

SECRET = "0123456789abcdef0123456789abcdef-test-secret"
PRICES = {"input_per_million": "0.50", "output_per_million": "2.15", "cached_input_per_million": "0.10"}
HELLO = [{"role": "user", "content": "Hello there"}]
STORES = ("sqlite", "postgres")


@cache
def shared_engine():
    engine = start_engine("--max-model-len", "2048", "--kv-cache-memory", "0.1", "--max-waiting", "1024",
                          "--max-num-seqs", "64")
    atexit.register(engine.stop)
    return engine


def temp_dir(prefix: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def store_url(kind: str) -> str:
    if kind == "postgres":
        return postgres_or_skip().fresh_database()
    return f"sqlite:///{temp_dir('ledger-') / 'usage.db'}"


def sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


@cache
def files() -> tuple[Path, Path]:
    """(prices file, key secret file)."""
    folder = temp_dir("ledger-files-")
    (folder / "prices.json").write_text(json.dumps({"models": {MODEL: PRICES}}))
    (folder / "secret").write_text(SECRET + "\n")
    return folder / "prices.json", folder / "secret"


def start_gateway(url: str, *flags: str, keys: tuple[str, ...] = (KEY,), engine=None) -> GatewayProcess:
    prices, secret = files()
    gw = GatewayProcess([(engine or shared_engine()).address], "--usage-db", url, "--prices", str(prices),
                        "--key-secret-file", str(secret), "--key-cache-seconds", "0.5", *flags, keys=keys)
    gw.wait_ready()
    return gw


def cost(prompt: int, cached: int, completion: int) -> Decimal:
    p = {k: Decimal(v) for k, v in PRICES.items()}
    return ((prompt - cached) * p["input_per_million"] + cached * p["cached_input_per_million"]
            + completion * p["output_per_million"]) / 1_000_000


def keys_cli(*args: str, secret: bool = True) -> subprocess.CompletedProcess:
    flags = ["--key-secret-file", str(files()[1])] if secret and args[0] == "create" else []
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOESERVE_")}
    return subprocess.run([sys.executable, "-m", "gateway", "keys", *args, *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=env)


def create_key(url: str, name: str, *flags: str) -> tuple[str, str]:
    """(key id, key) of a new key in the store at url."""
    result = keys_cli("create", "--name", name, "--usage-db", url, *flags)
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    return fields["id"], fields["key"]


async def _http(method: str, url: str, key: str | None, body=None) -> tuple[int, dict, bytes]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, json=body, headers=headers) as resp:
            return resp.status, dict(resp.headers), await resp.read()


def http(method: str, url: str, key: str | None = KEY, body=None) -> tuple[int, dict, dict | bytes]:
    """(status, headers, JSON body or raw bytes)."""
    status, headers, raw = asyncio.run(_http(method, url, key, body))
    try:
        return status, headers, json.loads(raw)
    except ValueError:
        return status, headers, raw


def chat(gw: GatewayProcess, key: str = KEY, **body) -> tuple[int, dict, dict | bytes]:
    return http("POST", gw.base_url + "/chat/completions", key,
                {"model": MODEL, "messages": HELLO, "max_tokens": 4, **body})


def records(gw: GatewayProcess, key: str = KEY, limit: int = 1000) -> dict[str, dict]:
    """The ledger as the usage API shows it to `key`: record id -> record."""
    status, _, body = http("GET", f"{gw.base_url}/usage/requests?limit={limit}", key)
    assert status == 200, body
    return {r["id"]: r for r in body["data"]}


def wait_for_record(gw: GatewayProcess, record_id: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = records(gw).get(record_id)
        if found is not None or time.monotonic() > deadline:
            assert found is not None, f"no record {record_id} after {timeout} s"
            return found
        time.sleep(0.05)
