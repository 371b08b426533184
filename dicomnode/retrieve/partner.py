"""Which series a rule would fuse with a waiting one: the wanted modality, and a usable partner held.

A usable partner is what assemble would pair: a complete series of the wanted modality of the
same patient, eligible under the rule's selection and within its pair window (which a rule that
fetches widens to ``lookback_days``). A series still being retrieved does not count yet.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.assemble.selection import SeriesSelector, pairable, series_geometry
from dicomnode.config import RuleConfig
from dicomnode.db import PriorRetrieve, Series
from dicomnode.retrieve.ledger import ACTIVE_RETRIEVE


def wanted(rule: RuleConfig, anchor_modality: str) -> tuple[str, str]:
    """(modality, selector side) of the partner of a series of ``anchor_modality`` under ``rule``."""
    if anchor_modality == rule.reference:
        return rule.moving, "moving"
    return rule.reference, "reference"


def being_retrieved(s: Session, patient_key: str) -> set[str]:
    """Series Instance UIDs of the patient with a pending or running retrieve."""
    return set(
        s.scalars(
            select(PriorRetrieve.series_instance_uid).where(
                PriorRetrieve.patient_key == patient_key, PriorRetrieve.state.in_(ACTIVE_RETRIEVE)
            )
        ).all()
    )


def usable_partner(s: Session, rule: RuleConfig, pair_window_hours: float, anchor: Series) -> Series | None:
    """A complete series held by the node that the rule would fuse with ``anchor``, if any."""
    modality, _side = wanted(rule, anchor.modality)
    busy = being_retrieved(s, anchor.patient_key)
    found = [
        c
        for c in s.scalars(
            select(Series).where(
                Series.patient_key == anchor.patient_key,
                Series.modality == modality,
                Series.state == "complete",
            )
        ).all()
        if c.series_instance_uid not in busy and pairable(rule, pair_window_hours, anchor, c)
    ]
    if not found:
        return None
    selector = SeriesSelector(rule, series_geometry(s, [c.series_instance_uid for c in found]))
    return next((c for c in found if selector.rejection(c) is None), None)
