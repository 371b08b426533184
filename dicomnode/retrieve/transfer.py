"""Retrieve attempts: C-MOVE of the chosen series to the node, or C-GET of it, retried with backoff.

With C-MOVE the source opens its own association to ``node.ae_title`` and the receive stage stores
the instances; with C-GET they arrive on this association and the receive stage's store path takes
them (``ReceiveStage.adopt_retrieve_association``). Either way an attempt counts as done only when
the source answered Success for every sub-operation and the series' instances are indexed under the
waiting series' patient; otherwise it is retried after a backoff, up to ``retrieve.max_attempts``.
Before each attempt the partner is looked for once more: one that arrived by itself cancels it.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from dicomnode.config import RuleConfig, Settings, SourceConfig
from dicomnode.db import Instance, PriorFetch, PriorRetrieve, Series, record
from dicomnode.receive import ReceiveStage
from dicomnode.retrieve.candidates import retrieve_identifier
from dicomnode.retrieve.ledger import ACTIVE_RETRIEVE, STAGE, Ledger, backoff_seconds, label
from dicomnode.retrieve.partner import usable_partner
from dicomnode.retrieve.scu import RetrieveResult, SourceSession

log = logging.getLogger("dicomnode.retrieve")
RENEW_EVERY = 5.0  # seconds between lease renewals while sub-operations progress


class Transfers:
    """Runs due retrieve attempts (and takes over those whose worker's lease expired)."""

    def __init__(
        self, settings: Settings, ledger: Ledger, receiver: ReceiveStage, rules: dict[str, RuleConfig]
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.receiver = receiver
        self.rules = rules
        self.sources = {s.name: s for s in settings.sources}

    def run_due(self) -> int:
        now = self.ledger.clock()
        with self.ledger.sessionmaker() as s:
            due = s.scalars(
                select(PriorRetrieve.id)
                .where(
                    or_(
                        (PriorRetrieve.state == "pending") & (PriorRetrieve.next_attempt_at <= now),
                        (PriorRetrieve.state == "running") & (PriorRetrieve.lease_expires_at < now),
                    )
                )
                .order_by(PriorRetrieve.id)
            ).all()
        return sum(self.attempt(rid) for rid in due)

    def _cancel_reason(self, s: Session, fetch: PriorFetch) -> tuple[str | None, Series | None]:
        rule = self.rules.get(fetch.rule_name)
        anchor = s.scalar(select(Series).where(Series.series_instance_uid == fetch.anchor_series_uid))
        if rule is None:
            return f"rule {fetch.rule_name} no longer fetches missing series", anchor
        if anchor is None:
            return "the waiting series is no longer indexed", anchor
        partner = usable_partner(s, rule, self.settings.assembly.pair_window_hours, anchor)
        if partner is not None:
            return f"partner arrived by itself: {label(partner)}", anchor
        return None, anchor

    def attempt(self, retrieve_id: int) -> int:
        """One attempt of one retrieve; 1 when it ran or was cancelled."""
        now = self.ledger.clock()
        with self.ledger.sessionmaker() as s:
            r = s.get(PriorRetrieve, retrieve_id)
            if r is None or r.state not in ACTIVE_RETRIEVE:
                return 0
            fetch = s.get(PriorFetch, r.fetch_id)
            assert fetch is not None
            cancel, anchor = self._cancel_reason(s, fetch)
            previous, attempt = r.state, r.attempts + 1  # read first: the claim updates ``r``
            if cancel is not None:
                if not self.ledger.claim(s, PriorRetrieve, retrieve_id):
                    return 0
                self.ledger.retrieve_to(s, retrieve_id, previous, "cancelled", cancel)
                self.ledger.fetch_to(s, fetch, "cancelled", cancel)
                s.commit()
                return 1
            assert anchor is not None
            if not self.ledger.claim(
                s, PriorRetrieve, retrieve_id, state="running", attempts=attempt, started_at=now
            ):
                return 0
            took_over = " (its previous worker stopped)" if previous == "running" else ""
            record(
                s,
                STAGE,
                "retrieve",
                retrieve_id,
                previous,
                "running",
                f"{r.method} of series {r.series_instance_uid} from {r.source} started, "
                f"attempt {attempt}{took_over}",
            )
            s.commit()
        source = self.sources.get(r.source)
        if source is None:
            result = RetrieveResult(False, error=f"source {r.source} is no longer configured")
        else:
            result = self._run(retrieve_id, source, r.method, r.study_instance_uid, r.series_instance_uid)
        self._record(retrieve_id, result, attempt, anchor.patient_key)
        return 1

    def _run(
        self, retrieve_id: int, source: SourceConfig, method: str, study_uid: str, series_uid: str
    ) -> RetrieveResult:
        service = "c-get" if method == "c-get" else "c-move"
        handlers = self.receiver.retrieve_handlers() if service == "c-get" else None
        last = [time.monotonic()]

        def progress(_completed: int | None, _remaining: int | None) -> None:
            if time.monotonic() - last[0] >= RENEW_EVERY:
                last[0] = time.monotonic()
                self.ledger.renew(PriorRetrieve, retrieve_id)

        with SourceSession(self.settings.node.ae_title, source, service, handlers) as session:
            error = session.open()
            if error:
                return RetrieveResult(False, error=error)
            if service == "c-get":
                assert session.assoc is not None
                self.receiver.adopt_retrieve_association(session.assoc, source.ae_title)
            destination = self.settings.node.ae_title if service == "c-move" else None
            return session.retrieve(
                retrieve_identifier(study_uid, series_uid),
                destination,
                self.settings.retrieve.max_retrieve_seconds,
                progress,
            )

    def _record(self, retrieve_id: int, result: RetrieveResult, attempt: int, patient_key: str) -> None:
        cfg = self.settings.retrieve
        ledger = self.ledger
        now = ledger.clock()
        with ledger.sessionmaker() as s:
            r = s.get(PriorRetrieve, retrieve_id)
            fetch = s.get(PriorFetch, r.fetch_id) if r is not None else None
            assert r is not None and fetch is not None
            n_held, held_key = s.execute(
                select(func.count(), func.min(Series.patient_key))
                .select_from(Instance)
                .join(Series, Series.series_instance_uid == Instance.series_instance_uid)
                .where(Instance.series_instance_uid == r.series_instance_uid)
            ).one()
            counts = {
                "n_completed": result.completed,
                "n_failed": result.failed,
                "n_warning": result.warning,
                "last_status": result.status,
            }
            status = f"status 0x{result.status:04X}" if result.status is not None else "no final status"
            summary = (
                f"{result.completed or 0} completed, {result.failed or 0} failed, "
                f"{result.warning or 0} warning sub-operations ({status}); {n_held} instances held"
            )
            error, permanent = result.error, False
            if result.ok and not n_held:
                error = f"{r.source} reported success but no instance of the series arrived"
            elif result.ok and held_key != patient_key:
                error = "the retrieved series belongs to another patient key than the waiting series"
                permanent = True
            if result.ok and error is None:
                ledger.retrieve_to(
                    s,
                    retrieve_id,
                    "running",
                    "done",
                    f"retrieve completed: {summary}",
                    finished_at=now,
                    error=None,
                    **counts,
                )
                ledger.fetch_to(
                    s,
                    fetch,
                    "retrieved",
                    f"{r.method} from {r.source} completed: {summary}; assemble pairs it when complete",
                )
            elif permanent or attempt >= cfg.max_attempts:
                ledger.retrieve_to(
                    s,
                    retrieve_id,
                    "running",
                    "failed",
                    f"retrieve failed (attempt {attempt}, giving up): {error}; {summary}",
                    finished_at=now,
                    error=error,
                    **counts,
                )
                ledger.fetch_to(
                    s,
                    fetch,
                    "failed",
                    f"retrieve of series {r.series_instance_uid} from {r.source} failed: {error}",
                )
            else:
                delay = backoff_seconds(cfg, attempt)
                ledger.retrieve_to(
                    s,
                    retrieve_id,
                    "running",
                    "pending",
                    f"retrieve failed (attempt {attempt} of {cfg.max_attempts}): {error}; {summary}; "
                    f"retry in {delay:g} s",
                    next_attempt_at=now + timedelta(seconds=delay),
                    error=error,
                    **counts,
                )
            s.commit()
        log.info("retrieve %d: %s", retrieve_id, "done" if result.ok and error is None else "attempt failed")
