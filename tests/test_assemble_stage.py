"""Assemble: rows in (series), rows out (series states, jobs, events)."""

from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from dicomnode.assemble import AssembleStage
from dicomnode.config import load_settings
from dicomnode.db import Event, Job, Series, make_sessionmaker

T0 = datetime(2026, 1, 1, 12, 0, 0)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture()
def env(tmp_path):
    sm = make_sessionmaker(f"sqlite:///{tmp_path}/t.db")
    settings = load_settings(None, assembly={"series_stable_seconds": 30, "pair_window_hours": 24})
    clock = Clock()
    return sm, AssembleStage(settings, sm, clock=clock), clock


def add_series(sm, uid, modality, patient="P1", study="1.2.3", last=T0, study_dt=None, issuer=""):
    with sm() as s:
        key = f"{issuer}^{patient}" if issuer else patient
        s.add(
            Series(
                series_instance_uid=uid,
                study_instance_uid=study,
                patient_key=key,
                patient_id=patient,
                issuer_of_patient_id=issuer,
                modality=modality,
                n_instances=10,
                last_received_at=last,
                study_datetime=study_dt,
            )
        )
        s.commit()


def jobs(sm):
    with sm() as s:
        return s.scalars(select(Job).order_by(Job.id)).all()


def test_series_complete_only_after_stable_wait(env):
    sm, stage, clock = env
    add_series(sm, "mr1", "MR")
    clock.now = T0 + timedelta(seconds=29)
    assert stage.complete_stable_series() == 0
    clock.now = T0 + timedelta(seconds=31)
    assert stage.complete_stable_series() == 1
    with sm() as s:
        assert s.scalar(select(Series.state).where(Series.series_instance_uid == "mr1")) == "complete"
        ev = s.scalars(select(Event).where(Event.entity == "series")).all()
        assert ev[-1].old_state == "receiving" and ev[-1].new_state == "complete"


def test_one_job_per_complete_pair_idempotent(env):
    sm, stage, clock = env
    add_series(sm, "mr1", "MR")
    add_series(sm, "ct1", "CT")
    add_series(sm, "pt1", "PT", last=T0 + timedelta(seconds=20))
    clock.now = T0 + timedelta(seconds=40)
    stage.run_once()
    assert [(j.rule_name, j.moving_series_uid) for j in jobs(sm)] == [("mr-ct", "ct1")]
    clock.now = T0 + timedelta(seconds=60)
    stage.run_once()
    stage.run_once()
    # a second assembler over the same DB (restart / scale-out) adds nothing
    AssembleStage(stage.settings, sm, clock=clock).run_once()
    assert sorted(j.rule_name for j in jobs(sm)) == ["mr-ct", "mr-pet"]


def test_grouping_by_patient_and_issuer(env):
    sm, stage, clock = env
    add_series(sm, "mr1", "MR", patient="A")
    add_series(sm, "ct-other", "CT", patient="B")
    add_series(sm, "ct-other-issuer", "CT", patient="A", issuer="OTHERHOSP")
    clock.now = T0 + timedelta(minutes=5)
    stage.run_once()
    assert jobs(sm) == []
    add_series(sm, "ct1", "CT", patient="A")
    stage.run_once()
    assert [j.moving_series_uid for j in jobs(sm)] == ["ct1"]


def test_pair_window_across_studies(env):
    sm, stage, clock = env
    add_series(sm, "mr1", "MR", study="s1", study_dt=T0)
    add_series(sm, "ct-far", "CT", study="s2", study_dt=T0 - timedelta(hours=30))
    add_series(sm, "ct-near", "CT", study="s3", study_dt=T0 - timedelta(hours=3))
    add_series(sm, "ct-nodate", "CT", study="s4", study_dt=None)
    clock.now = T0 + timedelta(minutes=5)
    stage.run_once()
    assert [j.moving_series_uid for j in jobs(sm)] == ["ct-near"]


def test_new_generation_makes_new_job_with_reason(env):
    sm, stage, clock = env
    add_series(sm, "mr1", "MR")
    add_series(sm, "ct1", "CT")
    clock.now = T0 + timedelta(minutes=1)
    stage.run_once()
    with sm() as s:
        j = s.scalars(select(Job)).one()
        j.state = "done"
        ser = s.scalar(select(Series).where(Series.series_instance_uid == "ct1"))
        ser.state, ser.generation, ser.last_received_at = "receiving", 2, clock.now
        s.commit()
    stage.run_once()
    assert len(jobs(sm)) == 1  # not complete again yet
    clock.now += timedelta(minutes=1)
    stage.run_once()
    js = jobs(sm)
    assert [(j.reference_generation, j.moving_generation) for j in js] == [(1, 1), (1, 2)]
    with sm() as s:
        ev = s.scalars(select(Event).where(Event.entity == "job", Event.entity_id == str(js[1].id))).one()
        assert "new instances after job" in ev.reason and "generation 2" in ev.reason


def test_receiver_update_wins_over_completion(env):
    """A series whose last_received_at moved on between read and update is not completed."""
    sm, stage, clock = env
    add_series(sm, "mr1", "MR")
    clock.now = T0 + timedelta(seconds=31)
    with sm() as s:
        ser = s.scalar(select(Series))
        ser.last_received_at = clock.now
        s.commit()
    assert stage.complete_stable_series() == 0
