"""The fuse stage numbers and names each fused series: no collision with the study's series, one
number range per rule, and a re-fusion that says which series it replaces (audit, description,
removal rows for destinations that can delete it)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update
from test_runner_stage import add_job, index

from dicomnode.config import load_settings
from dicomnode.db import Event, Job, Output, Series, SeriesRemoval, make_sessionmaker
from dicomnode.runner import FuseStage
from dicomnode.spool import Spool
from dicomnode.testing import generate_study
from dicomnode.testing.peers import free_port


def _stage(tmp_path: Path, **output: object) -> tuple:
    sm = make_sessionmaker(f"sqlite:///{tmp_path}/n.db")
    spool = Spool(tmp_path / "spool")
    settings = load_settings(
        None,
        fusion={"device": "cpu", "batch_size": 4, "method": "laplacian-pyramid"},
        destinations=[
            {"name": "pacs", "ae_title": "P1", "host": "127.0.0.1", "port": 104},
            {
                "name": "orthanc",
                "ae_title": "P2",
                "host": "127.0.0.1",
                "port": 105,
                # nothing listens there: asking for the study's series numbers fails, the job does not
                "orthanc": {"url": f"http://127.0.0.1:{free_port()}"},
            },
        ],
        output=output,
    )
    return sm, spool, FuseStage(settings, sm, spool, worker_id="test:1")


def _series_numbers(sm, spool: Spool, job_id: int) -> set[int]:  # type: ignore[no-untyped-def]
    with sm() as s:
        paths = s.scalars(select(Output.path).where(Output.job_id == job_id)).all()
    return {int(pydicom.dcmread(spool.abspath(p), stop_before_pixels=True).SeriesNumber) for p in paths}


@pytest.fixture()
def study(tmp_path: Path):  # type: ignore[no-untyped-def]
    return generate_study(tmp_path / "st", modalities=("MR", "CT", "PT"), scale=0.2, seed=2)


def test_each_rule_gets_its_own_free_series_number(tmp_path: Path, study) -> None:  # type: ignore[no-untyped-def]
    """MR+CT and MR+PET of one study used to share a number (the MR's + 1000)."""
    sm, spool, stage = _stage(tmp_path)
    index(sm, spool, [p for s in study.series.values() for p in s.paths])
    with sm() as s:  # what the receive stage stores: the sources' own numbers; the CT took 9100
        for modality, number in (("MR", 3), ("CT", 9100), ("PT", 4)):
            s.execute(
                update(Series)
                .where(Series.series_instance_uid == study.series[modality].series_instance_uid)
                .values(series_number=number)
            )
        s.commit()
    mr = study.series["MR"].series_instance_uid
    ct_job = add_job(sm, mr, study.series["CT"].series_instance_uid, study.patient_id, rule="mr-ct")
    pt_job = add_job(sm, mr, study.series["PT"].series_instance_uid, study.patient_id, rule="mr-pet")
    assert stage.run_once() == 1 and stage.run_once() == 1
    ct_numbers, pt_numbers = _series_numbers(sm, spool, ct_job), _series_numbers(sm, spool, pt_job)
    assert ct_numbers == {9101} and pt_numbers == {9200}
    with sm() as s:
        ct = s.get(Job, ct_job)
        assert ct.state == "done" and ct.output_series_number == 9101
        assert "series numbers not known" in ct.details and "cannot reach" in ct.details


def test_refusion_names_the_series_it_replaces(tmp_path: Path, study) -> None:  # type: ignore[no-untyped-def]
    sm, spool, stage = _stage(tmp_path, replace_previous=True)
    index(sm, spool, [p for s in study.series.values() for p in s.paths])
    mr, ct = study.series["MR"].series_instance_uid, study.series["CT"].series_instance_uid
    first = add_job(sm, mr, ct, study.patient_id)
    assert stage.run_once() == 1
    second = _refuse(sm, study)  # the CT series received more instances later
    assert stage.run_once() == 1
    assert _series_numbers(sm, spool, first) == {9100} and _series_numbers(sm, spool, second) == {9101}
    with sm() as s:
        old, new = s.get(Job, first), s.get(Job, second)
        assert new.state == "done" and new.replaces_series_uid == old.output_series_uid
        done = s.scalars(
            select(Event).where(
                Event.entity == "job", Event.entity_id == str(second), Event.new_state == "done"
            )
        ).one()
        assert f"replaces series {old.output_series_uid} (number 9100) of job {first}" in done.reason
        removals = {r.destination: r for r in s.scalars(select(SeriesRemoval))}
        out = s.scalars(select(Output.path).where(Output.job_id == second)).first()
    ds = pydicom.dcmread(spool.abspath(out))
    assert ds.SeriesDescription.endswith("RESEARCH USE ONLY REPLACES 9100")
    assert old.output_series_uid in ds.DerivationDescription
    assert removals["orthanc"].state == "pending" and removals["pacs"].state == "left"
    assert {r.series_instance_uid for r in removals.values()} == {old.output_series_uid}


def _refuse(sm, study) -> int:  # type: ignore[no-untyped-def]
    """A second job of the MR+CT pair after the CT received new instances (generation 2)."""
    mr, ct = study.series["MR"].series_instance_uid, study.series["CT"].series_instance_uid
    with sm() as s:
        s.execute(update(Series).where(Series.series_instance_uid == ct).values(generation=2))
        job = Job(
            rule_name="mr-ct",
            patient_key=study.patient_id,
            reference_series_uid=mr,
            moving_series_uid=ct,
            moving_generation=2,
        )
        s.add(job)
        s.commit()
        return job.id


def test_without_replace_previous_no_removal_is_planned(tmp_path: Path, study) -> None:  # type: ignore[no-untyped-def]
    sm, spool, stage = _stage(tmp_path, replaces_text="")
    index(sm, spool, study.series["MR"].paths + study.series["CT"].paths)
    mr, ct = study.series["MR"].series_instance_uid, study.series["CT"].series_instance_uid
    add_job(sm, mr, ct, study.patient_id)
    assert stage.run_once() == 1
    second = _refuse(sm, study)
    assert stage.run_once() == 1
    with sm() as s:
        assert s.scalars(select(SeriesRemoval)).all() == []
        assert s.get(Job, second).replaces_series_uid is not None  # still known and audited
        out = s.scalars(select(Output.path).where(Output.job_id == second)).first()
    ds = pydicom.dcmread(spool.abspath(out), stop_before_pixels=True)
    assert ds.SeriesDescription.endswith("[laplacian-pyramid] RESEARCH USE ONLY")  # no marker configured
    assert int(ds.SeriesNumber) == 9101


def test_multiframe_iod_writes_one_instance_per_series(tmp_path: Path, study) -> None:  # type: ignore[no-untyped-def]
    sm, spool, stage = _stage(tmp_path, iod="multiframe-sc")
    index(sm, spool, study.series["MR"].paths + study.series["CT"].paths)
    job_id = add_job(sm, study.series["MR"].series_instance_uid, study.series["CT"].series_instance_uid, "x")
    assert stage.run_once() == 1
    with sm() as s:
        assert s.get(Job, job_id).state == "done"
        (out,) = s.scalars(select(Output).where(Output.job_id == job_id)).all()
    ds = pydicom.dcmread(spool.abspath(out.path))
    assert int(ds.NumberOfFrames) == len(study.series["MR"].paths)
    assert ds.FrameOfReferenceUID == study.frame_of_reference_uid
