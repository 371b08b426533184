"""Claims between processes on one database: workers skip rows another worker is taking instead of
queueing behind it (PostgreSQL's FOR UPDATE SKIP LOCKED), and two assemblers never decide one
patient at the same time, so neither creates a job the other already created."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, text
from test_assemble_stage import add_series

from dicomnode.assemble import AssembleStage
from dicomnode.assemble import stage as assemble_stage
from dicomnode.config import load_settings
from dicomnode.db import Delivery, Event, Job, Output, SeriesRemoval, make_sessionmaker
from dicomnode.db.leases import (
    _delivery_candidates,
    _job_candidates,
    claim_deliveries,
    claim_job,
    claim_removal,
    lock_patients,
)

pytestmark = pytest.mark.both_backends
T0 = datetime(2026, 1, 1, 12, 0, 0)
PATIENTS = 12


def _postgresql_only(url: str) -> None:
    if not url.startswith("postgresql"):
        pytest.skip("SQLite has one writer: a claim there is the conditional UPDATE alone")


def _add_jobs(sm, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    with sm() as s:
        jobs = [
            Job(
                rule_name="mr-ct",
                patient_key=f"P{i}",
                reference_series_uid=f"1.2.{i}.1",
                moving_series_uid=f"1.2.{i}.2",
            )
            for i in range(n)
        ]
        s.add_all(jobs)
        s.commit()
        return [j.id for j in jobs]


def test_a_job_another_worker_is_claiming_is_skipped_not_waited_for(db_url: str):
    _postgresql_only(db_url)
    sm = make_sessionmaker(db_url)
    first, second = _add_jobs(sm, 2)
    with sm() as taking, sm() as other:
        # a worker in the middle of its claim: the oldest candidate locked, its UPDATE not yet sent
        assert [j.id for j in _job_candidates(taking, T0, limit=1)] == [first]
        other.execute(text("SET LOCAL lock_timeout = '20s'"))  # waiting would fail the test, not hang it
        result = claim_job(other, "worker-b", T0, T0 + timedelta(seconds=30), max_attempts=3)
        assert result.claim is not None and result.claim.job_id == second
        taking.rollback()
    with sm() as s:
        assert s.get(Job, first).state == "pending" and s.get(Job, second).lease_owner == "worker-b"


def test_deliveries_another_dispatcher_is_claiming_are_skipped(db_url: str):
    _postgresql_only(db_url)
    sm = make_sessionmaker(db_url)
    (job_id,) = _add_jobs(sm, 1)
    with sm() as s:
        outputs = [
            Output(
                job_id=job_id,
                sop_instance_uid=f"1.3.{i}",
                series_instance_uid="1.3",
                instance_number=i,
                path="x",
            )
            for i in range(6)
        ]
        s.add_all(outputs)
        s.flush()
        s.add_all(Delivery(output_id=o.id, destination="pacs", next_attempt_at=T0) for o in outputs)
        s.commit()
    now, expires = T0 + timedelta(seconds=1), T0 + timedelta(seconds=31)
    with sm() as taking, sm() as other:
        held = [i for i, _ in _delivery_candidates(taking, now, 3, ())]
        other.execute(text("SET LOCAL lock_timeout = '20s'"))
        got = [c.delivery_id for c in claim_deliveries(other, "dispatcher-b", now, expires, limit=10)]
        assert len(held) == 3 and len(got) == 3 and not set(held) & set(got)
        assert claim_deliveries(taking, "dispatcher-a", now, expires, limit=10) != []
    with sm() as s:
        owners = sorted(str(o) for o in s.scalars(select(Delivery.lease_owner)))
        assert owners == ["dispatcher-a"] * 3 + ["dispatcher-b"] * 3


def test_a_patient_is_decided_by_one_assembler_at_a_time(db_url: str):
    sm = make_sessionmaker(db_url)
    with sm() as holder:
        assert lock_patients(holder, ["P1", "P2"]) == {"P1", "P2"}
        if db_url.startswith("postgresql"):
            with sm() as other:  # does not wait: it leaves the held patients to their holder
                assert lock_patients(other, ["P2", "P3"]) == {"P3"}
                other.commit()
        else:  # SQLite: the one write lock; the other assembler waits for it
            got: list[set[str]] = []
            waiter = threading.Thread(target=lambda: got.append(_lock_and_commit(sm, ["P2", "P3"])))
            waiter.start()
            waiter.join(timeout=1.0)
            assert waiter.is_alive() and got == []
        holder.commit()
    if not db_url.startswith("postgresql"):
        waiter.join(timeout=60)
        assert got == [{"P2", "P3"}]
    with sm() as other:
        assert lock_patients(other, ["P1", "P2"]) == {"P1", "P2"}  # released by the holder's commit
        other.commit()


def _lock_and_commit(sm, keys: list[str]) -> set[str]:  # type: ignore[no-untyped-def]
    with sm() as s:
        won = lock_patients(s, keys)
        s.commit()
        return won


def test_two_assemblers_never_create_the_same_job(db_url: str, monkeypatch: pytest.MonkeyPatch):
    """Two assemblers plan the same twelve patients and then write at the same moment: every job is
    created once, by one of them. On PostgreSQL the unique key of a job is dropped first, so that
    the patient locks alone must keep the jobs single (on SQLite the key stays: one write lock)."""
    sm = make_sessionmaker(db_url)
    if db_url.startswith("postgresql"):
        with sm() as s:
            s.execute(text("ALTER TABLE jobs DROP CONSTRAINT uq_job_pair_generation"))
            s.commit()
    for p in range(PATIENTS):
        add_series(sm, f"1.9.{p}.1", "MR", patient=f"P{p}", study=f"1.9.{p}", state="complete")
        add_series(
            sm, f"1.9.{p}.2", "CT" if p % 2 else "PT", patient=f"P{p}", study=f"1.9.{p}", state="complete"
        )
    settings = load_settings(None, assembly={"series_stable_seconds": 30, "pair_window_hours": 24})
    together = threading.Barrier(2, timeout=60)
    real_lock = assemble_stage.lock_patients

    def lock_after_both_planned(s, keys):  # type: ignore[no-untyped-def]
        together.wait()  # both plans are made: each one sees every pair without a job
        return real_lock(s, keys)

    monkeypatch.setattr(assemble_stage, "lock_patients", lock_after_both_planned)
    stages = [AssembleStage(settings, make_sessionmaker(db_url), clock=lambda: T0) for _ in range(2)]
    created: list[int] = []
    errors: list[BaseException] = []

    def run(stage: AssembleStage) -> None:
        try:
            created.append(stage.create_jobs())
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
            together.abort()

    threads = [threading.Thread(target=run, args=(st,)) for st in stages]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and sum(created) == PATIENTS
    with sm() as s:
        keys = [(j.reference_series_uid, j.moving_series_uid) for j in s.scalars(select(Job))]
        made = s.scalars(select(Event).where(Event.entity == "job", Event.new_state == "pending")).all()
    assert len(keys) == PATIENTS and len(set(keys)) == PATIENTS
    assert len(made) == PATIENTS  # one "created" record per job: nobody fell back on the unique key


def test_a_series_removal_is_held_by_one_dispatcher(db_url: str):
    sm = make_sessionmaker(db_url)
    (job_id,) = _add_jobs(sm, 1)
    with sm() as s:
        row = SeriesRemoval(
            series_instance_uid="1.4", destination="pacs", replaced_by_job_id=job_id, next_attempt_at=T0
        )
        s.add(row)
        s.commit()
        removal_id = row.id
    until = T0 + timedelta(seconds=60)
    with sm() as a, sm() as b:
        assert claim_removal(a, removal_id, T0, until)
        assert not claim_removal(b, removal_id, T0 + timedelta(seconds=59), until)
        assert claim_removal(b, removal_id, until, until + timedelta(seconds=60))  # the holder died
