"""The dispatch outbox: send due Delivery rows by C-STORE (one association per destination per round)
or, to a DICOMweb destination, by STOW-RS (:mod:`dicomnode.dispatch.senders` picks by type).

A delivery becomes 'sent' only after the destination answered Success (or a Warning, which
DICOM defines as stored; the status is kept in ``last_status``). Any other outcome is a failed
attempt: ``attempts`` + 1, the reason in ``last_error`` and the audit, and the next try after an
exponential backoff with jitter; after ``dispatch.max_attempts`` the delivery is 'failed'.

Crash safety: state is only written after the PACS answered, in short transactions (so the SQLite
write lock is never held while waiting on the network). A process that dies mid-round leaves its
rows 'pending' and due, and the next round sends them again; a PACS takes a re-sent identical
instance. Two dispatchers on one database are not coordinated: both may send a due row (harmless
for the same reason), and only the first result is recorded.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import DestinationConfig, Settings
from dicomnode.db import Association, Delivery, Output, record, utcnow
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
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.spool = spool
        self.clock = clock
        self.batch_limit = batch_limit

    # --- the rounds -----------------------------------------------------------------------------

    def run_once(self) -> int:
        """Send every due delivery (at most ``batch_limit``), grouped per destination; returns number sent."""
        now = self.clock()
        with self.sessionmaker() as s:
            rows = s.execute(
                select(Delivery.id, Delivery.destination, Output.path)
                .join(Output, Output.id == Delivery.output_id)
                .where(Delivery.state == "pending", Delivery.next_attempt_at <= now)
                .order_by(Delivery.destination, Delivery.id)
                .limit(self.batch_limit)
            ).all()
        if not rows:
            return 0
        by_dest: dict[str, list[_Due]] = {}
        for delivery_id, dest_name, path in rows:
            by_dest.setdefault(dest_name, []).append(_Due(delivery_id, dest_name, path))
        configured = {d.name: d for d in self.settings.destinations}
        sent = 0
        for dest_name, items in by_dest.items():
            dest = configured.get(dest_name)
            if dest is None:
                self._fail_unconfigured(dest_name, items)
                continue
            sent += self._deliver(dest, items)
        return sent

    def run_forever(self, stop: threading.Event) -> None:
        """Run rounds until ``stop`` is set; sleeps ``dispatch.poll_seconds`` when a round sent nothing."""
        log.info("dispatch worker started (%d destinations)", len(self.settings.destinations))
        while not stop.is_set():
            try:
                sent = self.run_once()
            except Exception:  # a DB outage must not kill the worker; the next round retries
                log.exception("dispatch round failed")
                sent = 0
            if sent == 0:
                stop.wait(self.settings.dispatch.poll_seconds)
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
            log.warning("dispatch to %s: %s; %d deliveries wait for retry", dest.name, error, len(planned))
            results.extend((item.delivery_id, StoreResult(False, None, error)) for item, _ in planned)
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
        base = min(cfg.backoff_initial_seconds * 2 ** max(attempts - 1, 0), cfg.backoff_max_seconds)
        return base * (1.0 + random.uniform(0.0, JITTER))

    def _flush(self, results: list[tuple[int, StoreResult]]) -> None:
        """Record a batch of outcomes in one short transaction."""
        if not results:
            return
        max_attempts = self.settings.dispatch.max_attempts
        with self.sessionmaker() as s, s.begin():
            now = self.clock()
            for delivery_id, result in results:
                d = s.get(Delivery, delivery_id)
                if d is None or d.state != "pending":
                    continue  # changed meanwhile (admin action or another dispatcher)
                d.last_status = result.status
                if result.stored:
                    d.state, d.sent_at, d.last_error = "sent", now, result.error
                    why = f"stored at {d.destination}" + (f" ({result.error})" if result.error else "")
                    record(s, STAGE, "delivery", d.id, "pending", "sent", why)
                    continue
                d.attempts += 1
                d.last_error = result.error
                if d.attempts >= max_attempts:
                    d.state = "failed"
                    record(
                        s,
                        STAGE,
                        "delivery",
                        d.id,
                        "pending",
                        "failed",
                        f"gave up after {d.attempts} attempts: {result.error}",
                    )
                    log.error(
                        "dispatch: delivery %d to %s failed for good after %d attempts",
                        d.id,
                        d.destination,
                        d.attempts,
                    )
                else:
                    delay = self.backoff_seconds(d.attempts)
                    d.next_attempt_at = now + timedelta(seconds=delay)
                    record(
                        s,
                        STAGE,
                        "delivery",
                        d.id,
                        "pending",
                        "pending",
                        f"attempt {d.attempts}/{max_attempts} failed: {result.error}; "
                        f"next attempt in {delay:.1f} s",
                    )

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
                d.state, d.last_error = "failed", reason
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
            )
            s.add(row)
            s.flush()
            return int(row.id)

    def _close_association_row(
        self, assoc_id: int, state: str, reason: str | None, n_stored: int, n_failed: int
    ) -> None:
        with self.sessionmaker() as s, s.begin():
            row = s.get(Association, assoc_id)
            if row is None:
                return
            row.state, row.reason = state, reason
            row.n_stored, row.n_failed, row.ended_at = n_stored, n_failed, utcnow()
            summary = (
                f"outbound to {row.called_aet}@{row.peer_host}:{row.peer_port}: "
                f"{n_stored} stored, {n_failed} failed"
            )
            record(
                s, STAGE, "association", assoc_id, "open", state, summary + (f"; {reason}" if reason else "")
            )
