"""API keys: `python -m gateway keys create|list|revoke` against SQLite and PostgreSQL,
keys at rest only as keyed hashes, the gateway accepting them (and command-line keys),
revokes taking effect within the key cache time."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import time

import pytest

from engine_server import ROOT
from gateway_helpers import KEY, GatewayProcess
from ledger_helpers import (SECRET, STORES, chat, create_key, keys_cli, records, shared_engine, sqlite_path,
                            start_gateway, store_url)
from postgres import postgres_or_skip


@pytest.fixture(scope="module", params=STORES)
def url(request):
    return store_url(request.param)


@pytest.fixture(scope="module")
def gw(url):
    proc = start_gateway(url)
    yield proc
    assert proc.stop() == 0


def bytes_at_rest(url: str) -> bytes:
    """Everything the store holds: the SQLite file and its WAL, or a pg_dump of the database."""
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        return b"".join(p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.exists())
    pg = postgres_or_skip()
    dump = subprocess.run([str(pg.bin / "pg_dump"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
                           "-d", url.rsplit("/", 1)[1]], capture_output=True, timeout=60, check=True)
    return dump.stdout


def test_created_key_is_printed_once_and_stored_only_as_its_keyed_hash(url, gw):
    result = keys_cli("create", "--name", "alice", "--budget", "2.50", "--rpm", "60", "--tpm", "100000",
                      "--usage-db", url)
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    key_id, key = fields["id"], fields["key"]
    assert fields["name"] == "alice" and re.fullmatch(r"key_[0-9a-f]{16}", key_id)
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{43}", key) and "shown this once" in result.stderr
    stored = bytes_at_rest(url)
    digest = hmac.new(SECRET.encode(), key.encode(), hashlib.sha256).hexdigest()
    assert digest.encode() in stored and key.encode() not in stored and key[3:].encode() not in stored
    listed = keys_cli("list", "--usage-db", url)
    as_json = keys_cli("list", "--json", "--usage-db", url)
    assert listed.returncode == as_json.returncode == 0 and key not in listed.stdout + as_json.stdout
    assert digest not in listed.stdout + as_json.stdout
    assert listed.stdout.splitlines()[0].split() == ["id", "name", "budget", "spent", "rpm", "tpm", "admin",
                                                     "created", "revoked"]
    [entry] = [e for e in map(json.loads, as_json.stdout.splitlines()) if e["id"] == key_id]
    assert entry | {"created": None} == {"id": key_id, "name": "alice", "budget": "2.5", "spent": "0", "rpm": 60,
                                         "tpm": 100000, "admin": False, "created": None, "revoked": None}
    assert chat(gw, key)[0] == 200


def test_store_key_is_billed_under_its_id_and_revoke_takes_effect_within_the_cache_time(url, gw):
    key_id, key = create_key(url, "bob")
    status, _, body = chat(gw, key)
    assert status == 200 and records(gw)[body["id"]]["key_id"] == key_id
    revoked = keys_cli("revoke", key_id, "--usage-db", url)
    assert revoked.returncode == 0 and revoked.stdout.startswith(f"revoked {key_id} (bob) at ")
    start = time.monotonic()
    while (answer := chat(gw, key))[0] == 200:
        assert time.monotonic() - start < 3, "the revoked key still works after 3 s (cache: 0.5 s)"
        time.sleep(0.05)
    status, headers, body = answer
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert body["error"] == {"message": "The API key was revoked", "type": "invalid_request_error", "param": None,
                             "code": "invalid_api_key"}
    again = keys_cli("revoke", key_id, "--usage-db", url)  # once revoked, stays revoked at its first time
    assert again.returncode == 0 and again.stdout == revoked.stdout


def test_command_line_keys_are_admin_and_billed_as_local(gw):
    status, _, body = chat(gw, KEY)
    local_id = "local:" + hashlib.sha256(KEY.encode()).hexdigest()[:8]
    assert status == 200 and records(gw)[body["id"]]["key_id"] == local_id
    assert chat(gw, "sk-not-a-key")[0] == 401


def test_keys_create_refuses_without_a_secret_or_with_a_short_one(tmp_path):
    url = store_url("sqlite")
    bare = keys_cli("create", "--name", "x", "--usage-db", url, secret=False)
    short = tmp_path / "short"
    short.write_text("too short")
    weak = keys_cli("create", "--name", "x", "--usage-db", url, "--key-secret-file", str(short), secret=False)
    for result, says in ((bare, "MOESERVE_KEY_SECRET"), (weak, "at least 32 bytes")):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and says in lines[0]
        assert result.stdout == ""


def test_secret_from_the_environment_and_a_gateway_with_another_secret():
    url = store_url("sqlite")
    env_secret = "e" * 40
    result = subprocess.run([sys.executable, "-m", "gateway", "keys", "create", "--name", "env", "--usage-db", url],
                            capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env={"MOESERVE_KEY_SECRET": env_secret, "PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr
    key = dict(line.split(": ", 1) for line in result.stdout.splitlines())["key"]
    same = GatewayProcess([shared_engine().address], "--usage-db", url, env={"MOESERVE_KEY_SECRET": env_secret})
    other = start_gateway(url)  # the test secret: the key's hash does not match
    try:
        same.wait_ready()
        assert chat(same, key)[0] == 200 and chat(same, KEY)[0] == 200
        assert chat(other, key)[0] == 401
    finally:
        assert same.stop() == 0 and other.stop() == 0


@pytest.mark.parametrize("args, says", [
    (["revoke", "key_0000000000000000"], "no key with id"),
    (["create", "--name", "x", "--budget", "-1"], "non-negative"),
    (["create", "--name", "x", "--rpm", "0"], "positive integer"),
    (["create", "--budget", "1"], "--name"),
    (["list", "--usage-db", "mysql://x/y"], "--usage-db"),
    (["list", "--usage-db", "postgresql://postgres@127.0.0.1:1/none"], "cannot use the usage store"),
])
def test_bad_keys_commands_print_one_error_line_and_exit_2(args, says):
    if "--usage-db" not in args:
        args = [*args, "--usage-db", store_url("sqlite")]
    result = keys_cli(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert says in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, says", [
    (["--usage-db", "mysql://db/usage"], "--usage-db"),
    (["--usage-db", "sqlite://relative.db"], "three slashes"),
    (["--usage-db", "sqlite:////nonexistent/folder/usage.db"], "cannot open the usage store"),
    (["--usage-db", "postgresql://postgres@127.0.0.1:1/none"], "cannot open the usage store"),
    (["--key-secret-file", "/nonexistent/secret"], "cannot read"),
    (["--key-secret-file", "{short}"], "at least 32 bytes"),
    (["--key-cache-seconds", "-1"], "--key-cache-seconds"),
])
def test_bad_usage_flags_of_serve_print_one_error_line_and_exit_2(tmp_path, flags, says):
    short = tmp_path / "short"
    short.write_text("short")
    args = [a.format(short=short) for a in flags]
    if "--usage-db" not in args:
        args += ["--usage-db", store_url("sqlite")]
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--engine", "127.0.0.1:1", "--api-key", "k",
                             *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert says in lines[0] and "Traceback" not in result.stderr
