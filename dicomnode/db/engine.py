"""Engine and session setup: SQLite in WAL mode by default, any SQLAlchemy URL works.

A SQLite database file is private to the node's user (0600, whatever the umask): it holds patient
identifiers. SQLite gives its -wal and -shm files the database file's permissions.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.models import SCHEMA_VERSION, Base, SchemaInfo


class SchemaVersionError(RuntimeError):
    """The database was written by a different schema version."""


def make_engine(url: str) -> Engine:
    """Create the engine; for SQLite: WAL, FULL sync (acknowledged means durable), busy timeout."""
    parsed = make_url(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    kwargs: dict[str, object] = {"future": True}
    if is_sqlite:
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:"):
            _private_sqlite_file(Path(db))
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    engine = create_engine(url, **kwargs)
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


def init_db(engine: Engine, attempts: int = 10) -> None:
    """Create missing tables and check the schema version.

    Stages started together as separate processes race to create the schema; the loser of a
    race sees "already exists" / a duplicate key and simply tries again.
    """
    for attempt in range(attempts):
        try:
            _create(engine)
            return
        except (OperationalError, IntegrityError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _create(engine: Engine) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        info = s.scalar(select(SchemaInfo))
        if info is None:
            s.add(SchemaInfo(id=1, version=SCHEMA_VERSION))
            s.commit()
        elif info.version != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"database schema version {info.version}, this dicomnode needs {SCHEMA_VERSION}"
            )


def make_sessionmaker(url: str) -> sessionmaker[Session]:
    """Engine + tables + a session factory (expire_on_commit off: rows are read after commit)."""
    engine = make_engine(url)
    init_db(engine)
    return sessionmaker(engine, expire_on_commit=False)
