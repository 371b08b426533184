"""The retrieve stage: fetch a rule's missing partner series from the PACS sources.

For every rule with ``fetch_missing.enabled``, a complete series that the rule would fuse (the
best reference or moving series of its study) and that has no usable partner in the node gets a
``PriorFetch`` row. It waits ``wait_minutes`` for the partner to arrive by itself (which cancels
it), then queries every source (Study Root C-FIND, study then series level: the patient's Patient
ID and Issuer, the wanted modality, study dates within ``lookback_days``), ranks what they offer
with the rule's own ``SeriesSelector`` and retrieves the chosen series: C-MOVE to ``node.ae_title``
(the instances arrive at the receive stage as C-STORE from the source) or C-GET (the instances
arrive on this association and go through the receive stage's own store path). Assemble then
pairs and the fuse stage registers and fuses it like any other series.

Every query and retrieve is a row with a state and audit events; a failed query round or retrieve
is retried with exponential backoff up to ``retrieve.max_attempts``. State is written in short
transactions, never while waiting on the network (the receive stage writes while a C-MOVE runs).
Rows carry a lease (owner, expiry) renewed while working, so a stage that dies loses nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.assemble.selection import SeriesSelector, pairable, series_geometry
from dicomnode.config import RuleConfig, Settings, SourceConfig
from dicomnode.db import Instance, PriorFetch, PriorQuery, PriorRetrieve, Series, record, utcnow
from dicomnode.retrieve.candidates import (
    SeriesCandidate,
    StudyMatch,
    accept_series,
    accept_study,
    retrieve_identifier,
    series_query,
    study_query,
)
from dicomnode.retrieve.scu import RetrieveResult, SourceSession
from dicomnode.spool import Spool

log = logging.getLogger("dicomnode.retrieve")
STAGE = "retrieve"
OPEN_FETCH = ("waiting", "querying", "retrieving")
ACTIVE_RETRIEVE = ("pending", "running")
LEASE_SECONDS = 60.0  # renewed while a query or retrieve makes progress
RENEW_EVERY = 5.0


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _label(series: Series) -> str:
    desc = series.series_description or "(no description)"
    return f"'{desc}' ({series.series_instance_uid[-12:]})"


class _Retry(Exception):
    """A query round failed in a way worth retrying; the message is the reason."""


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
    ) -> None:
        from dicomnode.receive import ReceiveStage  # noqa: PLC0415

        self.settings = settings
        self.sessionmaker = sessionmaker
        self.clock = clock
        self.worker_id = worker_id or _worker_id()
        self.rules = {r.name: r for r in settings.rules if r.fetch_missing.enabled}
        self.sources = {s.name: s for s in settings.sources}
        # C-GET sub-operations are stored by the receive stage's own path (never started here).
        self.receiver = ReceiveStage(settings, sessionmaker, spool)
        self._settled: dict[tuple[str, str], datetime] = {}  # anchors whose partner was there

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

    def stop(self) -> None:
        self.receiver.index.close()

    # -- helpers -------------------------------------------------------------------------------------
    def _backoff(self, attempts: int) -> float:
        cfg = self.settings.retrieve
        return min(cfg.backoff_initial_seconds * 2 ** max(attempts - 1, 0), cfg.backoff_max_seconds)

    def _claim(self, s: Session, model: Any, row_id: int, **values: Any) -> bool:
        """Take the lease on a row nobody else holds (or whose lease expired)."""
        now = self.clock()
        res = s.execute(
            update(model)
            .where(
                model.id == row_id,
                or_(
                    model.lease_expires_at.is_(None),
                    model.lease_expires_at < now,
                    model.lease_owner == self.worker_id,
                ),
            )
            .values(
                lease_owner=self.worker_id,
                lease_expires_at=now + timedelta(seconds=LEASE_SECONDS),
                **values,
            )
        )
        return res.rowcount == 1  # type: ignore[attr-defined]

    def _renew(self, model: Any, row_id: int) -> None:
        with self.sessionmaker() as s:
            s.execute(
                update(model)
                .where(model.id == row_id, model.lease_owner == self.worker_id)
                .values(lease_expires_at=self.clock() + timedelta(seconds=LEASE_SECONDS))
            )
            s.commit()

    def _fetch_to(self, s: Session, fetch: PriorFetch, state: str, reason: str, **values: Any) -> None:
        """Move a fetch to ``state`` with its audit event; end states release the lease."""
        now = self.clock()
        old = fetch.state  # read first: the ORM update below also changes the loaded object
        ending = state not in OPEN_FETCH
        extra: dict[str, Any] = {"finished_at": now} if ending else {}
        if ending:
            extra.update(lease_owner=None, lease_expires_at=None)
        s.execute(
            update(PriorFetch)
            .where(PriorFetch.id == fetch.id)
            .values(state=state, reason=reason, updated_at=now, **extra, **values)
        )
        record(s, STAGE, "fetch", fetch.id, old, state, reason)
        fetch.state = state

    def _release(self, model: Any, row_id: int) -> None:
        with self.sessionmaker() as s:
            s.execute(
                update(model)
                .where(model.id == row_id, model.lease_owner == self.worker_id)
                .values(lease_owner=None, lease_expires_at=None)
            )
            s.commit()

    @staticmethod
    def _wanted(rule: RuleConfig, anchor_modality: str) -> tuple[str, str]:
        """(wanted modality, selector side of the wanted series) for an anchor of ``anchor_modality``."""
        if anchor_modality == rule.reference:
            return rule.moving, "moving"
        return rule.reference, "reference"

    def _active_retrieves(self, s: Session, patient_key: str) -> set[str]:
        return set(
            s.scalars(
                select(PriorRetrieve.series_instance_uid).where(
                    PriorRetrieve.patient_key == patient_key, PriorRetrieve.state.in_(ACTIVE_RETRIEVE)
                )
            ).all()
        )

    def usable_partner(self, s: Session, rule: RuleConfig, anchor: Series) -> Series | None:
        """A complete series in the node that the rule would fuse with ``anchor``, if any."""
        wanted, _side = self._wanted(rule, anchor.modality)
        being_retrieved = self._active_retrieves(s, anchor.patient_key)
        window = self.settings.assembly.pair_window_hours
        found = [
            c
            for c in s.scalars(
                select(Series).where(
                    Series.patient_key == anchor.patient_key,
                    Series.modality == wanted,
                    Series.state == "complete",
                )
            ).all()
            if c.series_instance_uid not in being_retrieved and pairable(rule, window, anchor, c)
        ]
        if not found:
            return None
        selector = SeriesSelector(rule, series_geometry(s, [c.series_instance_uid for c in found]))
        return next((c for c in found if selector.rejection(c) is None), None)

    # -- new fetches ---------------------------------------------------------------------------------
    def discover(self) -> int:
        """A fetch row for each complete series a rule would fuse that has no usable partner."""
        now = self.clock()
        created = 0
        with self.sessionmaker() as s:
            fetched = set(s.scalars(select(PriorRetrieve.series_instance_uid)).all())
            for rule in self.rules.values():
                created += self._discover_rule(s, rule, now, fetched)
            s.commit()
        horizon = now - timedelta(hours=max(r.fetch_missing.max_age_hours for r in self.rules.values()))
        self._settled = {k: v for k, v in self._settled.items() if v >= horizon}
        return created

    def _discover_rule(self, s: Session, rule: RuleConfig, now: datetime, fetched: set[str]) -> int:
        since = now - timedelta(hours=rule.fetch_missing.max_age_hours)
        has_fetch = set(
            s.scalars(select(PriorFetch.anchor_series_uid).where(PriorFetch.rule_name == rule.name)).all()
        )
        complete = [
            x
            for x in s.scalars(
                select(Series).where(
                    Series.state == "complete",
                    Series.modality.in_({rule.reference, rule.moving}),
                    Series.completed_at >= since,
                )
            ).all()
            if x.series_instance_uid not in fetched  # a fetched series never starts a fetch itself
        ]
        if not complete:
            return 0
        patients = {x.patient_key for x in complete}
        busy = set(
            s.scalars(
                select(Series.patient_key).where(
                    Series.state == "receiving", Series.patient_key.in_(patients)
                )
            ).all()
        )
        selector = SeriesSelector(rule, series_geometry(s, [x.series_instance_uid for x in complete]))
        created = 0
        groups: dict[tuple[str, str, str], list[Series]] = {}
        for x in complete:
            if x.patient_key not in busy:
                groups.setdefault((x.patient_key, x.study_instance_uid, x.modality), []).append(x)
        for (_patient, _study, modality), members in sorted(groups.items()):
            side = "reference" if modality == rule.reference else "moving"
            anchor = selector.choose(members, side).series
            if anchor is None:
                continue
            key = (rule.name, anchor.series_instance_uid)
            if anchor.series_instance_uid in has_fetch or key in self._settled:
                continue
            if self.usable_partner(s, rule, anchor) is not None:
                self._settled[key] = anchor.completed_at or now
                continue
            if self._create_fetch(s, rule, anchor, now):
                created += 1
        return created

    def _create_fetch(self, s: Session, rule: RuleConfig, anchor: Series, now: datetime) -> bool:
        wanted, _side = self._wanted(rule, anchor.modality)
        wait = rule.fetch_missing.wait_minutes
        due = (anchor.completed_at or now) + timedelta(minutes=wait)
        fetch = PriorFetch(
            rule_name=rule.name,
            patient_key=anchor.patient_key,
            anchor_series_uid=anchor.series_instance_uid,
            anchor_modality=anchor.modality,
            wanted_modality=wanted,
            state="waiting",
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
            return False
        reason = (
            f"rule {rule.name}: {anchor.modality} series {_label(anchor)} complete without a usable "
            f"{wanted} series; waiting {wait:g} min for it to arrive, then querying "
            f"{', '.join(self.sources)}"
        )
        fetch.reason = reason
        record(s, STAGE, "fetch", fetch.id, None, "waiting", reason)
        log.info("fetch %d: waiting for a %s series (rule %s)", fetch.id, wanted, rule.name)
        return True

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
        worked = 0
        for fetch_id in due:
            worked += self._advance(fetch_id)
        return worked

    def _advance(self, fetch_id: int) -> int:
        """Cancel, keep waiting, or run a query round for one fetch; 1 when something changed."""
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
            else:
                partner = self.usable_partner(s, rule, anchor)
                if partner is not None:
                    cancel = f"partner arrived by itself: {_label(partner)}"
                elif fetch.state == "waiting" and (now < fetch.due_at or self._arriving(s, fetch)):
                    return 0
            if not self._claim(s, PriorFetch, fetch_id):
                return 0
            if cancel is not None:
                self._fetch_to(s, fetch, "cancelled", cancel)
                s.commit()
                log.info("fetch %d: cancelled", fetch_id)
                return 1
            assert rule is not None and anchor is not None
            if fetch.state == "waiting":
                self._fetch_to(
                    s,
                    fetch,
                    "querying",
                    f"no usable {fetch.wanted_modality} series after "
                    f"{rule.fetch_missing.wait_minutes:g} min; querying {', '.join(self.sources)}",
                )
            s.commit()
        try:
            self._query_round(fetch_id, rule, anchor)
        except _Retry as exc:
            self._retry_query(fetch_id, str(exc))
        finally:
            self._release(PriorFetch, fetch_id)
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
        with self.sessionmaker() as s:
            fetch = s.get(PriorFetch, fetch_id)
            assert fetch is not None
            attempts = fetch.attempts + 1
            if attempts >= cfg.max_attempts:
                self._fetch_to(
                    s, fetch, "failed", f"query failed {attempts} times, giving up: {why}", attempts=attempts
                )
            else:
                delay = self._backoff(attempts)
                s.execute(
                    update(PriorFetch)
                    .where(PriorFetch.id == fetch_id)
                    .values(
                        attempts=attempts,
                        next_attempt_at=self.clock() + timedelta(seconds=delay),
                        reason=f"query attempt {attempts} failed: {why}",
                        updated_at=self.clock(),
                    )
                )
                record(
                    s,
                    STAGE,
                    "fetch",
                    fetch_id,
                    "querying",
                    "querying",
                    f"query attempt {attempts} of {cfg.max_attempts} failed: {why}; retry in {delay:g} s",
                )
            s.commit()
        log.warning("fetch %d: query attempt failed: %s", fetch_id, why)

    def _query_round(self, fetch_id: int, rule: RuleConfig, anchor: Series) -> None:
        """Query every source; choose; create the retrieve (and run it) or end the fetch."""
        fm = rule.fetch_missing
        wanted, side = self._wanted(rule, anchor.modality)
        if not anchor.patient_id.strip() or anchor.study_datetime is None:
            missing = "Patient ID" if not anchor.patient_id.strip() else "Study Date"
            self._end(fetch_id, "not_found", f"the {anchor.modality} series has no {missing} to query by")
            return
        last = anchor.study_datetime.date()
        first = last - timedelta(days=fm.lookback_days)
        candidates: list[SeriesCandidate] = []
        notes: list[str] = []
        failures: list[str] = []
        for source in self.sources.values():
            found, error = self._query_source(fetch_id, source, anchor, wanted, first, last, rule, notes)
            candidates += found
            if error:
                failures.append(error)
        unique: dict[str, SeriesCandidate] = {}
        for c in candidates:
            if c.series.series_instance_uid != anchor.series_instance_uid:
                unique.setdefault(c.series.series_instance_uid, c)
        dates = f"dated {first:%Y-%m-%d}..{last:%Y-%m-%d}"
        if not unique:
            if failures:
                raise _Retry("; ".join(failures))
            why = f"no source holds a {wanted} series of the patient {dates}"
            self._end(fetch_id, "not_found", "; ".join([why, *notes]))
            return
        selector = SeriesSelector(rule, {})
        choice = selector.choose([c.series for c in unique.values()], side, near=anchor)
        listed = f"{len(unique)} candidate {wanted} series {dates}"
        if choice.series is None:
            if failures:
                raise _Retry(f"{listed}, none usable ({choice.why}); " + "; ".join(failures))
            self._end(fetch_id, "not_found", f"{listed}, none usable: {choice.why}")
            return
        chosen = unique[choice.series.series_instance_uid]
        self._choose(fetch_id, rule, anchor, chosen, f"{listed}; {choice.why}")

    def _query_source(
        self,
        fetch_id: int,
        source: SourceConfig,
        anchor: Series,
        wanted: str,
        first: date,
        last: date,
        rule: RuleConfig,
        notes: list[str],
    ) -> tuple[list[SeriesCandidate], str | None]:
        """Study then series level C-FIND on one source; (candidates, error or None)."""
        cfg = self.settings.retrieve
        calling = self.settings.node.ae_title
        issuer = anchor.issuer_of_patient_id or ""
        with SourceSession(calling, source, "find") as session:
            dates = f"{first:%Y-%m-%d}..{last:%Y-%m-%d}"
            what = f"C-FIND STUDY level to {source.name}: {wanted} studies dated {dates}"
            query_id = self._query_sent(fetch_id, source, "STUDY", None, what)
            error = session.open()
            if error:
                self._query_done(query_id, None, error, 0)
                return [], f"{source.name}: {error}"
            result = session.find(
                study_query(anchor.patient_id, issuer, wanted, first, last), cfg.max_studies
            )
            studies: list[StudyMatch] = []
            for ds in result.matches:
                accepted = accept_study(source.name, ds, anchor.patient_id, issuer)
                if isinstance(accepted, str):
                    notes.append(f"{source.name}: {accepted}")
                else:
                    studies.append(accepted)
            summary = f"{len(result.matches)} matches, {len(studies)} studies of the patient"
            if result.truncated:
                summary += f" (more than {cfg.max_studies}: the first {cfg.max_studies} used)"
            self._query_done(query_id, result.status, result.error, len(result.matches), summary)
            if result.error and not studies:
                return [], f"{source.name}: {result.error}"
            found: list[SeriesCandidate] = []
            for study in studies:
                self._renew(PriorFetch, fetch_id)
                what = f"C-FIND SERIES level to {source.name}: {wanted} series of study "
                what += study.study_instance_uid
                query_id = self._query_sent(fetch_id, source, "SERIES", study.study_instance_uid, what)
                result = session.find(series_query(study.study_instance_uid, wanted), cfg.max_series)
                n_ok = 0
                for ds in result.matches:
                    accepted = accept_series(ds, study, wanted, anchor, rule.min_slices)
                    if isinstance(accepted, str):
                        notes.append(f"{source.name}: {accepted}")
                    else:
                        found.append(accepted)
                        n_ok += 1
                summary = f"{len(result.matches)} matches, {n_ok} {wanted} series"
                if result.truncated:
                    summary += f" (more than {cfg.max_series}: the first {cfg.max_series} used)"
                self._query_done(query_id, result.status, result.error, len(result.matches), summary)
                if result.error:
                    return found, f"{source.name}: {result.error}"
        return found, None

    def _query_sent(
        self, fetch_id: int, source: SourceConfig, level: str, study: str | None, what: str
    ) -> int:
        with self.sessionmaker() as s:
            q = PriorQuery(
                fetch_id=fetch_id,
                source=source.name,
                level=level,
                study_instance_uid=study,
                state="sent",
                started_at=self.clock(),
            )
            s.add(q)
            s.flush()
            record(s, STAGE, "query", q.id, None, "sent", f"fetch {fetch_id}: {what}")
            s.commit()
            return q.id

    def _query_done(
        self, query_id: int, status: int | None, error: str | None, n: int, summary: str = ""
    ) -> None:
        state = "failed" if error else "done"
        with self.sessionmaker() as s:
            s.execute(
                update(PriorQuery)
                .where(PriorQuery.id == query_id)
                .values(state=state, status=status, error=error, n_matches=n, finished_at=self.clock())
            )
            reason = "; ".join(x for x in (summary, error) if x)
            record(s, STAGE, "query", query_id, "sent", state, reason)
            s.commit()

    def _end(self, fetch_id: int, state: str, reason: str) -> None:
        with self.sessionmaker() as s:
            fetch = s.get(PriorFetch, fetch_id)
            assert fetch is not None
            self._fetch_to(s, fetch, state, reason)
            s.commit()
        log.info("fetch %d: %s", fetch_id, state)

    def _choose(
        self, fetch_id: int, rule: RuleConfig, anchor: Series, chosen: SeriesCandidate, why: str
    ) -> None:
        uid = chosen.series.series_instance_uid
        source = self.sources[chosen.source]
        with self.sessionmaker() as s:
            held = s.scalar(select(Series).where(Series.series_instance_uid == uid))
            other = s.scalar(
                select(PriorRetrieve.fetch_id).where(
                    PriorRetrieve.series_instance_uid == uid, PriorRetrieve.state.in_(ACTIVE_RETRIEVE)
                )
            )
            fetch = s.get(PriorFetch, fetch_id)
            assert fetch is not None
            if other is not None:
                self._fetch_to(s, fetch, "cancelled", f"{why}; already being retrieved by fetch {other}")
                s.commit()
                return
            if held is not None:
                self._fetch_to(
                    s,
                    fetch,
                    "cancelled",
                    f"{why}; the node already holds it ({held.state}, {held.n_instances} instances): "
                    "not fetched again",
                )
                s.commit()
                return
            when = chosen.study.study_datetime
            retrieve = PriorRetrieve(
                fetch_id=fetch_id,
                source=source.name,
                method=source.retrieve,
                patient_key=anchor.patient_key,
                study_instance_uid=chosen.study.study_instance_uid,
                series_instance_uid=uid,
                state="pending",
                next_attempt_at=self.clock(),
                created_at=self.clock(),
            )
            s.add(retrieve)
            s.flush()
            self._fetch_to(
                s,
                fetch,
                "retrieving",
                f"chose {_label(chosen.series)} of study {when:%Y-%m-%d} on {source.name} "
                f"({source.retrieve}, retrieve {retrieve.id}): {why}"
                if when
                else f"chose {_label(chosen.series)} on {source.name} (retrieve {retrieve.id}): {why}",
                source=source.name,
                chosen_study_uid=chosen.study.study_instance_uid,
                chosen_series_uid=uid,
            )
            record(s, STAGE, "retrieve", retrieve.id, None, "pending", f"fetch {fetch_id}: {source.retrieve}")
            s.commit()
            retrieve_id = retrieve.id
        self._retrieve(retrieve_id)

    # -- retrieves -----------------------------------------------------------------------------------
    def run_retrieves(self) -> int:
        now = self.clock()
        with self.sessionmaker() as s:
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
        return sum(self._retrieve(rid) for rid in due)

    def _retrieve(self, retrieve_id: int) -> int:
        """One attempt of one retrieve; 1 when it ran."""
        now = self.clock()
        with self.sessionmaker() as s:
            r = s.get(PriorRetrieve, retrieve_id)
            if r is None or r.state not in ACTIVE_RETRIEVE:
                return 0
            previous, attempt = r.state, r.attempts + 1  # read first: the claim updates ``r``
            if not self._claim(
                s, PriorRetrieve, retrieve_id, state="running", attempts=attempt, started_at=now
            ):
                return 0
            fetch = s.get(PriorFetch, r.fetch_id)
            assert fetch is not None
            note = " (the previous worker stopped)" if previous == "running" else ""
            record(
                s,
                STAGE,
                "retrieve",
                retrieve_id,
                previous,
                "running",
                f"{r.method} of series {r.series_instance_uid} from {r.source} started, attempt {attempt}"
                + note,
            )
            s.commit()
            rule = self.rules.get(fetch.rule_name)
            anchor = s.scalar(select(Series).where(Series.series_instance_uid == fetch.anchor_series_uid))
            partner = (
                self.usable_partner(s, rule, anchor) if rule is not None and anchor is not None else None
            )
            if rule is None or anchor is None or partner is not None:
                why = (
                    f"partner arrived by itself: {_label(partner)}"
                    if partner is not None
                    else "the rule no longer fetches, or the waiting series is gone"
                )
                self._retrieve_to(s, retrieve_id, "running", "cancelled", why)
                self._fetch_to(s, fetch, "cancelled", why)
                s.commit()
                return 1
            source = self.sources.get(r.source)
            study_uid, series_uid, method = r.study_instance_uid, r.series_instance_uid, r.method
        if source is None:
            result = RetrieveResult(False, error=f"source {r.source} is no longer configured")
        else:
            result = self._run(retrieve_id, source, method, study_uid, series_uid)
        self._record_result(retrieve_id, result, attempt, anchor)
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
                self._renew(PriorRetrieve, retrieve_id)

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

    def _retrieve_to(
        self, s: Session, retrieve_id: int, old: str, new: str, reason: str, **values: Any
    ) -> None:
        s.execute(
            update(PriorRetrieve)
            .where(PriorRetrieve.id == retrieve_id)
            .values(state=new, lease_owner=None, lease_expires_at=None, **values)
        )
        record(s, STAGE, "retrieve", retrieve_id, old, new, reason)

    def _record_result(self, retrieve_id: int, result: RetrieveResult, attempt: int, anchor: Series) -> None:
        cfg = self.settings.retrieve
        now = self.clock()
        with self.sessionmaker() as s:
            r = s.get(PriorRetrieve, retrieve_id)
            fetch = s.get(PriorFetch, r.fetch_id) if r is not None else None
            assert r is not None and fetch is not None
            held = s.execute(
                select(func.count(), func.min(Series.patient_key))
                .select_from(Instance)
                .join(Series, Series.series_instance_uid == Instance.series_instance_uid)
                .where(Instance.series_instance_uid == r.series_instance_uid)
            ).one()
            n_held, held_key = int(held[0] or 0), held[1]
            counts = dict(
                n_completed=result.completed,
                n_failed=result.failed,
                n_warning=result.warning,
                last_status=result.status,
            )
            status = f"status 0x{result.status:04X}" if result.status is not None else "no final status"
            summary = (
                f"{result.completed or 0} completed, {result.failed or 0} failed, "
                f"{result.warning or 0} warning sub-operations ({status}); {n_held} instances held"
            )
            error = result.error
            permanent = False
            if result.ok and n_held == 0:
                error = f"{r.source} reported success but no instance of the series arrived"
            elif result.ok and held_key != anchor.patient_key:
                error = "the retrieved series belongs to another patient key than the waiting series"
                permanent = True
            if result.ok and error is None:
                self._retrieve_to(
                    s,
                    retrieve_id,
                    "running",
                    "done",
                    f"retrieve completed: {summary}",
                    finished_at=now,
                    error=None,
                    **counts,
                )
                self._fetch_to(
                    s,
                    fetch,
                    "retrieved",
                    f"{r.method} from {r.source} completed: {summary}; assemble pairs it when complete",
                )
            elif permanent or attempt >= cfg.max_attempts:
                self._retrieve_to(
                    s,
                    retrieve_id,
                    "running",
                    "failed",
                    f"retrieve failed (attempt {attempt}, giving up): {error}; {summary}",
                    finished_at=now,
                    error=error,
                    **counts,
                )
                self._fetch_to(s, fetch, "failed", f"retrieve of {_series_ref(r)} failed: {error}")
            else:
                delay = self._backoff(attempt)
                self._retrieve_to(
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


def _series_ref(r: PriorRetrieve) -> str:
    return f"series {r.series_instance_uid} from {r.source}"
