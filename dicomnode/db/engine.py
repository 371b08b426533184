"""Engine and session setup: SQLite in WAL mode by default, PostgreSQL (psycopg 3) for scale-out.

Any SQLAlchemy URL works; these two are tested. The schema is brought to this release's
revision (or refused) by ``dicomnode.db.schema`` before the first session.

A SQLite database file is private to the node's user (0600, whatever the umask): it holds patient
identifiers. SQLite gives its -wal and -shm files the database file's permissions.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.schema import SchemaState, ensure_schema

if TYPE_CHECKING:
    from dicomnode.config import StorageConfig

DEFAULT_POOL_SIZE = 5


def make_engine(url: str, pool_size: int = DEFAULT_POOL_SIZE) -> Engine:
    """Create the engine.

    SQLite: WAL, FULL sync (acknowledged means durable), busy timeout, foreign keys.
    A server database: a pool of ``pool_size`` connections per process (as many again at peak:
    every association thread, stage worker and HTTP request may hold one), checked before use so
    that a restarted server costs one failed ping instead of a failed transaction.
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):  # the driver that is installed: psycopg 3
        parsed = parsed.set(drivername="postgresql+psycopg")
    is_sqlite = parsed.get_backend_name() == "sqlite"
    kwargs: dict[str, object] = {"future": True}
    if is_sqlite:
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:"):
            _private_sqlite_file(Path(db))
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    else:
        kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, pool_recycle=3600)
        if parsed.get_backend_name() == "postgresql":
            kwargs["connect_args"] = {"application_name": "dicomnode"}
    engine = create_engine(parsed, **kwargs)
    if is_sqlite:

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


def _private_sqlite_file(db: Path) -> None:
    """Create the database file 0600 before SQLite does (its -wal/-shm follow it); tighten old ones."""
    if not db.parent.exists():
        db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}-journal")):
        try:
            if path.stat().st_mode & 0o077 and path.stat().st_uid == os.geteuid():
                os.chmod(path, 0o600)
        except OSError:
            continue


def init_db(engine: Engine, auto_migrate: bool | None = None, attempts: int = 10) -> SchemaState:
    """Create, recognise or upgrade the schema (``dicomnode.db.schema.ensure_schema``).

    A database that cannot be reached yet (a server still starting, a SQLite lock held past
    its timeout) is tried again a few times; a schema it cannot use raises SchemaError at once.
    """
    for attempt in range(attempts):
        try:
            return ensure_schema(engine, auto_migrate)
        except OperationalError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def make_sessionmaker(
    url: str, *, auto_migrate: bool | None = None, pool_size: int = DEFAULT_POOL_SIZE
) -> sessionmaker[Session]:
    """Engine + schema + a session factory (expire_on_commit off: rows are read after commit)."""
    engine = make_engine(url, pool_size=pool_size)
    init_db(engine, auto_migrate)
    return sessionmaker(engine, expire_on_commit=False)


def storage_sessionmaker(storage: StorageConfig) -> sessionmaker[Session]:
    """``make_sessionmaker`` with the ``storage.*`` settings (URL, auto_migrate, pool_size)."""
    return make_sessionmaker(
        storage.database_url, auto_migrate=storage.auto_migrate, pool_size=storage.pool_size
    )
