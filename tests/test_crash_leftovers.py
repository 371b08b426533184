"""Crash leftovers: each stage closes rows and removes files of workers whose lease expired, and
never those of a worker that is alive (several receivers and fuse workers share one DB and spool)."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from test_dispatch_outbox import Clock

from dicomnode.config import load_settings
from dicomnode.db import Association, Event, Job, Output, Worker, make_sessionmaker, utcnow
from dicomnode.db.leases import WorkerLeases
from dicomnode.receive import ReceiveStage
from dicomnode.runner import FuseStage
from dicomnode.spool import Spool, outgoing_path


def make(tmp_path: Path):  # type: ignore[no-untyped-def]
    settings = load_settings(
        None,
        node={"host": "127.0.0.1", "port": 0},
        storage={"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path}/db.sqlite"},
        fusion={"device": "cpu"},
    )
    sm = make_sessionmaker(settings.storage.database_url)
    return settings, sm


def add_association(sm, owner: str | None, expires: datetime | None, direction: str = "in") -> int:
    with sm() as s:
        row = Association(
            direction=direction,
            calling_aet="SCANNER",
            state="open",
            lease_owner=owner,
            lease_expires_at=expires,
        )
        s.add(row)
        s.commit()
        return row.id


def test_receive_closes_associations_of_stopped_receivers_only(tmp_path: Path):
    settings, sm = make(tmp_path)
    now = utcnow()
    dead = add_association(sm, "receiver-a", now - timedelta(seconds=1))
    legacy = add_association(sm, None, None)
    alive = add_association(sm, "receiver-b", now + timedelta(hours=1))
    outbound = add_association(sm, "dispatcher-a", now - timedelta(seconds=1), direction="out")
    clock = Clock()
    leases = WorkerLeases(sm, 30, "receiver-c", clock=clock)
    stage = ReceiveStage(settings, sm, Spool(settings.storage.spool_dir), leases=leases)
    stage.start()
    try:
        with sm() as s:
            rows = {a.id: a for a in s.scalars(select(Association))}
            events = s.scalars(select(Event).where(Event.entity == "association")).all()
        assert (rows[dead].state, rows[dead].reason) == (
            "aborted",
            "node restarted: lease of receiver-a expired",
        )
        assert rows[dead].ended_at is not None
        assert rows[legacy].reason == "node restarted: lease of an unknown worker expired"
        assert rows[alive].state == "open"  # another receiver serves it right now
        assert rows[outbound].state == "open"  # the dispatch stage closes its own
        assert sorted((e.entity_id, e.old_state, e.new_state) for e in events) == [
            (str(dead), "open", "aborted"),
            (str(legacy), "open", "aborted"),
        ]
        clock.now = now + timedelta(hours=2)  # receiver-b has stopped renewing since
        stage.remove_leftovers()
        with sm() as s:
            assert s.get(Association, alive).state == "aborted"
    finally:
        stage.stop()
        leases.stop()


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_partial_writes_of_stopped_workers_are_removed(tmp_path: Path):
    settings, sm = make(tmp_path)
    now = utcnow()
    with sm() as s:
        s.add(Worker(worker_id="gone", tmp_dir="0dead", lease_expires_at=now - timedelta(seconds=5)))
        s.add(Worker(worker_id="busy", tmp_dir="1live", lease_expires_at=now + timedelta(hours=1)))
        s.add(Worker(worker_id="long-gone", tmp_dir="", lease_expires_at=now - timedelta(days=2)))
        s.commit()
    tmp = Path(settings.storage.spool_dir) / "tmp"
    for folder, name in (("0dead", "a.part"), ("1live", "b.part"), ("2unknown", "c.part")):
        (tmp / folder).mkdir(parents=True)
        (tmp / folder / name).write_bytes(b"half an instance")
        _age(tmp / folder, 120)
    (tmp / "old.part").write_bytes(b"x")
    _age(tmp / "old.part", 7200)
    (tmp / "new.part").write_bytes(b"x")
    (tmp / "3fresh").mkdir()  # a worker registering right now: not touched within the lease period
    leases = WorkerLeases(sm, 30, "receiver-c")
    stage = ReceiveStage(settings, sm, Spool(settings.storage.spool_dir), leases=leases)
    stage.start()
    try:
        left = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))
        assert left == ["1live", "1live/b.part", "3fresh", "new.part"]
        with sm() as s:  # heartbeat rows of workers dead for more than a day are forgotten
            assert sorted(s.scalars(select(Worker.worker_id))) == ["busy", "gone", "receiver-c"]
    finally:
        stage.stop()
        leases.stop()


def test_fuse_start_removes_outputs_of_interrupted_jobs_only(tmp_path: Path):
    settings, sm = make(tmp_path)
    spool = Spool(settings.storage.spool_dir)
    now = utcnow()

    def job(state: str, series: str, owner: str | None = None, expires: datetime | None = None) -> int:
        with sm() as s:
            j = Job(
                rule_name="mr-ct",
                patient_key="P",
                reference_series_uid="r" + series,
                moving_series_uid="m" + series,
                state=state,
                output_series_uid=series,
                lease_owner=owner,
                lease_expires_at=expires,
            )
            s.add(j)
            s.commit()
            return j.id

    def files(series: str, n: int = 2) -> list[str]:
        rels = [outgoing_path(series, f"{series}.{k}") for k in range(n)]
        for rel in rels:
            spool.write(rel, b"DICM")
        return rels

    job("running", "1.1", "dead-worker", now - timedelta(seconds=1))
    dead_files = files("1.1")
    job("running", "1.2", "live-worker", now + timedelta(hours=1))
    live_files = files("1.2")
    done = job("done", "1.3")
    done_files = files("1.3", 3)
    with sm() as s:
        for k, rel in enumerate(done_files[:2]):
            s.add(
                Output(
                    job_id=done,
                    sop_instance_uid=f"1.3.{k}",
                    series_instance_uid="1.3",
                    instance_number=k,
                    path=rel,
                )
            )
        s.commit()
    stray = files("1.4")  # no job names it (an interrupted job of an older version)
    stage = FuseStage(settings, sm, spool, worker_id="fuse-c")
    try:
        assert stage.remove_leftovers() == 2 + 1 + 2
    finally:
        stage.leases.stop()
    exists = {rel for rel in dead_files + live_files + done_files + stray if spool.abspath(rel).exists()}
    assert exists == set(live_files) | set(done_files[:2])
    assert not spool.abspath(dead_files[0]).parent.exists()  # emptied folders go too
