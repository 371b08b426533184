"""The retrieve stage: fetch a rule's missing partner series from the PACS sources.

For every rule with ``fetch_missing.enabled``, a complete series the rule would fuse (the best
reference or moving series of its study, chosen by the rule's selection) that has no usable
partner in the node gets a ``PriorFetch`` row. It waits ``wait_minutes`` for the partner to
arrive by itself (which cancels it; a partner still arriving extends the wait), then a query
round asks every source (:mod:`dicomnode.retrieve.query`) and the chosen series is retrieved
(:mod:`dicomnode.retrieve.transfer`). Assemble then pairs it and the fuse stage registers and
fuses it like any other series. The stage talks to the others only through rows and, for C-GET,
through the receive stage's store path.

A failed query round (a source down, refusing, timing out) is retried with exponential backoff
up to ``retrieve.max_attempts``, then the fetch fails with the reason; so does a retrieve.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.assemble.selection import SeriesSelector, series_geometry
from dicomnode.config import RuleConfig, Settings
from dicomnode.db import PriorFetch, PriorRetrieve, Series, record, utcnow
from dicomnode.db.leases import WorkerLeases
from dicomnode.receive import ReceiveStage
from dicomnode.retrieve.ledger import LEASE_SECONDS, STAGE, Ledger, backoff_seconds, label
from dicomnode.retrieve.partner import usable_partner, wanted
from dicomnode.retrieve.query import QueryRound, RetryQuery
from dicomnode.retrieve.transfer import Transfers
from dicomnode.spool import Spool

log = logging.getLogger("dicomnode.retrieve")


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class RetrieveStage:
    """Creates, advances and retries fetches; ``run_once`` for one pass, ``run_forever`` as a worker."""

    def __init__(
        self,
        settings: Settings,
        sessionmaker: sessionmaker[Session],
        spool: Spool,
        *,
        clock: Callable[[], datetime] = utcnow,
        worker_id: str | None = None,
        leases: WorkerLeases | None = None,
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.clock = clock
        self.rules = {r.name: r for r in settings.rules if r.fetch_missing.enabled}
        # A live worker renews its lease at least once per source response (timeout_seconds apart).
        slowest = max((s.timeout_seconds for s in settings.sources), default=0.0)
        lease = max(LEASE_SECONDS, settings.workers.lease_seconds, 2 * slowest + 10)
        owner = worker_id or (leases.owner if leases else None) or settings.workers.worker_id or _worker_id()
        self.ledger = Ledger(sessionmaker, clock, owner, lease)
        self.queries = QueryRound(settings, self.ledger)
        # C-GET sub-operations are stored by the receive stage's own path (its SCP is not started here).
        self.transfers = Transfers(
            settings, self.ledger, ReceiveStage(settings, sessionmaker, spool, leases=leases), self.rules
        )
        self._settled: dict[tuple[str, str], datetime] = {}  # (rule, series) whose partner was held

    # -- the loop ------------------------------------------------------------------------------------
    def run_once(self) -> int:
        """One pass: new fetches, due waits and query rounds, due retrieves; returns rows worked on."""
        if not self.rules:
            return 0
        return self.discover() + self.advance_fetches() + self.run_retrieves()

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # keep the stage alive; the error is logged with its traceback
                log.exception("retrieve pass failed")
            stop.wait(self.settings.retrieve.poll_seconds)

    def run_retrieves(self) -> int:
        return self.transfers.run_due()

    def _partner(self, s: Session, rule: RuleConfig, anchor: Series) -> Series | None:
        return usable_partner(s, rule, self.settings.assembly.pair_window_hours, anchor)

    # -- new fetches ---------------------------------------------------------------------------------
    def discover(self) -> int:
        """A fetch row for each recently completed series a rule would fuse that has no usable partner."""
        now = self.clock()
        created = 0
        with self.sessionmaker() as s:
            for rule in self.rules.values():
                created += self._discover_rule(s, rule, now)
            s.commit()
        horizon = now - timedelta(hours=max(r.fetch_missing.max_age_hours for r in self.rules.values()))
        self._settled = {k: v for k, v in self._settled.items() if v >= horizon}
        return created

    def _discover_rule(self, s: Session, rule: RuleConfig, now: datetime) -> int:
        since = now - timedelta(hours=rule.fetch_missing.max_age_hours)
        complete = s.scalars(
            select(Series).where(
                Series.state == "complete",
                Series.modality.in_({rule.reference, rule.moving}),
                Series.completed_at >= since,
            )
        ).all()
        uids = [x.series_instance_uid for x in complete]
        if not uids:
            return 0
        has_fetch = set(
            s.scalars(
                select(PriorFetch.anchor_series_uid).where(
                    PriorFetch.rule_name == rule.name, PriorFetch.anchor_series_uid.in_(uids)
                )
            ).all()
        )
        # A fetched series never starts a fetch itself (no chains of priors of priors).
        fetched = set(
            s.scalars(
                select(PriorRetrieve.series_instance_uid).where(PriorRetrieve.series_instance_uid.in_(uids))
            )
        )
        patients = {x.patient_key for x in complete}
        busy = set(
            s.scalars(
                select(Series.patient_key).where(
                    Series.state == "receiving", Series.patient_key.in_(patients)
                )
            ).all()
        )
        groups: dict[tuple[str, str, str], list[Series]] = {}
        for x in complete:
            if x.patient_key not in busy and x.series_instance_uid not in fetched:
                groups.setdefault((x.patient_key, x.study_instance_uid, x.modality), []).append(x)
        selector = SeriesSelector(rule, series_geometry(s, uids))
        created = 0
        for (_patient, _study, modality), members in sorted(groups.items()):
            anchor = selector.choose(members, "reference" if modality == rule.reference else "moving").series
            if anchor is None:
                continue
            key = (rule.name, anchor.series_instance_uid)
            if anchor.series_instance_uid in has_fetch or key in self._settled:
                continue
            if self._partner(s, rule, anchor) is not None:
                self._settled[key] = anchor.completed_at or now
                continue
            created += self._create_fetch(s, rule, anchor, now)
        return created

    def _create_fetch(self, s: Session, rule: RuleConfig, anchor: Series, now: datetime) -> int:
        modality, _side = wanted(rule, anchor.modality)
        wait = rule.fetch_missing.wait_minutes
        due = (anchor.completed_at or now) + timedelta(minutes=wait)
        reason = (
            f"rule {rule.name}: {anchor.modality} series {label(anchor)} complete without a usable "
            f"{modality} series; waiting {wait:g} min for it to arrive, then querying "
            f"{', '.join(self.queries.sources)}"
        )
        fetch = PriorFetch(
            rule_name=rule.name,
            patient_key=anchor.patient_key,
            anchor_series_uid=anchor.series_instance_uid,
            anchor_modality=anchor.modality,
            wanted_modality=modality,
            state="waiting",
            reason=reason,
            due_at=due,
            next_attempt_at=due,
            created_at=now,
            updated_at=now,
        )
        try:
            with s.begin_nested():
                s.add(fetch)
                s.flush()
        except IntegrityError:  # another retrieve worker created it first
            return 0
        record(s, STAGE, "fetch", fetch.id, None, "waiting", reason)
        log.info("fetch %d: waiting for a %s series (rule %s)", fetch.id, modality, rule.name)
        return 1

    # -- waits and query rounds ----------------------------------------------------------------------
    def advance_fetches(self) -> int:
        now = self.clock()
        with self.sessionmaker() as s:
            due = s.scalars(
                select(PriorFetch.id)
                .where(
                    PriorFetch.state.in_(("waiting", "querying")),
                    or_(PriorFetch.lease_expires_at.is_(None), PriorFetch.lease_expires_at < now),
                )
                .order_by(PriorFetch.id)
            ).all()
        return sum(self._advance(fetch_id) for fetch_id in due)

    def _advance(self, fetch_id: int) -> int:
        """Cancel, keep waiting, or run a query round (and the first retrieve attempt) for one fetch."""
        now = self.clock()
        with self.sessionmaker() as s:
            fetch = s.get(PriorFetch, fetch_id)
            if fetch is None or fetch.state not in ("waiting", "querying"):
                return 0
            if fetch.state == "querying" and fetch.next_attempt_at > now:
                return 0
            rule = self.rules.get(fetch.rule_name)
            anchor = s.scalar(select(Series).where(Series.series_instance_uid == fetch.anchor_series_uid))
            cancel: str | None = None
            if rule is None:
                cancel = f"rule {fetch.rule_name} no longer fetches missing series"
            elif anchor is None:
                cancel = "the waiting series is no longer indexed"
            elif (partner := self._partner(s, rule, anchor)) is not None:
                cancel = f"partner arrived by itself: {label(partner)}"
            elif fetch.state == "waiting" and (now < fetch.due_at or self._arriving(s, fetch)):
                return 0
            if not self.ledger.claim(s, PriorFetch, fetch_id):
                return 0
            if cancel is not None:
                self.ledger.fetch_to(s, fetch, "cancelled", cancel)
                s.commit()
                log.info("fetch %d: cancelled", fetch_id)
                return 1
            assert rule is not None and anchor is not None
            if fetch.state == "waiting":
                self.ledger.fetch_to(
                    s,
                    fetch,
                    "querying",
                    f"no usable {fetch.wanted_modality} series after "
                    f"{rule.fetch_missing.wait_minutes:g} min; querying {', '.join(self.queries.sources)}",
                )
            s.commit()
        retrieve_id = None
        try:
            retrieve_id = self.queries.run(fetch_id, rule, anchor)
        except RetryQuery as exc:
            self._retry_query(fetch_id, str(exc))
        finally:
            self.ledger.release(PriorFetch, fetch_id)
        if retrieve_id is not None:
            self.transfers.attempt(retrieve_id)
        return 1

    @staticmethod
    def _arriving(s: Session, fetch: PriorFetch) -> bool:
        """A series of the wanted modality of the patient is still arriving: the wait goes on."""
        n = s.scalar(
            select(func.count())
            .select_from(Series)
            .where(
                Series.patient_key == fetch.patient_key,
                Series.modality == fetch.wanted_modality,
                Series.state == "receiving",
            )
        )
        return bool(n)

    def _retry_query(self, fetch_id: int, why: str) -> None:
        cfg = self.settings.retrieve
        now = self.clock()
        with self.sessionmaker() as s:
            fetch = s.get(PriorFetch, fetch_id)
            assert fetch is not None
            attempts = fetch.attempts + 1
            if attempts >= cfg.max_attempts:
                reason = f"query failed {attempts} times, giving up: {why}"
                self.ledger.fetch_to(s, fetch, "failed", reason, attempts=attempts)
            else:
                delay = backoff_seconds(cfg, attempts)
                s.execute(
                    update(PriorFetch)
                    .where(PriorFetch.id == fetch_id)
                    .values(
                        attempts=attempts,
                        next_attempt_at=now + timedelta(seconds=delay),
                        reason=f"query attempt {attempts} failed: {why}",
                        updated_at=now,
                    )
                )
                reason = f"query attempt {attempts} of {cfg.max_attempts} failed: {why}; retry in {delay:g} s"
                record(s, STAGE, "fetch", fetch_id, "querying", "querying", reason)
            s.commit()
        log.warning("fetch %d: query attempt failed: %s", fetch_id, why)
