"""Retention: delete spool files of patients that are finished and delivered; disk usage for the views.

A patient's files may go when nothing of it is unfinished: no series still arriving, no job
pending, running or held, no delivery pending, held or failed (a failed delivery keeps its files
so that it can be re-sent). Among those, the cleaner deletes the files of patients whose last
activity is older than ``storage.retention_days``, and, while the spool holds more than
``storage.max_spool_gb``, of the least recently active patients first (a patient without any job
only after ``assembly.pair_window_hours``: its partner series may still come). Rows stay and say
when their file went (``file_deleted_at``); one audit event per patient says why.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.admin.actions import remove_spool_file
from dicomnode.config import Settings
from dicomnode.db import Delivery, Instance, Job, Output, Series, record, utcnow
from dicomnode.spool import thumbnail_path

log = logging.getLogger("dicomnode.admin")
STAGE = "admin"
GB = 1024**3


def spool_usage(s: Session, spool_dir: Path) -> dict[str, int]:
    """Bytes of spool files the DB knows (instances and outputs still present) and the disk's free space."""
    inst = s.scalar(select(func.sum(Instance.size_bytes)).where(Instance.file_deleted_at.is_(None))) or 0
    outs = s.scalar(select(func.sum(Output.size_bytes)).where(Output.file_deleted_at.is_(None))) or 0
    try:
        disk = shutil.disk_usage(spool_dir)
        free, total = int(disk.free), int(disk.total)
    except OSError:
        free = total = 0
    return {"spool_bytes": int(inst) + int(outs), "disk_free_bytes": free, "disk_total_bytes": total}


@dataclass
class _Patient:
    key: str
    last_activity: datetime
    has_jobs: bool
    files_bytes: int


@dataclass
class CleanResult:
    patients: int = 0
    files: int = 0
    bytes: int = 0


class SpoolCleaner:
    """Deletes expired spool files; run by the admin stage every ``storage.clean_interval_seconds``."""

    def __init__(
        self, settings: Settings, sessionmaker: sessionmaker[Session], clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.clock = clock
        self.root = Path(settings.storage.spool_dir)

    @property
    def enabled(self) -> bool:
        st = self.settings.storage
        return st.retention_days is not None or st.max_spool_gb is not None

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.storage.clean_interval_seconds):
            try:
                self.run_once()
            except Exception:
                log.exception("retention pass failed")

    # -- which patients --------------------------------------------------------------------------

    def _busy(self, s: Session) -> set[str]:
        busy = set(s.scalars(select(Series.patient_key).where(Series.state == "receiving")))
        busy |= set(s.scalars(select(Job.patient_key).where(Job.state.in_(("pending", "running", "held")))))
        busy |= set(
            s.scalars(
                select(Job.patient_key)
                .join(Output, Output.job_id == Job.id)
                .join(Delivery, Delivery.output_id == Output.id)
                .where(Delivery.state.in_(("pending", "held", "failed")))
                .distinct()
            )
        )
        return busy

    def _candidates(self, s: Session) -> list[_Patient]:
        """Patients with files still in the spool and nothing unfinished, least recently active first."""
        sizes: dict[str, int] = defaultdict(int)
        for key, n in s.execute(
            select(Series.patient_key, func.sum(Instance.size_bytes))
            .join(Instance, Instance.series_instance_uid == Series.series_instance_uid)
            .where(Instance.file_deleted_at.is_(None))
            .group_by(Series.patient_key)
        ):
            sizes[key] += int(n or 0)
        for key, n in s.execute(
            select(Job.patient_key, func.sum(func.coalesce(Output.size_bytes, 0)))
            .join(Output, Output.job_id == Job.id)
            .where(Output.file_deleted_at.is_(None))
            .group_by(Job.patient_key)
        ):
            sizes[key] += int(n or 0)
        last: dict[str, datetime] = {}

        def newer(key: str, t: datetime | None) -> None:
            if t is not None and (key not in last or t > last[key]):
                last[key] = t

        for key, t in s.execute(
            select(Series.patient_key, func.max(Series.last_received_at)).group_by(Series.patient_key)
        ):
            newer(key, t)
        job_keys = set()
        for key, t in s.execute(
            select(Job.patient_key, func.max(func.coalesce(Job.finished_at, Job.created_at))).group_by(
                Job.patient_key
            )
        ):
            job_keys.add(key)
            newer(key, t)
        for key, t in s.execute(
            select(Job.patient_key, func.max(Delivery.sent_at))
            .join(Output, Output.job_id == Job.id)
            .join(Delivery, Delivery.output_id == Output.id)
            .group_by(Job.patient_key)
        ):
            newer(key, t)
        busy = self._busy(s)
        found = [
            _Patient(key, last[key], key in job_keys, size)
            for key, size in sizes.items()
            if key not in busy and key in last and size >= 0
        ]
        return sorted(found, key=lambda p: p.last_activity)

    def plan(self, s: Session) -> list[tuple[_Patient, str]]:
        """(patient, why) for every patient whose files go now."""
        st = self.settings.storage
        now = self.clock()
        chosen: list[tuple[_Patient, str]] = []
        candidates = self._candidates(s)
        if st.retention_days is not None:
            cutoff = now - timedelta(days=st.retention_days)
            for p in candidates:
                if p.last_activity < cutoff:
                    chosen.append(
                        (
                            p,
                            f"last activity {p.last_activity:%Y-%m-%d %H:%M}, "
                            f"over {st.retention_days:g} days ago",
                        )
                    )
        if st.max_spool_gb is not None:
            limit = int(st.max_spool_gb * GB)
            used = spool_usage(s, self.root)["spool_bytes"] - sum(p.files_bytes for p, _ in chosen)
            pair_window = now - timedelta(hours=self.settings.assembly.pair_window_hours)
            taken = {p.key for p, _ in chosen}
            for p in candidates:
                if used <= limit:
                    break
                if p.key in taken or (not p.has_jobs and p.last_activity > pair_window) or p.files_bytes == 0:
                    continue
                chosen.append(
                    (
                        p,
                        f"spool over storage.max_spool_gb ({used / GB:.2f} > {st.max_spool_gb:g} GB); "
                        "least recently active first",
                    )
                )
                used -= p.files_bytes
        return chosen

    # -- deleting --------------------------------------------------------------------------------

    def run_once(self) -> CleanResult:
        """One pass: returns what was deleted."""
        result = CleanResult()
        if not self.enabled:
            return result
        with self.sessionmaker() as s:
            plan = self.plan(s)
        for patient, why in plan:
            files = self._expire(patient.key, why)
            if files is None:
                continue
            result.patients += 1
            for rel in files:
                try:
                    result.files += remove_spool_file(self.root, rel)
                except OSError as exc:
                    log.error("retention: cannot delete a spool file: %s", exc)
            result.bytes += patient.files_bytes
        if result.patients:
            log.info(
                "retention: %d files (%.1f MB) of %d patients deleted",
                result.files,
                result.bytes / 1e6,
                result.patients,
            )
        return result

    def _expire(self, key: str, why: str) -> list[str] | None:
        """Mark the patient's present files gone and audit it; returns their paths (None: now busy)."""
        now = self.clock()
        with self.sessionmaker() as s, s.begin():
            if key in self._busy(s):  # something arrived since the plan
                return None
            series_uids = list(s.scalars(select(Series.series_instance_uid).where(Series.patient_key == key)))
            job_ids = list(s.scalars(select(Job.id).where(Job.patient_key == key)))
            inst: list[Any] = list(
                s.execute(
                    select(Instance.id, Instance.path, Instance.size_bytes).where(
                        Instance.series_instance_uid.in_(series_uids), Instance.file_deleted_at.is_(None)
                    )
                )
            )
            outs: list[Any] = list(
                s.execute(
                    select(Output.id, Output.path, Output.size_bytes).where(
                        Output.job_id.in_(job_ids), Output.file_deleted_at.is_(None)
                    )
                )
            )
            if not inst and not outs:
                return None
            for model, rows in ((Instance, inst), (Output, outs)):
                ids = [r.id for r in rows]
                for i in range(0, len(ids), 500):
                    s.execute(update(model).where(model.id.in_(ids[i : i + 500])).values(file_deleted_at=now))
            n_bytes = sum(int(r.size_bytes or 0) for r in (*inst, *outs))
            record(
                s,
                STAGE,
                "patient",
                key,
                None,
                "files_deleted",
                f"retention: {len(inst)} received and {len(outs)} fused files "
                f"({n_bytes / 1e6:.1f} MB) deleted; {why}; rows and audit kept",
            )
        return [r.path for r in (*inst, *outs)] + [thumbnail_path(j) for j in job_ids]
