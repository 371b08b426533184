"""Status of the node read from the DB: counts by state and the latest audit events."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomnode.db import (
    Association,
    Delivery,
    Event,
    Instance,
    Job,
    Output,
    PriorFetch,
    Series,
    SeriesDecision,
)

SERIES_STATES = ("receiving", "complete")
JOB_STATES = ("pending", "running", "done", "failed", "superseded")
DELIVERY_STATES = ("pending", "sent", "failed")
FETCH_STATES = ("waiting", "querying", "retrieving", "retrieved", "not_found", "cancelled", "failed")


def _counts(s: Session, column: Any, states: tuple[str, ...]) -> dict[str, int]:
    rows = dict(s.execute(select(column, func.count()).group_by(column)).all())
    out = {st: int(rows.pop(st, 0)) for st in states}
    out.update({str(k): int(v) for k, v in rows.items()})
    return out


def collect_status(s: Session, n_events: int = 20, n_series: int = 20) -> dict[str, Any]:
    """Counts by state for series, jobs and deliveries, totals, the last ``n_events`` events and the
    ``n_series`` most recently decided series that a rule skipped or that wait, with the reason."""
    events = s.scalars(select(Event).order_by(Event.id.desc()).limit(n_events)).all()
    last_jobs = s.scalars(select(Job).order_by(Job.id.desc()).limit(10)).all()
    not_fused = s.execute(
        select(SeriesDecision, Series.modality, Series.series_description)
        .join(Series, Series.series_instance_uid == SeriesDecision.series_instance_uid, isouter=True)
        .where(SeriesDecision.decision.in_(("skipped", "waiting")))
        .order_by(SeriesDecision.updated_at.desc(), SeriesDecision.id.desc())
        .limit(n_series)
    ).all()
    last_fetches = s.scalars(select(PriorFetch).order_by(PriorFetch.id.desc()).limit(10)).all()
    return {
        "series": _counts(s, Series.state, SERIES_STATES),
        "jobs": _counts(s, Job.state, JOB_STATES),
        "deliveries": _counts(s, Delivery.state, DELIVERY_STATES),
        "fetches": _counts(s, PriorFetch.state, FETCH_STATES),
        "totals": {
            "associations": int(s.scalar(select(func.count()).select_from(Association)) or 0),
            "instances": int(s.scalar(select(func.count()).select_from(Instance)) or 0),
            "outputs": int(s.scalar(select(func.count()).select_from(Output)) or 0),
        },
        "recent_jobs": [
            {
                "id": j.id,
                "rule": j.rule_name,
                "state": j.state,
                "method": j.method,
                "error": j.error,
                "created_at": j.created_at.isoformat(timespec="seconds"),
            }
            for j in last_jobs
        ],
        "series_not_fused": [
            {
                "series_instance_uid": d.series_instance_uid,
                "modality": modality or "",
                "description": description or "",
                "rule": d.rule_name,
                "decision": d.decision,
                "reason": d.reason,
                "updated_at": d.updated_at.isoformat(timespec="seconds"),
            }
            for d, modality, description in not_fused
        ],
        "recent_fetches": [
            {
                "id": f.id,
                "rule": f.rule_name,
                "wanted": f.wanted_modality,
                "state": f.state,
                "reason": f.reason,
                "updated_at": f.updated_at.isoformat(timespec="seconds"),
            }
            for f in last_fetches
        ],
        "events": [
            {
                "id": e.id,
                "at": e.at.isoformat(timespec="seconds"),
                "stage": e.stage,
                "entity": e.entity,
                "entity_id": e.entity_id,
                "old_state": e.old_state,
                "new_state": e.new_state,
                "reason": e.reason,
            }
            for e in reversed(events)
        ],
    }


def _table(headers: list[str], rows: list[list[str]], max_width: int = 70) -> list[str]:
    cells = [[(c if len(c) <= max_width else c[: max_width - 1] + "…") for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return out


def format_status(st: dict[str, Any]) -> str:
    """A readable text table of :func:`collect_status`."""
    lines = ["dicomnode status", ""]
    rows = []
    for what in ("series", "jobs", "deliveries", "fetches"):
        rows.append([what] + [f"{k}={v}" for k, v in st[what].items()])
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    lines += _table(["what"] + ["count by state"] + [""] * (width - 2), rows)
    t = st["totals"]
    lines += ["", f"associations={t['associations']}  instances={t['instances']}  outputs={t['outputs']}"]
    if st["recent_jobs"]:
        lines += ["", "recent jobs:"]
        lines += _table(
            ["id", "rule", "state", "method", "created", "error"],
            [
                [str(j["id"]), j["rule"], j["state"], j["method"] or "", j["created_at"], j["error"] or ""]
                for j in st["recent_jobs"]
            ],
        )
    if st.get("series_not_fused"):
        lines += ["", "series skipped or waiting (by rule):"]
        lines += _table(
            ["series", "modality", "description", "rule", "decision", "reason"],
            [
                [
                    d["series_instance_uid"][-24:],
                    d["modality"],
                    d["description"][:30],
                    d["rule"],
                    d["decision"],
                    d["reason"],
                ]
                for d in st["series_not_fused"]
            ],
            max_width=110,
        )
    if st["recent_fetches"]:
        lines += ["", "recent fetches of missing series:"]
        lines += _table(
            ["id", "rule", "wants", "state", "updated", "reason"],
            [
                [str(f["id"]), f["rule"], f["wanted"], f["state"], f["updated_at"], f["reason"] or ""]
                for f in st["recent_fetches"]
            ],
            max_width=160,
        )
    lines += ["", f"last {len(st['events'])} events:"]
    lines += _table(
        ["at", "stage", "entity", "id", "change", "reason"],
        [
            [
                e["at"],
                e["stage"],
                e["entity"],
                e["entity_id"][-24:],
                f"{e['old_state'] or '-'} -> {e['new_state'] or '-'}",
                e["reason"] or "",
            ]
            for e in st["events"]
        ],
    )
    return "\n".join(lines)
