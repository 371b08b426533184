"""The fuse stage worker.

Claims a pending job (conditional UPDATE, so several workers can share one DB), loads both series
from the spool, aligns them (same frame of reference: patient coordinates; otherwise rigid
registration), fuses with the configured fuser, writes Secondary Capture files to the spool and
commits Output rows plus one Delivery row per destination. Why a job failed is in ``jobs.error``
and in the audit event.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.db import Delivery, Instance, Job, Output, Series, SeriesRemoval, record, utcnow
from dicomnode.dispatch.study_series import series_numbers_at
from dicomnode.fusion.align import align
from dicomnode.fusion.base import Fuser
from dicomnode.fusion.pipeline import FusionError, fuse_pair, input_notes
from dicomnode.fusion.registry import get_fuser
from dicomnode.fusion.resample import resolve_device
from dicomnode.fusion.spatial_registration import (
    SPATIAL_REGISTRATION_STORAGE,
    RegistrationObjectError,
    SpatialRegistration,
    parse_registration,
)
from dicomnode.fusion.volume import Volume, VolumeError, volume_from_datasets
from dicomnode.output import (
    OutputError,
    OutputOptions,
    build_fused_series,
    choose_series_number,
    replaces_marker,
)
from dicomnode.spool import Spool, outgoing_path

log = logging.getLogger("dicomnode.fuse")
STAGE = "fuse"


class JobFailed(Exception):
    """A job cannot be completed; the message is the reason recorded for the admin."""


def _replaces_text(replaced: Job) -> str:
    number = replaced.output_series_number
    return f"; replaces series {replaced.output_series_uid} (number {number}) of job {replaced.id}"


@dataclass
class _SeriesPlan:
    """Identity of a job's fused series, decided before it is built."""

    rule_name: str
    number: int
    replaces: Job | None  # the earlier job of the rule in the study whose series this one replaces
    source: pydicom.Dataset | None  # a reference header read afresh (Patient/Study as received)
    notes: list[str]


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FuseStage:
    """Runs fusion jobs one at a time (start more processes for more workers)."""

    def __init__(
        self,
        settings: Settings,
        sessionmaker: sessionmaker[Session],
        spool: Spool,
        worker_id: str | None = None,
        stale_after: timedelta = timedelta(hours=2),
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.spool = spool
        self.worker_id = worker_id or _worker_id()
        self.stale_after = stale_after
        self.device = str(resolve_device(settings.fusion.device))
        self._fuser: Fuser | None = None

    @property
    def fuser(self) -> Fuser:
        if self._fuser is None:
            self._fuser = get_fuser(self.settings.fusion.method, device=self.device)
            log.info("fuser %s %s on %s", self._fuser.name, self._fuser.version, self.device)
        return self._fuser

    # -- job claiming and recovery -------------------------------------------------------------
    def recover(self) -> int:
        """Put back to pending the running jobs whose worker died (same host) or went stale."""
        host = socket.gethostname()
        now = utcnow()
        n = 0
        with self.sessionmaker() as s:
            for job in s.scalars(select(Job).where(Job.state == "running")).all():
                w_host, _, w_pid = (job.worker or "").rpartition(":")
                dead = w_host == host and w_pid.isdigit() and not _pid_alive(int(w_pid))
                stale = job.started_at is not None and now - job.started_at > self.stale_after
                if dead or stale or job.worker == self.worker_id:
                    s.execute(
                        update(Job).where(Job.id == job.id, Job.state == "running").values(state="pending")
                    )
                    why = (
                        "worker stopped before finishing"
                        if dead or job.worker == self.worker_id
                        else (f"running longer than {self.stale_after}")
                    )
                    record(s, STAGE, "job", job.id, "running", "pending", f"recovered: {why}")
                    n += 1
            s.commit()
        return n

    def claim(self) -> int | None:
        """Atomically move the oldest pending job to running; returns its id."""
        with self.sessionmaker() as s:
            for job_id in s.scalars(
                select(Job.id).where(Job.state == "pending").order_by(Job.id).limit(5)
            ).all():
                res = s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state == "pending")
                    .values(
                        state="running",
                        worker=self.worker_id,
                        started_at=utcnow(),
                        attempts=Job.attempts + 1,
                    )
                )
                if res.rowcount == 1:  # type: ignore[attr-defined]
                    record(s, STAGE, "job", job_id, "pending", "running", f"worker {self.worker_id}")
                    s.commit()
                    return job_id
        return None

    def run_once(self) -> int:
        job_id = self.claim()
        if job_id is None:
            return 0
        self.run_job(job_id)
        return 1

    def run_forever(self, stop: threading.Event) -> None:
        try:
            self.recover()
        except Exception:
            log.exception("job recovery failed")
        while not stop.is_set():
            try:
                worked = self.run_once()
            except Exception:
                log.exception("fuse pass failed")
                worked = 0
            if not worked:
                stop.wait(self.settings.fusion.poll_seconds)

    # -- one job -------------------------------------------------------------------------------
    def _finish(self, job_id: int, new_state: str, reason: str, **values: object) -> None:
        with self.sessionmaker() as s:
            s.execute(
                update(Job).where(Job.id == job_id).values(state=new_state, finished_at=utcnow(), **values)
            )
            record(s, STAGE, "job", job_id, "running", new_state, reason)
            s.commit()

    def _load_series(self, s: Session, series_uid: str) -> Volume:
        paths = s.scalars(select(Instance.path).where(Instance.series_instance_uid == series_uid)).all()
        if not paths:
            raise JobFailed(f"series {series_uid} has no stored instances")
        datasets = []
        for p in paths:
            try:
                datasets.append(pydicom.dcmread(self.spool.abspath(p)))
            except Exception as exc:
                raise JobFailed(f"cannot read stored instance {p}: {exc}") from exc
        # Only image slices with geometry make the volume (drops e.g. presentation states).
        images = [d for d in datasets if "PixelData" in d]
        if not images:
            raise JobFailed(f"series {series_uid} has no images")
        try:
            return volume_from_datasets(images)
        except VolumeError as exc:
            raise JobFailed(f"series {series_uid}: {exc}") from exc

    def run_job(self, job_id: int) -> None:
        t0 = time.perf_counter()
        try:
            with self.sessionmaker() as s:
                job = s.get(Job, job_id)
                assert job is not None
                ref_series = s.scalar(
                    select(Series).where(Series.series_instance_uid == job.reference_series_uid)
                )
                mov_series = s.scalar(
                    select(Series).where(Series.series_instance_uid == job.moving_series_uid)
                )
                if ref_series is None or mov_series is None:
                    raise JobFailed("a source series is no longer indexed")
                current = (ref_series.generation, mov_series.generation) == (
                    job.reference_generation,
                    job.moving_generation,
                )
                if not current:
                    self._finish(
                        job_id,
                        "superseded",
                        "a source series received new instances; a newer job fuses the new generation",
                    )
                    return
                if ref_series.state != "complete" or mov_series.state != "complete":
                    raise JobFailed("a source series is receiving again; it will be fused when complete")
                reference = self._load_series(s, job.reference_series_uid)
                moving = self._load_series(s, job.moving_series_uid)
                registrations = self._registrations(s, job.patient_key)
            self._execute(job_id, reference, moving, t0, registrations)
        except JobFailed as exc:
            log.warning("job %d failed: %s", job_id, exc)
            self._finish(job_id, "failed", str(exc), error=str(exc))
        except Exception as exc:  # unexpected: keep the node alive, tell the admin
            log.exception("job %d failed unexpectedly", job_id)
            reason = f"internal error: {type(exc).__name__}: {exc}"
            self._finish(job_id, "failed", reason, error=reason)

    def _registrations(self, s: Session, patient_key: str) -> list[SpatialRegistration]:
        """Spatial Registration objects received for the patient (unusable ones are skipped)."""
        paths = s.scalars(
            select(Instance.path)
            .join(Series, Series.series_instance_uid == Instance.series_instance_uid)
            .where(Instance.sop_class_uid == SPATIAL_REGISTRATION_STORAGE, Series.patient_key == patient_key)
            .order_by(Instance.id.desc())
        ).all()
        found = []
        for p in paths:
            try:
                found.append(parse_registration(pydicom.dcmread(self.spool.abspath(p))))
            except (RegistrationObjectError, OSError, ValueError) as exc:
                log.warning("spatial registration object %s not used: %s", p, exc)
        return found

    def _series_plan(self, job_id: int, reference: Volume) -> _SeriesPlan:
        """Series Number, the earlier fused series this one replaces, and the Patient/Study source."""
        with self.sessionmaker() as s:
            job = s.get(Job, job_id)
            assert job is not None
            study_uid = str(reference.datasets[0].StudyInstanceUID)
            in_study = select(Series.series_instance_uid).where(Series.study_instance_uid == study_uid)
            taken: set[int | None] = set(
                s.scalars(select(Series.series_number).where(Series.study_instance_uid == study_uid)).all()
            )
            taken |= set(
                s.scalars(
                    select(Job.output_series_number).where(
                        Job.reference_series_uid.in_(in_study), Job.id != job_id
                    )
                ).all()
            )
            earlier = s.scalars(
                select(Job)
                .where(
                    Job.rule_name == job.rule_name,
                    Job.reference_series_uid.in_(in_study),
                    Job.output_series_uid.is_not(None),
                    Job.id != job_id,
                )
                .order_by(Job.id.desc())
                .limit(1)
            ).first()
            source_path = s.scalar(
                select(Instance.path).where(
                    Instance.sop_instance_uid == str(reference.datasets[0].SOPInstanceUID)
                )
            )
        notes = []
        timeout = min(self.settings.dispatch.timeout_seconds, 10.0)
        for dest in self.settings.destinations:
            numbers, note = series_numbers_at(dest, study_uid, timeout)
            taken |= numbers
            if note:
                notes.append(note)
        number = job.output_series_number or choose_series_number(
            self.settings.series_number_base(job.rule_name), taken
        )
        source = None
        if source_path:
            try:  # read afresh: the Patient/Study text is copied as received
                source = pydicom.dcmread(self.spool.abspath(source_path), stop_before_pixels=True)
            except Exception as exc:
                notes.append(f"patient/study copied from the loaded header ({type(exc).__name__})")
        return _SeriesPlan(
            rule_name=job.rule_name,
            number=number,
            replaces=earlier,
            source=source,
            notes=notes,
        )

    def _output_options(self, plan: _SeriesPlan) -> OutputOptions:
        out = self.settings.output
        replaced = plan.replaces
        return OutputOptions(
            notice=out.notice,
            notice_in_description=out.notice_in_description,
            burn_in_notice=out.burn_in_notice,
            iod=out.iod,
            replaces=replaces_marker(out.replaces_text, replaced.output_series_number) if replaced else "",
            replaces_series_uid=replaced.output_series_uid if replaced else None,
        )

    def _execute(
        self,
        job_id: int,
        reference: Volume,
        moving: Volume,
        t0: float,
        registrations: list[SpatialRegistration] | None = None,
    ) -> None:
        try:
            transform, align_info = align(
                reference, moving, device=self.device, registrations=registrations or []
            )
            fused = fuse_pair(
                reference,
                moving,
                self.fuser,
                batch_size=self.settings.fusion.batch_size,
                device=self.device,
                transform=transform,
            )
        except FusionError as exc:
            raise JobFailed(str(exc)) from exc
        notes = input_notes(reference, moving)
        plan = self._series_plan(job_id, reference)
        series_uid = generate_uid(entropy_srcs=[self.worker_id, str(job_id), str(time.time_ns())])
        t1 = time.perf_counter()
        try:
            datasets = build_fused_series(
                fused.pixels,
                reference.datasets,
                moving.datasets,
                rule_name=plan.rule_name,
                method_name=fused.method_name,
                method_version=fused.method_version,
                series_instance_uid=series_uid,
                series_number=plan.number,
                registered=fused.registered,
                derivation_note="; ".join([str(align_info["alignment"]), *notes])[:400],
                options=self._output_options(plan),
                patient_study_source=plan.source,
            )
        except OutputError as exc:
            raise JobFailed(f"cannot build the fused series: {exc}") from exc
        written: list[tuple[str, str, int]] = []
        for n, ds in enumerate(datasets, start=1):
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            rel = outgoing_path(series_uid, str(ds.SOPInstanceUID))
            self.spool.write(rel, buf.getvalue())
            written.append((str(ds.SOPInstanceUID), rel, int(getattr(ds, "InstanceNumber", n))))
        t_out = time.perf_counter() - t1
        details = {
            **fused.details,
            **align_info,
            "input_notes": notes,
            "series_number": plan.number,
            "series_description": str(datasets[0].SeriesDescription),
            "series_notes": plan.notes,
            "seconds_output": round(t_out, 3),
            "seconds_total": round(time.perf_counter() - t0, 3),
        }
        destinations = [d.name for d in self.settings.destinations]
        replaced = plan.replaces
        with self.sessionmaker() as s:
            for sop_uid, rel, number in written:
                out = Output(
                    job_id=job_id,
                    sop_instance_uid=sop_uid,
                    series_instance_uid=series_uid,
                    instance_number=number,
                    path=rel,
                )
                s.add(out)
                s.flush()
                record(s, STAGE, "output", sop_uid, None, "written", f"job {job_id}, instance {number}")
                for dest in destinations:
                    d = Delivery(output_id=out.id, destination=dest, state="pending")
                    s.add(d)
                    s.flush()
                    record(s, STAGE, "delivery", d.id, None, "pending", f"to {dest}")
            s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    state="done",
                    finished_at=utcnow(),
                    method=fused.method_name,
                    method_version=fused.method_version,
                    output_series_uid=series_uid,
                    output_series_number=plan.number,
                    replaces_series_uid=replaced.output_series_uid if replaced else None,
                    details=json.dumps(details),
                    error=None,
                )
            )
            if replaced is not None:
                self._record_replacement(s, job_id, replaced)
            record(
                s,
                STAGE,
                "job",
                job_id,
                "running",
                "done",
                f"{len(written)} instances fused with {fused.method_name} {fused.method_version} "
                f"on {fused.details['device']}; {align_info['alignment']}"
                + "".join(f"; {n}" for n in notes)
                + f"; series number {plan.number}"
                + (_replaces_text(replaced) if replaced else ""),
            )
            s.commit()
        log.info("job %d done: %d instances in %.1f s", job_id, len(written), details["seconds_total"])

    def _record_replacement(self, s: Session, job_id: int, replaced: Job) -> None:
        """With ``output.replace_previous``: one removal row per destination for the replaced series."""
        if not self.settings.output.replace_previous or not replaced.output_series_uid:
            return
        for dest in self.settings.destinations:
            exists = s.scalar(
                select(SeriesRemoval.id).where(
                    SeriesRemoval.series_instance_uid == replaced.output_series_uid,
                    SeriesRemoval.destination == dest.name,
                )
            )
            if exists is not None:
                continue
            if dest.orthanc is None:
                state, why = (
                    "left",
                    f"{dest.name} offers no way to delete a series; the replaced series stays",
                )
            else:
                state, why = "pending", f"delete at {dest.name} once job {job_id}'s series is delivered there"
            row = SeriesRemoval(
                series_instance_uid=replaced.output_series_uid,
                destination=dest.name,
                replaced_by_job_id=job_id,
                state=state,
                reason=why,
                finished_at=utcnow() if state == "left" else None,
            )
            s.add(row)
            s.flush()
            record(s, STAGE, "removal", row.id, None, state, f"series {replaced.output_series_uid}: {why}")
