"""Pixels that make sense before they leave: poisoned series fail their job with a reason (audit and
jobs.error) and produce no outputs, instead of black instances pushed to PACS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select
from test_runner_stage import add_study_job, index

from dicomnode.config import load_settings
from dicomnode.db import Delivery, Event, Job, Output, make_sessionmaker
from dicomnode.fusion.sanity import PixelSanityError, check_fused
from dicomnode.runner import FuseStage
from dicomnode.spool import Spool
from dicomnode.testing import generate_study


@pytest.fixture()
def env(tmp_path: Path):
    sm = make_sessionmaker(f"sqlite:///{tmp_path}/n.db")
    spool = Spool(tmp_path / "spool")
    settings = load_settings(
        None,
        fusion={"device": "cpu", "batch_size": 8, "method": "laplacian-pyramid"},
        destinations=[{"name": "pacs", "ae_title": "P1", "host": "127.0.0.1", "port": 104}],
    )
    stage = FuseStage(settings, sm, spool, worker_id="test:1")
    study = generate_study(tmp_path / "st", modalities=("MR", "CT"), scale=0.2, seed=1)
    yield sm, spool, stage, study
    stage.leases.stop(release=False)


def rewrite(paths: list[Path], change) -> None:  # type: ignore[no-untyped-def]
    for n, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        change(n, ds)
        ds.save_as(p)


def run(env) -> Job:  # type: ignore[no-untyped-def]
    sm, spool, stage, study = env
    index(sm, spool, study.series["MR"].paths + study.series["CT"].paths)
    job_id = add_study_job(sm, study)
    assert stage.run_once() == 1
    with sm() as s:
        job = s.get(Job, job_id)
        assert s.scalars(select(Output)).all() == [] and s.scalars(select(Delivery)).all() == []
        (ev,) = s.scalars(select(Event).where(Event.entity == "job", Event.new_state == "failed")).all()
        assert ev.reason == job.error
    assert not (spool.root / "outgoing").exists() or not any((spool.root / "outgoing").rglob("*.dcm"))
    return job


def test_nan_rescale_slope_fails_the_job(env):
    rewrite(env[3].series["CT"].paths, lambda n, ds: setattr(ds, "RescaleSlope", "NaN"))
    job = run(env)
    assert job.state == "failed"
    assert "Rescale Slope nan" in job.error and "not a finite number" in job.error


def test_infinite_slope_on_one_slice_fails_the_job(env):
    def one(n: int, ds: pydicom.Dataset) -> None:
        if n == 3:
            ds.RescaleSlope = "inf"

    rewrite(env[3].series["CT"].paths, one)
    job = run(env)
    assert job.state == "failed" and "Rescale Slope inf" in job.error


def test_absurd_rescale_slope_fails_the_job(env):
    rewrite(env[3].series["CT"].paths, lambda n, ds: setattr(ds, "RescaleSlope", "1e30"))
    job = run(env)
    assert job.state == "failed" and "is absurd" in job.error


def test_tiny_slices_fail_the_job(env):
    """Slices of 4x4 pixels (the selection refuses them too; a job made anyway still fails)."""

    def tiny(n: int, ds: pydicom.Dataset) -> None:
        ds.Rows = ds.Columns = 4
        ds.PixelData = np.full((4, 4), 40 + n, dtype=np.uint16).tobytes()

    rewrite(env[3].series["CT"].paths, tiny)
    job = run(env)
    assert job.state == "failed" and "4x4 pixels per slice, fewer than 32x32" in job.error


def test_constant_source_fails_the_job(env):
    def blank(n: int, ds: pydicom.Dataset) -> None:
        ds.PixelData = np.zeros((ds.Rows, ds.Columns), dtype=np.uint16).tobytes()

    rewrite(env[3].series["MR"].paths, blank)
    job = run(env)
    assert job.state == "failed" and "reference MR is constant" in job.error


def test_mostly_empty_fusion_fails_the_job(env):
    """Sources that are black but for one pixel per slice fuse into a black volume: not sent."""

    def speck(n: int, ds: pydicom.Dataset) -> None:
        px = np.zeros((ds.Rows, ds.Columns), dtype=np.uint16)
        px[0, n % ds.Columns] = 4000
        ds.PixelData = px.tobytes()
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"

    rewrite(env[3].series["MR"].paths, speck)
    rewrite(env[3].series["CT"].paths, speck)
    job = run(env)
    assert job.state == "failed" and "the fused volume is almost empty" in job.error


def test_check_fused_accepts_a_head_and_refuses_blank_and_constant():
    head = np.zeros((4, 64, 64), dtype=np.uint8)
    head[:, 16:48, 16:48] = 120
    check_fused(head)
    check_fused(np.stack([head] * 3, axis=-1))  # RGB
    with pytest.raises(PixelSanityError, match="constant"):
        check_fused(np.full((4, 64, 64), 200, dtype=np.uint8))
    speck = np.zeros((4, 64, 64), dtype=np.uint8)
    speck[0, 0, 0] = 255
    with pytest.raises(PixelSanityError, match="almost empty"):
        check_fused(speck)
