"""Leases on jobs: a dead worker's job is taken over by any live worker (any host, any id), a live
worker keeps its job however long it runs, a worker that lost its lease commits nothing, and claims
are safe with several processes on one SQLite database."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from test_dispatch_outbox import Clock
from test_runner_stage import add_study_job, index

from dicomnode.config import load_settings
from dicomnode.db import Event, Job, Output, make_sessionmaker
from dicomnode.runner import FuseStage
from dicomnode.spool import Spool
from dicomnode.testing import generate_study


def settings(**workers: object):  # type: ignore[no-untyped-def]
    return load_settings(
        None,
        fusion={"device": "cpu", "batch_size": 8, "method": "laplacian-pyramid"},
        destinations=[{"name": "pacs", "ae_title": "P1", "host": "127.0.0.1", "port": 104}],
        workers={"lease_seconds": 30, **workers},
    )


@pytest.fixture()
def env(tmp_path: Path):
    sm = make_sessionmaker(f"sqlite:///{tmp_path}/n.db")
    spool = Spool(tmp_path / "spool")
    st = generate_study(tmp_path / "st", modalities=("MR", "CT"), scale=0.2, seed=1)
    index(sm, spool, st.series["MR"].paths + st.series["CT"].paths)
    stages: list[FuseStage] = []
    clock = Clock()

    def stage(worker_id: str, **workers: object) -> FuseStage:
        s = FuseStage(settings(**workers), sm, spool, worker_id=worker_id, clock=clock)
        stages.append(s)
        return s

    yield sm, spool, st, stage, clock
    for s in stages:
        s.leases.stop(release=False)


def job_events(sm, job_id: int) -> list[tuple[str | None, str | None, str | None]]:
    with sm() as s:
        rows = s.scalars(
            select(Event).where(Event.entity == "job", Event.entity_id == str(job_id)).order_by(Event.id)
        )
        return [(e.old_state, e.new_state, e.reason) for e in rows.all()]


def test_a_worker_on_another_host_takes_over_when_the_lease_expires(env):
    """The worker that claimed the job dies (on its host, in its container): a worker with another
    id takes the job once the lease expired, not before, and the audit says whose lease expired."""
    sm, spool, st, stage, clock = env
    job_id = add_study_job(sm, st)
    dead = stage("scanner-room-a:4711")
    claim = dead.claim()
    assert claim is not None and claim.job_id == job_id
    live = stage("fuse-b:12")  # e.g. the container recreated with a new worker id
    assert live.run_once() == 0  # the lease still runs
    clock.advance(31)
    assert live.run_once() == 1
    with sm() as s:
        job = s.get(Job, job_id)
        assert (job.state, job.attempts, job.worker, job.lease_owner) == ("done", 2, "fuse-b:12", None)
        assert len(s.scalars(select(Output)).all()) == len(st.series["MR"].paths)
    events = job_events(sm, job_id)
    assert events[1] == (
        "running",
        "running",
        "lease of scanner-room-a:4711 expired; taken over by fuse-b:12",
    )
    assert events[-1][:2] == ("running", "done")


def test_a_live_worker_keeps_its_lease_through_a_job_longer_than_the_lease(env, monkeypatch):
    """Renewals hold the job while it runs, however long; another worker never takes it meanwhile."""
    sm, spool, st, stage, clock = env
    job_id = add_study_job(sm, st)
    slow = FuseStage(settings(lease_seconds=3), sm, spool, worker_id="slow")
    other = FuseStage(settings(lease_seconds=3), sm, spool, worker_id="other")
    started = threading.Event()
    real_fuse = type(slow.fuser).fuse

    def slow_fuse(self, a, b):  # type: ignore[no-untyped-def]
        if not started.is_set():
            started.set()
            time.sleep(4.5)  # the job outlasts its lease (3 s) by far
        return real_fuse(self, a, b)

    monkeypatch.setattr(type(slow.fuser), "fuse", slow_fuse)
    worker = threading.Thread(target=slow.run_once)
    worker.start()
    assert started.wait(60)
    tries = taken = 0
    while worker.is_alive():
        tries += 1
        taken += other.claim() is not None
        time.sleep(0.2)
    worker.join()
    slow.leases.stop(release=False)
    other.leases.stop(release=False)
    assert taken == 0 and tries >= 10
    with sm() as s:
        job = s.get(Job, job_id)
        assert (job.state, job.attempts, job.worker) == ("done", 1, "slow")


def test_a_worker_that_lost_its_lease_commits_nothing_and_removes_its_files(env, monkeypatch):
    """Worker A pauses while writing its outputs; its lease expires and B takes the job over and
    finishes it. A's commit is refused and A's files are removed: one output series, not two."""
    sm, spool, st, stage, clock = env
    job_id = add_study_job(sm, st)
    a, b = stage("worker-a"), stage("worker-b")
    claim = a.claim()
    real_write = Spool.write
    a_files: list[str] = []

    def pausing_write(self, relpath, chunks):  # type: ignore[no-untyped-def]
        size = real_write(self, relpath, chunks)
        if not a_files and relpath.startswith("outgoing/"):  # A wrote its first output, then stalls
            a_files.append(relpath)
            clock.advance(31)
            monkeypatch.setattr(Spool, "write", real_write)
            assert b.run_once() == 1
            monkeypatch.setattr(Spool, "write", pausing_write)
        return size

    monkeypatch.setattr(Spool, "write", pausing_write)
    a.run_job(claim)
    monkeypatch.setattr(Spool, "write", real_write)
    with sm() as s:
        job = s.get(Job, job_id)
        outputs = s.scalars(select(Output)).all()
    assert (job.state, job.worker) == ("done", "worker-b")
    assert {o.series_instance_uid for o in outputs} == {job.output_series_uid}
    assert not spool.abspath(a_files[0]).exists()
    on_disk = {str(p.relative_to(spool.root)) for p in (spool.root / "outgoing").rglob("*") if p.is_file()}
    assert on_disk == {o.path for o in outputs}
    reasons = [r for _, _, r in job_events(sm, job_id)]
    assert any("worker-a lost the job's lease before finishing" in (r or "") for r in reasons), reasons


def test_a_job_whose_workers_keep_dying_fails_after_max_attempts(env):
    sm, spool, st, stage, clock = env
    job_id = add_study_job(sm, st)
    for n in range(3):
        assert stage(f"crashing-{n}", max_job_attempts=3).claim().job_id == job_id  # then it dies
        clock.advance(31)
    last = stage("survivor", max_job_attempts=3)
    assert last.run_once() == 0
    with sm() as s:
        job = s.get(Job, job_id)
    assert job.state == "failed" and job.attempts == 3
    assert (
        job.error == "lease of crashing-2 expired; its worker stopped 3 times while running it: not retried"
    )


CLAIM_LOOP = r"""
import json, sys
from datetime import timedelta
from dicomnode.db import make_sessionmaker, utcnow
from dicomnode.db.leases import claim_job
sm = make_sessionmaker(sys.argv[1])
owner, got = sys.argv[2], []
while True:
    now = utcnow()
    with sm() as s:
        claim = claim_job(s, owner, now, now + timedelta(seconds=600), max_attempts=3).claim
    if claim is None:
        break
    got.append(claim.job_id)
print(json.dumps(got))
"""


def test_claims_are_safe_with_several_processes_on_one_sqlite_db(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/shared.db"
    sm = make_sessionmaker(url)
    with sm() as s:
        for n in range(60):
            s.add(
                Job(rule_name="r", patient_key="p", reference_series_uid=f"r{n}", moving_series_uid=f"m{n}")
            )
        s.commit()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIM_LOOP, url, f"proc-{n}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    claimed: list[int] = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "database is locked" not in err
        claimed += json.loads(out)
    assert sorted(claimed) == list(range(1, 61))  # every job exactly once
    with sm() as s:
        owners = {j.lease_owner for j in s.scalars(select(Job)).all()}
        n_events = len(s.scalars(select(Event).where(Event.new_state == "running")).all())
    assert owners <= {f"proc-{n}" for n in range(4)} and n_events == 60


def _renewal_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "leases" and t.is_alive())


def test_a_round_run_alone_renews_while_it_runs_and_leaves_no_thread(tmp_path: Path) -> None:
    """``run_once`` outside a worker's loop starts renewals for the round and stops them after it
    (keeping the leases); a worker that started its renewals keeps them through its rounds."""
    from dicomnode.db.leases import WorkerLeases  # noqa: PLC0415

    sm = make_sessionmaker(f"sqlite:///{tmp_path}/n.db")
    before = _renewal_threads()
    alone = WorkerLeases(sm, 30, "alone")
    with alone.renewing():
        assert _renewal_threads() == before + 1
        with alone.renewing():  # a second round at the same time shares the thread
            assert _renewal_threads() == before + 1
        assert _renewal_threads() == before + 1  # the first round still runs
    assert _renewal_threads() == before

    worker = WorkerLeases(sm, 30, "worker")
    worker.start()
    try:
        with worker.renewing():
            pass
        assert _renewal_threads() == before + 1  # started by the worker: still renewing
    finally:
        worker.stop()
    assert _renewal_threads() == before


def test_a_fuse_round_run_alone_leaves_no_renewal_thread(env) -> None:
    sm, spool, st, stage, clock = env
    add_study_job(sm, st)
    before = _renewal_threads()
    assert stage("solo").run_once() == 1
    assert _renewal_threads() == before
