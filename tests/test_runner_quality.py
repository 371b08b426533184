"""Fusion quality per job: nine metrics stored, thumbnails in the spool, a gate that holds until released."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from test_runner_stage import add_study_job, index

from dicomnode.admin.actions import AdminActions
from dicomnode.config import QualityGate, load_settings
from dicomnode.db import Delivery, Event, Job, Output, make_sessionmaker
from dicomnode.dispatch import DispatchOutbox
from dicomnode.fusion.metrics import METRIC_NAMES
from dicomnode.runner import FuseStage
from dicomnode.runner.quality import gate_verdict, sample_slices, thumbnail_slices
from dicomnode.spool import Spool, thumbnail_path
from dicomnode.testing import generate_study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory):
    return generate_study(tmp_path_factory.mktemp("q") / "st", modalities=("MR", "CT"), scale=0.2, seed=4)


def _stage(tmp: Path, study, **fusion: object):  # type: ignore[no-untyped-def]
    sm = make_sessionmaker(f"sqlite:///{tmp}/n.db")
    spool = Spool(tmp / "spool")
    settings = load_settings(
        None,
        storage={"spool_dir": str(tmp / "spool"), "database_url": f"sqlite:///{tmp}/n.db"},
        fusion={"device": "cpu", "batch_size": 8, "method": "laplacian-pyramid", **fusion},
        destinations=[{"name": "pacs", "ae_title": "P1", "host": "127.0.0.1", "port": 104}],
    )
    index(sm, spool, study.series["MR"].paths + study.series["CT"].paths)
    return settings, sm, spool, FuseStage(settings, sm, spool, worker_id="test:1"), add_study_job(sm, study)


def test_sample_and_thumbnail_slices():
    assert sample_slices(5, 12) == [0, 1, 2, 3, 4]
    s = sample_slices(200, 12)
    assert len(s) == 12 and s[0] >= 20 and s[-1] <= 179 and s == sorted(set(s))
    assert thumbnail_slices(200) == [60, 100, 140]
    assert thumbnail_slices(1) == [0]


def test_gate_verdict():
    gate = QualityGate(min={"ssim": 1.0}, not_worse_than_pixel_max=["qabf"])
    assert gate_verdict("r", gate, {"SSIM": 1.1, "Qabf": 0.5}, {"Qabf": 0.4}) is None
    why = gate_verdict("r", gate, {"SSIM": 0.9, "Qabf": 0.3}, {"Qabf": 0.4})
    assert "SSIM 0.900 below the minimum 1" in why and "Qabf 0.300 below pixel max 0.400" in why
    assert gate_verdict("r", gate, {"SSIM": float("nan"), "Qabf": 0.5}, {"Qabf": 0.4}) is not None
    assert gate_verdict("r", None, {}, {}) is None


def test_metrics_stored_shown_in_audit_and_thumbnails_written(tmp_path: Path, study):
    _settings, sm, spool, stage, job_id = _stage(tmp_path, study)
    assert stage.run_once() == 1
    with sm() as s:
        job = s.get(Job, job_id)
        assert job.state == "done", job.error
        q = json.loads(job.quality)
        done_event = s.scalars(select(Event).where(Event.entity == "job", Event.new_state == "done")).one()
    assert list(q["metrics"]) == list(METRIC_NAMES)
    assert all(np.isfinite(v) for v in q["metrics"].values())
    assert 0 < q["metrics"]["SSIM"] <= 2 and 0 < q["metrics"]["Qabf"] <= 1
    n = len(study.series["MR"].paths)
    assert q["slices"] == [i + 1 for i in sample_slices(n, 8)]  # fusion.quality_slices
    assert "quality EN" in done_event.reason and "SSIM" in done_event.reason
    assert json.loads(job.details)["seconds_quality"] > 0
    png = Image.open(io.BytesIO(spool.abspath(thumbnail_path(job_id)).read_bytes()))
    assert png.size == (3 * 160, 3 * 160)  # MR | CT | fused, three slices
    px = np.asarray(png.convert("L"), dtype=np.float32)
    for row in range(3):
        for col in range(3):
            tile = px[row * 160 : (row + 1) * 160, col * 160 : (col + 1) * 160]
            assert tile.std() > 5, f"tile {row},{col} is blank"


def test_gate_holds_until_released_and_retry_runs_again(tmp_path: Path, study):
    settings, sm, spool, stage, job_id = _stage(
        tmp_path, study, quality_gate={"mr-ct": {"min": {"SSIM": 5.0}, "not_worse_than_pixel_max": ["Qabf"]}}
    )
    assert stage.run_once() == 1
    with sm() as s:
        job = s.get(Job, job_id)
        assert job.state == "held"
        assert "quality gate of rule mr-ct: SSIM" in job.error and "below the minimum 5" in job.error
        assert "Qabf" in json.loads(job.quality)["pixel_max"]
        states = set(s.scalars(select(Delivery.state)).all())
        n_outputs = len(s.scalars(select(Output.id).where(Output.job_id == job_id)).all())
    assert states == {"held"} and n_outputs == len(study.series["MR"].paths)
    assert DispatchOutbox(settings, sm, spool).run_once() == 0  # held: nothing goes out

    actions = AdminActions(settings, sm)
    actions.retry_job(job_id, "alice")  # the held run's outputs are discarded, the job runs again
    with sm() as s:
        assert s.get(Job, job_id).state == "pending"
        assert s.scalars(select(Output).where(Output.job_id == job_id)).all() == []
    assert stage.run_once() == 1
    with sm() as s:
        assert s.get(Job, job_id).state == "held" and s.get(Job, job_id).attempts == 2

    result = actions.release_job(job_id, "alice")
    assert result.changed == n_outputs
    with sm() as s:
        assert s.get(Job, job_id).state == "done"
        assert set(s.scalars(select(Delivery.state)).all()) == {"pending"}
        ev = s.scalars(select(Event).where(Event.entity == "job", Event.old_state == "held")).all()[-1]
        assert ev.actor == "alice" and "quality gate overridden" in ev.reason


def test_cancel_while_running_discards_the_result(tmp_path: Path, study):
    """The cancel takes the job's lease: the worker's ownership-checked commit fails, its files go."""
    settings, sm, spool, stage, job_id = _stage(tmp_path, study, quality_metrics=False)
    claim = stage.claim()
    assert claim is not None and claim.job_id == job_id
    AdminActions(settings, sm).cancel_job(job_id, "alice")
    stage.run_job(claim)  # the worker finishes; its result must not overwrite the cancel
    with sm() as s:
        job = s.get(Job, job_id)
        assert job.state == "cancelled" and job.lease_owner is None
        assert s.scalars(select(Output)).all() == [] and s.scalars(select(Delivery)).all() == []
        last = s.scalars(select(Event).where(Event.entity == "job").order_by(Event.id.desc())).first()
    assert "cancelled while it ran" in last.reason and "result was discarded" in last.reason
    assert not list((spool.root / "outgoing").rglob("*.dcm"))


def test_cancel_is_noticed_at_the_next_lease_renewal(tmp_path: Path, study):
    """A renewal after the cancel marks the job lost: the worker stops before fusing."""
    settings, sm, spool, stage, job_id = _stage(tmp_path, study, quality_metrics=False)
    claim = stage.claim()
    AdminActions(settings, sm).cancel_job(job_id, "alice")
    stage.leases.beat()
    assert stage.leases.lost("job", job_id)
    stage.run_job(claim)
    with sm() as s:
        assert s.get(Job, job_id).state == "cancelled"
        assert s.scalars(select(Output)).all() == []
    assert not (spool.root / "outgoing").exists() or not list((spool.root / "outgoing").rglob("*"))
