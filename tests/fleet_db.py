"""A real PostgreSQL 15 server for the control plane's tests, and a fresh, empty database per test on SQLite and on
PostgreSQL.

Import the fixtures in a test module with ``from fleet_db import fleet_db_url, postgres  # noqa: F401``; a test
that takes ``fleet_db_url`` runs once per database. ``PostgresServer`` is usable without pytest (bench scripts):

    with PostgresServer() as pg:
        url = pg.create_database("bench")   # postgresql+asyncpg://postgres@127.0.0.1:PORT/bench

The cluster lives in a private temporary folder, listens on loopback only, trusts local connections and runs with
``fsync=off``: it is a test server, never a place for data. ``initdb`` refuses to run as root, so as root the
folder belongs to the ``postgres`` user and the server's commands run through ``runuser``.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import free_port

PG_BIN = Path(os.environ.get("SLMOPS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresServer:
    """One throw-away PostgreSQL cluster: ``start()``, ``url(db)``, ``create_database(name)``, ``stop()``."""

    def __init__(self, bindir: Path = PG_BIN, user: str = "postgres"):
        self.bindir = Path(bindir)
        self.user = user
        self.port = 0
        self.root: Path | None = None
        self.started_s = 0.0  # how long start() took

    # --- life cycle ---------------------------------------------------------------------------------------------
    def start(self) -> PostgresServer:
        missing = [b for b in ("initdb", "pg_ctl", "psql") if not (self.bindir / b).exists()]
        if missing:
            raise RuntimeError(f"PostgreSQL 15 binaries not found in {self.bindir} ({', '.join(missing)} missing): "
                               "install postgresql-15 (apt-get install -y postgresql-15) or set SLMOPS_TEST_PG_BIN")
        t0 = time.monotonic()
        self.root = Path(tempfile.mkdtemp(prefix="slmops-pg-"))
        (self.root / "sock").mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.root, self.user)
            shutil.chown(self.root / "sock", self.user)
        atexit.register(self.stop)
        try:
            self._as_owner("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                           "--no-locale", "--no-sync", "--no-instructions")
            self._start_on_free_port()
        except BaseException:
            self.stop()
            raise
        self.started_s = time.monotonic() - t0
        return self

    def _start_on_free_port(self, tries: int = 3) -> None:
        """A port found free may be taken before the server binds it: try another."""
        for attempt in range(tries):
            self.port = free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root / 'sock'} -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
            try:
                self._as_owner("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60",
                               "-o", opts, "start")
                return
            except RuntimeError:
                if attempt == tries - 1:
                    raise

    def stop(self) -> None:
        if self.root is None:
            return
        root, self.root = self.root, None
        if (root / "data" / "postmaster.pid").exists():
            subprocess.run(self._owner_cmd("pg_ctl", "-D", str(root / "data"), "-m", "immediate", "-w", "stop"),
                           capture_output=True, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- databases ----------------------------------------------------------------------------------------------
    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        self.sql(f'CREATE DATABASE "{_checked(name)}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop it even when a test left connections open."""
        self.sql(f'DROP DATABASE IF EXISTS "{_checked(name)}" WITH (FORCE)')

    def sql(self, statement: str, dbname: str = "postgres") -> str:
        """Run one statement through psql on the maintenance connection; its output."""
        cmd = [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
               "-p", str(self.port), "-U", "postgres", "-d", dbname, "-c", statement]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode:
            raise RuntimeError(f"psql failed ({statement!r}): {done.stderr.strip()}")
        return done.stdout

    # --- helpers ------------------------------------------------------------------------------------------------
    @property
    def data(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    def _owner_cmd(self, binary: str, *args: str) -> list[str]:
        cmd = [str(self.bindir / binary), *args]
        return ["runuser", "-u", self.user, "--", *cmd] if os.geteuid() == 0 else cmd

    def _as_owner(self, binary: str, *args: str) -> None:
        done = subprocess.run(self._owner_cmd(binary, *args), capture_output=True, text=True, timeout=120,
                              cwd=self.root, check=False)
        if done.returncode:
            log = self.root / "server.log" if self.root else None
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{binary} failed: {done.stderr.strip() or done.stdout.strip()}\n{tail}")


def _checked(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"not a plain database name: {name!r}")
    return name


_shared: list[PostgresServer] = []  # the process's one server, however many modules import the fixture


@pytest.fixture(scope="session")
def postgres():  # type: ignore[no-untyped-def]
    """The session's PostgreSQL server. Missing binaries fail the tests that need it (CI installs them).

    Each test module that imports this fixture gets its own copy of it from pytest, so the server itself is kept
    here: one per test process. All copies end with the session; the first to end stops it."""
    if not _shared or _shared[0].root is None:
        server = PostgresServer()
        try:
            server.start()
            failure = ""
        except RuntimeError as err:
            failure = str(err)
        if failure:
            pytest.fail(failure, pytrace=False)
        _shared[:] = [server]
    yield _shared[0]
    _shared[0].stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet_db_url(request, tmp_path):  # type: ignore[no-untyped-def]
    """A fresh, empty database: a file in tmp_path, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'fleet.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    name = f"fleet_{uuid.uuid4().hex[:16]}"
    url = server.create_database(name)
    yield url
    server.drop_database(name)
