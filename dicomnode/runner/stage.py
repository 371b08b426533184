"""The fuse stage worker.

Claims a job under a lease (``dicomnode.db.leases``: a pending job, or a running one whose worker's
lease expired), loads both series from the spool, checks the pixels make sense, aligns them (same
frame of reference: patient coordinates; otherwise rigid registration), fuses with the configured
fuser, checks the result, measures its quality on a few slices (``quality.py``), writes Secondary
Capture files to the spool and commits Output rows plus one Delivery row per destination in the
transaction that marks the job done, only while this worker still holds the job's lease. A job
below its rule's quality gate ends ``held`` instead, its deliveries held until an admin releases it;
a job an admin cancels loses its lease, so its worker commits nothing. A worker that lost its
lease removes the files it wrote, so a job taken over never sends two series. Why a job failed is
in ``jobs.error`` and the audit event.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import ConfigError, Settings
from dicomnode.db import Delivery, Instance, Job, Output, Series, SeriesRemoval, record, utcnow
from dicomnode.db.leases import JobClaim, WorkerLeases, claim_job, owned_job
from dicomnode.dispatch.study_series import series_numbers_at
from dicomnode.fusion.align import align
from dicomnode.fusion.base import Fuser
from dicomnode.fusion.pipeline import FUNCTIONAL_MODALITIES, FusionError, FusionResult, fuse_pair, input_notes
from dicomnode.fusion.registry import get_fuser
from dicomnode.fusion.resample import device_problem, resolve_device
from dicomnode.fusion.sanity import PixelSanityError, check_fused, check_source
from dicomnode.fusion.spatial_registration import (
    SPATIAL_REGISTRATION_STORAGE,
    RegistrationObjectError,
    SpatialRegistration,
    parse_registration,
)
from dicomnode.fusion.volume import Volume, VolumeError, volume_from_datasets
from dicomnode.logs import log_context
from dicomnode.output import (
    OutputError,
    OutputOptions,
    build_fused_series,
    choose_series_number,
    replaces_marker,
)
from dicomnode.partial_writes import sweep_partials
from dicomnode.runner import quality
from dicomnode.spool import Spool, outgoing_path, thumbnail_path

log = logging.getLogger("dicomnode.fuse")
STAGE = "fuse"


class JobFailed(Exception):
    """A job cannot be completed; the message is the reason recorded for the admin."""


class LeaseLost(Exception):
    """This worker no longer holds the job (its lease expired and another worker took it)."""


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


def series_dir(series_uid: str) -> str:
    """The spool folder (relative) that holds an output series' files."""
    return posixpath.dirname(outgoing_path(series_uid, "1"))


def require_device(device: str) -> None:
    """ConfigError naming ``fusion.device`` when this host cannot fuse on ``device``."""
    problem = device_problem(device)
    if problem:
        raise ConfigError(f"fusion.device: {problem}")


class FuseStage:
    """Runs fusion jobs one at a time (start more processes for more workers)."""

    def __init__(
        self,
        settings: Settings,
        sessionmaker: sessionmaker[Session],
        spool: Spool,
        worker_id: str | None = None,
        *,
        leases: WorkerLeases | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.spool = spool
        self._own_leases = leases is None
        self.leases = leases or WorkerLeases(
            sessionmaker,
            settings.workers.lease_seconds,
            worker_id or settings.workers.worker_id,
            stages=("fuse",),
            clock=clock,
        )
        self.worker_id = self.leases.owner
        require_device(settings.fusion.device)
        self.device = str(resolve_device(settings.fusion.device))
        self._fuser: Fuser | None = None

    @property
    def fuser(self) -> Fuser:
        if self._fuser is None:
            self._fuser = get_fuser(self.settings.fusion.method, device=self.device)
            log.info("fuser %s %s on %s", self._fuser.name, self._fuser.version, self.device)
        return self._fuser

    # -- claiming and crash leftovers ----------------------------------------------------------
    def claim(self) -> JobClaim | None:
        """Take the oldest pending job, or a running one whose lease expired (audited)."""
        now = self.leases.clock()
        with self.sessionmaker() as s:
            result = claim_job(
                s,
                self.worker_id,
                now,
                self.leases.expiry(now),
                max_attempts=self.settings.workers.max_job_attempts,
                stage=STAGE,
            )
        for _job_id, series_uid in result.abandoned:
            self._discard_series(series_uid)
        claim = result.claim
        if claim is not None:
            self.leases.hold("job", [claim.job_id])
            if claim.taken_from is not None:
                log.warning("job %d taken over: lease of %s expired", claim.job_id, claim.taken_from)
            self._discard_series(claim.previous_output_series)
        return claim

    def _discard_series(self, series_uid: str | None) -> int:
        """Remove the files of an output series that was never committed; returns how many."""
        if not series_uid:
            return 0
        folder = self.spool.abspath(series_dir(series_uid))
        n = sum(1 for p in folder.glob("*") if p.is_file()) if folder.is_dir() else 0
        shutil.rmtree(folder, ignore_errors=True)
        return n

    def remove_leftovers(self) -> int:
        """Remove output files no Output row references, except those of jobs under a live lease,
        and partial writes of stopped workers; returns the number of output files removed."""
        outgoing = self.spool.root / "outgoing"
        listed: list[str] = []
        if outgoing.is_dir():
            for dirpath, _dirs, files in os.walk(outgoing):
                rel_dir = os.path.relpath(dirpath, self.spool.root).replace(os.sep, "/")
                listed += [f"{rel_dir}/{f}" for f in files]
        # Read the DB after listing: a file written after the listing is not touched, and a job
        # that commits meanwhile has its rows visible here.
        now = self.leases.clock()
        with self.sessionmaker() as s:
            referenced = set(s.scalars(select(Output.path)).all()) if listed else set()
            live_dirs = {
                series_dir(uid)
                for uid in s.scalars(
                    select(Job.output_series_uid).where(
                        Job.state == "running",
                        Job.output_series_uid.is_not(None),
                        Job.lease_expires_at >= now,
                    )
                ).all()
            }
        removed = 0
        for rel in listed:
            if rel in referenced or posixpath.dirname(rel) in live_dirs:
                continue
            try:
                self.spool.abspath(rel).unlink()
                removed += 1
            except OSError:
                pass
        for dirpath, dirs, files in os.walk(outgoing, topdown=False) if outgoing.is_dir() else ():
            if not dirs and not files and dirpath != str(outgoing):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass
        if removed:
            log.warning("removed %d output files of interrupted jobs", removed)
        sweep_partials(self.sessionmaker, self.spool.root, self.leases)
        return removed

    def run_once(self) -> int:
        """Claim and run one job; returns 1, or 0 when none was due. The job's lease is renewed
        while it runs (by the worker's renewal thread, or by one started for this round alone)."""
        with self.leases.renewing():
            claim = self.claim()
            if claim is None:
                return 0
            try:
                with log_context.bind(job_id=claim.job_id):
                    self.run_job(claim)
            finally:
                self.leases.drop("job", [claim.job_id])
            return 1

    def run_forever(self, stop: threading.Event) -> None:
        self.leases.start()
        try:
            self.remove_leftovers()
        except Exception:
            log.exception("removing leftovers of interrupted jobs failed")
        while not stop.is_set():
            try:
                worked = self.run_once()
            except Exception:
                log.exception("fuse pass failed")
                worked = 0
            if not worked:
                stop.wait(self.settings.fusion.poll_seconds)
        if self._own_leases:
            self.leases.stop()

    # -- one job -------------------------------------------------------------------------------
    def _check_lease(self, claim: JobClaim) -> None:
        if self.leases.lost("job", claim.job_id):
            raise LeaseLost(f"worker {self.worker_id} lost the lease of job {claim.job_id}")

    def _finish(self, claim: JobClaim, new_state: str, reason: str, **values: object) -> bool:
        """Move the job out of running while this worker still holds it; False when it does not."""
        with self.sessionmaker() as s:
            res = s.execute(
                update(Job)
                .where(owned_job(claim.job_id, self.worker_id, claim.attempt))
                .values(
                    state=new_state,
                    finished_at=utcnow(),
                    lease_owner=None,
                    lease_expires_at=None,
                    **values,
                )
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                s.rollback()
                return False
            record(s, STAGE, "job", claim.job_id, "running", new_state, reason)
            s.commit()
        return True

    def _fail(self, claim: JobClaim, reason: str) -> None:
        if not self._finish(claim, "failed", reason, error=reason, output_series_uid=None):
            self._lease_lost(claim, [])

    def _lease_lost(self, claim: JobClaim, written_series: list[str]) -> None:
        """Drop this worker's result: remove its files and say so in the audit."""
        n = sum(self._discard_series(uid) for uid in written_series)
        with self.sessionmaker() as s:
            state = s.scalar(select(Job.state).where(Job.id == claim.job_id))
        why = (
            "the job was cancelled while it ran"
            if state == "cancelled"
            else f"worker {self.worker_id} lost the job's lease before finishing"
        )
        reason = f"{why}; its result was discarded" + (f" ({n} output files removed)" if n else "")
        log.warning("job %d: %s", claim.job_id, reason)
        with self.sessionmaker() as s:
            record(s, STAGE, "job", claim.job_id, None, None, reason)
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

    def run_job(self, claim: JobClaim) -> None:
        """Run one claimed job to done, failed or superseded (or drop it when the lease is lost)."""
        job_id = claim.job_id
        t0 = time.perf_counter()
        written: list[str] = []  # output series this attempt wrote files for
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
                    reason = "a source series received new instances; a newer job fuses the new generation"
                    if not self._finish(claim, "superseded", reason):
                        self._lease_lost(claim, [])
                    return
                if ref_series.state != "complete" or mov_series.state != "complete":
                    raise JobFailed("a source series is receiving again; it will be fused when complete")
                reference = self._load_series(s, job.reference_series_uid)
                moving = self._load_series(s, job.moving_series_uid)
                registrations = self._registrations(s, job.patient_key)
            self._check_lease(claim)
            self._execute(claim, reference, moving, t0, registrations, written)
        except LeaseLost:
            self._lease_lost(claim, written)
        except JobFailed as exc:
            log.warning("job %d failed: %s", job_id, exc)
            for uid in written:
                self._discard_series(uid)
            self._fail(claim, str(exc))
        except Exception as exc:  # unexpected: keep the node alive, tell the admin
            log.exception("job %d failed unexpectedly", job_id)
            for uid in written:
                self._discard_series(uid)
            self._fail(claim, f"internal error: {type(exc).__name__}: {exc}")

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
                    Job.state == "done",
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
        claim: JobClaim,
        reference: Volume,
        moving: Volume,
        t0: float,
        registrations: list[SpatialRegistration],
        written: list[str],
    ) -> None:
        job_id = claim.job_id
        cfg = self.settings.fusion
        n_slices = int(reference.array.shape[0])
        sample = quality.sample_slices(n_slices, cfg.quality_slices) if cfg.quality_metrics else []
        thumbs = quality.thumbnail_slices(n_slices)
        try:
            check_source(reference, "reference")
            check_source(moving, "moving")
            transform, align_info = align(reference, moving, device=self.device, registrations=registrations)
            self._check_lease(claim)
            fused = fuse_pair(
                reference,
                moving,
                self.fuser,
                batch_size=cfg.batch_size,
                device=self.device,
                transform=transform,
                progress=lambda _done, _total: self._check_lease(claim),
                keep=sorted(set(sample) | set(thumbs)),
            )
            check_fused(fused.pixels)
        except (FusionError, PixelSanityError) as exc:
            raise JobFailed(str(exc)) from exc
        notes = input_notes(reference, moving)
        plan = self._series_plan(job_id, reference)
        report = self._review(job_id, fused, sample, thumbs, moving.modality, plan.rule_name)
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
        self._announce_output(claim, series_uid)
        written.append(series_uid)
        files: list[tuple[str, str, int, int]] = []
        for n, ds in enumerate(datasets, start=1):
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            rel = outgoing_path(series_uid, str(ds.SOPInstanceUID))
            size = self.spool.write(rel, buf.getvalue())
            files.append((str(ds.SOPInstanceUID), rel, int(getattr(ds, "InstanceNumber", n)), size))
        t_out = time.perf_counter() - t1
        details = {
            **fused.details,
            **align_info,
            "input_notes": notes,
            "series_number": plan.number,
            "series_description": str(datasets[0].SeriesDescription),
            "series_notes": plan.notes,
            "seconds_quality": round(report.seconds, 3) if report else None,
            "seconds_output": round(t_out, 3),
            "seconds_total": round(time.perf_counter() - t0, 3),
        }
        held = report.held_reason if report else None
        end_state = "held" if held else "done"
        destinations = [d.name for d in self.settings.destinations]
        replaced = plan.replaces
        with self.sessionmaker() as s:
            # The job row first: it takes the write lock and proves the lease is still ours.
            res = s.execute(
                update(Job)
                .where(owned_job(job_id, self.worker_id, claim.attempt))
                .values(
                    state=end_state,
                    finished_at=utcnow(),
                    method=fused.method_name,
                    method_version=fused.method_version,
                    output_series_uid=series_uid,
                    output_series_number=plan.number,
                    replaces_series_uid=replaced.output_series_uid if replaced else None,
                    details=json.dumps(details),
                    quality=json.dumps(report.as_json()) if report else None,
                    error=held,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                s.rollback()
                raise LeaseLost(f"job {job_id} is no longer held by {self.worker_id}")
            for sop_uid, rel, number, size in files:
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
            if replaced is not None:
                self._record_replacement(s, job_id, replaced)
            record(
                s,
                STAGE,
                "job",
                job_id,
                "running",
                end_state,
                f"{len(files)} instances fused with {fused.method_name} {fused.method_version} "
                f"on {fused.details['device']}; {align_info['alignment']}"
                + "".join(f"; {n}" for n in notes)
                + f"; series number {plan.number}"
                + (_replaces_text(replaced) if replaced else "")
                + (f"; {report.summary()}" if report else "")
                + (f"; held: {held}" if held else ""),
            )
            s.commit()
        log.info("job %d %s: %d instances in %.1f s", job_id, end_state, len(files), details["seconds_total"])

    def _announce_output(self, claim: JobClaim, series_uid: str) -> None:
        """Name the output series on the job before writing its files, so that whoever takes the job
        over after a crash knows which files to remove; LeaseLost when the job is no longer ours."""
        with self.sessionmaker() as s:
            res = s.execute(
                update(Job)
                .where(owned_job(claim.job_id, self.worker_id, claim.attempt))
                .values(output_series_uid=series_uid)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                s.rollback()
                raise LeaseLost(f"job {claim.job_id} is no longer held by {self.worker_id}")
            s.commit()

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

    def _review(
        self,
        job_id: int,
        fused: FusionResult,
        sample: list[int],
        thumbs: list[int],
        modality: str,
        rule_name: str,
    ) -> quality.QualityReport | None:
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
        except Exception:
            log.exception("job %d: quality metrics failed; the job goes on without them", job_id)
            return None
        if png is not None:
            try:  # a retried job draws its strip again
                path = self.spool.abspath(thumbnail_path(job_id))
                path.unlink(missing_ok=True)
                self.spool.write(thumbnail_path(job_id), png)
            except OSError as exc:
                log.warning("job %d: thumbnail strip not written: %s", job_id, exc)
        return report
