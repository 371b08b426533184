"""Retention: spool files of finished, delivered patients go by age and by size; unfinished work never."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from admin_rows import add_patient, age_rows
from sqlalchemy import select

from dicomnode.admin.actions import ActionError, AdminActions
from dicomnode.admin.retention import SpoolCleaner, spool_usage
from dicomnode.config import load_settings
from dicomnode.db import Event, Instance, Job, Output, Series, make_sessionmaker, utcnow
from dicomnode.spool import Spool

KB = 1000


def _env(tmp: Path, **storage: object):  # type: ignore[no-untyped-def]
    settings = load_settings(
        None,
        storage={"spool_dir": str(tmp / "spool"), "database_url": f"sqlite:///{tmp}/n.db", **storage},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
    )
    Spool(tmp / "spool")
    return settings, make_sessionmaker(settings.storage.database_url)


def _files(sm, key: str) -> list[tuple[str, object]]:  # type: ignore[no-untyped-def]
    """(path, file_deleted_at) of a patient's instances and outputs."""
    with sm() as s:
        inst = s.execute(
            select(Instance.path, Instance.file_deleted_at)
            .join(Series, Series.series_instance_uid == Instance.series_instance_uid)
            .where(Series.patient_key == key)
        ).all()
        outs = s.execute(
            select(Output.path, Output.file_deleted_at)
            .join(Job, Job.id == Output.job_id)
            .where(Job.patient_key == key)
        ).all()
    return [(p, t) for p, t in (*inst, *outs)]


def _present(tmp: Path, sm, key: str) -> bool:  # type: ignore[no-untyped-def]
    files = _files(sm, key)
    assert files
    on_disk = [(tmp / "spool" / p).is_file() for p, _ in files]
    marked = [t is None for _, t in files]
    assert on_disk == marked, "rows and files disagree"
    assert all(on_disk) or not any(on_disk)
    return all(on_disk)


def test_by_age_only_finished_and_delivered_patients(tmp_path: Path):
    settings, sm = _env(tmp_path, retention_days=30)
    spool = tmp_path / "spool"
    old = utcnow() - timedelta(days=45)
    add_patient(sm, spool, "OLD-DONE")
    add_patient(sm, spool, "OLD-FAILED-JOB", job_state="failed", error="x")  # finished: a failed job ends
    add_patient(sm, spool, "OLD-PENDING", job_state="pending")
    add_patient(sm, spool, "OLD-HELD", job_state="held", delivery_state="held")
    add_patient(sm, spool, "OLD-UNSENT", delivery_state="pending")
    add_patient(sm, spool, "OLD-DELIVERY-FAILED", delivery_state="failed")  # kept: it can be re-sent
    add_patient(sm, spool, "RECENT")
    for key in ("OLD-DONE", "OLD-FAILED-JOB", "OLD-PENDING", "OLD-HELD", "OLD-UNSENT", "OLD-DELIVERY-FAILED"):
        age_rows(sm, key, old)

    result = SpoolCleaner(settings, sm).run_once()

    assert result.patients == 2
    assert not _present(tmp_path, sm, "OLD-DONE")
    assert not _present(tmp_path, sm, "OLD-FAILED-JOB")
    for key in ("OLD-PENDING", "OLD-HELD", "OLD-UNSENT", "OLD-DELIVERY-FAILED", "RECENT"):
        assert _present(tmp_path, sm, key), key
    with sm() as s:
        ev = s.scalars(select(Event).where(Event.entity == "patient", Event.entity_id == "OLD-DONE")).one()
        assert ev.new_state == "files_deleted" and "over 30 days ago" in ev.reason
        assert s.scalar(select(Job).where(Job.patient_key == "OLD-DONE")) is not None  # rows stay
    assert SpoolCleaner(settings, sm).run_once().patients == 0  # nothing left to do


def test_by_size_oldest_first_until_under_the_limit(tmp_path: Path):
    # each patient: 2 series x 4 instances + 2 outputs of 100 kB = 1 MB
    settings, sm = _env(tmp_path, max_spool_gb=2.5 * 1000 * KB / 1024**3)
    spool = tmp_path / "spool"
    for i, days in enumerate((9, 7, 5, 3)):
        add_patient(sm, spool, f"P{i}", n_instances=4, n_outputs=2, file_bytes=100 * KB)
        age_rows(sm, f"P{i}", utcnow() - timedelta(days=days))
    add_patient(sm, spool, "P-RUNNING", job_state="running", n_instances=4, file_bytes=100 * KB)
    age_rows(sm, "P-RUNNING", utcnow() - timedelta(days=20))  # the oldest, but unfinished
    with sm() as s:
        before = spool_usage(s, spool)["spool_bytes"]
    assert before == 4 * 1000 * KB + 800 * KB

    result = SpoolCleaner(settings, sm).run_once()

    assert [_present(tmp_path, sm, f"P{i}") for i in range(4)] == [False, False, False, True]
    assert _present(tmp_path, sm, "P-RUNNING")
    with sm() as s:
        after = spool_usage(s, spool)["spool_bytes"]
        reasons = [e.reason for e in s.scalars(select(Event).where(Event.new_state == "files_deleted"))]
    assert after <= 2.5 * 1000 * KB and result.patients == 3
    assert all("storage.max_spool_gb" in r for r in reasons)


def test_never_a_file_of_an_unfinished_job_even_when_full(tmp_path: Path):
    settings, sm = _env(tmp_path, retention_days=1, max_spool_gb=1e-9)
    spool = tmp_path / "spool"
    for state in ("pending", "running", "held"):
        add_patient(sm, spool, f"U-{state}", job_state=state, delivery_state="held")
        age_rows(sm, f"U-{state}", utcnow() - timedelta(days=400))
    add_patient(sm, spool, "U-receiving")
    with sm() as s:
        s.execute(
            Series.__table__.update().where(Series.patient_key == "U-receiving").values(state="receiving")
        )
        s.commit()
    age_rows(sm, "U-receiving", utcnow() - timedelta(days=400))
    assert SpoolCleaner(settings, sm).run_once().patients == 0
    for key in ("U-pending", "U-running", "U-held", "U-receiving"):
        assert _present(tmp_path, sm, key), key


def test_resend_after_retention_says_why(tmp_path: Path):
    settings, sm = _env(tmp_path, retention_days=1)
    job = add_patient(sm, tmp_path / "spool", "GONE")
    age_rows(sm, "GONE", utcnow() - timedelta(days=3))
    SpoolCleaner(settings, sm).run_once()
    with pytest.raises(ActionError, match="removed by retention"):
        AdminActions(settings, sm).resend_job(job, "alice")
