"""What each rule decided about each series: chosen (for a job), skipped (and why) or waiting (for what).

One row per (series, rule) in ``series_decisions``, rewritten on every assemble pass that looks at
the series; an audit event only when the decision (or its job) changes, so a series that waits for
a partner does not repeat itself in the audit every second. The admin status shows skipped and
waiting series with their reasons (a one-slice CT says it is not a volume instead of silence).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicomnode.assemble.selection import SeriesSelector, label
from dicomnode.config import RuleConfig
from dicomnode.db import Series, SeriesDecision, record

STAGE = "assemble"
DECISIONS = ("chosen", "skipped", "waiting")
_PRIORITY = {"chosen": 3, "skipped": 2, "waiting": 1}  # a series chosen for one pairing is chosen


@dataclass
class _Decision:
    decision: str
    reason: str
    job_id: int | None = None
    patient_key: str = ""


def _apply(row: SeriesDecision, new: _Decision, now: datetime) -> None:
    row.decision, row.reason, row.job_id, row.updated_at = new.decision, new.reason, new.job_id, now


class SeriesDecisions:
    """Collects one rule's decisions during a pass, then writes those that changed."""

    def __init__(self, rule: RuleConfig, selector: SeriesSelector) -> None:
        self.rule = rule
        self.selector = selector
        self._new: dict[str, _Decision] = {}

    def _put(self, series: Series, decision: str, reason: str, job_id: int | None = None) -> None:
        uid = series.series_instance_uid
        current = self._new.get(uid)
        if current is None or _PRIORITY[decision] > _PRIORITY[current.decision]:
            self._new[uid] = _Decision(decision, reason, job_id, series.patient_key)

    def chosen(self, series: Series, why: str, job_id: int) -> None:
        self._put(series, "chosen", why, job_id)

    def not_chosen(self, candidates: list[Series], best: Series | None) -> None:
        """Every candidate but ``best``: skipped, with its rejection or the series that ranked higher."""
        for c in candidates:
            if best is not None and c.id == best.id:
                continue
            why = self.selector.rejection(c)
            if why is None and best is not None:
                why = f"not chosen: {label(best)} ranks higher"
            self._put(c, "skipped", why or "not chosen")

    def waiting(self, series: Series, why: str) -> None:
        """Nothing to pair with yet; a series that can never be fused is skipped instead."""
        rejection = self.selector.rejection(series)
        if rejection is not None:
            self._put(series, "skipped", rejection)
        else:
            self._put(series, "waiting", why)

    def keep_patients(self, patient_keys: set[str]) -> None:
        """Forget the decisions about other patients' series (another assembler decides those)."""
        self._new = {uid: d for uid, d in self._new.items() if d.patient_key in patient_keys}

    def save(self, s: Session, now: datetime) -> int:
        """Write new and changed decisions; an audit event per changed decision. Returns the count."""
        if not self._new:
            return 0
        existing = {
            d.series_instance_uid: d
            for d in s.scalars(
                select(SeriesDecision).where(
                    SeriesDecision.rule_name == self.rule.name,
                    SeriesDecision.series_instance_uid.in_(list(self._new)),
                )
            )
        }
        changed = 0
        for uid, new in sorted(self._new.items()):
            row = existing.get(uid)
            if row is not None and (row.decision, row.job_id) == (new.decision, new.job_id):
                if row.reason != new.reason:
                    row.reason, row.updated_at = new.reason, now
                continue
            old = row.decision if row is not None else None
            if row is None:
                row = SeriesDecision(series_instance_uid=uid, rule_name=self.rule.name)
                try:
                    with s.begin_nested():
                        s.add(row)
                        _apply(row, new, now)
                        s.flush()
                except IntegrityError:  # another assembler wrote it first
                    continue
            else:
                _apply(row, new, now)
            job = f" (job {new.job_id})" if new.job_id is not None else ""
            record(s, STAGE, "series", uid, old, new.decision, f"rule {self.rule.name}: {new.reason}{job}")
            changed += 1
        return changed
