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
from datetime import timedelta

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.db import Delivery, Instance, Job, Output, Series, record, utcnow
from dicomnode.fusion.align import align
from dicomnode.fusion.base import Fuser
from dicomnode.fusion.pipeline import FUNCTIONAL_MODALITIES, FusionError, FusionResult, fuse_pair, input_notes
from dicomnode.fusion.registry import get_fuser
from dicomnode.fusion.resample import resolve_device
from dicomnode.fusion.spatial_registration import (
    SPATIAL_REGISTRATION_STORAGE,
    RegistrationObjectError,
    SpatialRegistration,
    parse_registration,
)
from dicomnode.fusion.volume import Volume, VolumeError, volume_from_datasets
from dicomnode.logs import log_context
from dicomnode.runner import quality
from dicomnode.spool import Spool, outgoing_path, thumbnail_path

log = logging.getLogger("dicomnode.fuse")
STAGE = "fuse"


class JobFailed(Exception):
    """A job cannot be completed; the message is the reason recorded for the admin."""


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
        with log_context.bind(job_id=job_id):
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
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == "running")  # an admin may have cancelled it
                .values(state=new_state, finished_at=utcnow(), **values)
            )
            if res.rowcount == 1:  # type: ignore[attr-defined]
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

    def _execute(
        self,
        job_id: int,
        reference: Volume,
        moving: Volume,
        t0: float,
        registrations: list[SpatialRegistration] | None = None,
    ) -> None:
        from dicomnode.output import build_fused_series  # noqa: PLC0415

        cfg = self.settings.fusion
        n_slices = int(reference.array.shape[0])
        sample = quality.sample_slices(n_slices, cfg.quality_slices) if cfg.quality_metrics else []
        thumbs = quality.thumbnail_slices(n_slices)
        try:
            transform, align_info = align(
                reference, moving, device=self.device, registrations=registrations or []
            )
            fused = fuse_pair(
                reference,
                moving,
                self.fuser,
                batch_size=cfg.batch_size,
                device=self.device,
                transform=transform,
                keep=sorted(set(sample) | set(thumbs)),
            )
        except FusionError as exc:
            raise JobFailed(str(exc)) from exc
        notes = input_notes(reference, moving)
        with self.sessionmaker() as s:
            rule_name = s.get(Job, job_id).rule_name  # type: ignore[union-attr]
        report, thumb_png = self._review(job_id, fused, sample, thumbs, moving.modality, rule_name)
        series_uid = generate_uid(entropy_srcs=[self.worker_id, str(job_id), str(time.time_ns())])
        ref_number = int(getattr(reference.datasets[0], "SeriesNumber", 0) or 0)
        t1 = time.perf_counter()
        datasets = build_fused_series(
            fused.pixels,
            reference.datasets,
            moving.datasets,
            rule_name=rule_name,
            method_name=fused.method_name,
            method_version=fused.method_version,
            series_instance_uid=series_uid,
            series_number=ref_number + 1000,
            registered=fused.registered,
            derivation_note="; ".join([str(align_info["alignment"]), *notes])[:400],
        )
        written: list[tuple[str, str, int]] = []
        for n, ds in enumerate(datasets, start=1):
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            rel = outgoing_path(series_uid, str(ds.SOPInstanceUID))
            size = self.spool.write(rel, buf.getvalue())
            written.append((str(ds.SOPInstanceUID), rel, int(getattr(ds, "InstanceNumber", n)), size))
        t_out = time.perf_counter() - t1
        details = {
            **fused.details,
            **align_info,
            "input_notes": notes,
            "seconds_quality": round(report.seconds, 3) if report else None,
            "seconds_output": round(t_out, 3),
            "seconds_total": round(time.perf_counter() - t0, 3),
        }
        held = report.held_reason if report else None
        end_state = "held" if held else "done"
        destinations = [d.name for d in self.settings.destinations]
        with self.sessionmaker() as s:
            for sop_uid, rel, number, size in written:
                out = Output(
                    job_id=job_id,
                    sop_instance_uid=sop_uid,
                    series_instance_uid=series_uid,
                    instance_number=number,
                    path=rel,
                    size_bytes=size,
                )
                s.add(out)
                s.flush()
                record(s, STAGE, "output", sop_uid, None, "written", f"job {job_id}, instance {number}")
                for dest in destinations:
                    d = Delivery(output_id=out.id, destination=dest, state="held" if held else "pending")
                    s.add(d)
                    s.flush()
                    record(s, STAGE, "delivery", d.id, None, d.state, f"to {dest}")
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == "running")
                .values(
                    state=end_state,
                    finished_at=utcnow(),
                    method=fused.method_name,
                    method_version=fused.method_version,
                    output_series_uid=series_uid,
                    details=json.dumps(details),
                    quality=json.dumps(report.as_json()) if report else None,
                    error=held,
                )
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                s.rollback()
                for _, rel, _, _ in written:
                    self.spool.abspath(rel).unlink(missing_ok=True)
                log.info(
                    "job %d was cancelled while it ran; its %d outputs are discarded", job_id, len(written)
                )
                return
            record(
                s,
                STAGE,
                "job",
                job_id,
                "running",
                end_state,
                f"{len(written)} instances fused with {fused.method_name} {fused.method_version} "
                f"on {fused.details['device']}; {align_info['alignment']}"
                + "".join(f"; {n}" for n in notes)
                + (f"; {report.summary()}" if report else "")
                + (f"; held: {held}" if held else ""),
            )
            s.commit()
        log.info(
            "job %d %s: %d instances in %.1f s", job_id, end_state, len(written), details["seconds_total"]
        )

    def _review(
        self,
        job_id: int,
        fused: FusionResult,
        sample: list[int],
        thumbs: list[int],
        modality: str,
        rule_name: str,
    ) -> tuple[quality.QualityReport | None, bytes | None]:
        """Quality metrics and gate (module ``quality``); a failure here never fails the job."""
        try:
            report, png = quality.review(
                fused,
                sample,
                thumbs,
                functional=modality in FUNCTIONAL_MODALITIES,
                rule_name=rule_name,
                gate=self.settings.fusion.quality_gate.get(rule_name),
            )
            if png is not None:
                self.spool.write(thumbnail_path(job_id), png)
            return report, png
        except Exception:
            log.exception("job %d: quality metrics failed; the job goes on without them", job_id)
            return None, None
