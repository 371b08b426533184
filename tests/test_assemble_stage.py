"""Assemble: rows in (series), rows out (series states, jobs, events)."""

from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from dicomnode.admin import collect_status, format_status
from dicomnode.assemble import AssembleStage
from dicomnode.config import load_settings
from dicomnode.db import Event, Instance, Job, Series, SeriesDecision, make_sessionmaker

T0 = datetime(2026, 1, 1, 12, 0, 0)
pytestmark = pytest.mark.both_backends


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture()
def env(db_url):
    sm = make_sessionmaker(db_url)
    settings = load_settings(None, assembly={"series_stable_seconds": 30, "pair_window_hours": 24})
    clock = Clock()
    return sm, AssembleStage(settings, sm, clock=clock), clock


def add_series(sm, uid, modality, patient="P1", study="1.2.3", last=T0, study_dt=None, issuer="", **kw):
    kw.setdefault("n_instances", 10)
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
                last_received_at=last,
                study_datetime=study_dt,
                **kw,
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
        ev = s.scalars(select(Event).where(Event.entity == "series").order_by(Event.id)).all()
        assert ev[-1].old_state == "receiving" and ev[-1].new_state == "complete"


def test_one_job_per_complete_pair_idempotent(env):
    sm, stage, clock = env
    add_series(sm, "mr1", "MR")
    add_series(sm, "ct1", "CT")
    add_series(sm, "pt1", "PT", last=T0 + timedelta(seconds=20))
    clock.now = T0 + timedelta(seconds=40)
    stage.run_once()
    # the PET is still arriving: the patient's series are not chosen until it is complete
    assert jobs(sm) == []
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


def test_series_selection_prefers_t1_3d_and_attenuation_corrected_pet(env):
    sm, stage, clock = env
    add_series(sm, "loc", "MR", series_description="3-plane localizer", n_instances=30)
    add_series(sm, "t2", "MR", series_description="T2 TSE AX", n_instances=40)
    add_series(sm, "flair", "MR", series_description="FLAIR AX", n_instances=40)
    add_series(sm, "t1", "MR", series_description="T1 MPRAGE SAG", acquisition_type="3D", n_instances=176)
    add_series(
        sm, "t1post", "MR", series_description="T1 SE AX", n_instances=24, image_type="ORIGINAL\\PRIMARY"
    )
    add_series(sm, "tiny", "MR", series_description="T1 3D single", acquisition_type="3D", n_instances=2)
    add_series(sm, "nac", "PT", series_description="PET FDG NAC", n_instances=90)
    add_series(sm, "ac", "PT", series_description="PET FDG AC", n_instances=90)
    clock.now = T0 + timedelta(minutes=1)
    stage.run_once()
    (job,) = jobs(sm)
    assert (job.reference_series_uid, job.moving_series_uid) == ("t1", "ac")
    with sm() as s:
        ev = s.scalars(select(Event).where(Event.entity == "job")).one()
    assert "'T1 MPRAGE SAG'" in ev.reason and "3D" in ev.reason and "176 slices" in ev.reason
    assert "'3-plane localizer'" in ev.reason and "excluded by pattern" in ev.reason
    assert "fewer than 8" in ev.reason  # the 2-slice series is not a volume
    assert "'PET FDG AC'" in ev.reason.split("Moving:")[1].split("chosen")[0]


def test_custom_rule_patterns_and_body_part(db_url):
    sm = make_sessionmaker(db_url)
    settings = load_settings(
        None,
        rules=[
            {
                "name": "mr-ct",
                "reference": "MR",
                "moving": "CT",
                "reference_prefer": ["flair"],
                "moving_prefer": ["bone"],
                "body_part": "HEAD",
            }
        ],
    )
    clock = Clock()
    stage = AssembleStage(settings, sm, clock=clock)
    add_series(sm, "t1", "MR", series_description="T1 MPRAGE", acquisition_type="3D")
    add_series(sm, "flair", "MR", series_description="FLAIR 3D", body_part="HEAD")
    add_series(sm, "flair-knee", "MR", series_description="FLAIR knee", body_part="KNEE")
    add_series(sm, "soft", "CT", series_description="CT HEAD soft")
    add_series(sm, "bone", "CT", series_description="CT HEAD bone")
    clock.now = T0 + timedelta(minutes=1)
    stage.run_once()
    (job,) = jobs(sm)
    assert (job.reference_series_uid, job.moving_series_uid) == ("flair", "bone")


def test_no_eligible_reference_makes_no_job(env):
    sm, stage, clock = env
    add_series(sm, "loc", "MR", series_description="Localizer")
    add_series(sm, "ct1", "CT")
    clock.now = T0 + timedelta(minutes=1)
    stage.run_once()
    assert jobs(sm) == []


def decisions(sm, rule: str = "mr-ct") -> dict[str, tuple[str, str, int | None]]:
    with sm() as s:
        rows = s.scalars(select(SeriesDecision).where(SeriesDecision.rule_name == rule)).all()
        return {d.series_instance_uid: (d.decision, d.reason, d.job_id) for d in rows}


def series_events(sm, rule: str = "mr-ct") -> list[Event]:
    """The decision events of one rule."""
    with sm() as s:
        rows = s.scalars(
            select(Event).where(Event.entity == "series", Event.stage == "assemble").order_by(Event.id)
        )
        return [e for e in rows if (e.reason or "").startswith(f"rule {rule}: ")]


def add_instances(sm, series_uid: str, n: int, rows: int, columns: int) -> None:
    with sm() as s:
        for k in range(n):
            s.add(
                Instance(
                    sop_instance_uid=f"{series_uid}.{k}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    series_instance_uid=series_uid,
                    study_instance_uid="1.2.3",
                    image_orientation="1\\0\\0\\0\\1\\0",
                    rows=rows,
                    columns=columns,
                    path=f"x/{series_uid}/{k}",
                )
            )
        s.commit()


def test_one_slice_ct_is_skipped_with_a_reason_in_the_audit_and_status(env):
    """A CT of one slice creates no job, and both series say why (once, not on every pass)."""
    sm, stage, clock = env
    add_series(sm, "mr1", "MR", series_description="T1 MPRAGE")
    add_series(sm, "ct1", "CT", series_description="CT HEAD", n_instances=1)
    clock.now = T0 + timedelta(minutes=1)
    stage.run_once()
    stage.run_once()
    assert jobs(sm) == []
    got = decisions(sm)
    assert got["ct1"] == ("skipped", "1 slices, fewer than 8 (not a volume)", None)
    assert got["mr1"][0] == "waiting" and "no eligible CT series to pair with" in got["mr1"][1]
    assert "'CT HEAD' (ct1) 1 slices, fewer than 8" in got["mr1"][1]
    decided = [
        (e.entity_id, e.old_state, e.new_state) for e in series_events(sm) if e.new_state != "complete"
    ]
    assert sorted(decided) == [("ct1", None, "skipped"), ("mr1", None, "waiting")]
    with sm() as s:
        st = collect_status(s)
    shown = {d["series_instance_uid"]: d for d in st["series_not_fused"]}
    assert shown["ct1"]["reason"] == "1 slices, fewer than 8 (not a volume)"
    assert shown["ct1"]["modality"] == "CT" and shown["ct1"]["rule"] == "mr-ct"
    text = format_status(st)
    assert "series skipped or waiting" in text and "1 slices, fewer than 8 (not a volume)" in text


def test_series_of_one_by_one_pixels_is_skipped(env):
    """2000 slices of 1x1 pixels are not an image: skipped with the reason, no job."""
    sm, stage, clock = env
    add_series(sm, "mr1", "MR", n_instances=20)
    add_series(sm, "ct1", "CT", n_instances=2000)
    add_instances(sm, "mr1", 20, 256, 256)
    add_instances(sm, "ct1", 2000, 1, 1)
    clock.now = T0 + timedelta(minutes=1)
    stage.run_once()
    assert jobs(sm) == []
    assert decisions(sm)["ct1"][:2] == (
        "skipped",
        "1x1 pixels per slice, fewer than 32x32 (not an image to fuse)",
    )


def test_decisions_change_with_the_series_and_are_audited_once_per_change(env):
    sm, stage, clock = env
    add_series(sm, "mr1", "MR", series_description="T1 MPRAGE", acquisition_type="3D")
    add_series(sm, "mr-t2", "MR", series_description="T2 TSE")
    clock.now = T0 + timedelta(minutes=1)
    stage.run_once()
    got = decisions(sm)
    assert got["mr1"][0] == "waiting" and got["mr-t2"][0] == "skipped"
    assert "ranks higher" in got["mr-t2"][1] and "'T1 MPRAGE' (mr1)" in got["mr-t2"][1]
    add_series(sm, "ct1", "CT", series_description="CT HEAD", last=clock.now)
    clock.now += timedelta(minutes=1)
    stage.run_once()
    stage.run_once()
    (job,) = jobs(sm)
    got = decisions(sm)
    assert got["mr1"][0] == got["ct1"][0] == "chosen"
    assert got["mr1"][2] == got["ct1"][2] == job.id
    assert got["mr-t2"][0] == "skipped"
    changes = [
        (e.entity_id, e.old_state, e.new_state) for e in series_events(sm) if e.new_state != "complete"
    ]
    assert changes == [
        ("mr-t2", None, "skipped"),
        ("mr1", None, "waiting"),
        ("ct1", None, "chosen"),
        ("mr1", "waiting", "chosen"),
    ]
    chosen = [e.reason for e in series_events(sm) if e.new_state == "chosen"]
    assert all(r.startswith("rule mr-ct: ") and r.endswith(f"(job {job.id})") for r in chosen)
