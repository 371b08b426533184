"""Schema revisions (Alembic, shipped in ``dicomnode/db/migrations``): what a database holds, and
bringing it to the revision this release needs.

What a database can be when a process starts:

- ``empty``: none of dicomnode's tables: created from the models and stamped with the head
  revision (the migrations are checked against the models by the tests, so both give one schema);
- ``legacy``: made by a release from before migrations (``schema_info`` version 1, no
  ``alembic_version``): stamped with the baseline revision, then upgraded;
- ``behind``: an older revision this release knows: upgraded;
- ``current``: the head revision: nothing to do;
- ``newer``: a revision this release does not know (a newer dicomnode wrote it): refused;
- ``foreign``: some of dicomnode's tables without a revision it can recognise: refused.

Upgrades run at start only when allowed (``storage.auto_migrate``; by default on SQLite, where
the database belongs to one node, and not on a shared server, where ``dicomnode db upgrade`` is
run once, deliberately). Creating and upgrading happen under a lock (a PostgreSQL advisory lock;
on SQLite an immediate transaction), so processes that start together do it once; the first
reads happen without one, so a current database costs one query.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, MetaData, create_engine, event, insert, inspect, pool, text

from dicomnode.db.models import LEGACY_GUARD_VERSION, Base, SchemaInfo

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001_baseline"
VERSION_TABLE = "alembic_version"
_PG_LOCK_KEY = 0x64636D6E6F646531  # any constant shared by every dicomnode process
_SQLITE_LOCK_WAIT_MS = 600_000  # a process waits this long for another one's migration


log = logging.getLogger(__name__)


class SchemaError(RuntimeError):
    """This release cannot use the database's schema as it is; the message says what to do."""


@dataclass(frozen=True)
class SchemaState:
    """What a database holds: ``kind`` (see the module docstring), its revision, this release's head."""

    kind: str
    revision: str | None
    head: str

    def describe(self) -> str:
        """One line for ``dicomnode db current`` and for errors."""
        match self.kind:
            case "current":
                return f"schema revision {self.revision} (current)"
            case "empty":
                return f"no dicomnode tables yet (the node creates revision {self.head})"
            case "legacy":
                return f"schema from before migrations (schema_info 1); this release needs {self.head}"
            case "behind":
                return f"schema revision {self.revision}; this release needs {self.head}"
            case "newer":
                return (
                    f"schema revision {self.revision} is newer than this release "
                    f"(it knows revisions up to {self.head})"
                )
        return f"not a dicomnode schema this release recognises ({self.revision or 'no revision'})"


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for the shipped migrations (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("file_template", "%%(rev)s")
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The revision this release's models correspond to."""
    head = _script().get_current_head()
    assert head is not None, "no migrations shipped"
    return head


def known_revisions() -> set[str]:
    return {rev.revision for rev in _script().walk_revisions()}


def inspect_schema(conn: Connection) -> SchemaState:
    """Classify the database behind ``conn`` (reads only)."""
    head = head_revision()
    tables = set(inspect(conn).get_table_names())
    if VERSION_TABLE in tables:
        revisions = [str(r) for r in conn.scalars(text(f"SELECT version_num FROM {VERSION_TABLE}"))]
        if len(revisions) != 1:
            return SchemaState("foreign", ",".join(revisions) or None, head)
        rev = revisions[0]
        if rev == head:
            return SchemaState("current", rev, head)
        return SchemaState("behind" if rev in known_revisions() else "newer", rev, head)
    ours = tables & set(Base.metadata.tables)
    if not ours:
        return SchemaState("empty", None, head)
    if "schema_info" in tables:
        version = conn.scalar(text("SELECT version FROM schema_info WHERE id = 1"))
        if version == 1:
            return SchemaState("legacy", None, head)
        return SchemaState("foreign", f"schema_info version {version}", head)
    return SchemaState("foreign", None, head)


def auto_migrate_default(engine: Engine) -> bool:
    """Upgrade at start unless told otherwise: yes for SQLite, no for a shared database server."""
    return engine.dialect.name == "sqlite"


def ensure_schema(engine: Engine, auto_migrate: bool | None = None) -> SchemaState:
    """Bring the database to the head revision, or raise SchemaError saying what to do.

    A new database is always created. An older schema is upgraded only when ``auto_migrate``
    (None: :func:`auto_migrate_default`). A newer or unrecognised one is always refused.
    """
    allowed = auto_migrate_default(engine) if auto_migrate is None else auto_migrate
    with engine.connect() as conn:
        state = inspect_schema(conn)
    if state.kind == "current":
        return state
    _refuse_unusable(state, allowed)
    with _migration_transaction(engine) as conn:
        state = inspect_schema(conn)  # another process may have done it meanwhile
        _refuse_unusable(state, allowed)
        _bring_to_head(conn, state)
    if state.kind != "empty":
        log.info("database upgraded: %s -> revision %s", state.describe(), state.head)
    return SchemaState("current", state.head, state.head)


def upgrade(engine: Engine) -> tuple[SchemaState, SchemaState]:
    """``dicomnode db upgrade``: (state before, state after); SchemaError when it cannot."""
    with engine.connect() as conn:
        before = inspect_schema(conn)
    if before.kind == "current":
        return before, before
    _refuse_unusable(before, allowed=True)
    with _migration_transaction(engine) as conn:
        before = inspect_schema(conn)
        _refuse_unusable(before, allowed=True)
        _bring_to_head(conn, before)
    return before, SchemaState("current", before.head, before.head)


def current(engine: Engine) -> SchemaState:
    """``dicomnode db current``: the database's state, changing nothing."""
    with engine.connect() as conn:
        return inspect_schema(conn)


def _refuse_unusable(state: SchemaState, allowed: bool) -> None:
    if state.kind == "newer":
        raise SchemaError(
            f"the database's {state.describe()}. Run the dicomnode release that upgraded it "
            "(or a newer one), or restore the backup taken before that upgrade."
        )
    if state.kind == "foreign":
        raise SchemaError(
            f"the database holds {state.describe()}. Point storage.database_url at a dicomnode "
            "database or at an empty one."
        )
    if state.kind in ("legacy", "behind") and not allowed:
        raise SchemaError(
            f"the database holds a {state.describe()}. Back it up, then run `dicomnode db upgrade` "
            "(or set storage.auto_migrate: true to upgrade at start)."
        )


def _bring_to_head(conn: Connection, state: SchemaState) -> None:
    cfg = alembic_config(conn)
    if state.kind == "empty":
        Base.metadata.create_all(conn)
        conn.execute(insert(SchemaInfo).values(id=1, version=LEGACY_GUARD_VERSION))
        command.stamp(cfg, "head")
        return
    if state.kind == "legacy":
        command.stamp(cfg, BASELINE)
    if state.kind in ("legacy", "behind"):
        command.upgrade(cfg, "head")
    if conn.dialect.name == "sqlite":
        broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise SchemaError(f"the upgrade would break {len(broken)} foreign keys; nothing was changed")


@contextmanager
def _migration_transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction that holds the schema lock; committed when the block ends without error."""
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        migration_engine = _sqlite_migration_engine(engine)
        try:
            with migration_engine.begin() as conn:
                yield conn
        finally:
            migration_engine.dispose()
        return
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        yield conn


def _sqlite_migration_engine(engine: Engine) -> Engine:
    """A SQLite engine whose transactions are real (BEGIN IMMEDIATE: the lock), DDL included.

    Python's sqlite3 module otherwise commits around DDL on its own. Foreign keys stay off while
    tables are rebuilt (SQLite cannot alter a column; Alembic's batch mode copies the table) and
    are checked before the commit instead.
    """
    mig = create_engine(
        engine.url,
        poolclass=pool.NullPool,
        connect_args={"timeout": _SQLITE_LOCK_WAIT_MS / 1000, "check_same_thread": False},
    )

    @event.listens_for(mig, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={_SQLITE_LOCK_WAIT_MS}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(mig, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return mig


def schema_differences(conn: Connection) -> list[Any]:
    """Alembic's comparison of the database with the models (empty when they agree)."""
    ctx = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(
        compare_metadata(ctx, Base.metadata)  # type: ignore[arg-type]
    )


def make_revision(message: str, directory: Path | None = None, metadata: MetaData | None = None) -> Path:
    """Write the next revision, autogenerated from the models vs. the migrations (for developers).

    The migrations run on a scratch SQLite database, Alembic compares it with the models
    (``metadata``, default: dicomnode's) and writes the operations that are missing into
    ``directory`` (default: the shipped ``versions/``); review the file before committing it.
    """
    import tempfile  # noqa: PLC0415

    # Alembic's version table holds 32 characters: "NNNN_" and at most 27 of the message.
    slug = re.sub(r"[^a-z0-9]+", "_", message.lower()).strip("_")[:27].rstrip("_") or "revision"
    number = 1 + max(int(r.split("_", 1)[0]) for r in known_revisions() if r[:4].isdigit())
    rev_id = f"{number:04d}_{slug}"
    with tempfile.TemporaryDirectory() as tmp:
        scratch = create_engine(f"sqlite:///{tmp}/scratch.db", poolclass=pool.NullPool)
        try:
            with scratch.begin() as conn:
                cfg = alembic_config(conn)
                if metadata is not None:
                    cfg.attributes["target_metadata"] = metadata
                if directory is not None:
                    locations = [str(MIGRATIONS / "versions"), str(directory)]
                    cfg.set_main_option("version_locations", os.pathsep.join(locations))
                command.upgrade(cfg, "head")
                script = command.revision(
                    cfg,
                    message=message,
                    autogenerate=True,
                    rev_id=rev_id,
                    version_path=str(directory) if directory is not None else None,
                )
        finally:
            scratch.dispose()
    _script.cache_clear()
    assert script is not None and not isinstance(script, list)
    return Path(script.path)
