"""One query round of a fetch: Study Root C-FIND on every source, the rule's choice, the retrieve row.

Each source is asked at study level (the patient's Patient ID and Issuer, the wanted modality in
Modalities in Study, study dates from ``lookback_days`` before the waiting series' study to its
day), then at series level for each study it names. The series offered by all sources are ranked
by the rule's own ``SeriesSelector`` (preferences, exclusions, body part, minimum slices; then
the nearest study in time, i.e. the newest prior). The chosen series gets a ``PriorRetrieve``
row unless the node already holds it or another fetch is retrieving it.
"""

from __future__ import annotations

import logging
from datetime import date, timedelta
from typing import TypeVar

from sqlalchemy import select

from dicomnode.assemble.selection import SeriesSelector
from dicomnode.config import RuleConfig, Settings, SourceConfig
from dicomnode.db import PriorFetch, PriorRetrieve, Series, record
from dicomnode.retrieve.candidates import (
    SeriesCandidate,
    accept_series,
    accept_study,
    series_query,
    study_query,
)
from dicomnode.retrieve.ledger import ACTIVE_RETRIEVE, STAGE, Ledger, label
from dicomnode.retrieve.partner import wanted
from dicomnode.retrieve.scu import FindResult, SourceSession

log = logging.getLogger("dicomnode.retrieve")


T = TypeVar("T")


def _sort_out(outcomes: list[T | str]) -> tuple[list[T], list[str]]:
    """Accepted matches, and the reasons (strings) of those not used."""
    accepted = [o for o in outcomes if not isinstance(o, str)]
    return accepted, [o for o in outcomes if isinstance(o, str)]  # type: ignore[misc]


class RetryQuery(Exception):
    """The round could not ask every source it needed; the message is the reason."""


class QueryRound:
    """Runs query rounds for fetches in state ``querying``."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self.sources = {s.name: s for s in settings.sources}

    def run(self, fetch_id: int, rule: RuleConfig, anchor: Series) -> int | None:
        """Query, choose and create the retrieve; its id, or None when the fetch ended here.

        Raises RetryQuery when a source failed and the others offered nothing usable.
        """
        modality, side = wanted(rule, anchor.modality)
        if not anchor.patient_id.strip() or anchor.study_datetime is None:
            missing = "Patient ID" if not anchor.patient_id.strip() else "Study Date"
            self.ledger.end(
                fetch_id, "not_found", f"the {anchor.modality} series has no {missing} to query by"
            )
            return None
        last = anchor.study_datetime.date()
        first = last - timedelta(days=rule.fetch_missing.lookback_days)
        offered: dict[str, SeriesCandidate] = {}
        notes: list[str] = []
        failures: list[str] = []
        for source in self.sources.values():
            found, error = self._ask(fetch_id, source, anchor, modality, first, last, rule, notes)
            for c in found:
                if c.series.series_instance_uid != anchor.series_instance_uid:
                    offered.setdefault(c.series.series_instance_uid, c)  # the first source wins
            if error:
                failures.append(error)
        dates = f"dated {first:%Y-%m-%d}..{last:%Y-%m-%d}"
        if not offered:
            if failures:
                raise RetryQuery("; ".join(failures))
            self.ledger.end(
                fetch_id,
                "not_found",
                "; ".join([f"no source holds a {modality} series of the patient {dates}", *notes]),
            )
            return None
        choice = SeriesSelector(rule, {}).choose([c.series for c in offered.values()], side, near=anchor)
        listed = f"{len(offered)} candidate {modality} series {dates}"
        if choice.series is None:
            if failures:
                raise RetryQuery(f"{listed}, none usable ({choice.why}); " + "; ".join(failures))
            self.ledger.end(fetch_id, "not_found", f"{listed}, none usable: {choice.why}")
            return None
        return self._choose(
            fetch_id, anchor, offered[choice.series.series_instance_uid], f"{listed}; {choice.why}"
        )

    def _ask(
        self,
        fetch_id: int,
        source: SourceConfig,
        anchor: Series,
        modality: str,
        first: date,
        last: date,
        rule: RuleConfig,
        notes: list[str],
    ) -> tuple[list[SeriesCandidate], str | None]:
        """Study then series level C-FIND on one source: (candidates, error or None)."""
        cfg = self.settings.retrieve
        issuer = anchor.issuer_of_patient_id or ""
        with SourceSession(self.settings.node.ae_title, source, "find") as session:
            dates = f"{first:%Y-%m-%d}..{last:%Y-%m-%d}"
            what = f"C-FIND STUDY level to {source.name}: {modality} studies dated {dates}"
            query_id = self.ledger.query_sent(fetch_id, source.name, "STUDY", None, what)
            error = session.open()
            if error:
                self.ledger.query_done(query_id, FindResult(error=error), "", [])
                return [], f"{source.name}: {error}"
            result = session.find(
                study_query(anchor.patient_id, issuer, modality, first, last), cfg.max_studies
            )
            studies, dropped = _sort_out(
                [accept_study(source.name, ds, anchor.patient_id, issuer) for ds in result.matches]
            )
            summary = f"{len(result.matches)} matches, {len(studies)} studies of the patient"
            if result.truncated:
                summary += f" (more than {cfg.max_studies}: the first {cfg.max_studies} used)"
            self.ledger.query_done(query_id, result, summary, dropped)
            if dropped:
                notes.append(f"query {query_id} did not use {len(dropped)} matches")
            if result.error and not studies:
                return [], f"{source.name}: {result.error}"
            found: list[SeriesCandidate] = []
            for study in studies:
                self.ledger.renew(PriorFetch, fetch_id)
                uid = study.study_instance_uid
                what = f"C-FIND SERIES level to {source.name}: {modality} series of study {uid}"
                query_id = self.ledger.query_sent(fetch_id, source.name, "SERIES", uid, what)
                result = session.find(series_query(uid, modality), cfg.max_series)
                series, dropped = _sort_out(
                    [accept_series(ds, study, modality, anchor, rule.min_slices) for ds in result.matches]
                )
                found += series
                summary = f"{len(result.matches)} matches, {len(series)} {modality} series"
                if result.truncated:
                    summary += f" (more than {cfg.max_series}: the first {cfg.max_series} used)"
                self.ledger.query_done(query_id, result, summary, dropped)
                if dropped:
                    notes.append(f"query {query_id} did not use {len(dropped)} matches")
                if result.error:
                    return found, f"{source.name}: {result.error}"
        return found, None

    def _choose(self, fetch_id: int, anchor: Series, chosen: SeriesCandidate, why: str) -> int | None:
        uid = chosen.series.series_instance_uid
        source = self.sources[chosen.source]
        ledger = self.ledger
        with ledger.sessionmaker() as s:
            fetch = s.get(PriorFetch, fetch_id)
            assert fetch is not None
            other = s.scalar(
                select(PriorRetrieve.fetch_id).where(
                    PriorRetrieve.series_instance_uid == uid, PriorRetrieve.state.in_(ACTIVE_RETRIEVE)
                )
            )
            if other is not None:
                ledger.fetch_to(s, fetch, "cancelled", f"{why}; already being retrieved by fetch {other}")
                s.commit()
                return None
            held = s.scalar(select(Series).where(Series.series_instance_uid == uid))
            if held is not None:
                ledger.fetch_to(
                    s,
                    fetch,
                    "cancelled",
                    f"{why}; the node already holds it ({held.state}, {held.n_instances} instances): "
                    "not fetched again",
                )
                s.commit()
                return None
            retrieve = PriorRetrieve(
                fetch_id=fetch_id,
                source=source.name,
                method=source.retrieve,
                patient_key=anchor.patient_key,
                study_instance_uid=chosen.study.study_instance_uid,
                series_instance_uid=uid,
                state="pending",
                next_attempt_at=ledger.clock(),
                created_at=ledger.clock(),
            )
            s.add(retrieve)
            s.flush()
            when = chosen.study.study_datetime
            of_study = f" of study {when:%Y-%m-%d}" if when else ""
            ledger.fetch_to(
                s,
                fetch,
                "retrieving",
                f"chose {label(chosen.series)}{of_study} on {source.name} ({source.retrieve}, "
                f"retrieve {retrieve.id}): {why}",
                source=source.name,
                chosen_study_uid=chosen.study.study_instance_uid,
                chosen_series_uid=uid,
            )
            record(s, STAGE, "retrieve", retrieve.id, None, "pending", f"fetch {fetch_id}: {source.retrieve}")
            s.commit()
            log.info("fetch %d: chose a series on %s (retrieve %d)", fetch_id, source.name, retrieve.id)
            return retrieve.id
