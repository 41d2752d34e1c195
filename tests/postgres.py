"""A real PostgreSQL server for the tests: Debian's binaries, a throwaway cluster.

`shared_postgres()` starts one server per test session (initdb into a temporary folder,
listening on a free loopback port with its unix socket in that folder) and stops it at
exit; each test module takes a fresh database of it (`fresh_database`). As root, initdb
and pg_ctl run as the `postgres` user (`runuser -u postgres --`), which owns the folder.
Where no server can start (no binaries, no such user), `PostgresUnavailable` says why
and the tests that need one skip with that reason.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from functools import cache
from pathlib import Path

import pytest

from gateway_helpers import free_port


class PostgresUnavailable(RuntimeError):
    """No server could be started here; the message says why."""


def find_bin_dir() -> Path:
    """The newest Debian PostgreSQL's bin folder (or one holding initdb on PATH)."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name)
                  if Path(d).parent.name.isdigit() else 0)
    for d in reversed(dirs):
        if (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file():
            return Path(d)
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PostgresUnavailable("PostgreSQL's server binaries (initdb, pg_ctl) are not installed; "
                              "scripts/setup.sh installs Debian's postgresql package where apt-get is available")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale(bin_dir: Path) -> None:
    """Stops the servers of test runs that died without stopping theirs (killed, timed out):
    each server's folder names the process that started it."""
    for owner in glob.glob(os.path.join(tempfile.gettempdir(), f"{PREFIX}*", "owner.pid")):
        root = Path(owner).parent
        try:
            pid = int(Path(owner).read_text())
        except (OSError, ValueError):
            continue
        if _alive(pid):
            continue
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 and shutil.which("runuser") else []
        if (root / "data" / "postmaster.pid").exists():
            subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "-w",
                            "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


PREFIX = "moeserve-pg-"


class PostgresServer:
    def __init__(self) -> None:
        self.bin = find_bin_dir()
        reap_stale(self.bin)
        self.root = Path(tempfile.mkdtemp(prefix=PREFIX))
        (self.root / "owner.pid").write_text(str(os.getpid()))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = free_port()
        self.as_user: list[str] = []
        self.running = False
        try:
            self._init()
            self.start()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _init(self) -> None:
        if os.geteuid() == 0:  # initdb refuses to run as root
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and there is no 'postgres' user to run the server") from None
            if not shutil.which("runuser"):
                raise PostgresUnavailable("running as root and runuser is missing")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        # --no-sync: initdb's own files only; the server itself runs with fsync on.
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync",
                  "--locale=C.UTF-8")

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
            raise PostgresUnavailable(f"{tool} failed (exit {result.returncode}): {' | '.join(tail)}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Runs SQL with the server's own psql; returns its unaligned output."""
        result = subprocess.run([str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                                 "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database, "-c", sql],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def fresh_database(self) -> str:
        """A new empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """Stops the server (fast shutdown: clients are disconnected)."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            self.running = False

    def start(self) -> None:
        """Starts (or restarts) the server on its port, with its socket in its folder."""
        if not self.running:
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o",
                      f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200", "start")
            self.running = True

    def destroy(self) -> None:
        try:
            self.stop()
        except PostgresUnavailable:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


@cache
def _shared() -> PostgresServer | PostgresUnavailable:
    try:
        return _start_shared()
    except PostgresUnavailable as exc:  # remembered: the next module does not try again
        return exc


def shared_postgres() -> PostgresServer:
    """One server for the whole test session; raises PostgresUnavailable where none can start."""
    server = _shared()
    if isinstance(server, PostgresUnavailable):
        raise server
    return server


def _start_shared() -> PostgresServer:
    server = PostgresServer()
    atexit.register(server.destroy)
    deadline = time.monotonic() + 10
    while True:  # pg_ctl -w returned; the TCP listener answers a moment later at worst
        try:
            server.psql("SELECT 1")
            return server
        except RuntimeError as exc:
            if time.monotonic() > deadline:
                raise PostgresUnavailable(f"the server started but does not answer: {exc}") from None
            time.sleep(0.1)


def postgres_or_skip() -> PostgresServer:
    """The session's server; where none can start the test skips saying why, or fails when
    MOESERVE_REQUIRE_POSTGRES=1 (CI sets it: there the PostgreSQL tests must run)."""
    try:
        return shared_postgres()
    except PostgresUnavailable as exc:
        if os.environ.get("MOESERVE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required (MOESERVE_REQUIRE_POSTGRES=1) but cannot start: {exc}")
        pytest.skip(f"PostgreSQL cannot start here: {exc}")
