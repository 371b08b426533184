"""The receive stage's writes to the database: instance rows, series upserts, associations, events.

One short transaction per instance: the Instance row and its Series upsert commit together,
so an acknowledged instance is always indexed and always counted in its series.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Dialect, Engine, bindparam, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db import Association, Event, Instance, QuarantinedInstance, Series, record, utcnow
from dicomnode.receive.header import InstanceHeader

STAGE = "receive"

# Built once: executing a constant statement with a parameter dict skips SQLAlchemy's per-call
# statement construction and cache-key generation (most of the Python cost per instance).
_SELECT_PATH = select(Instance.path).where(Instance.sop_instance_uid == bindparam("uid"))
_INSERT_INSTANCE = insert(Instance)
_SELECT_SERIES = (
    select(Series.id, Series.state, Series.generation)
    .where(Series.series_instance_uid == bindparam("uid"))
    .with_for_update()
)
_INSERT_SERIES = insert(Series)
_INSERT_EVENT = insert(Event)
_COUNT_SERIES = (
    update(Series)
    .where(Series.id == bindparam("sid"))
    .values(n_instances=Series.n_instances + 1, last_received_at=bindparam("now"))
)
_REOPEN_SERIES = (
    update(Series)
    .where(Series.id == bindparam("sid"))
    .values(
        n_instances=Series.n_instances + 1,
        last_received_at=bindparam("now"),
        state="receiving",
        generation=bindparam("gen"),
        completed_at=None,
    )
)


class InstanceIndex:
    """Database access for the receive stage (thread safe).

    SQLite has one writer anyway: every write of this process goes through one lock and one
    connection, which also makes the series upsert race-free between its associations. The
    instances that several associations index at the same moment share one transaction, so one
    commit (one fsync of the WAL) acknowledges them all (:class:`_GroupCommit`). A server
    database (PostgreSQL) takes the associations' transactions side by side, on a few connections
    (its row lock on the series and the unique SOP Instance UID keep them right, as between
    processes), so one association's commit does not wait for another's.
    """

    def __init__(self, sessionmaker_: sessionmaker[Session], receiver: str | None = None) -> None:
        self._sessionmaker = sessionmaker_
        self.receiver = receiver  # "<node_id>:<pid>" recorded on the associations this process takes
        self._engine: Engine = sessionmaker_.kw["bind"]
        serial = self._engine.dialect.name == "sqlite"
        self._write_lock: AbstractContextManager[object] = threading.Lock() if serial else nullcontext()
        # The per-instance path uses long-lived Core connections (no ORM unit of work, no pool
        # checkout): it is most of the Python cost of an instance otherwise.
        self._hot = _HotConnections(self._engine, 1 if serial else _server_connections(self._engine))
        # The duplicate check only reads: on SQLite (WAL) it runs beside the writer on connections of
        # its own instead of queueing for the write lock behind other associations' commits.
        self._reads = _HotConnections(self._engine, 2) if serial else self._hot
        dialect = self._engine.dialect
        self._select_path = _DriverStatement(_SELECT_PATH, dialect)
        self._insert_instance = _DriverStatement(_INSERT_INSTANCE, dialect, list(_INSTANCE_COLUMNS))
        self._select_series = _DriverStatement(_SELECT_SERIES, dialect)
        self._count_series = _DriverStatement(_COUNT_SERIES, dialect)
        self._integrity_error: type[Exception] = dialect.loaded_dbapi.IntegrityError
        # SQLite: one writer, one fsync per commit. Instances that arrive on several associations at
        # once share a transaction (group commit): each caller still returns only after the commit
        # that holds its row.
        self._group = _GroupCommit(self._commit_batch) if serial else None

    def close(self) -> None:
        """Return the hot-path connections to the pool."""
        with self._write_lock:
            self._hot.close()
        self._reads.close()

    def known_path(self, sop_instance_uid: str) -> str | None:
        """Spool path of an already indexed instance, or None when it is new.

        Asked once per instance: the query, compiled once, runs on the driver's own connection
        (see :class:`_DriverStatement`)."""
        with self._reads.checkout() as conn:
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            try:
                row = self._select_path.fetchone(dbapi, {"uid": sop_instance_uid})
                dbapi.rollback()
            except Exception:
                conn.invalidate()  # the driver's error says nothing SQLAlchemy can judge: start afresh
                raise
            return None if row is None else str(row[0])

    def add_instance(
        self,
        header: InstanceHeader,
        *,
        relpath: str,
        size: int,
        transfer_syntax_uid: str,
        association_id: int | None,
    ) -> bool:
        """Insert the instance and upsert its series in one transaction; False if already indexed."""
        for attempt in (1, 2):
            try:
                return self._add_instance(header, relpath, size, transfer_syntax_uid, association_id)
            except _SeriesRace:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _add_instance(
        self,
        h: InstanceHeader,
        relpath: str,
        size: int,
        transfer_syntax_uid: str,
        association_id: int | None,
    ) -> bool:
        now = utcnow()
        row = _instance_row(h, relpath, size, transfer_syntax_uid, association_id, now)
        if self._group is not None:  # the common case, batched with other associations' rows
            counted = self._group.submit(row)
            if counted is not None:
                return counted
        with self._write_lock, self._hot.checkout() as conn:
            if self._group is None:
                counted = self._count_in_open_series(conn, row, now)
                if counted is not None:
                    return counted
            added = self._index_in(conn, h, row, now)
            if added:
                conn.commit()
            else:
                conn.rollback()
            return added

    def _count_in_open_series(self, conn: Connection, row: dict[str, object], now: datetime) -> bool | None:
        """The common case on the driver's connection: insert the instance and count it in its series
        when that series exists and is still receiving; commits and returns True (False: the SOP
        Instance UID is already indexed). None, with nothing written, when the series is new or
        complete: the caller then takes the general path (:meth:`_index_in`)."""
        with _driver_connection(conn) as dbapi:
            try:
                self._insert_instance.execute(dbapi, row)
            except self._integrity_error:
                dbapi.rollback()
                return False
            series = self._select_series.fetchone(dbapi, {"uid": row["series_instance_uid"]})
            if series is None or series[1] == "complete":
                dbapi.rollback()
                return None
            self._count_series.execute(dbapi, {"sid": series[0], "now": now})
            dbapi.commit()
            return True

    def _commit_batch(self, rows: list[dict[str, object]]) -> list[bool | None]:
        """Index the instances of open series in one transaction (SQLite's group commit).

        Per row: True (inserted and counted), False (its SOP Instance UID is already indexed) or
        None (its series is new or complete: nothing written, the caller takes the general path).
        A failed statement only ends its own row (SQLite undoes just that statement)."""
        results: list[bool | None] = []
        with self._write_lock, self._hot.checkout() as conn, _driver_connection(conn) as dbapi:
            for row in rows:
                series = self._select_series.fetchone(dbapi, {"uid": row["series_instance_uid"]})
                if series is None or series[1] == "complete":
                    results.append(None)
                    continue
                try:
                    self._insert_instance.execute(dbapi, row)
                except self._integrity_error:
                    results.append(False)
                    continue
                self._count_series.execute(dbapi, {"sid": series[0], "now": row["received_at"]})
                results.append(True)
            dbapi.commit()
        return results

    @staticmethod
    def _index_in(conn: Connection, h: InstanceHeader, values: dict[str, object], now: datetime) -> bool:
        try:
            conn.execute(_INSERT_INSTANCE, values)
        except IntegrityError:
            return False
        row = conn.execute(_SELECT_SERIES, {"uid": h.series_instance_uid}).first()
        if row is None:
            try:
                conn.execute(_INSERT_SERIES, _new_series(h, now))
            except IntegrityError:
                raise _SeriesRace() from None
            reason = "first instance received"
            conn.execute(_INSERT_EVENT, _event(h.series_instance_uid, None, "receiving", reason, now))
        elif row.state == "complete":
            generation = row.generation + 1
            conn.execute(_REOPEN_SERIES, {"sid": row.id, "now": now, "gen": generation})
            reason = f"new instance after completion (generation {generation})"
            conn.execute(_INSERT_EVENT, _event(h.series_instance_uid, "complete", "receiving", reason, now))
        else:
            conn.execute(_COUNT_SERIES, {"sid": row.id, "now": now})
        return True

    def quarantined_paths(self, sop_instance_uid: str) -> list[str]:
        """Spool paths of the data sets already quarantined under this SOP Instance UID."""
        with self._write_lock, self._sessionmaker() as s:
            return list(
                s.scalars(
                    select(QuarantinedInstance.path)
                    .where(QuarantinedInstance.sop_instance_uid == sop_instance_uid)
                    .order_by(QuarantinedInstance.id)
                )
            )

    def add_quarantined(
        self,
        header: InstanceHeader,
        *,
        relpath: str,
        size: int,
        transfer_syntax_uid: str,
        calling_aet: str,
        peer_host: str,
        association_id: int | None,
        reason: str,
    ) -> None:
        """Record a quarantined data set and its audit event in one transaction."""
        with self._write_lock, self._sessionmaker() as s:
            s.add(
                QuarantinedInstance(
                    sop_instance_uid=header.sop_instance_uid,
                    sop_class_uid=header.sop_class_uid,
                    study_instance_uid=header.study_instance_uid,
                    series_instance_uid=header.series_instance_uid,
                    transfer_syntax_uid=transfer_syntax_uid,
                    path=relpath,
                    size_bytes=size,
                    calling_aet=calling_aet,
                    peer_host=peer_host,
                    association_id=association_id,
                    reason=reason,
                )
            )
            record(s, STAGE, "instance", header.sop_instance_uid, "stored", "quarantined", reason)
            s.commit()

    def event(self, entity: str, entity_id: object, old: str | None, new: str | None, reason: str) -> None:
        """Write one audit event in its own transaction."""
        with self._write_lock, self._sessionmaker() as s:
            record(s, STAGE, entity, entity_id, old, new, reason)
            s.commit()

    def open_association(
        self,
        calling: str,
        called: str,
        host: str,
        port: int,
        lease_owner: str | None = None,
        lease_expires_at: datetime | None = None,
        note: str | None = None,
    ) -> int:
        """Insert an accepted association (state open, leased to this process) with its event;
        returns its id."""
        with self._write_lock, self._sessionmaker() as s:
            row = Association(
                direction="in",
                calling_aet=calling,
                called_aet=called,
                peer_host=host,
                peer_port=port,
                state="open",
                receiver=self.receiver,
                lease_owner=lease_owner,
                lease_expires_at=lease_expires_at,
            )
            s.add(row)
            s.flush()
            reason = note or f"accepted from {calling}@{host}:{port}"
            record(s, STAGE, "association", row.id, None, "open", reason)
            s.commit()
            return row.id

    def reject_association(self, calling: str, called: str, host: str, port: int, reason: str) -> int:
        """Insert a rejected association with its event; returns its id."""
        with self._write_lock, self._sessionmaker() as s:
            row = Association(
                direction="in",
                calling_aet=calling,
                called_aet=called,
                peer_host=host,
                peer_port=port,
                state="rejected",
                reason=reason,
                ended_at=utcnow(),
                receiver=self.receiver,
            )
            s.add(row)
            s.flush()
            record(s, STAGE, "association", row.id, None, "rejected", reason)
            s.commit()
            return row.id

    def close_association(self, assoc_id: int, state: str, n_stored: int, n_failed: int, reason: str) -> None:
        """Move an open association to released/aborted with its final counts (unless another
        process already closed it because this one's lease had expired)."""
        with self._write_lock, self._sessionmaker() as s:
            res = s.execute(
                update(Association)
                .where(Association.id == assoc_id, Association.state == "open")
                .values(
                    state=state,
                    n_stored=n_stored,
                    n_failed=n_failed,
                    ended_at=utcnow(),
                    reason=None if state == "released" else reason,
                    lease_expires_at=None,
                )
            )
            if res.rowcount == 1:  # type: ignore[attr-defined]
                record(s, STAGE, "association", assoc_id, "open", state, reason)
            s.commit()


_INSTANCE_COLUMNS = (
    "sop_instance_uid",
    "sop_class_uid",
    "series_instance_uid",
    "study_instance_uid",
    "patient_id",
    "issuer_of_patient_id",
    "modality",
    "frame_of_reference_uid",
    "instance_number",
    "image_position",
    "image_orientation",
    "pixel_spacing",
    "slice_thickness",
    "rows",
    "columns",
    "number_of_frames",
    "transfer_syntax_uid",
    "path",
    "size_bytes",
    "association_id",
    "received_at",
)


def _instance_row(
    h: InstanceHeader,
    relpath: str,
    size: int,
    transfer_syntax_uid: str,
    association_id: int | None,
    now: datetime,
) -> dict[str, object]:
    """Column values of an instance row (the keys of ``_INSTANCE_COLUMNS``)."""
    return {
        "sop_instance_uid": h.sop_instance_uid,
        "sop_class_uid": h.sop_class_uid,
        "series_instance_uid": h.series_instance_uid,
        "study_instance_uid": h.study_instance_uid,
        "patient_id": h.patient_id,
        "issuer_of_patient_id": h.issuer_of_patient_id,
        "modality": h.modality,
        "frame_of_reference_uid": h.frame_of_reference_uid,
        "instance_number": h.instance_number,
        "image_position": h.image_position,
        "image_orientation": h.image_orientation,
        "pixel_spacing": h.pixel_spacing,
        "slice_thickness": h.slice_thickness,
        "rows": h.rows,
        "columns": h.columns,
        "number_of_frames": h.number_of_frames,
        "transfer_syntax_uid": transfer_syntax_uid,
        "path": relpath,
        "size_bytes": size,
        "association_id": association_id,
        "received_at": now,
    }


class _DriverStatement:
    """A statement compiled once for a dialect and run on the driver's connection, with the bind
    conversions SQLAlchemy would apply (e.g. datetimes as SQLite text): most of what SQLAlchemy
    spends per execution is in building the call, which a per-instance statement need not repeat."""

    def __init__(self, statement: Any, dialect: Dialect, column_keys: list[str] | None = None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=column_keys)
        self.sql = str(compiled)
        self._order = list(compiled.positiontup or []) if compiled.positional else None
        # Values the statement carries itself (the 1 of ``n_instances + 1``).
        self._fixed = {name: bind.value for name, bind in compiled.binds.items() if bind.value is not None}
        self._convert = {
            name: proc
            for name, bind in compiled.binds.items()
            if (proc := bind.type._cached_bind_processor(dialect)) is not None
        }

    def _params(self, values: dict[str, object]) -> Any:
        if self._fixed:
            values = {**self._fixed, **values}
        if self._convert:
            values = dict(values)
            for name, convert in self._convert.items():
                if values.get(name) is not None:
                    values[name] = convert(values[name])
        if self._order is None:
            return values
        return tuple(values[name] for name in self._order)

    def execute(self, dbapi: Any, values: dict[str, object]) -> None:
        cursor = dbapi.cursor()
        try:
            cursor.execute(self.sql, self._params(values))
        finally:
            cursor.close()

    def fetchone(self, dbapi: Any, values: dict[str, object]) -> Any:
        cursor = dbapi.cursor()
        try:
            cursor.execute(self.sql, self._params(values))
            return cursor.fetchone()
        finally:
            cursor.close()


def _server_connections(engine: Engine) -> int:
    """Hot-path connections on a server database: most of the engine's pool, at most 4."""
    size = getattr(engine.pool, "size", None)
    return max(1, min(4, (size() if callable(size) else 5) - 1))


class _HotConnections:
    """Up to ``size`` long-lived connections, one per concurrent caller; broken ones are dropped."""

    def __init__(self, engine: Engine, size: int) -> None:
        self._engine = engine
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[Connection] = []
        self._lock = threading.Lock()

    @contextmanager
    def checkout(self) -> Iterator[Connection]:
        """A connection for one transaction; rolled back (and dropped if broken) on an error."""
        with self._slots:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed or conn.invalidated:
                conn = self._engine.connect()
            try:
                yield conn
            except BaseException as exc:
                if self._rolled_back(conn, exc):
                    with self._lock:
                        self._idle.append(conn)
                raise
            with self._lock:
                self._idle.append(conn)

    @staticmethod
    def _rolled_back(conn: Connection, exc: BaseException) -> bool:
        """Roll back after an error; False when the connection is broken and must not be reused."""
        try:
            conn.rollback()
        except Exception:
            return False
        return not (isinstance(exc, DBAPIError) and exc.connection_invalidated)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


@contextmanager
def _driver_connection(conn: Connection) -> Iterator[Any]:
    """The driver's own connection under ``conn``; any error rolls it back and invalidates ``conn``
    (the driver's error says nothing SQLAlchemy can judge: the pool starts afresh)."""
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    try:
        yield dbapi
    except BaseException:
        try:
            dbapi.rollback()
        except Exception:
            pass
        conn.invalidate()
        raise


class _GroupCommit:
    """Leader/follower batching: the first caller commits what every caller queued meanwhile."""

    def __init__(self, commit: Callable[[list[dict[str, object]]], list[bool | None]]) -> None:
        self._commit = commit
        self._cond = threading.Condition()
        self._queued: list[_Pending] = []
        self._leading = False

    def submit(self, row: dict[str, object]) -> bool | None:
        """The row's result once the transaction holding it committed (see ``commit``'s results)."""
        mine = _Pending(row)
        with self._cond:
            self._queued.append(mine)
            while not mine.done:
                if self._leading:
                    self._cond.wait()
                    continue
                self._leading = True
                batch, self._queued = self._queued, []
                self._cond.release()
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._leading = False
                    self._cond.notify_all()
        if mine.error is not None:
            raise mine.error
        return mine.result

    def _run(self, batch: list[_Pending]) -> None:
        try:
            results = self._commit([p.row for p in batch])
        except BaseException as exc:
            for p in batch:
                p.error, p.done = exc, True
            return
        for p, result in zip(batch, results, strict=True):
            p.result, p.done = result, True


class _Pending:
    __slots__ = ("done", "error", "result", "row")

    def __init__(self, row: dict[str, object]) -> None:
        self.row = row
        self.done = False
        self.result: bool | None = None
        self.error: BaseException | None = None


class _SeriesRace(Exception):
    """Another process inserted the same series concurrently; the transaction is retried."""


def _event(
    series_uid: str, old: str | None, new: str | None, reason: str, now: datetime
) -> dict[str, object]:
    """Column values of a series audit event (the same row ``record`` writes, on the Core path)."""
    return {
        "at": now,
        "stage": STAGE,
        "entity": "series",
        "entity_id": series_uid,
        "old_state": old,
        "new_state": new,
        "reason": reason,
    }


def _new_series(h: InstanceHeader, now: datetime) -> dict[str, object]:
    return {
        "series_instance_uid": h.series_instance_uid,
        "study_instance_uid": h.study_instance_uid,
        "patient_key": h.patient_key,
        "patient_id": h.patient_id,
        "issuer_of_patient_id": h.issuer_of_patient_id,
        "patient_name": h.patient_name,
        "modality": h.modality,
        "series_description": h.series_description,
        "protocol_name": h.protocol_name,
        "sequence_name": h.sequence_name,
        "body_part": h.body_part,
        "acquisition_type": h.acquisition_type,
        "image_type": h.image_type,
        "frame_of_reference_uid": h.frame_of_reference_uid,
        "study_datetime": h.study_datetime,
        "series_number": h.series_number,
        "n_instances": 1,
        "generation": 1,
        "state": "receiving",
        "first_received_at": now,
        "last_received_at": now,
    }
