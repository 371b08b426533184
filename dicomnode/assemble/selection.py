"""Which series of a study to fuse: rule preferences (description patterns), exclusions, geometry.

A study holds many series (T1, T2, FLAIR, DWI, localizers; PET AC and NAC; CT soft and bone
kernels). Candidates are filtered (excluded patterns, LOCALIZER image type, other body part,
too few slices, several orientations, fewer than 32x32 pixels per slice) and ranked: first
matching preference pattern, then a 3D acquisition, then the same study as the reference, then
nearest in time, then more slices. The ``why`` text goes into the job's audit event and the
series' decision (``decisions.py``). The retrieve stage ranks the series a PACS offers with the
same selector, so a fetched partner is the one the rule would have chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomnode.config import RuleConfig
from dicomnode.db import Instance, Series
from dicomnode.fusion.sanity import MIN_IN_PLANE


@dataclass
class Choice:
    series: Series | None
    why: str


@dataclass(frozen=True)
class SeriesGeometry:
    """What the index knows of a series' shape: slices (frames counted), distinct orientations,
    and the smallest Rows and Columns of its instances (None when no instance says)."""

    slices: int
    orientations: int = 1
    rows: int | None = None
    columns: int | None = None


def pairable(rule: RuleConfig, pair_window_hours: float, a: Series, b: Series) -> bool:
    """Whether two series of one patient may be fused under ``rule``.

    Same study, or studies at most ``pair_window_hours`` apart. A rule that fetches missing
    partners also admits studies up to ``fetch_missing.lookback_days`` apart by study date:
    that is how old a partner it fetches, and one already held is as good as a fetched one.
    """
    if a.patient_key != b.patient_key or a.series_instance_uid == b.series_instance_uid:
        return False
    if a.study_instance_uid == b.study_instance_uid:
        return True
    if a.study_datetime is None or b.study_datetime is None:
        return False
    if abs(a.study_datetime - b.study_datetime) <= timedelta(hours=pair_window_hours):
        return True
    fetch = rule.fetch_missing
    days = abs((a.study_datetime.date() - b.study_datetime.date()).days)
    return fetch.enabled and days <= fetch.lookback_days


def series_geometry(s: Session, series_uids: Sequence[str]) -> dict[str, SeriesGeometry]:
    """Per indexed series: slices (incl. frames), distinct orientations, smallest rows and columns."""
    if not series_uids:
        return {}
    rows = s.execute(
        select(
            Instance.series_instance_uid,
            func.sum(Instance.number_of_frames),
            func.count(func.distinct(Instance.image_orientation)),
            func.min(Instance.rows),
            func.min(Instance.columns),
        )
        .where(Instance.series_instance_uid.in_(list(series_uids)))
        .group_by(Instance.series_instance_uid)
    ).all()
    return {uid: SeriesGeometry(int(n or 0), int(o or 0), r, c) for uid, n, o, r, c in rows}


def label(series: Series) -> str:
    """How a series is named in reasons: its description and the end of its UID."""
    desc = series.series_description or "(no description)"
    return f"'{desc}' ({series.series_instance_uid[-12:]})"


class SeriesSelector:
    def __init__(self, rule: RuleConfig, geometry: dict[str, SeriesGeometry]) -> None:
        self.rule = rule
        self.geometry = geometry
        self.exclude = rule.patterns("exclude")
        self.prefer = {"reference": rule.patterns("reference"), "moving": rule.patterns("moving")}

    @staticmethod
    def text(series: Series) -> str:
        return " | ".join(
            t for t in (series.series_description, series.protocol_name, series.sequence_name) if t
        )

    def rejection(self, series: Series) -> str | None:
        """Why a series is not a candidate, or None."""
        text = self.text(series)
        for p in self.exclude:
            if p.search(text):
                return f"excluded by pattern {p.pattern!r}"
        if "LOCALIZER" in (series.image_type or "").upper():
            return "image type LOCALIZER"
        if (
            self.rule.body_part
            and series.body_part
            and series.body_part.upper() != self.rule.body_part.upper()
        ):
            return f"body part {series.body_part}, rule wants {self.rule.body_part}"
        geo = self._geo(series)
        if geo.slices < self.rule.min_slices:
            return f"{geo.slices} slices, fewer than {self.rule.min_slices} (not a volume)"
        if geo.orientations > 1:
            return f"{geo.orientations} orientations in one series (localizer or mixed stacks)"
        if (geo.rows is not None and geo.rows < MIN_IN_PLANE) or (
            geo.columns is not None and geo.columns < MIN_IN_PLANE
        ):
            return (
                f"{geo.columns}x{geo.rows} pixels per slice, fewer than {MIN_IN_PLANE}x{MIN_IN_PLANE} "
                "(not an image to fuse)"
            )
        return None

    def _geo(self, series: Series) -> SeriesGeometry:
        return self.geometry.get(series.series_instance_uid) or SeriesGeometry(series.n_instances)

    def rank(self, series: Series, which: str, near: Series | None) -> tuple[object, ...]:
        text = self.text(series)
        patterns = self.prefer[which]
        match = next((n for n, p in enumerate(patterns) if p.search(text)), len(patterns))
        is_3d = 0 if series.acquisition_type.upper() == "3D" else 1
        other_study = 0
        dt = 0.0
        if near is not None:
            other_study = 0 if series.study_instance_uid == near.study_instance_uid else 1
            if series.study_datetime and near.study_datetime:
                dt = abs((series.study_datetime - near.study_datetime).total_seconds())
        return (match, is_3d, other_study, dt, -self._geo(series).slices, series.series_instance_uid)

    def choose(self, candidates: list[Series], which: str, near: Series | None = None) -> Choice:
        if not candidates:
            return Choice(None, "no candidate")
        rejected = [(c, self.rejection(c)) for c in candidates]
        eligible = [c for c, why in rejected if why is None]
        others = [f"{label(c)} {why}" for c, why in rejected if why is not None]
        if not eligible:
            return Choice(None, "no eligible series: " + "; ".join(others))
        ranked = sorted(eligible, key=lambda c: self.rank(c, which, near))
        best = ranked[0]
        match, is_3d, *_rest, neg_slices, _uid = self.rank(best, which, near)
        patterns = self.prefer[which]
        parts = [
            f"preference {match + 1} {patterns[match].pattern!r}"
            if match < len(patterns)
            else "no preference match",
            "3D" if is_3d == 0 else "2D/unknown",
            f"{-neg_slices} slices",
        ]
        why = f"{label(best)} chosen ({', '.join(parts)})"
        if len(ranked) > 1:
            why += "; ranked below: " + ", ".join(label(c) for c in ranked[1:])
        if others:
            why += "; not eligible: " + "; ".join(others)
        return Choice(best, why)
