"""The admin actions: retry, cancel, release, re-send, pause/resume a destination, purge.

One implementation for the HTTP API and the command line. Each action changes pipeline rows in one
transaction with an audit event naming who asked (``actor``: a token name, ``cli:USER``), and raises
:class:`ActionError` with a message an admin can act on when the rows do not allow it.

The actions respect the workers' leases (``dicomnode.db.leases``): cancelling a running job takes
its lease away, so its worker's ownership-checked commit fails and it discards its result; a
re-send follows the dispatcher's re-queue rules (``requeue_failed``) and leaves deliveries being
sent right now alone; a paused destination is skipped by the dispatcher's claim.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.db import (
    Delivery,
    DestinationState,
    Instance,
    Job,
    Output,
    PriorFetch,
    PriorQuery,
    PriorRetrieve,
    QuarantinedInstance,
    Series,
    SeriesDecision,
    SeriesRemoval,
    record,
    utcnow,
)
from dicomnode.dispatch.outbox import requeue_failed
from dicomnode.spool import thumbnail_path

log = logging.getLogger("dicomnode.admin")
STAGE = "admin"
UNFINISHED_JOB_STATES = ("pending", "running", "held")


class ActionError(Exception):
    """An action the rows do not allow; ``status`` is the HTTP status that fits (404, 409)."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ActionResult:
    """What an action did, for the API's JSON answer and the CLI's line."""

    message: str
    changed: int = 0


def _job(s: Session, job_id: int) -> Job:
    job = s.get(Job, job_id)
    if job is None:
        raise ActionError(f"no job {job_id}", 404)
    return job


def remove_spool_file(root: Path, relpath: str) -> bool:
    """Delete one spool file (and its now-empty folders up to the spool root); False if it was gone."""
    path = root / relpath
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    parent = path.parent
    while parent != root and root in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent
    return True


class AdminActions:
    """The documented admin actions over one database and spool."""

    def __init__(self, settings: Settings, sessionmaker: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.spool_root = Path(settings.storage.spool_dir)

    # -- jobs ------------------------------------------------------------------------------------

    def retry_job(self, job_id: int, actor: str) -> ActionResult:
        """A failed, held or cancelled job runs again (a held run's outputs are discarded first)."""
        discarded: list[str] = []
        with self.sessionmaker() as s, s.begin():
            job = _job(s, job_id)
            if job.state not in ("failed", "held", "cancelled"):
                hint = {
                    "done": "; use resend to send its outputs again",
                    "superseded": "; a newer job fuses the newer series",
                }.get(job.state, "")
                raise ActionError(
                    f"job {job_id} is {job.state}: only failed, held or cancelled jobs retry{hint}"
                )
            if job.state == "held" or job.output_series_uid:
                discarded = self._discard_outputs(s, job_id)
            old = job.state
            # ``attempts`` stays: it is the claims' fencing token, so a worker still finishing a
            # cancelled run cannot commit over the new one
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == old)
                .values(
                    state="pending",
                    error=None,
                    output_series_uid=None,
                    finished_at=None,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
            extra = f"; {len(discarded)} outputs of the previous run discarded" if discarded else ""
            record(s, STAGE, "job", job_id, old, "pending", f"retry requested by {actor}{extra}", actor)
        self._unlink(discarded)
        log.info("job %d queued again by %s", job_id, actor)
        return ActionResult(f"job {job_id} is pending again", 1)

    def cancel_job(self, job_id: int, actor: str) -> ActionResult:
        """A pending, running or held job ends ``cancelled``; a held job's outputs are never sent.

        A running job loses its lease here: its worker notices at its next renewal (or at the
        latest at its ownership-checked commit) and discards what it wrote.
        """
        with self.sessionmaker() as s, s.begin():
            job = _job(s, job_id)
            if job.state not in UNFINISHED_JOB_STATES:
                raise ActionError(f"job {job_id} is {job.state}: only pending, running or held jobs cancel")
            old, worker = job.state, job.lease_owner
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == old, Job.attempts == job.attempts)
                .values(state="cancelled", finished_at=utcnow(), lease_owner=None, lease_expires_at=None)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                raise ActionError(f"job {job_id} changed while it was being cancelled; try again")
            n = self._set_deliveries(s, job_id, "held", "cancelled")
            left = self._leave_replaced(s, job_id, f"job {job_id} was cancelled by {actor}")
            why = f"cancelled by {actor}" + (f"; {n} held deliveries cancelled" if n else "")
            if left:
                why += f"; the series it replaces stays at {left} destinations"
            if old == "running":
                why += f"; worker {worker or '(none)'} discards its result"
            record(s, STAGE, "job", job_id, old, "cancelled", why, actor)
        return ActionResult(f"job {job_id} cancelled", 1)

    @staticmethod
    def _leave_replaced(s: Session, job_id: int, why: str) -> int:
        """Settle the removals waiting for a cancelled job's series: the earlier series stays."""
        rows = s.scalars(
            select(SeriesRemoval).where(
                SeriesRemoval.replaced_by_job_id == job_id, SeriesRemoval.state == "pending"
            )
        ).all()
        for r in rows:
            r.state, r.reason, r.finished_at = "left", f"{why}; the earlier series stays", utcnow()
            record(s, STAGE, "removal", r.id, "pending", "left", r.reason)
        return len(rows)

    def release_job(self, job_id: int, actor: str) -> ActionResult:
        """A held job's outputs go out as they are: the job is done and its deliveries pending."""
        with self.sessionmaker() as s, s.begin():
            job = _job(s, job_id)
            if job.state != "held":
                raise ActionError(f"job {job_id} is {job.state}: only held jobs are released")
            s.execute(update(Job).where(Job.id == job_id, Job.state == "held").values(state="done"))
            n = self._set_deliveries(s, job_id, "held", "pending")
            record(
                s,
                STAGE,
                "job",
                job_id,
                "held",
                "done",
                f"released by {actor} (quality gate overridden: {job.error or 'no reason recorded'}); "
                f"{n} deliveries pending",
                actor,
            )
        return ActionResult(f"job {job_id} released: {n} deliveries pending", n)

    @staticmethod
    def _set_deliveries(s: Session, job_id: int, old: str, new: str) -> int:
        ids = s.scalars(
            select(Delivery.id)
            .join(Output, Output.id == Delivery.output_id)
            .where(Output.job_id == job_id, Delivery.state == old)
        ).all()
        if not ids:
            return 0
        s.execute(update(Delivery).where(Delivery.id.in_(ids)).values(state=new, next_attempt_at=utcnow()))
        return len(ids)  # the job's own event counts them: a series has hundreds of deliveries

    def _discard_outputs(self, s: Session, job_id: int) -> list[str]:
        """Delete a job's Output and Delivery rows; returns the files to remove after commit."""
        outputs = s.execute(select(Output.id, Output.path).where(Output.job_id == job_id)).all()
        ids = [o.id for o in outputs]
        if ids:
            s.execute(delete(Delivery).where(Delivery.output_id.in_(ids)))
            s.execute(delete(Output).where(Output.id.in_(ids)))
        return [o.path for o in outputs]

    def _unlink(self, relpaths: list[str]) -> int:
        n = 0
        for rel in relpaths:
            try:
                n += remove_spool_file(self.spool_root, rel)
            except OSError as exc:
                log.error("admin: cannot remove spool file: %s", exc)
        return n

    # -- deliveries ------------------------------------------------------------------------------

    def _destinations(self, destination: str | None) -> list[str]:
        configured = [d.name for d in self.settings.destinations]
        if destination is None:
            if not configured:
                raise ActionError("no destinations are configured", 409)
            return configured
        if destination not in configured:
            raise ActionError(
                f"unknown destination {destination!r}; destinations: {', '.join(configured) or 'none'}", 404
            )
        return [destination]

    def resend_output(self, output_id: int, actor: str, destination: str | None = None) -> ActionResult:
        """Send one output again to one destination (or all): its deliveries go back to pending."""
        names = self._destinations(destination)
        with self.sessionmaker() as s, s.begin():
            out = s.get(Output, output_id)
            if out is None:
                raise ActionError(f"no output {output_id}", 404)
            self._check_sendable(s, out.job_id, [out])
            n = self._requeue(s, [out], names, actor)
        return ActionResult(f"output {output_id}: {n} deliveries pending", n)

    def resend_job(self, job_id: int, actor: str, destination: str | None = None) -> ActionResult:
        """Send every output of a done job again to one destination (or all)."""
        names = self._destinations(destination)
        with self.sessionmaker() as s, s.begin():
            _job(s, job_id)
            outputs = s.scalars(select(Output).where(Output.job_id == job_id).order_by(Output.id)).all()
            if not outputs:
                raise ActionError(f"job {job_id} has no outputs to send")
            self._check_sendable(s, job_id, outputs)
            n = self._requeue(s, outputs, names, actor)
            record(
                s,
                STAGE,
                "job",
                job_id,
                None,
                None,
                f"re-send of {len(outputs)} outputs to {', '.join(names)} requested by {actor}",
                actor,
            )
        return ActionResult(f"job {job_id}: {n} deliveries pending", n)

    @staticmethod
    def _check_sendable(s: Session, job_id: int, outputs: list[Output]) -> None:
        job = _job(s, job_id)
        if job.state != "done":
            raise ActionError(
                f"job {job_id} is {job.state}: only a done job's outputs are re-sent"
                + ("; release it first" if job.state == "held" else "")
            )
        gone = [o for o in outputs if o.file_deleted_at is not None]
        if gone:
            raise ActionError(
                f"{len(gone)} output files were removed by retention on "
                f"{gone[0].file_deleted_at:%Y-%m-%d}; they cannot be sent again"
            )

    @staticmethod
    def _requeue(s: Session, outputs: list[Output], names: list[str], actor: str) -> int:
        """Deliveries of ``outputs`` to ``names`` due now with attempts reset (the dispatcher's
        re-queue rules): failed ones through ``requeue_failed``, sent ones alike, waiting ones
        at once; a delivery a dispatcher is sending now (live lease) is left to finish."""
        now = utcnow()
        by_key = {
            (d.output_id, d.destination): d
            for d in s.scalars(
                select(Delivery).where(
                    Delivery.output_id.in_([o.id for o in outputs]), Delivery.destination.in_(names)
                )
            ).all()
        }
        reason = f"re-send requested by {actor}"
        failed = [d.id for d in by_key.values() if d.state == "failed"]
        moved = set(requeue_failed(s, failed, reason, stage=STAGE, now=now, actor=actor))
        again = {
            "state": "pending",
            "attempts": 0,
            "failing_since": None,
            "next_attempt_at": now,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        counts: dict[str, int] = {}
        for out in outputs:
            for name in names:
                d = by_key.get((out.id, name))
                if d is None:
                    row = Delivery(output_id=out.id, destination=name, state="pending", next_attempt_at=now)
                    s.add(row)
                    s.flush()
                    record(s, STAGE, "delivery", row.id, None, "pending", f"to {name}: {reason}", actor)
                elif d.id in moved:
                    pass
                elif d.state == "sent" or (
                    d.state == "pending" and (d.lease_expires_at is None or d.lease_expires_at < now)
                ):
                    res = s.execute(
                        update(Delivery)
                        .where(Delivery.id == d.id, Delivery.state == d.state)
                        .values(**again, sent_at=None)
                        .execution_options(synchronize_session=False)
                    )
                    if res.rowcount != 1:  # type: ignore[attr-defined]
                        continue
                    record(s, STAGE, "delivery", d.id, d.state, "pending", reason, actor)
                else:
                    continue  # being sent right now, or not in a state that sends
                counts[name] = counts.get(name, 0) + 1
        for name, n in counts.items():
            record(s, STAGE, "destination", name, None, None, f"{n} deliveries re-sent by {actor}", actor)
        return sum(counts.values())

    # -- destinations ----------------------------------------------------------------------------

    def pause_destination(self, name: str, actor: str, reason: str | None = None) -> ActionResult:
        """Stop sending to ``name``: its deliveries stay pending until it is resumed."""
        return self._set_paused(name, True, actor, reason)

    def resume_destination(self, name: str, actor: str) -> ActionResult:
        """Send to ``name`` again."""
        return self._set_paused(name, False, actor, None)

    def _set_paused(self, name: str, paused: bool, actor: str, reason: str | None) -> ActionResult:
        self._destinations(name)
        with self.sessionmaker() as s, s.begin():
            row = s.get(DestinationState, name)
            was = bool(row and row.paused)
            if row is None:
                row = DestinationState(name=name)
                s.add(row)
            row.paused, row.changed_by, row.changed_at, row.reason = paused, actor, utcnow(), reason
            new = "paused" if paused else "active"
            old = "paused" if was else "active"
            why = f"{'paused' if paused else 'resumed'} by {actor}" + (f": {reason}" if reason else "")
            record(s, STAGE, "destination", name, old, new, why, actor)
        return ActionResult(f"destination {name} {new}", int(was != paused))

    # -- purge -----------------------------------------------------------------------------------

    def purge_patient(self, patient_key: str, actor: str) -> ActionResult:
        """Delete a patient's spool files and rows (series, instances, jobs, outputs, deliveries).

        The audit events stay. Refused while one of the patient's jobs is running.
        """
        with self.sessionmaker() as s, s.begin():
            series_uids = s.scalars(
                select(Series.series_instance_uid).where(Series.patient_key == patient_key)
            ).all()
            job_ids = s.scalars(select(Job.id).where(Job.patient_key == patient_key)).all()
            if not series_uids and not job_ids:
                raise ActionError(f"no patient {patient_key!r}", 404)
            running = s.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.state == "running")).all()
            if running:
                raise ActionError(
                    f"job {running[0]} of this patient is running; cancel it or wait, then purge"
                )
            now = utcnow()
            sending = s.scalar(
                select(func.count())
                .select_from(Delivery)
                .join(Output, Output.id == Delivery.output_id)
                .where(
                    Output.job_id.in_(job_ids),
                    Delivery.state == "pending",
                    Delivery.lease_expires_at.is_not(None),
                    Delivery.lease_expires_at >= now,
                )
            )
            if sending:
                raise ActionError(
                    f"{sending} deliveries of this patient are being sent right now; "
                    "pause their destination or wait, then purge"
                )
            fetch_ids = list(s.scalars(select(PriorFetch.id).where(PriorFetch.patient_key == patient_key)))
            fetching = s.scalar(
                select(func.count())
                .select_from(PriorRetrieve)
                .where(
                    PriorRetrieve.fetch_id.in_(fetch_ids),
                    PriorRetrieve.state == "running",
                    PriorRetrieve.lease_expires_at >= now,
                )
            )
            if fetching:
                raise ActionError("a missing series of this patient is being retrieved now; wait, then purge")
            files = list(
                s.scalars(
                    select(Instance.path).where(
                        Instance.series_instance_uid.in_(series_uids), Instance.file_deleted_at.is_(None)
                    )
                ).all()
            )
            out_rows = s.execute(
                select(Output.id, Output.path, Output.file_deleted_at).where(Output.job_id.in_(job_ids))
            ).all()
            files += [o.path for o in out_rows if o.file_deleted_at is None]
            files += [thumbnail_path(j) for j in job_ids]
            quarantined = s.execute(
                select(QuarantinedInstance.id, QuarantinedInstance.path).where(
                    QuarantinedInstance.series_instance_uid.in_(series_uids)
                )
            ).all()
            files += [q.path for q in quarantined]
            out_ids = [o.id for o in out_rows]
            n_rows = 0
            for stmt in (
                delete(Delivery).where(Delivery.output_id.in_(out_ids)),
                delete(Output).where(Output.id.in_(out_ids)),
                delete(SeriesRemoval).where(SeriesRemoval.replaced_by_job_id.in_(job_ids)),
                delete(Job).where(Job.id.in_(job_ids)),
                delete(SeriesDecision).where(SeriesDecision.series_instance_uid.in_(series_uids)),
                delete(PriorQuery).where(PriorQuery.fetch_id.in_(fetch_ids)),
                delete(PriorRetrieve).where(PriorRetrieve.fetch_id.in_(fetch_ids)),
                delete(PriorFetch).where(PriorFetch.id.in_(fetch_ids)),
                delete(QuarantinedInstance).where(QuarantinedInstance.id.in_([q.id for q in quarantined])),
                delete(Instance).where(Instance.series_instance_uid.in_(series_uids)),
                delete(Series).where(Series.series_instance_uid.in_(series_uids)),
            ):
                n_rows += int(s.execute(stmt).rowcount or 0)  # type: ignore[attr-defined]
            record(
                s,
                STAGE,
                "patient",
                patient_key,
                None,
                "purged",
                f"purged by {actor}: {len(series_uids)} series, {len(job_ids)} jobs, {n_rows} rows; "
                "spool files deleted, audit events kept",
                actor,
            )
        n_files = self._unlink(files)
        log.info("admin: a patient was purged by %s (%d files, %d rows)", actor, n_files, n_rows)
        return ActionResult(f"patient purged: {n_files} files and {n_rows} rows deleted", n_rows)

    def purge_older_than(self, days: float, actor: str, now: datetime | None = None) -> ActionResult:
        """Purge every patient with nothing unfinished (no job, series or delivery under way) whose
        last activity is older than ``days``."""
        if days < 0:
            raise ActionError("days must be 0 or more", 422)
        cutoff = (now or utcnow()) - timedelta(days=days)
        with self.sessionmaker() as s:
            last_rx = dict(
                s.execute(
                    select(Series.patient_key, func.max(Series.last_received_at)).group_by(Series.patient_key)
                ).all()
            )
            last_job = dict(
                s.execute(
                    select(
                        Job.patient_key, func.max(func.coalesce(Job.finished_at, Job.created_at))
                    ).group_by(Job.patient_key)
                ).all()
            )
            busy = set(s.scalars(select(Job.patient_key).where(Job.state.in_(UNFINISHED_JOB_STATES))).all())
            busy |= set(s.scalars(select(Series.patient_key).where(Series.state == "receiving")).all())
            busy |= set(  # fused series not yet at their destinations (e.g. a PACS down for days)
                s.scalars(
                    select(Job.patient_key)
                    .join(Output, Output.job_id == Job.id)
                    .join(Delivery, Delivery.output_id == Output.id)
                    .where(Delivery.state.in_(("pending", "held")))
                    .distinct()
                ).all()
            )
        old = []
        for key in sorted(set(last_rx) | set(last_job)):
            last = max(t for t in (last_rx.get(key), last_job.get(key)) if t is not None)
            if key not in busy and last < cutoff:
                old.append(key)
        for key in old:
            self.purge_patient(key, actor)
        return ActionResult(
            f"{len(old)} patients purged (last activity before {cutoff:%Y-%m-%d %H:%M})", len(old)
        )
