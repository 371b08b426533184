"""Read-only views of the DB for the admin API, the dashboard and the CLI (plain dicts, JSON-ready).

Lists are newest first and paged by ``limit`` plus a ``cursor`` (the id the next page starts
below) or an ``offset`` for grouped lists (patients, studies). Every query touches one page of
rows and indexed columns only, so a page costs the same with ten jobs or ten thousand.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from dicomnode.config import Settings
from dicomnode.db import (
    Association,
    Delivery,
    DestinationState,
    Event,
    Job,
    Output,
    PriorFetch,
    Series,
    SeriesDecision,
)

UNFINISHED_JOB_STATES = ("pending", "running", "held")
FETCH_UNDER_WAY = ("waiting", "querying", "retrieving")
PER_INSTANCE_ENTITIES = ("instance", "output", "delivery")  # summarised, never listed as milestones


def iso(t: datetime | None) -> str | None:
    return t.isoformat(timespec="seconds") if t is not None else None


@dataclass
class Page:
    items: list[dict[str, Any]]
    next_cursor: int | None = None
    next_offset: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {"items": self.items, "next_cursor": self.next_cursor, "next_offset": self.next_offset}


def _keyset(stmt: Select[Any], id_col: Any, limit: int, cursor: int | None, offset: int) -> Select[Any]:
    if cursor is not None:
        stmt = stmt.where(id_col < cursor)
    return stmt.order_by(id_col.desc()).offset(offset).limit(limit + 1)


def _page(rows: Sequence[Any], limit: int, key: Any, to_dict: Any) -> Page:
    more = len(rows) > limit
    rows = list(rows[:limit])
    return Page([to_dict(r) for r in rows], next_cursor=key(rows[-1]) if more and rows else None)


# -- jobs ----------------------------------------------------------------------------------------


def _delivery_counts(s: Session, job_ids: Iterable[int]) -> dict[int, dict[str, dict[str, int]]]:
    """Per job: per destination, its deliveries by state."""
    ids = list(job_ids)
    out: dict[int, dict[str, dict[str, int]]] = defaultdict(dict)
    if not ids:
        return out
    rows = s.execute(
        select(Output.job_id, Delivery.destination, Delivery.state, func.count())
        .join(Delivery, Delivery.output_id == Output.id)
        .where(Output.job_id.in_(ids))
        .group_by(Output.job_id, Delivery.destination, Delivery.state)
    ).all()
    for job_id, dest, state, n in rows:
        out[job_id].setdefault(dest, {})[state] = int(n)
    return out


def _series_by_uid(s: Session, uids: Iterable[str]) -> dict[str, Series]:
    wanted = sorted(set(uids))
    if not wanted:
        return {}
    return {
        x.series_instance_uid: x
        for x in s.scalars(select(Series).where(Series.series_instance_uid.in_(wanted)))
    }


def job_dict(job: Job, series: dict[str, Series], deliveries: dict[str, dict[str, int]]) -> dict[str, Any]:
    """One job as the API shows it: who, what, how long, how good, where it went."""
    details = json.loads(job.details or "{}")
    quality = json.loads(job.quality) if job.quality else None
    ref = series.get(job.reference_series_uid)
    mov = series.get(job.moving_series_uid)
    timings = {
        k.removeprefix("seconds_"): float(v)
        for k, v in details.items()
        if k.startswith("seconds_") and isinstance(v, int | float)
    }
    return {
        "id": job.id,
        "rule": job.rule_name,
        "state": job.state,
        "attempts": job.attempts,
        "patient_key": job.patient_key,
        "patient_id": ref.patient_id if ref else None,
        "patient_name": ref.patient_name if ref else None,
        "study_instance_uid": ref.study_instance_uid if ref else None,
        "reference_series_uid": job.reference_series_uid,
        "reference_modality": ref.modality if ref else None,
        "moving_series_uid": job.moving_series_uid,
        "moving_modality": mov.modality if mov else None,
        "method": job.method,
        "method_version": job.method_version,
        "alignment": details.get("alignment"),
        "timings": timings,
        "error": job.error,
        "quality": quality.get("metrics") if quality else None,
        "output_series_uid": job.output_series_uid,
        "output_series_number": job.output_series_number,
        "deliveries": deliveries,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
    }


def list_jobs(
    s: Session,
    *,
    state: str | None = None,
    rule: str | None = None,
    patient: str | None = None,
    limit: int = 50,
    cursor: int | None = None,
    offset: int = 0,
) -> Page:
    """Jobs newest first, filtered by state, rule and patient key."""
    stmt = select(Job)
    if state:
        stmt = stmt.where(Job.state == state)
    if rule:
        stmt = stmt.where(Job.rule_name == rule)
    if patient:
        stmt = stmt.where(Job.patient_key == patient)
    jobs = s.scalars(_keyset(stmt, Job.id, limit, cursor, offset)).all()
    shown = jobs[:limit]
    series = _series_by_uid(s, [u for j in shown for u in (j.reference_series_uid, j.moving_series_uid)])
    counts = _delivery_counts(s, [j.id for j in shown])
    return _page(jobs, limit, lambda j: j.id, lambda j: job_dict(j, series, counts.get(j.id, {})))


def _choice_reasons(s: Session, job: Job) -> dict[str, str | None]:
    """Why each source series was chosen: the rule's decision row, else the job's creation event."""
    decisions = {
        d.series_instance_uid: d.reason
        for d in s.scalars(
            select(SeriesDecision).where(
                SeriesDecision.rule_name == job.rule_name,
                SeriesDecision.series_instance_uid.in_([job.reference_series_uid, job.moving_series_uid]),
            )
        )
    }
    created = s.scalar(
        select(Event.reason)
        .where(Event.entity == "job", Event.entity_id == str(job.id), Event.old_state.is_(None))
        .order_by(Event.id)
        .limit(1)
    )
    text = created or ""
    ref_why = text.split("Reference: ", 1)[1].split(". Moving: ", 1)[0] if "Reference: " in text else None
    mov_why = text.split("Moving: ", 1)[1] if "Moving: " in text else None
    return {
        "reference": decisions.get(job.reference_series_uid) or ref_why,
        "moving": decisions.get(job.moving_series_uid) or mov_why,
    }


def job_detail(s: Session, job_id: int, n_events: int = 200) -> dict[str, Any] | None:
    """A job with its timeline (its own and its sources' events), sources, deliveries per destination."""
    job = s.get(Job, job_id)
    if job is None:
        return None
    series = _series_by_uid(s, [job.reference_series_uid, job.moving_series_uid])
    counts = _delivery_counts(s, [job.id])
    out = job_dict(job, series, counts.get(job.id, {}))
    out["details"] = json.loads(job.details or "{}")
    out["quality_report"] = json.loads(job.quality) if job.quality else None
    reasons = _choice_reasons(s, job)
    out["sources"] = [
        series_dict(series[uid], [], why=reasons[role], role=role)
        for role, uid in (("reference", job.reference_series_uid), ("moving", job.moving_series_uid))
        if uid in series
    ]
    per_dest = s.execute(
        select(Delivery.destination, Delivery.state, func.count(), func.max(Delivery.sent_at))
        .join(Output, Output.id == Delivery.output_id)
        .where(Output.job_id == job.id)
        .group_by(Delivery.destination, Delivery.state)
    ).all()
    dests: dict[str, dict[str, Any]] = {}
    for dest, state, n, last in per_dest:
        d = dests.setdefault(dest, {"destination": dest, "states": {}, "last_sent_at": None})
        d["states"][state] = int(n)
        if last is not None and (d["last_sent_at"] is None or iso(last) > d["last_sent_at"]):
            d["last_sent_at"] = iso(last)
    last_errors = s.execute(
        select(Delivery.destination, Delivery.last_error)
        .join(Output, Output.id == Delivery.output_id)
        .where(Output.job_id == job.id, Delivery.last_error.is_not(None), Delivery.state != "sent")
        .order_by(Delivery.id.desc())
        .limit(50)
    ).all()
    for dest, err in last_errors:
        dests.get(dest, {}).setdefault("last_error", err)
    out["destinations"] = list(dests.values())
    out["n_outputs"] = int(
        s.scalar(select(func.count()).select_from(Output).where(Output.job_id == job.id)) or 0
    )
    # two indexed lookups (entity, entity_id), merged: one query with OR would scan the audit by id
    events = list(
        s.scalars(
            select(Event)
            .where(Event.entity == "job", Event.entity_id == str(job.id))
            .order_by(Event.id.desc())
            .limit(n_events)
        )
    )
    events += s.scalars(
        select(Event)
        .where(
            Event.entity == "series", Event.entity_id.in_([job.reference_series_uid, job.moving_series_uid])
        )
        .order_by(Event.id.desc())
        .limit(n_events)
    )
    events = sorted(events, key=lambda e: e.id, reverse=True)[:n_events]
    out["events"] = [event_dict(e) for e in reversed(events)]
    return out


# -- series, studies, patients -------------------------------------------------------------------


def series_dict(
    x: Series, decisions: list[SeriesDecision], why: str | None = None, role: str | None = None
) -> dict:
    d = {
        "series_instance_uid": x.series_instance_uid,
        "study_instance_uid": x.study_instance_uid,
        "patient_key": x.patient_key,
        "modality": x.modality,
        "description": x.series_description,
        "instances": x.n_instances,
        "state": x.state,
        "generation": x.generation,
        "first_received_at": iso(x.first_received_at),
        "last_received_at": iso(x.last_received_at),
        "completed_at": iso(x.completed_at),
        "decisions": [
            {"rule": dd.rule_name, "decision": dd.decision, "reason": dd.reason, "job_id": dd.job_id}
            for dd in decisions
        ],
    }
    if role is not None:
        d["role"] = role
        d["why"] = why
    return d


def list_series(
    s: Session,
    *,
    patient: str | None = None,
    study: str | None = None,
    state: str | None = None,
    modality: str | None = None,
    decision: str | None = None,
    rule: str | None = None,
    limit: int = 50,
    cursor: int | None = None,
    offset: int = 0,
) -> Page:
    """Series newest first; ``decision`` (chosen, skipped, waiting) and ``rule`` keep the series a
    rule decided that way about (from ``series_decisions``)."""
    stmt = select(Series)
    for col, value in (
        (Series.patient_key, patient),
        (Series.study_instance_uid, study),
        (Series.state, state),
        (Series.modality, modality.upper() if modality else None),
    ):
        if value:
            stmt = stmt.where(col == value)
    if decision or rule:
        decided = select(SeriesDecision.series_instance_uid)
        if decision:
            decided = decided.where(SeriesDecision.decision == decision)
        if rule:
            decided = decided.where(SeriesDecision.rule_name == rule)
        stmt = stmt.where(Series.series_instance_uid.in_(decided))
    rows = s.scalars(_keyset(stmt, Series.id, limit, cursor, offset)).all()
    uids = [r.series_instance_uid for r in rows[:limit]]
    decisions: dict[str, list[SeriesDecision]] = defaultdict(list)
    if uids:
        for d in s.scalars(select(SeriesDecision).where(SeriesDecision.series_instance_uid.in_(uids))):
            decisions[d.series_instance_uid].append(d)
    return _page(rows, limit, lambda r: r.id, lambda r: series_dict(r, decisions[r.series_instance_uid]))


def list_studies(s: Session, *, patient: str | None = None, limit: int = 50, offset: int = 0) -> Page:
    stmt = select(
        Series.study_instance_uid,
        func.min(Series.patient_key),
        func.count(),
        func.sum(Series.n_instances),
        func.min(Series.first_received_at),
        func.max(Series.last_received_at),
        func.max(Series.study_datetime),
    ).group_by(Series.study_instance_uid)
    if patient:
        stmt = stmt.where(Series.patient_key == patient)
    rows = s.execute(
        stmt.order_by(func.max(Series.last_received_at).desc()).offset(offset).limit(limit + 1)
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    modalities: dict[str, set[str]] = defaultdict(set)
    if rows:
        for uid, mod in s.execute(
            select(Series.study_instance_uid, Series.modality).where(
                Series.study_instance_uid.in_([r[0] for r in rows])
            )
        ):
            modalities[uid].add(mod)
    items = [
        {
            "study_instance_uid": uid,
            "patient_key": key,
            "series": int(n),
            "instances": int(inst or 0),
            "modalities": sorted(modalities[uid]),
            "study_datetime": iso(dt),
            "first_received_at": iso(first),
            "last_received_at": iso(last),
        }
        for uid, key, n, inst, first, last, dt in rows
    ]
    return Page(items, next_offset=offset + limit if more else None)


def list_patients(s: Session, *, limit: int = 50, offset: int = 0) -> Page:
    rows = s.execute(
        select(
            Series.patient_key,
            func.max(Series.patient_id),
            func.max(Series.patient_name),
            func.count(func.distinct(Series.study_instance_uid)),
            func.count(),
            func.max(Series.last_received_at),
        )
        .group_by(Series.patient_key)
        .order_by(func.max(Series.last_received_at).desc())
        .offset(offset)
        .limit(limit + 1)
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    jobs: dict[str, dict[str, int]] = defaultdict(dict)
    if rows:
        for key, state, n in s.execute(
            select(Job.patient_key, Job.state, func.count())
            .where(Job.patient_key.in_([r[0] for r in rows]))
            .group_by(Job.patient_key, Job.state)
        ):
            jobs[key][state] = int(n)
    items = [
        {
            "patient_key": key,
            "patient_id": pid,
            "patient_name": name,
            "studies": int(n_st),
            "series": int(n_se),
            "last_received_at": iso(last),
            "jobs": jobs[key],
        }
        for key, pid, name, n_st, n_se, last in rows
    ]
    return Page(items, next_offset=offset + limit if more else None)


# -- outputs, deliveries, destinations -----------------------------------------------------------


def list_outputs(
    s: Session, *, job_id: int | None = None, limit: int = 50, cursor: int | None = None, offset: int = 0
) -> Page:
    stmt = select(Output)
    if job_id is not None:
        stmt = stmt.where(Output.job_id == job_id)
    rows = s.scalars(_keyset(stmt, Output.id, limit, cursor, offset)).all()
    return _page(
        rows,
        limit,
        lambda o: o.id,
        lambda o: {
            "id": o.id,
            "job_id": o.job_id,
            "sop_instance_uid": o.sop_instance_uid,
            "series_instance_uid": o.series_instance_uid,
            "instance_number": o.instance_number,
            "size_bytes": o.size_bytes,
            "created_at": iso(o.created_at),
            "file_deleted_at": iso(o.file_deleted_at),
        },
    )


def list_deliveries(
    s: Session,
    *,
    state: str | None = None,
    destination: str | None = None,
    job_id: int | None = None,
    limit: int = 50,
    cursor: int | None = None,
    offset: int = 0,
) -> Page:
    stmt = select(Delivery, Output.job_id).join(Output, Output.id == Delivery.output_id)
    if state:
        stmt = stmt.where(Delivery.state == state)
    if destination:
        stmt = stmt.where(Delivery.destination == destination)
    if job_id is not None:
        stmt = stmt.where(Output.job_id == job_id)
    rows = s.execute(_keyset(stmt, Delivery.id, limit, cursor, offset)).all()
    return _page(
        rows,
        limit,
        lambda r: r[0].id,
        lambda r: {
            "id": r[0].id,
            "output_id": r[0].output_id,
            "job_id": r[1],
            "destination": r[0].destination,
            "state": r[0].state,
            "attempts": r[0].attempts,
            "next_attempt_at": iso(r[0].next_attempt_at) if r[0].state == "pending" else None,
            "last_error": r[0].last_error,
            "last_status": r[0].last_status,
            "sent_at": iso(r[0].sent_at),
        },
    )


def list_destinations(s: Session, settings: Settings) -> list[dict[str, Any]]:
    """Configured destinations: active or paused, deliveries waiting or failed, last success.

    Counted per destination and state on the (destination, state, sent_at) index: a few index
    ranges, not the whole outbox (sent deliveries are most of it and are not counted).
    """
    states = {d.name: d for d in s.scalars(select(DestinationState))}
    out = []
    for d in settings.destinations:
        st = states.get(d.name)
        counts = {
            state: int(
                s.scalar(
                    select(func.count())
                    .select_from(Delivery)
                    .where(Delivery.destination == d.name, Delivery.state == state)
                )
                or 0
            )
            for state in ("pending", "held", "failed")
        }
        last = s.scalar(
            select(func.max(Delivery.sent_at)).where(Delivery.destination == d.name, Delivery.state == "sent")
        )
        out.append(
            {
                "name": d.name,
                "type": d.type,
                "where": d.where,
                "ae_title": d.ae_title,
                "host": d.host,
                "port": d.port,
                "state": "paused" if st and st.paused else "active",
                "changed_by": st.changed_by if st else None,
                "changed_at": iso(st.changed_at) if st else None,
                **counts,
                "last_success_at": iso(last),
            }
        )
    return out


# -- associations and events ---------------------------------------------------------------------


def list_associations(
    s: Session,
    *,
    direction: str | None = None,
    state: str | None = None,
    limit: int = 50,
    cursor: int | None = None,
    offset: int = 0,
) -> Page:
    stmt = select(Association)
    if direction:
        stmt = stmt.where(Association.direction == direction)
    if state:
        stmt = stmt.where(Association.state == state)
    rows = s.scalars(_keyset(stmt, Association.id, limit, cursor, offset)).all()
    return _page(
        rows,
        limit,
        lambda a: a.id,
        lambda a: {
            "id": a.id,
            "direction": a.direction,
            "calling_aet": a.calling_aet,
            "called_aet": a.called_aet,
            "peer_host": a.peer_host,
            "peer_port": a.peer_port,
            "state": a.state,
            "reason": a.reason,
            "n_stored": a.n_stored,
            "n_failed": a.n_failed,
            "started_at": iso(a.started_at),
            "ended_at": iso(a.ended_at),
        },
    )


def event_dict(e: Event) -> dict[str, Any]:
    return {
        "id": e.id,
        "at": iso(e.at),
        "stage": e.stage,
        "entity": e.entity,
        "entity_id": e.entity_id,
        "old_state": e.old_state,
        "new_state": e.new_state,
        "reason": e.reason,
        "actor": e.actor,
    }


def list_events(
    s: Session,
    *,
    entity: str | None = None,
    entity_id: str | None = None,
    since: datetime | None = None,
    stage: str | None = None,
    milestones: bool = False,
    limit: int = 50,
    cursor: int | None = None,
    offset: int = 0,
) -> Page:
    """Events newest first; ``milestones`` leaves out per-instance events (instances, outputs, deliveries)."""
    stmt = select(Event)
    if entity:
        stmt = stmt.where(Event.entity == entity)
    elif milestones:
        stmt = stmt.where(Event.entity.not_in(PER_INSTANCE_ENTITIES))
    if entity_id:
        stmt = stmt.where(Event.entity_id == entity_id)
    if since is not None:
        stmt = stmt.where(Event.at >= since)
    if stage:
        stmt = stmt.where(Event.stage == stage)
    rows = s.scalars(_keyset(stmt, Event.id, limit, cursor, offset)).all()
    return _page(rows, limit, lambda e: e.id, event_dict)


def fetch_dict(f: PriorFetch) -> dict[str, Any]:
    return {
        "id": f.id,
        "rule": f.rule_name,
        "patient_key": f.patient_key,
        "anchor_series_uid": f.anchor_series_uid,
        "anchor_modality": f.anchor_modality,
        "wanted": f.wanted_modality,
        "state": f.state,
        "reason": f.reason,
        "attempts": f.attempts,
        "source": f.source,
        "chosen_series_uid": f.chosen_series_uid,
        "created_at": iso(f.created_at),
        "updated_at": iso(f.updated_at),
    }


def list_fetches(
    s: Session,
    *,
    state: str | None = None,
    patient: str | None = None,
    limit: int = 50,
    cursor: int | None = None,
    offset: int = 0,
) -> Page:
    """Fetches of a rule's missing partner series from PACS sources, newest first."""
    stmt = select(PriorFetch)
    if state:
        stmt = stmt.where(PriorFetch.state == state)
    if patient:
        stmt = stmt.where(PriorFetch.patient_key == patient)
    rows = s.scalars(_keyset(stmt, PriorFetch.id, limit, cursor, offset)).all()
    return _page(rows, limit, lambda f: f.id, fetch_dict)


# -- failures ------------------------------------------------------------------------------------


def failures(s: Session, limit: int = 20) -> dict[str, list[dict[str, Any]]]:
    """What needs an admin: failed and held jobs, failed deliveries grouped by job and destination."""
    jobs = s.scalars(
        select(Job).where(Job.state.in_(("failed", "held"))).order_by(Job.id.desc()).limit(limit)
    ).all()
    series = _series_by_uid(s, [u for j in jobs for u in (j.reference_series_uid, j.moving_series_uid)])
    counts = _delivery_counts(s, [j.id for j in jobs])
    grouped = s.execute(
        select(Output.job_id, Delivery.destination, func.count(), func.max(Delivery.id))
        .join(Output, Output.id == Delivery.output_id)
        .where(Delivery.state == "failed")
        .group_by(Output.job_id, Delivery.destination)
        .order_by(func.max(Delivery.id).desc())
        .limit(limit)
    ).all()
    last_errors = {
        d.id: d.last_error
        for d in s.scalars(select(Delivery).where(Delivery.id.in_([g[3] for g in grouped])))
    }
    return {
        "jobs": [job_dict(j, series, counts.get(j.id, {})) for j in jobs],
        "deliveries": [
            {"job_id": job_id, "destination": dest, "failed": int(n), "last_error": last_errors.get(last_id)}
            for job_id, dest, n, last_id in grouped
        ],
    }


def queue_depth(s: Session) -> dict[str, int]:
    """Work waiting per stage: series still arriving, missing series being fetched, jobs to fuse,
    jobs held, deliveries to send."""

    def count(stmt: Select[Any]) -> int:
        return int(s.scalar(stmt) or 0)

    return {
        "assemble": count(select(func.count()).select_from(Series).where(Series.state == "receiving")),
        "retrieve": count(
            select(func.count()).select_from(PriorFetch).where(PriorFetch.state.in_(FETCH_UNDER_WAY))
        ),
        "fuse": count(select(func.count()).select_from(Job).where(Job.state.in_(("pending", "running")))),
        "held": count(select(func.count()).select_from(Job).where(Job.state == "held")),
        "dispatch": count(select(func.count()).select_from(Delivery).where(Delivery.state == "pending")),
    }
