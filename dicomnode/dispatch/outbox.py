"""The dispatch outbox: send due Delivery rows by C-STORE (one association per destination per round)
or, to a DICOMweb destination, by STOW-RS (:mod:`dicomnode.dispatch.senders` picks by type).

Delivery states (``deliveries.state``)::

    pending --(destination stored it: Success or Warning)------------------> sent
    pending --(transient failure)--> pending, attempts + 1, next attempt after backoff
    pending --(permanent refusal, or give_up_after passed since the first
               failed attempt, or dispatch.max_attempts reached if set)-----> failed (reason kept)
    failed  --(an admin re-sends it: ``requeue_failed``)-------------------> pending, attempts 0

A round first leases the due rows to this dispatcher (``dicomnode.db.leases``; a leased row stays
'pending'); another dispatcher skips them until the lease expires, so two dispatchers on one
database do not send the same row twice, and the rows of a dispatcher that died are taken over.
A delivery becomes 'sent' only after the destination answered Success (or a Warning, which DICOM
defines as stored; the status is kept in ``last_status``). A transient failure (no connection, an
abort, a timeout, 0xA7xx out of resources, ...) is retried with exponential backoff and jitter,
capped at ``dispatch.backoff_max_seconds``, until ``dispatch.give_up_after`` has passed since the
first failed attempt (7 days by default: a PACS outage of days still ends delivered). A permanent
refusal (A-ASSOCIATE-RJ "rejected permanent", no accepted presentation context, a refused SOP
class or another status a retry cannot change) fails the delivery at once with the reason.

Crash safety: state is only written after the PACS answered, in short transactions (so the SQLite
write lock is never held while waiting on the network). A process that dies mid-round leaves its
rows 'pending' under a lease that expires; the next round of any dispatcher sends them again, and a
PACS takes a re-sent identical instance.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import DestinationConfig, Settings
from dicomnode.db import Association, Delivery, DestinationState, Output, record, utcnow
from dicomnode.db.leases import WorkerLeases, claim_deliveries, close_orphaned_associations
from dicomnode.dispatch.scu import (
    MAX_CONTEXTS,
    FileInfo,
    FileProblem,
    StoreResult,
    inspect_file,
    presentation_contexts,
)
from dicomnode.dispatch.senders import make_sender, peer_address
from dicomnode.spool import Spool

log = logging.getLogger("dicomnode.dispatch")

STAGE = "dispatch"
FLUSH_EVERY = 32  # results per short write transaction
FLUSH_SECONDS = 1.0
JITTER = 0.1  # backoff is stretched by a random 0..10 % so retries of many rows do not align


@dataclass
class _Due:
    delivery_id: int
    destination: str
    path: str  # relative to the spool root


def _duration(td: timedelta) -> str:
    seconds = td.total_seconds()
    if seconds >= 86400:
        return f"{seconds / 86400:g} days"
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    return f"{seconds:g} s"


def requeue_failed(
    s: Session,
    delivery_ids: Iterable[int],
    reason: str,
    *,
    stage: str = "admin",
    now: datetime | None = None,
    actor: str | None = None,
) -> list[int]:
    """Put failed deliveries back to pending, due now, with attempts reset (an admin's re-send).

    Returns the ids that moved; rows not in 'failed' are left alone; ``actor`` names who asked in
    the audit. The caller commits.
    """
    moved = []
    now = now or utcnow()
    for d in s.scalars(
        select(Delivery).where(Delivery.id.in_(list(delivery_ids)), Delivery.state == "failed")
    ):
        res = s.execute(
            update(Delivery)
            .where(Delivery.id == d.id, Delivery.state == "failed")
            .values(
                state="pending",
                attempts=0,
                failing_since=None,
                next_attempt_at=now,
                lease_owner=None,
                lease_expires_at=None,
            )
        )
        if res.rowcount == 1:  # type: ignore[attr-defined]
            record(s, stage, "delivery", d.id, "failed", "pending", reason, actor)
            moved.append(d.id)
    return moved


class DispatchOutbox:
    """Sends every due delivery; ``run_once`` for one round, ``run_forever`` as the stage's worker."""

    def __init__(
        self,
        settings: Settings,
        sessionmaker: sessionmaker[Session],
        spool: Spool,
        *,
        clock: Callable[[], datetime] = utcnow,
        batch_limit: int = 2000,
        leases: WorkerLeases | None = None,
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.spool = spool
        self.clock = clock
        self.batch_limit = batch_limit
        self._own_leases = leases is None
        self.leases = leases or WorkerLeases(
            sessionmaker,
            settings.workers.lease_seconds,
            settings.workers.worker_id,
            stages=("dispatch",),
            clock=clock,
        )
        self.owner = self.leases.owner

    # --- the rounds -----------------------------------------------------------------------------

    def run_once(self) -> int:
        """Send every due delivery (at most ``batch_limit``), grouped per destination; returns number sent.

        The leases of the round's deliveries are renewed while it runs (by the worker's renewal
        thread, or by one started for this round alone)."""
        with self.leases.renewing():
            return self._round()

    def _round(self) -> int:
        now = self.clock()
        with self.sessionmaker() as s:
            # an admin paused these: their deliveries stay pending, unleased, until resumed
            paused = s.scalars(select(DestinationState.name).where(DestinationState.paused)).all()
            claims = claim_deliveries(
                s,
                self.owner,
                now,
                self.leases.expiry(now),
                limit=self.batch_limit,
                skip_destinations=paused,
                stage=STAGE,
            )
        if not claims:
            return 0
        ids = [c.delivery_id for c in claims]
        self.leases.hold("delivery", ids)
        try:
            with self.sessionmaker() as s:
                paths = dict(
                    s.execute(
                        select(Output.id, Output.path).where(Output.id.in_({c.output_id for c in claims}))
                    ).all()
                )
            by_dest: dict[str, list[_Due]] = {}
            for c in claims:
                by_dest.setdefault(c.destination, []).append(
                    _Due(c.delivery_id, c.destination, paths.get(c.output_id, ""))
                )
            configured = {d.name: d for d in self.settings.destinations}
            sent = 0
            for dest_name, items in by_dest.items():
                dest = configured.get(dest_name)
                if dest is None:
                    self._fail_unconfigured(dest_name, items)
                    continue
                sent += self._deliver(dest, items)
            return sent
        finally:
            self._release(ids)

    def _release(self, ids: list[int]) -> None:
        """Give back the leases of rows this round did not record (e.g. over the context limit)."""
        self.leases.drop("delivery", ids)
        with self.sessionmaker() as s, s.begin():
            s.execute(
                update(Delivery)
                .where(Delivery.id.in_(ids), Delivery.lease_owner == self.owner)
                .values(lease_owner=None, lease_expires_at=None)
                .execution_options(synchronize_session=False)
            )

    def close_orphans(self) -> int:
        """Close outbound associations left open by a dispatcher whose lease expired."""
        with self.sessionmaker() as s:
            return close_orphaned_associations(s, self.clock(), "out", STAGE)

    def run_forever(self, stop: threading.Event) -> None:
        """Run rounds until ``stop`` is set; sleeps ``dispatch.poll_seconds`` when a round sent nothing."""
        log.info("dispatch worker started (%d destinations)", len(self.settings.destinations))
        self.leases.start()
        self.leases.add_sweep(self.close_orphans)
        try:
            self.close_orphans()
        except Exception:
            log.exception("closing associations of stopped dispatchers failed")
        while not stop.is_set():
            try:
                sent = self.run_once()
            except Exception:  # a DB outage must not kill the worker; the next round retries
                log.exception("dispatch round failed")
                sent = 0
            if sent == 0:
                stop.wait(self.settings.dispatch.poll_seconds)
        if self._own_leases:
            self.leases.stop()
        log.info("dispatch worker stopped")

    # --- one destination ------------------------------------------------------------------------

    def _deliver(self, dest: DestinationConfig, items: list[_Due]) -> int:
        """One association to ``dest`` for ``items``; records every outcome; returns number sent."""
        results: list[tuple[int, StoreResult]] = []
        planned: list[tuple[_Due, FileInfo]] = []
        for item in items:
            try:
                planned.append((item, inspect_file(self.spool.abspath(item.path))))
            except FileProblem as exc:
                results.append((item.delivery_id, StoreResult(False, None, str(exc))))
        contexts = presentation_contexts([info for _, info in planned])
        if len(contexts) > MAX_CONTEXTS:  # the rest wait for the next round, still due
            keep = set(list(contexts)[:MAX_CONTEXTS])
            planned = [(item, info) for item, info in planned if info.sop_class_uid in keep]
        sent = 0
        if planned:
            sent = self._send_planned(dest, planned, results)
        else:
            self._flush(results)
        return sent

    def _send_planned(
        self,
        dest: DestinationConfig,
        planned: list[tuple[_Due, FileInfo]],
        results: list[tuple[int, StoreResult]],
    ) -> int:
        cfg = self.settings.dispatch
        assoc_id = self._open_association_row(dest)
        session = make_sender(
            self.settings.node.ae_title,
            dest,
            presentation_contexts([info for _, info in planned]),
            cfg.timeout_seconds,
        )
        n_stored = n_failed = 0
        error = session.open()
        if error is not None:
            log.warning("dispatch to %s: %s (%d deliveries)", dest.name, error, len(planned))
            failed = StoreResult(False, None, error, permanent=session.permanent)
            results.extend((item.delivery_id, failed) for item, _ in planned)
            n_failed = len(planned)
            self._flush(results)
            self._close_association_row(assoc_id, session.close(), error, 0, n_failed)
            return 0
        last_flush = time.monotonic()
        try:
            for item, info in planned:
                result = session.send(info)
                results.append((item.delivery_id, result))
                if result.stored:
                    n_stored += 1
                else:
                    n_failed += 1
                    log.warning(
                        "dispatch to %s: delivery %d not stored: %s",
                        dest.name,
                        item.delivery_id,
                        result.error,
                    )
                if len(results) >= FLUSH_EVERY or time.monotonic() - last_flush > FLUSH_SECONDS:
                    self._flush(results)
                    results.clear()
                    last_flush = time.monotonic()
        finally:
            state = session.close()
            self._flush(results)
            reason = None if state == "released" else (session.error or f"association {state}")
            self._close_association_row(assoc_id, state, reason, n_stored, n_failed)
        log.info("dispatch to %s: %d stored, %d failed", dest.name, n_stored, n_failed)
        return n_stored

    # --- rows -----------------------------------------------------------------------------------

    def backoff_seconds(self, attempts: int) -> float:
        """Delay before attempt ``attempts + 1``: initial * 2**(attempts-1), capped, plus jitter."""
        cfg = self.settings.dispatch
        exponent = min(max(attempts - 1, 0), 64)  # 2**64 * anything is past every cap
        base = min(cfg.backoff_initial_seconds * 2.0**exponent, cfg.backoff_max_seconds)
        return base * (1.0 + random.uniform(0.0, JITTER))

    def _flush(self, results: list[tuple[int, StoreResult]]) -> None:
        """Record a batch of outcomes in one short transaction."""
        if not results:
            return
        with self.sessionmaker() as s, s.begin():
            now = self.clock()
            for delivery_id, result in results:
                d = s.get(Delivery, delivery_id)
                if d is None or d.state != "pending":
                    continue  # changed meanwhile (admin action)
                if result.stored:  # a fact whoever holds the row now: the PACS has the instance
                    d.state, d.sent_at, d.last_error = "sent", now, result.error
                    d.last_status, d.lease_owner, d.lease_expires_at = result.status, None, None
                    why = f"stored at {d.destination}" + (f" ({result.error})" if result.error else "")
                    record(s, STAGE, "delivery", d.id, "pending", "sent", why)
                    continue
                if d.lease_owner != self.owner:
                    continue  # our lease expired and another dispatcher holds the row: its result counts
                self._record_failure(s, d, result, now)

    def _record_failure(self, s: Session, d: Delivery, result: StoreResult, now: datetime) -> None:
        cfg = self.settings.dispatch
        d.attempts += 1
        d.last_error, d.last_status = result.error, result.status
        d.lease_owner, d.lease_expires_at = None, None
        if d.failing_since is None:
            d.failing_since = now
        deadline = d.failing_since + cfg.give_up_after
        if result.permanent:
            d.state = "failed"
            reason = f"refused permanently, not retried: {result.error}"
        elif now >= deadline:
            d.state = "failed"
            reason = (
                f"gave up after {d.attempts} attempts over {_duration(now - d.failing_since)} "
                f"(dispatch.give_up_after {_duration(cfg.give_up_after)}): {result.error}"
            )
        elif cfg.max_attempts is not None and d.attempts >= cfg.max_attempts:
            d.state = "failed"
            reason = f"gave up after {d.attempts} attempts (dispatch.max_attempts): {result.error}"
        else:
            delay = self.backoff_seconds(d.attempts)
            d.next_attempt_at = min(now + timedelta(seconds=delay), deadline)
            count = f"{d.attempts}/{cfg.max_attempts}" if cfg.max_attempts is not None else f"{d.attempts}"
            wait = (d.next_attempt_at - now).total_seconds()
            record(
                s,
                STAGE,
                "delivery",
                d.id,
                "pending",
                "pending",
                f"attempt {count} failed: {result.error}; next attempt in {wait:.1f} s",
            )
            return
        record(s, STAGE, "delivery", d.id, "pending", "failed", reason)
        log.error("dispatch: delivery %d to %s failed: %s", d.id, d.destination, reason)

    def _fail_unconfigured(self, dest_name: str, items: list[_Due]) -> None:
        reason = (
            f"destination {dest_name!r} is not configured (destinations: "
            + (", ".join(d.name for d in self.settings.destinations) or "none")
            + ")"
        )
        log.error("dispatch: %d deliveries for unknown destination %r marked failed", len(items), dest_name)
        with self.sessionmaker() as s, s.begin():
            for item in items:
                d = s.get(Delivery, item.delivery_id)
                if d is None or d.state != "pending":
                    continue
                d.state, d.last_error, d.lease_owner, d.lease_expires_at = "failed", reason, None, None
                record(s, STAGE, "delivery", d.id, "pending", "failed", reason)

    def _open_association_row(self, dest: DestinationConfig) -> int:
        called, host, port = peer_address(dest)
        with self.sessionmaker() as s, s.begin():
            row = Association(
                direction="out",
                calling_aet=self.settings.node.ae_title,
                called_aet=called,
                peer_host=host,
                peer_port=port,
                state="open",
                lease_owner=self.owner,
                lease_expires_at=self.leases.expiry(),
            )
            s.add(row)
            s.flush()
            assoc_id = int(row.id)
        self.leases.hold("association", [assoc_id])
        return assoc_id

    def _close_association_row(
        self, assoc_id: int, state: str, reason: str | None, n_stored: int, n_failed: int
    ) -> None:
        self.leases.drop("association", [assoc_id])
        with self.sessionmaker() as s, s.begin():
            row = s.get(Association, assoc_id)
            if row is None or row.state != "open":
                return
            row.state, row.reason, row.lease_expires_at = state, reason, None
            row.n_stored, row.n_failed, row.ended_at = n_stored, n_failed, utcnow()
            summary = (
                f"outbound to {row.called_aet}@{row.peer_host}:{row.peer_port}: "
                f"{n_stored} stored, {n_failed} failed"
            )
            record(
                s, STAGE, "association", assoc_id, "open", state, summary + (f"; {reason}" if reason else "")
            )
