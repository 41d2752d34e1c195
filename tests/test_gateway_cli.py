"""`python -m gateway serve`: bad flags and files fail with one line and exit 2; keys from a
file and --no-auth work; the gateway never imports torch, the engine or the kernels."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from engine_server import ROOT
from gateway_helpers import GatewayProcess


def run_gateway(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "bad.json").write_text("{nope")
    (d / "negative.json").write_text(json.dumps({"models": {"m": {"input_per_million": "-1",
                                                                 "output_per_million": "1"}}}))
    (d / "partial.json").write_text(json.dumps({"models": {"m": {"input_per_million": "1"}}}))
    (d / "empty-keys").write_text("# no keys here\n\n")
    return d


@pytest.mark.parametrize("args, says", [
    ([], "required"),
    (["serve"], "--engine"),
    (["serve", "--engine", "localhost", "--api-key", "k"], "HOST:PORT"),
    (["serve", "--engine", "127.0.0.1:99999", "--api-key", "k"], "HOST:PORT"),
    (["serve", "--engine", "127.0.0.1:1,127.0.0.1:1", "--api-key", "k"], "twice"),
    (["serve", "--engine", "127.0.0.1:1"], "--no-auth"),
    (["serve", "--engine", "127.0.0.1:1", "--api-key", "k", "--no-auth"], "contradicts"),
    (["serve", "--engine", "127.0.0.1:1", "--api-key", "two words"], "whitespace"),
    (["serve", "--engine", "127.0.0.1:1", "--api-keys-file", "/nonexistent/keys"], "cannot read"),
    (["serve", "--engine", "127.0.0.1:1", "--api-keys-file", "{d}/empty-keys"], "no key"),
    (["serve", "--engine", "127.0.0.1:1", "--api-key", "k", "--prices", "{d}/bad.json"], "not valid JSON"),
    (["serve", "--engine", "127.0.0.1:1", "--api-key", "k", "--prices", "{d}/negative.json"], "non-negative"),
    (["serve", "--engine", "127.0.0.1:1", "--api-key", "k", "--prices", "{d}/partial.json"], "output_per_million"),
    (["serve", "--engine", "127.0.0.1:1", "--api-key", "k", "--port", "70000"], "--port"),
    (["serve", "--engine", "127.0.0.1:1", "--api-key", "k", "--max-body-bytes", "10"], "--max-body-bytes"),
    (["serve", "--engine", "127.0.0.1:1", "--api-key", "k", "--port", "x"], "invalid int"),
    (["serve", "--engine", "127.0.0.1:1", "--api-key", "k", "--frobnicate"], "unrecognized"),
])
def test_bad_flags_print_one_error_line_and_exit_2(files, args, says):
    result = run_gateway(*(a.format(d=files) for a in args))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert says in lines[0] and "Traceback" not in result.stderr


def test_port_in_use_is_one_error_line():
    first = GatewayProcess(["127.0.0.1:1"], "--no-auth", keys=())
    try:
        busy = first.url.rsplit(":", 1)[1]
        result = run_gateway("serve", "--engine", "127.0.0.1:1", "--no-auth", "--port", busy)
        assert result.returncode == 2 and result.stderr.startswith("error: cannot listen"), result.stderr
    finally:
        assert first.stop() == 0


def test_keys_file_and_no_auth(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# operators\nsk-from-file-1\n\nsk-from-file-2\n")
    with_keys = GatewayProcess(["127.0.0.1:1"], "--api-keys-file", str(keys), keys=())
    open_gw = GatewayProcess(["127.0.0.1:1"], "--no-auth", keys=())
    try:
        def status(url: str, key: str | None) -> int:
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    return resp.status
            except urllib.error.HTTPError as err:
                return err.code
        assert status(with_keys.base_url + "/models", "sk-from-file-2") == 200
        assert status(with_keys.base_url + "/models", "sk-from-file-3") == 401
        assert status(with_keys.base_url + "/models", None) == 401
        assert status(open_gw.base_url + "/models", None) == 200
    finally:
        assert with_keys.stop() == 0 and open_gw.stop() == 0


def test_gateway_never_imports_torch_engine_or_kernels():
    code = ("import sys, gateway.app, gateway.__main__, gateway.handlers, gateway.pool; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'engine', 'kernels')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
