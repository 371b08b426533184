"""The fuse stage: rows and files in (instances, series, a job), rows and files out (outputs, deliveries)."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from dicomnode.config import ConfigError, load_settings
from dicomnode.db import Delivery, Event, Instance, Job, Output, Series, make_sessionmaker, utcnow
from dicomnode.fusion.spatial_registration import SPATIAL_REGISTRATION_STORAGE
from dicomnode.runner import FuseStage
from dicomnode.spool import Spool, incoming_path
from dicomnode.testing import generate_study

SHIFT = np.array([12.0, -7.0, 5.0])  # CT frame B = frame A + SHIFT


def index(sm, spool: Spool, paths: list[Path]) -> None:
    """What the receive stage would have done: files into the spool, Instance and Series rows."""
    with sm() as s:
        for p in paths:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            rel = incoming_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            spool.abspath(rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, spool.abspath(rel))
            s.add(
                Instance(
                    sop_instance_uid=ds.SOPInstanceUID,
                    sop_class_uid=ds.SOPClassUID,
                    series_instance_uid=ds.SeriesInstanceUID,
                    study_instance_uid=ds.StudyInstanceUID,
                    patient_id=ds.PatientID,
                    modality=ds.Modality,
                    frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
                    path=rel,
                )
            )
            ser = s.scalar(select(Series).where(Series.series_instance_uid == ds.SeriesInstanceUID))
            if ser is None:
                s.add(
                    Series(
                        series_instance_uid=ds.SeriesInstanceUID,
                        study_instance_uid=ds.StudyInstanceUID,
                        patient_key=ds.PatientID,
                        patient_id=ds.PatientID,
                        modality=ds.Modality,
                        state="complete",
                        n_instances=1,
                    )
                )
                s.flush()
            else:
                ser.n_instances += 1
        s.commit()


def add_job(sm, ref_uid: str, mov_uid: str, patient: str, rule="mr-ct") -> int:
    with sm() as s:
        job = Job(
            rule_name=rule, patient_key=patient, reference_series_uid=ref_uid, moving_series_uid=mov_uid
        )
        s.add(job)
        s.commit()
        return job.id


def add_study_job(sm, st) -> int:
    """The MR+CT job of a generated study."""
    return add_job(
        sm, st.series["MR"].series_instance_uid, st.series["CT"].series_instance_uid, st.patient_id
    )


@pytest.fixture()
def env(tmp_path: Path, db_url: str):
    sm = make_sessionmaker(db_url)
    spool = Spool(tmp_path / "spool")
    settings = load_settings(
        None,
        fusion={"device": "cpu", "batch_size": 4, "method": "laplacian-pyramid"},
        destinations=[
            {"name": "pacs", "ae_title": "P1", "host": "127.0.0.1", "port": 104},
            {"name": "archive", "ae_title": "P2", "host": "127.0.0.1", "port": 105},
        ],
    )
    return sm, spool, FuseStage(settings, sm, spool, worker_id="test:1")


def test_job_to_outputs_and_deliveries(env, tmp_path: Path):
    sm, spool, stage = env
    st = generate_study(tmp_path / "st", modalities=("MR", "CT"), scale=0.2, seed=1)
    index(sm, spool, st.series["MR"].paths + st.series["CT"].paths)
    job_id = add_study_job(sm, st)
    assert stage.run_once() == 1
    n = len(st.series["MR"].paths)
    with sm() as s:
        job = s.get(Job, job_id)
        assert job.state == "done", job.error
        assert job.method == "laplacian-pyramid" and job.attempts == 1
        outs = s.scalars(select(Output).where(Output.job_id == job_id).order_by(Output.instance_number)).all()
        assert [o.instance_number for o in outs] == list(range(1, n + 1))
        assert {o.series_instance_uid for o in outs} == {job.output_series_uid}
        for o in outs:
            ds = pydicom.dcmread(spool.abspath(o.path))
            assert ds.SOPInstanceUID == o.sop_instance_uid
            assert ds.StudyInstanceUID == st.study_instance_uid
        deliveries = s.scalars(select(Delivery)).all()
        assert len(deliveries) == 2 * n and {d.destination for d in deliveries} == {"pacs", "archive"}
        assert all(d.state == "pending" for d in deliveries)
        states = [(e.old_state, e.new_state) for e in s.scalars(select(Event).where(Event.entity == "job"))]
        assert states == [("pending", "running"), ("running", "done")]
    assert stage.run_once() == 0  # nothing left


def _shift_to_other_frame(paths: list[Path], for_uid: str) -> None:
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.FrameOfReferenceUID = for_uid
        ds.ImagePositionPatient = [
            f"{float(v) + d:.4f}" for v, d in zip(ds.ImagePositionPatient, SHIFT, strict=True)
        ]
        ds.save_as(p)


def _reg_object(path: Path, study, target_for: str, source_for: str, matrix: np.ndarray) -> Path:
    ds = Dataset()
    ds.SOPClassUID = SPATIAL_REGISTRATION_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study.study_instance_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = study.patient_id
    ds.Modality = "REG"
    ds.FrameOfReferenceUID = target_for
    items = []
    for for_uid, mat in ((target_for, np.eye(4)), (source_for, matrix)):
        m = Dataset()
        m.FrameOfReferenceTransformationMatrixType = "RIGID"
        m.FrameOfReferenceTransformationMatrix = [f"{v:.6f}" for v in mat.ravel()]
        mr = Dataset()
        mr.MatrixSequence = Sequence([m])
        it = Dataset()
        it.FrameOfReferenceUID = for_uid
        it.MatrixRegistrationSequence = Sequence([mr])
        items.append(it)
    ds.RegistrationSequence = Sequence(items)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_spatial_registration_object_aligns_other_frame(env, tmp_path: Path):
    sm, spool, stage = env
    st = generate_study(tmp_path / "st", modalities=("MR", "CT"), scale=0.25, seed=2)
    other_for = generate_uid()
    _shift_to_other_frame(st.series["CT"].paths, other_for)
    to_mr = np.eye(4)
    to_mr[:3, 3] = -SHIFT  # CT frame -> MR frame
    reg = _reg_object(tmp_path / "reg.dcm", st, st.frame_of_reference_uid, other_for, to_mr)
    index(sm, spool, st.series["MR"].paths + st.series["CT"].paths + [reg])
    job_id = add_study_job(sm, st)
    stage.run_once()
    with sm() as s:
        job = s.get(Job, job_id)
        assert job.state == "done", job.error
        details = json.loads(job.details)
        assert details["alignment"].startswith("spatial registration object")
        outs = s.scalars(select(Output).where(Output.job_id == job_id)).all()
        fused = [pydicom.dcmread(spool.abspath(o.path)) for o in outs]
    assert "REG" in fused[0].SeriesDescription
    # the CT skull lands on the phantom's skull: with the REG matrix ignored it would be 15 mm off
    mr = {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(p) for p in st.series["MR"].paths)}
    skull_vals, brain_vals = [], []
    for f in fused:
        ref = mr[str(f.SourceImageSequence[0].ReferencedSOPInstanceUID)]
        pos = np.array([float(v) for v in ref.ImagePositionPatient])
        iop = np.array([float(v) for v in ref.ImageOrientationPatient])
        dr, dc = (float(v) for v in ref.PixelSpacing)
        j, i = np.mgrid[0 : f.Rows, 0 : f.Columns]
        pts = pos + i[..., None] * iop[:3] * dc + j[..., None] * iop[3:] * dr
        labels = st.phantom.labels(pts)
        px = f.pixel_array.astype(float)
        skull_vals += list(px[labels == 2])
        brain_vals += list(px[np.isin(labels, (3, 4))])
    assert np.mean(skull_vals) > np.mean(brain_vals) + 40


@pytest.mark.both_backends
def test_unreadable_series_fails_job_with_reason(env, tmp_path: Path):
    sm, spool, stage = env
    st = generate_study(tmp_path / "st", modalities=("MR", "CT"), scale=0.2, seed=1)
    index(sm, spool, st.series["MR"].paths + st.series["CT"].paths)
    with sm() as s:
        victim = s.scalars(select(Instance).where(Instance.modality == "CT")).first()
        spool.abspath(victim.path).write_bytes(b"not dicom at all")
    job_id = add_study_job(sm, st)
    stage.run_once()
    with sm() as s:
        job = s.get(Job, job_id)
        assert job.state == "failed"
        assert "cannot read stored instance" in job.error
        ev = s.scalars(select(Event).where(Event.entity == "job", Event.new_state == "failed")).one()
        assert ev.reason == job.error


@pytest.mark.both_backends
def test_superseded_generation_and_recovery(env, tmp_path: Path):
    sm, spool, stage = env
    st = generate_study(tmp_path / "st", modalities=("MR", "CT"), scale=0.2, seed=1)
    index(sm, spool, st.series["MR"].paths + st.series["CT"].paths)
    mr_uid, ct_uid = st.series["MR"].series_instance_uid, st.series["CT"].series_instance_uid
    job_id = add_job(sm, mr_uid, ct_uid, st.patient_id)
    with sm() as s:
        s.scalar(select(Series).where(Series.series_instance_uid == ct_uid)).generation = 2
        s.commit()
    stage.run_once()
    with sm() as s:
        assert s.get(Job, job_id).state == "superseded"
        # a job left running by a worker whose lease expired is taken over by the next claim
        dead = Job(
            rule_name="mr-ct",
            patient_key=st.patient_id,
            reference_series_uid=mr_uid,
            moving_series_uid=ct_uid,
            moving_generation=2,
            state="running",
            worker="gone:1",
            lease_owner="gone:1",
            lease_expires_at=utcnow() - timedelta(seconds=1),
            attempts=1,
        )
        s.add(dead)
        s.commit()
        dead_id = dead.id
    assert stage.run_once() == 1
    with sm() as s:
        job = s.get(Job, dead_id)
        assert (job.state, job.attempts, job.lease_owner) == ("done", 2, None)
        taken = s.scalars(select(Event).where(Event.entity_id == str(dead_id), Event.entity == "job")).first()
        assert taken.reason == "lease of gone:1 expired; taken over by test:1"


def test_different_frames_without_reg_are_registered(env, tmp_path: Path):
    """No REG object: rigid MI registration aligns the CT; the job records it, the series says REG."""
    sm, spool, stage = env
    st = generate_study(tmp_path / "st", modalities=("MR", "CT"), scale=0.4, seed=2)
    _shift_to_other_frame(st.series["CT"].paths, generate_uid())
    index(sm, spool, st.series["MR"].paths + st.series["CT"].paths)
    job_id = add_study_job(sm, st)
    stage.run_once()
    with sm() as s:
        job = s.get(Job, job_id)
        assert job.state == "done", job.error
        details = json.loads(job.details)
        outs = s.scalars(select(Output).where(Output.job_id == job_id)).all()
        ev = s.scalars(select(Event).where(Event.entity == "job", Event.new_state == "done")).one()
    assert "rigid registration" in details["alignment"] and "rigid registration" in ev.reason
    assert "translation (" in ev.reason and "iterations" in ev.reason and "mutual information" in ev.reason
    reg = details["registration"]
    assert reg["plausible"] is True
    # recovered translation: the CT frame is the MR frame shifted by SHIFT
    matrix = np.array(reg["matrix"])
    np.testing.assert_allclose(matrix[:3, :3], np.eye(3), atol=0.02)
    np.testing.assert_allclose(matrix[:3, 3], SHIFT, atol=1.5)
    assert "REG" in pydicom.dcmread(spool.abspath(outs[0].path)).SeriesDescription


def test_implausible_registration_fails_the_job_with_reason(env, tmp_path: Path):
    """A moving series with nothing to register on is refused, never fused wrongly."""
    sm, spool, stage = env
    st = generate_study(tmp_path / "st", modalities=("MR", "CT"), scale=0.25, seed=2)
    rng = np.random.default_rng(0)
    for p in st.series["CT"].paths:
        ds = pydicom.dcmread(p)
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.999"
        ds.PixelData = rng.integers(0, 2000, size=(ds.Rows, ds.Columns), dtype=np.int16).tobytes()
        ds.save_as(p)
    index(sm, spool, st.series["MR"].paths + st.series["CT"].paths)
    job_id = add_study_job(sm, st)
    stage.run_once()
    with sm() as s:
        job = s.get(Job, job_id)
        assert job.state == "failed"
        assert "registration result implausible" in job.error
        assert s.scalars(select(Output)).all() == []


def test_a_cuda_device_the_host_lacks_is_refused_at_start(tmp_path: Path):
    """``fusion.device: cuda:N`` without that GPU: one message naming the key, not a CPU run."""
    settings = load_settings(None, fusion={"device": "cuda:99"})
    sm = make_sessionmaker(f"sqlite:///{tmp_path}/n.db")
    with pytest.raises(ConfigError, match=r"^fusion\.device: cuda:99 is not on this host"):
        FuseStage(settings, sm, Spool(tmp_path / "spool"), worker_id="test:1")
