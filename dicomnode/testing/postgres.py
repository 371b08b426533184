"""A real PostgreSQL for tests and benchmarks, from Debian's ``postgresql`` package.

``initdb`` makes a cluster in a fresh temporary folder, ``pg_ctl`` starts it on a free loopback
port with its unix socket inside that folder, and ``stop()`` (also run at interpreter exit) stops
it and removes the folder. PostgreSQL refuses to run as root: when the tests run as root (CI),
the cluster runs as the ``postgres`` user and its folder belongs to that user. Authentication is
``trust`` on 127.0.0.1 only; every test gets its own database from ``create_database()``.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomnode.testing.peers import PeerError, free_port

PG_BIN = Path(os.environ.get("DICOMNODE_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
SERVICE_USER = "postgres"
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_LIVE: set[PostgresServer] = set()

__all__ = ["PG_BIN", "PostgresServer", "have_postgres", "postgres_missing", "start_postgres"]


def postgres_missing() -> str | None:
    """Why a test PostgreSQL cannot start here (None when it can)."""
    for name in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / name).is_file():
            return f"PostgreSQL binaries not found in {PG_BIN} (install Debian's postgresql package)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVICE_USER)
        except KeyError:
            return f"running as root and there is no {SERVICE_USER!r} user to run PostgreSQL as"
    return None


def have_postgres() -> bool:
    """True when a test PostgreSQL can be started."""
    return postgres_missing() is None


def _demote() -> dict[str, Any]:
    """Popen arguments that run a child as the ``postgres`` user when we are root."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam(SERVICE_USER)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    if os.geteuid() == 0:
        env["HOME"] = pwd.getpwnam(SERVICE_USER).pw_dir
    return env


@dataclass(eq=False)
class PostgresServer:
    """One throw-away PostgreSQL cluster.

    ``durable=False`` (tests) switches off fsync and synchronous commit: a crash of the test
    machine loses the cluster, which is thrown away anyway. Benchmarks use ``durable=True``, the
    settings a site runs with, so that they compare like with like against SQLite's FULL sync.
    """

    durable: bool = False
    port: int = 0
    workdir: Path | None = None
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "postgres.log"

    def _run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_server_env(),
            cwd=self.workdir,
            **_demote(),
        )

    def _options(self) -> str:
        assert self.workdir is not None
        opts = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.workdir),
            "max_connections": "300",
            "shared_buffers": "128MB" if self.durable else "32MB",
        }
        if not self.durable:
            opts.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        opts.update(self.settings)
        return " ".join([f"-p {self.port}"] + [f"-c {k}={v}" for k, v in opts.items()])

    def start(self, timeout: float = 60.0) -> PostgresServer:
        """initdb + pg_ctl start on a free port; raises PeerError with the log tail on failure."""
        missing = postgres_missing()
        if missing:
            raise PeerError(missing)
        # as root, in /tmp: the postgres user must reach it (TMPDIR may be a folder only root can enter)
        parent = "/tmp" if os.geteuid() == 0 else None
        self.workdir = Path(tempfile.mkdtemp(prefix="dicomnode-pg-", dir=parent))
        if os.geteuid() == 0:
            pw = pwd.getpwnam(SERVICE_USER)
            os.chown(self.workdir, pw.pw_uid, pw.pw_gid)
        init = self._run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SERVICE_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            timeout=timeout,
        )
        if init.returncode != 0:
            self._remove()
            raise PeerError(f"initdb failed:\n{init.stdout[-2000:]}{init.stderr[-2000:]}")
        pick = self.port == 0
        for attempt in range(3):
            if pick:
                self.port = free_port()
            started = self._run(
                [
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_path),
                    "-o",
                    self._options(),
                    "-w",
                    "-t",
                    str(int(timeout)),
                    "start",
                ],
                timeout=timeout + 10,
            )
            if started.returncode == 0:
                _LIVE.add(self)
                return self
            if not pick or attempt == 2:
                break
        tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
        self._remove()
        raise PeerError(f"PostgreSQL did not start on port {self.port}:\n{started.stderr}\n{tail}")

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3) of ``database`` over TCP on loopback."""
        return f"postgresql+psycopg://{SERVICE_USER}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg  # noqa: PLC0415

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=SERVICE_USER, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self, name: str | None = None, template: str | None = None) -> str:
        """A new database, empty or a copy of ``template`` (which nobody may be connected to)."""
        name = name or f"t_{os.getpid()}_{time.monotonic_ns()}"
        for value in (name, template):
            if value is not None and not _NAME.match(value):
                raise ValueError(f"database name must match {_NAME.pattern}: {value!r}")
        self._admin(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    def reset_database(self, name: str) -> None:
        """Empty ``name`` again (its ``public`` schema recreated), ending its other sessions first.

        Much cheaper than a new database (which costs a checkpoint-sized copy of the template).
        """
        if not _NAME.match(name):
            raise ValueError(f"not a database name: {name!r}")
        import psycopg  # noqa: PLC0415

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=SERVICE_USER, dbname=name, autocommit=True
        ) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("CREATE SCHEMA public")

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending the sessions still connected to it."""
        if not _NAME.match(name):
            raise ValueError(f"not a database name: {name!r}")
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its folder; idempotent."""
        if self.workdir is None:
            return
        if (self.data_dir / "postmaster.pid").exists():
            try:
                self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"], 60)
            except subprocess.TimeoutExpired:
                self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "stop"], 30)
        _LIVE.discard(self)
        self._remove()

    def _remove(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_postgres(durable: bool = False, timeout: float = 60.0) -> PostgresServer:
    """Start a throw-away PostgreSQL on a free loopback port."""
    return PostgresServer(durable=durable).start(timeout=timeout)


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()
