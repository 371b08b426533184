"""Status of the node read from the DB: counts, queues, disk, destinations, jobs, failures, milestones.

Answers "did patient X's fusion reach the PACS?": each job names its patient, study and series and
counts its deliveries per destination; failed and held jobs and failed deliveries have their own
list (so a storm of per-instance failures cannot push them out), and the recent events are
milestones only (associations, series, jobs, destinations, patients, not per-instance rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomnode.admin import queries
from dicomnode.admin.retention import spool_usage
from dicomnode.config import Settings
from dicomnode.db import Association, Delivery, Instance, Job, Output, PriorFetch, Series, SeriesDecision

SERIES_STATES = ("receiving", "complete")
JOB_STATES = ("pending", "running", "done", "failed", "superseded", "held", "cancelled")
DELIVERY_STATES = ("pending", "sent", "failed", "held", "cancelled")
FETCH_STATES = ("waiting", "querying", "retrieving", "retrieved", "not_found", "cancelled", "failed")


def _counts(s: Session, column: Any, states: tuple[str, ...]) -> dict[str, int]:
    rows = dict(s.execute(select(column, func.count()).group_by(column)).all())
    out = {st: int(rows.pop(st, 0)) for st in states}
    out.update({str(k): int(v) for k, v in rows.items()})
    return out


def collect_status(
    s: Session,
    n_events: int = 20,
    *,
    settings: Settings | None = None,
    n_jobs: int = 20,
    n_series: int = 20,
    patient: str | None = None,
) -> dict[str, Any]:
    """Everything ``dicomnode status`` and ``GET /api/v1/status`` show; ``patient`` narrows the jobs.

    Besides counts, queues, disk, destinations, jobs and failures: the ``n_series`` most recently
    decided series that a rule skipped or that wait (with the reason) and the last fetches of
    missing series.
    """
    jobs = queries.list_jobs(s, patient=patient, limit=n_jobs).items
    events = queries.list_events(s, milestones=True, limit=n_events).items if n_events else []
    if settings is not None:
        destinations = queries.list_destinations(s, settings)
        disk = spool_usage(s, Path(settings.storage.spool_dir))
    else:
        destinations, disk = [], {}
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
        "queue": queries.queue_depth(s),
        "disk": disk,
        "destinations": destinations,
        "recent_jobs": jobs,
        "failures": queries.failures(s, limit=n_jobs),
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
        "recent_fetches": [queries.fetch_dict(f) for f in last_fetches],
        "events": list(reversed(events)),
    }


def _table(headers: list[str], rows: list[list[str]], max_width: int = 70) -> list[str]:
    cells = [[(c if len(c) <= max_width else c[: max_width - 1] + "…") for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return out


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _deliveries(per_dest: dict[str, dict[str, int]]) -> str:
    return "; ".join(
        f"{dest}: " + " ".join(f"{k}={v}" for k, v in sorted(states.items()))
        for dest, states in sorted(per_dest.items())
    )


def _job_row(j: dict[str, Any]) -> list[str]:
    q = j.get("quality") or {}
    quality = " ".join(f"{k} {q[k]:.2f}" for k in ("SSIM", "Qabf") if k in q)
    return [
        str(j["id"]),
        j["rule"],
        j["state"],
        j["patient_key"],
        (j["study_instance_uid"] or "")[-20:],
        j["moving_modality"] or "",
        (j["output_series_uid"] or "")[-20:],
        _deliveries(j["deliveries"]),
        quality,
        j["error"] or "",
    ]


JOB_HEADERS = [
    "id",
    "rule",
    "state",
    "patient",
    "study",
    "moving",
    "output series",
    "deliveries",
    "quality",
    "error",
]


def format_status(st: dict[str, Any]) -> str:
    """A readable text report of :func:`collect_status`."""
    lines = ["dicomnode status", ""]
    rows = []
    for what in ("series", "jobs", "deliveries", "fetches"):
        rows.append([what] + [f"{k}={v}" for k, v in st[what].items()])
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    lines += _table(["what"] + ["count by state"] + [""] * (width - 2), rows)
    t = st["totals"]
    lines += ["", f"associations={t['associations']}  instances={t['instances']}  outputs={t['outputs']}"]
    lines += ["queue: " + "  ".join(f"{k}={v}" for k, v in st["queue"].items())]
    if st.get("disk"):
        d = st["disk"]
        lines += [
            f"spool: {_size(d['spool_bytes'])}; disk free {_size(d['disk_free_bytes'])} "
            f"of {_size(d['disk_total_bytes'])}"
        ]
    if st.get("destinations"):
        lines += ["", "destinations:"]
        lines += _table(
            ["name", "address", "state", "pending", "held", "failed", "last success"],
            [
                [
                    d["name"],
                    d["where"],
                    d["state"],
                    str(d["pending"]),
                    str(d["held"]),
                    str(d["failed"]),
                    d["last_success_at"] or "never",
                ]
                for d in st["destinations"]
            ],
        )
    fails = st["failures"]
    if fails["jobs"] or fails["deliveries"]:
        lines += ["", "needs attention:"]
        lines += [
            f"  job {j['id']} ({j['rule']}, {j['patient_key']}) {j['state']}: {j['error']}"
            for j in fails["jobs"]
        ]
        lines += [
            f"  job {d['job_id']}: {d['failed']} deliveries to {d['destination']} failed: {d['last_error']}"
            for d in fails["deliveries"]
        ]
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
    if st["recent_jobs"]:
        lines += ["", "jobs (newest first):"]
        lines += _table(JOB_HEADERS, [_job_row(j) for j in st["recent_jobs"]])
    lines += ["", f"last {len(st['events'])} events (per-instance events left out):"]
    lines += _table(
        ["at", "stage", "entity", "id", "change", "reason"],
        [
            [
                e["at"],
                e["stage"],
                e["entity"],
                e["entity_id"][-24:],
                f"{e['old_state'] or '-'} -> {e['new_state'] or '-'}",
                (e["reason"] or "") + (f" [by {e['actor']}]" if e.get("actor") else ""),
            ]
            for e in st["events"]
        ],
    )
    return "\n".join(lines)
