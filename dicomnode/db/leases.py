"""Leases: which worker holds a job, a delivery or an open association, and until when.

A claim writes the claimant's worker id (``lease_owner``) and an expiry (``lease_expires_at``) in
the same conditional UPDATE that takes the row, so two workers never both win it. The worker's
:class:`WorkerLeases` renews the expiry of every row it holds in a background thread, however long
the work takes (a slow fusion on a CPU keeps its job). A row whose lease expired belongs to nobody:
any live worker, on any host, takes it, and the audit says whose lease expired. Liveness is judged
only by lease expiry, never by process ids or host names.

Every claim's SQL lives in this module. The conditional UPDATE decides every claim, on every
backend. On PostgreSQL the candidate queries (``_job_candidates``, ``_delivery_candidates``) are
``SELECT ... FOR UPDATE SKIP LOCKED``: a worker locks the rows it is about to take and the others
skip them for the next ones instead of queueing behind its UPDATE (workers on several hosts take
disjoint work at once). On SQLite, which has one writer, those queries are plain and the
conditional UPDATE is atomic under the writer lock.

A job's ``attempts`` (incremented by every claim) is its fencing token: the owner's renewals and its
final commit name (owner, attempt), so a worker that lost its lease, even one that comes back from
a pause and still thinks it holds the job, cannot renew or finish it.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, delete, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.audit import record
from dicomnode.db.models import Association, Delivery, Job, SeriesRemoval, Worker, utcnow

log = logging.getLogger("dicomnode.leases")

Clock = Callable[[], datetime]


def default_worker_id(node_id: str | None = None) -> str:
    """``<node>-<pid>-<random>`` (node: ``storage.node_id`` or the host name): unique per process
    start (the parts are for people to read)."""
    return f"{(node_id or socket.gethostname())[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


def _expired(column_owner: object, column_expiry: object, now: datetime) -> ColumnElement[bool]:
    """Nobody holds the row: no owner, no expiry, or an expiry in the past."""
    return or_(column_owner.is_(None), column_expiry.is_(None), column_expiry < now)  # type: ignore[attr-defined]


# --- jobs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobClaim:
    """A job this worker now holds: ``attempt`` is the fencing token of the claim."""

    job_id: int
    attempt: int
    taken_from: str | None = None  # the worker whose lease expired, when the job was taken over
    previous_output_series: str | None = None  # an interrupted attempt's output series (to clean up)


@dataclass
class JobClaimResult:
    """What one claim pass did: the claimed job (or None) and the jobs given up on."""

    claim: JobClaim | None = None
    abandoned: list[tuple[int, str | None]] = field(default_factory=list)  # (job id, output series)


_MAX_LOOKS = 20  # candidates one claim looks at where rows lock (each one it skips was failed)


def row_locks(s: Session) -> bool:
    """True when the database locks rows for claims (PostgreSQL: ``FOR UPDATE SKIP LOCKED``)."""
    return s.get_bind().dialect.name == "postgresql"


def _job_candidates(s: Session, now: datetime, limit: int) -> list[Job]:
    """Pending jobs and running jobs whose lease expired, oldest first (locked where rows lock)."""
    return list(
        s.scalars(
            select(Job)
            .where(
                or_(
                    Job.state == "pending",
                    and_(Job.state == "running", _expired(Job.lease_owner, Job.lease_expires_at, now)),
                )
            )
            .order_by(Job.id)
            .limit(limit)
            .with_for_update(skip_locked=True)  # PostgreSQL; SQLite renders no FOR UPDATE
        ).all()
    )


def owned_job(job_id: int, owner: str, attempt: int) -> ColumnElement[bool]:
    """The WHERE clause that holds only while ``owner`` still holds this claim of the job."""
    return and_(Job.id == job_id, Job.state == "running", Job.lease_owner == owner, Job.attempts == attempt)


def claim_job(
    s: Session,
    owner: str,
    now: datetime,
    expires: datetime,
    *,
    max_attempts: int,
    stage: str = "fuse",
) -> JobClaimResult:
    """Take the oldest pending job, or a running one whose lease expired; commits.

    A job taken over after ``max_attempts`` claims (its workers keep dying on it) is failed instead.
    Where rows lock, one candidate at a time is locked (the others stay free for other workers) and
    the next is looked at only when that one was given up on; on SQLite the oldest few are tried.
    """
    result = JobClaimResult()
    locking = row_locks(s)
    for _ in range(_MAX_LOOKS if locking else 1):
        candidates = _job_candidates(s, now, limit=1 if locking else 5)
        if not candidates or _claim_first(s, candidates, owner, now, expires, max_attempts, stage, result):
            break
    s.commit()
    return result


def _claim_first(
    s: Session,
    candidates: list[Job],
    owner: str,
    now: datetime,
    expires: datetime,
    max_attempts: int,
    stage: str,
    result: JobClaimResult,
) -> bool:
    """Claim the first candidate that can be claimed (into ``result``); True when one was."""
    for job in candidates:
        was_running = job.state == "running"
        old_owner, old_attempts = job.lease_owner, job.attempts
        same_claim = and_(Job.id == job.id, Job.state == job.state, Job.attempts == old_attempts)
        if was_running:
            same_claim = and_(same_claim, _expired(Job.lease_owner, Job.lease_expires_at, now))
        lost = f"lease of {old_owner or 'an unknown worker'} expired"
        if was_running and old_attempts >= max_attempts:
            reason = f"{lost}; its worker stopped {old_attempts} times while running it: not retried"
            res = s.execute(
                update(Job)
                .where(same_claim)
                .values(
                    state="failed",
                    error=reason,
                    finished_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
            if res.rowcount == 1:  # type: ignore[attr-defined]
                record(s, stage, "job", job.id, "running", "failed", reason)
                result.abandoned.append((job.id, job.output_series_uid))
            continue
        res = s.execute(
            update(Job)
            .where(same_claim)
            .values(
                state="running",
                worker=owner,
                lease_owner=owner,
                lease_expires_at=expires,
                started_at=now,
                attempts=Job.attempts + 1,
                output_series_uid=None,
            )
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            continue  # another worker won the row
        if was_running:
            record(s, stage, "job", job.id, "running", "running", f"{lost}; taken over by {owner}")
        else:
            record(s, stage, "job", job.id, "pending", "running", f"worker {owner}")
        result.claim = JobClaim(
            job.id,
            old_attempts + 1,
            taken_from=(old_owner or "an unknown worker") if was_running else None,
            previous_output_series=job.output_series_uid if was_running else None,
        )
        return True
    return False


# --- deliveries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryClaim:
    """A due delivery this worker now holds for one round."""

    delivery_id: int
    destination: str
    output_id: int


def _delivery_candidates(
    s: Session, now: datetime, limit: int, skip_destinations: Iterable[str]
) -> list[tuple[int, str | None]]:
    """(id, current owner) of due pending deliveries nobody holds, by destination then age; where
    rows lock, those another dispatcher is taking right now are skipped (``FOR UPDATE SKIP LOCKED``)."""
    q = select(Delivery.id, Delivery.lease_owner).where(
        Delivery.state == "pending",
        Delivery.next_attempt_at <= now,
        _expired(Delivery.lease_owner, Delivery.lease_expires_at, now),
    )
    skip = list(skip_destinations)
    if skip:
        q = q.where(Delivery.destination.not_in(skip))
    q = (
        q.order_by(Delivery.destination, Delivery.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=Delivery)
    )
    return [(int(i), o) for i, o in s.execute(q)]


def claim_deliveries(
    s: Session,
    owner: str,
    now: datetime,
    expires: datetime,
    *,
    limit: int,
    skip_destinations: Iterable[str] = (),
    stage: str = "dispatch",
) -> list[DeliveryClaim]:
    """Lease up to ``limit`` due deliveries to ``owner`` (they stay 'pending'); commits."""
    candidates = _delivery_candidates(s, now, limit, skip_destinations)
    if not candidates:
        return []
    ids = [i for i, _ in candidates]
    s.execute(
        update(Delivery)
        .where(
            Delivery.id.in_(ids),
            Delivery.state == "pending",
            _expired(Delivery.lease_owner, Delivery.lease_expires_at, now),
        )
        .values(lease_owner=owner, lease_expires_at=expires)
        .execution_options(synchronize_session=False)
    )
    rows = s.execute(
        select(Delivery.id, Delivery.destination, Delivery.output_id)
        .where(Delivery.id.in_(ids), Delivery.lease_owner == owner, Delivery.lease_expires_at == expires)
        .order_by(Delivery.destination, Delivery.id)
    ).all()
    won = {int(r[0]) for r in rows}
    for delivery_id, old_owner in candidates:
        if old_owner is not None and delivery_id in won:
            record(
                s,
                stage,
                "delivery",
                delivery_id,
                "pending",
                "pending",
                f"lease of {old_owner} expired; taken over by {owner}",
            )
    s.commit()
    return [DeliveryClaim(int(i), str(d), int(o)) for i, d, o in rows]


# --- series removals -------------------------------------------------------------------------------


def claim_removal(s: Session, removal_id: int, now: datetime, until: datetime) -> bool:
    """Hold a due series removal until ``until`` (its next attempt moves there), so that another
    dispatcher leaves it alone meanwhile; after a crash it is due again then. Commits."""
    res = s.execute(
        update(SeriesRemoval)
        .where(
            SeriesRemoval.id == removal_id,
            SeriesRemoval.state == "pending",
            SeriesRemoval.next_attempt_at <= now,
        )
        .values(next_attempt_at=until)
    )
    s.commit()
    return res.rowcount == 1  # type: ignore[attr-defined]


# --- patients (assemble) ---------------------------------------------------------------------------

_PATIENT_LOCKS = 0x646E6173  # the advisory lock namespace of assemble's patient locks (PostgreSQL)


def lock_patients(s: Session, patient_keys: Iterable[str]) -> set[str]:
    """Take, for the rest of the session's transaction, the right to decide these patients; returns
    the patients this process may decide now (the others another assembler is deciding: skip them).

    PostgreSQL: a transaction-scoped advisory lock per patient, tried without waiting (so two
    assemblers never wait for each other, let alone deadlock), released at commit or rollback.
    SQLite: the database's one write lock, taken at once (``BEGIN IMMEDIATE``), stands for every
    patient's; it must be the first statement of the transaction. Either way, what the holder reads
    after the lock includes everything an earlier holder committed.
    """
    keys = sorted(set(patient_keys))
    if not keys:
        return set()
    conn = s.connection()
    if conn.dialect.name == "postgresql":
        rows = conn.execute(
            text(
                "SELECT k FROM unnest(CAST(:keys AS text[])) AS t(k) "
                "WHERE pg_try_advisory_xact_lock(:ns, hashtext(k))"
            ),
            {"keys": keys, "ns": _PATIENT_LOCKS},
        )
        return {str(r[0]) for r in rows}
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    return set(keys)


# --- associations ----------------------------------------------------------------------------------


def close_orphaned_associations(s: Session, now: datetime, direction: str, stage: str) -> int:
    """Close open associations (``direction`` in/out) whose serving process's lease expired; commits."""
    rows = s.execute(
        select(Association.id, Association.lease_owner).where(
            Association.state == "open",
            Association.direction == direction,
            _expired(Association.lease_owner, Association.lease_expires_at, now),
        )
    ).all()
    n = 0
    for assoc_id, owner in rows:
        reason = f"node restarted: lease of {owner or 'an unknown worker'} expired"
        res = s.execute(
            update(Association)
            .where(
                Association.id == assoc_id,
                Association.state == "open",
                _expired(Association.lease_owner, Association.lease_expires_at, now),
            )
            .values(state="aborted", reason=reason, ended_at=now, lease_expires_at=None)
        )
        if res.rowcount == 1:  # type: ignore[attr-defined]
            record(s, stage, "association", assoc_id, "open", "aborted", reason)
            n += 1
    s.commit()
    if n:
        log.warning("%d open %sbound association(s) of stopped workers closed as aborted", n, direction)
    return n


# --- workers ---------------------------------------------------------------------------------------


def live_workers(s: Session, now: datetime) -> dict[str, str]:
    """worker id -> its spool tmp folder name, for every worker whose heartbeat has not expired."""
    rows = s.execute(select(Worker.worker_id, Worker.tmp_dir).where(Worker.lease_expires_at >= now))
    return {str(w): str(t) for w, t in rows}


def forget_dead_workers(s: Session, expired_before: datetime) -> int:
    """Delete heartbeat rows of workers silent since before ``expired_before``; commits."""
    res = s.execute(delete(Worker).where(Worker.lease_expires_at < expired_before))
    s.commit()
    return int(res.rowcount or 0)  # type: ignore[attr-defined]


_TABLES = {"job": Job, "delivery": Delivery, "association": Association}
_HELD_STATE = {"job": "running", "delivery": "pending", "association": "open"}


class WorkerLeases:
    """One process's worker identity: its heartbeat row and the leases it holds, renewed in a thread.

    Stages tell it what they hold (:meth:`hold` / :meth:`drop`); only those rows are renewed, so a
    restarted process with the same configured ``worker_id`` never revives its predecessor's leases.
    """

    def __init__(
        self,
        sessionmaker: sessionmaker[Session],
        lease_seconds: float,
        worker_id: str | None = None,
        *,
        stages: Iterable[str] = (),
        clock: Clock = utcnow,
        node_id: str | None = None,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.seconds = float(lease_seconds)
        self.owner = worker_id or default_worker_id(node_id)
        self.stages = ",".join(stages)
        self.clock = clock
        # This process's spool tmp folder, tmp/<tmp_dir>/: on a spool shared by several hosts the
        # node id says whose partial writes a folder holds, the random part keeps processes apart.
        token = secrets.token_hex(8)
        self.tmp_dir = f"{node_id[:40]}-{token}" if node_id else token
        self._held: dict[str, set[int]] = {k: set() for k in _TABLES}
        self._lost: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._sweeps: list[Callable[[], object]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registered = False
        self._rounds_lock = threading.Lock()
        self._rounds = 0  # rounds inside renewing()
        self._for_rounds = False  # the thread was started by renewing(), not by start()

    @property
    def period(self) -> float:
        """Seconds between renewals: a third of the lease, so two missed renewals still hold it."""
        return self.seconds / 3.0

    def expiry(self, now: datetime | None = None) -> datetime:
        return (now or self.clock()) + timedelta(seconds=self.seconds)

    # -- what this process holds -------------------------------------------------------------------

    def hold(self, kind: str, ids: Iterable[int]) -> None:
        with self._lock:
            self._held[kind].update(ids)

    def drop(self, kind: str, ids: Iterable[int]) -> None:
        with self._lock:
            for i in ids:
                self._held[kind].discard(i)
                self._lost.discard((kind, i))

    def lost(self, kind: str, row_id: int) -> bool:
        """True when a renewal found the row no longer held by this worker."""
        with self._lock:
            return (kind, row_id) in self._lost

    # -- heartbeat ---------------------------------------------------------------------------------

    def register(self) -> None:
        """Write (or refresh) this worker's heartbeat row; idempotent."""
        now = self.clock()
        with self.sessionmaker() as s:
            row = s.get(Worker, self.owner)
            if row is None:
                s.add(
                    Worker(
                        worker_id=self.owner,
                        stages=self.stages,
                        host=socket.gethostname()[:128],
                        started_at=now,
                        lease_expires_at=self.expiry(now),
                        tmp_dir=self.tmp_dir,
                    )
                )
            else:
                row.stages, row.started_at, row.lease_expires_at = self.stages, now, self.expiry(now)
                row.tmp_dir, row.host = self.tmp_dir, socket.gethostname()[:128]
            s.commit()
        self._registered = True

    def beat(self) -> None:
        """Renew the heartbeat and every held lease in one transaction; note the rows lost."""
        now = self.clock()
        expires = self.expiry(now)
        with self._lock:
            held = {k: sorted(v) for k, v in self._held.items()}
        lost: list[tuple[str, int]] = []
        with self.sessionmaker() as s:
            s.execute(update(Worker).where(Worker.worker_id == self.owner).values(lease_expires_at=expires))
            for kind, ids in held.items():
                if not ids:
                    continue
                table = _TABLES[kind]
                s.execute(
                    update(table)
                    .where(
                        table.id.in_(ids),
                        table.lease_owner == self.owner,
                        table.state == _HELD_STATE[kind],
                    )
                    .values(lease_expires_at=expires)
                    .execution_options(synchronize_session=False)
                )
                still = set(
                    s.scalars(
                        select(table.id).where(
                            table.id.in_(ids),
                            table.lease_owner == self.owner,
                            table.state == _HELD_STATE[kind],
                        )
                    )
                )
                lost += [(kind, i) for i in ids if i not in still]
            s.commit()
        if lost:
            with self._lock:
                for kind, i in lost:
                    if i in self._held[kind]:
                        self._lost.add((kind, i))

    def add_sweep(self, sweep: Callable[[], object]) -> None:
        """Run ``sweep`` (e.g. close orphaned rows) once per lease period in the heartbeat thread."""
        self._sweeps.append(sweep)

    def start(self) -> None:
        """Register and start the renewal thread (idempotent); it runs until :meth:`stop`."""
        with self._rounds_lock:
            self._for_rounds = False
            self._start_thread()

    def _start_thread(self) -> None:
        if not self._registered:
            self.register()
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="leases", daemon=True)
        self._thread.start()

    @contextmanager
    def renewing(self) -> Iterator[None]:
        """Renewals while one round of a stage runs. A worker's loop has started them for good
        (:meth:`start`); a round run alone (``run_once``) starts them and, when the last such round
        ends, stops them again, keeping its leases: no thread outlives the rounds that needed it."""
        with self._rounds_lock:
            if self._rounds == 0 and self._thread is None:
                self._start_thread()
                self._for_rounds = True
            self._rounds += 1
        try:
            yield
        finally:
            with self._rounds_lock:
                self._rounds -= 1
                if self._rounds == 0 and self._for_rounds:
                    self._for_rounds = False
                    self.stop(release=False)

    def _run(self) -> None:
        last_sweep = 0.0
        elapsed = 0.0
        while not self._stop.wait(self.period):
            elapsed += self.period
            try:
                self.beat()
            except Exception as exc:  # a busy or absent DB: the next renewal tries again
                log.warning("lease renewal failed: %s", exc)
            if elapsed - last_sweep >= self.seconds:
                last_sweep = elapsed
                for sweep in list(self._sweeps):
                    try:
                        sweep()
                    except Exception:
                        log.exception("periodic recovery sweep failed")

    def stop(self, release: bool = True) -> None:
        """Stop renewing; with ``release`` give back every held lease and the heartbeat at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if release and self._registered:
            try:
                self.release_all()
            except Exception as exc:
                log.warning("could not release leases on stop: %s", exc)

    def release_all(self) -> None:
        """A clean stop: held jobs go back to pending, held deliveries are free, the heartbeat ends."""
        with self._lock:
            held = {k: sorted(v) for k, v in self._held.items()}
            for v in self._held.values():
                v.clear()
        with self.sessionmaker() as s:
            for job_id in held["job"]:
                res = s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == "running", Job.lease_owner == self.owner)
                    .values(state="pending", lease_owner=None, lease_expires_at=None)
                )
                if res.rowcount == 1:  # type: ignore[attr-defined]
                    record(s, "fuse", "job", job_id, "running", "pending", f"worker {self.owner} stopped")
            if held["delivery"]:
                s.execute(
                    update(Delivery)
                    .where(Delivery.id.in_(held["delivery"]), Delivery.lease_owner == self.owner)
                    .values(lease_owner=None, lease_expires_at=None)
                    .execution_options(synchronize_session=False)
                )
            s.execute(delete(Worker).where(Worker.worker_id == self.owner))
            s.commit()
        self._registered = False
