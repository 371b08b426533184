"""Rows (and small spool files) as the stages would have written them, for the admin tests."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

from dicomnode.db import Delivery, Event, Instance, Job, Output, Series, record, utcnow


def add_patient(
    sm,
    spool: Path,
    key: str,
    *,
    name: str = "Doe^Jane",
    job_state: str = "done",
    delivery_state: str = "sent",
    destinations: tuple[str, ...] = ("pacs",),
    n_instances: int = 3,
    n_outputs: int = 2,
    age: timedelta = timedelta(0),
    file_bytes: int = 1000,
    error: str | None = None,
) -> int:
    """One patient with an MR and a CT series, a job in ``job_state`` and its outputs; returns the job id."""
    now = utcnow() - age
    with sm() as s:
        uids = {}
        for mod in ("MR", "CT"):
            series_uid = f"1.2.826.0.1.{abs(hash((key, mod))) % 10**12}"
            uids[mod] = series_uid
            s.add(
                Series(
                    series_instance_uid=series_uid,
                    study_instance_uid=f"1.2.826.0.2.{abs(hash(key)) % 10**12}",
                    patient_key=key,
                    patient_id=key,
                    patient_name=name,
                    modality=mod,
                    series_description=f"{mod} head",
                    state="complete",
                    n_instances=n_instances,
                    first_received_at=now,
                    last_received_at=now,
                    completed_at=now,
                )
            )
            for i in range(n_instances):
                rel = f"incoming/{key}/{mod}/{i}.dcm"
                (spool / rel).parent.mkdir(parents=True, exist_ok=True)
                (spool / rel).write_bytes(b"\0" * file_bytes)
                s.add(
                    Instance(
                        sop_instance_uid=f"{series_uid}.{i}",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                        series_instance_uid=series_uid,
                        study_instance_uid=f"1.2.826.0.2.{abs(hash(key)) % 10**12}",
                        patient_id=key,
                        modality=mod,
                        path=rel,
                        size_bytes=file_bytes,
                        received_at=now,
                    )
                )
        finished = job_state not in ("pending", "running")
        job = Job(
            rule_name="mr-ct",
            patient_key=key,
            reference_series_uid=uids["MR"],
            moving_series_uid=uids["CT"],
            state=job_state,
            attempts=1,
            method="li2021-cnn" if finished else None,
            error=error,
            details=json.dumps(
                {"alignment": "same frame of reference", "seconds_fuse": 1.5, "seconds_total": 2.0}
            ),
            quality=json.dumps({"metrics": {"SSIM": 1.2, "Qabf": 0.5}, "slices": [1], "pixel_max": {}}),
            created_at=now,
            started_at=now if job_state != "pending" else None,
            finished_at=now if finished else None,
        )
        s.add(job)
        s.flush()
        record(
            s,
            "assemble",
            "job",
            job.id,
            None,
            "pending",
            "rule mr-ct: MR series complete with CT series. "
            "Reference: T1 3D first. Moving: soft tissue kernel",
        )
        if job_state in ("done", "held", "cancelled"):
            job.output_series_uid = f"1.2.826.0.3.{job.id}"
            for n in range(1, n_outputs + 1):
                rel = f"outgoing/{key}/{n}.dcm"
                (spool / rel).parent.mkdir(parents=True, exist_ok=True)
                (spool / rel).write_bytes(b"\1" * file_bytes)
                out = Output(
                    job_id=job.id,
                    sop_instance_uid=f"1.2.826.0.3.{job.id}.{n}",
                    series_instance_uid=job.output_series_uid,
                    instance_number=n,
                    path=rel,
                    size_bytes=file_bytes,
                    created_at=now,
                )
                s.add(out)
                s.flush()
                for dest in destinations:
                    s.add(
                        Delivery(
                            output_id=out.id,
                            destination=dest,
                            state=delivery_state,
                            attempts=1,
                            sent_at=now if delivery_state == "sent" else None,
                            last_error=None if delivery_state == "sent" else "association rejected",
                            created_at=now,
                        )
                    )
        s.add(
            Event(
                stage="fuse",
                entity="job",
                entity_id=str(job.id),
                old_state="running",
                new_state=job_state,
                reason=error or "fused",
                at=now,
            )
        )
        s.commit()
        return job.id


def age_rows(sm, key: str, when: datetime) -> None:
    """Make a patient's activity look as old as ``when``."""
    with sm() as s:
        for ser in s.query(Series).filter(Series.patient_key == key):
            ser.last_received_at = ser.first_received_at = ser.completed_at = when
        for job in s.query(Job).filter(Job.patient_key == key):
            job.finished_at = job.created_at = when
            for out in s.query(Output).filter(Output.job_id == job.id):
                for d in s.query(Delivery).filter(Delivery.output_id == out.id):
                    if d.sent_at is not None:
                        d.sent_at = when
        s.commit()
