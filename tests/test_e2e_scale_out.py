"""Scale-out on PostgreSQL: many processes per stage on one database and one spool.

Two receive processes on one port, two assemblers, three fuse workers and two dispatchers, each a
separate `dicomnode serve --stage X` process. Twelve patients (MR+CT and MR+PET) arrive through four
storescu associations at once. One fuse worker is killed with SIGKILL while it holds a job: its
lease expires and another worker finishes the job. Afterwards every job exists once and is done
once, and the PACS received every output exactly once (an Orthanc Lua filter logs each instance
it receives, duplicates included) and nothing of the interrupted attempt.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select

from dicomnode.db import Association, Delivery, Event, Instance, Job, Output, make_sessionmaker
from dicomnode.testing import generate_study
from dicomnode.testing.peers import Orthanc, echoscu, free_port, have_dcmtk, have_orthanc, peer_env, storescu
from dicomnode.testing.postgres import PostgresServer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (have_orthanc() and have_dcmtk()), reason="needs Debian orthanc and dcmtk"),
]

PATIENTS = 12
SENDERS = 4
LEASE = 3.0  # seconds: takeovers happen within the test, renewals survive a loaded machine
WORKERS = {"assemble": 2, "fuse": 3, "dispatch": 2}
RECEIVED_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  local f = io.open("{path}", "a")
  f:write(dicom.SOPInstanceUID .. "\\n")
  f:close()
  return true
end
"""


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, logs: list[Path]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


def start(tmp: Path, cfg: Path, stage: str, worker_id: str) -> subprocess.Popen[bytes]:
    env = {**peer_env(), "DICOMNODE_WORKERS__WORKER_ID": worker_id}
    with open(tmp / f"{worker_id}.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "dicomnode.cli", "--config", str(cfg), "serve", "--stage", stage],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


def held_job(sm, fuse: dict[str, subprocess.Popen[bytes]]) -> tuple[int, str] | None:  # type: ignore[no-untyped-def]
    """(job id, worker) of a running job whose worker is frozen mid-job (SIGSTOP), or None."""
    with sm() as s:
        running = s.execute(select(Job.id, Job.lease_owner).where(Job.state == "running")).all()
    for job_id, owner in running:
        if owner not in fuse:
            continue
        os.kill(fuse[owner].pid, signal.SIGSTOP)
        with sm() as s:  # frozen now: if the job is still its, the worker is certainly in the middle
            still = s.scalar(select(Job.lease_owner).where(Job.id == job_id, Job.state == "running"))
        if still == owner:
            return job_id, owner
        os.kill(fuse[owner].pid, signal.SIGCONT)
    return None


def test_two_receivers_two_assemblers_three_fuse_workers_two_dispatchers(
    tmp_path: Path, postgres_server: PostgresServer
):
    url = postgres_server.create_database()
    patients = []
    for i in range(PATIENTS):
        moving = "CT" if i % 2 == 0 else "PT"
        st = generate_study(
            tmp_path / "studies" / f"p{i:02d}",
            modalities=("MR", moving),
            scale=0.2,
            seed=2300 + i,
            patient_id=f"SCALE-{i:02d}",
        )
        patients.append(st)
    n_sent = sum(len(s.paths) for st in patients for s in st.series.values())
    n_fused = sum(len(st.series["MR"].paths) for st in patients)
    received = tmp_path / "orthanc-received.txt"
    received.touch()
    with Orthanc(tmp_path / "orthanc", lua=RECEIVED_LUA.format(path=received)) as orthanc:
        port = free_port()
        cfg = tmp_path / "node.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "node": {
                        "ae_title": "DICOMNODE",
                        "host": "127.0.0.1",
                        "port": port,
                        "receive_processes": 2,
                    },
                    "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": url},
                    "assembly": {"series_stable_seconds": 2, "poll_seconds": 0.3},
                    "destinations": [
                        {
                            "name": "pacs",
                            "ae_title": "ORTHANC",
                            "host": "127.0.0.1",
                            "port": orthanc.dicom_port,
                        }
                    ],
                    "fusion": {
                        "device": "cpu",
                        "poll_seconds": 0.3,
                        "method": "laplacian-pyramid",
                        "batch_size": 4,
                    },
                    "dispatch": {
                        "poll_seconds": 0.3,
                        "backoff_initial_seconds": 0.5,
                        "backoff_max_seconds": 2,
                    },
                    "workers": {"lease_seconds": LEASE},
                    "admin": {"http_port": 0},
                }
            )
        )
        procs = {"receive": start(tmp_path, cfg, "receive", "receive")}
        for stage, n in WORKERS.items():
            for k in range(1, n + 1):
                procs[f"{stage}-{k}"] = start(tmp_path, cfg, stage, f"{stage}-{k}")
        fuse = {name: p for name, p in procs.items() if name.startswith("fuse-")}
        logs = [tmp_path / f"{name}.log" for name in procs]
        sm = make_sessionmaker(url)
        victim: tuple[int, str] | None = None
        try:
            wait_for(lambda: echoscu(port).returncode == 0, 120, "the receivers", logs)
            groups = [
                [st.series[m].paths[0].parent for st in patients[k::SENDERS] for m in st.series]
                for k in range(SENDERS)
            ]
            with ThreadPoolExecutor(SENDERS) as pool:
                results = list(pool.map(lambda g: storescu(g, port), groups))
            assert [r.returncode for r in results] == [0] * SENDERS, results[0].stderr[-2000:]
            victim = wait_for(lambda: held_job(sm, fuse), 240, "a fuse worker in the middle of a job", logs)
            job_id, owner = victim
            fuse[owner].send_signal(signal.SIGKILL)  # frozen mid-job, now dead: its lease will expire
            fuse[owner].wait(timeout=30)

            def finished() -> bool:
                with sm() as s:
                    states = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
                    pending = s.scalar(
                        select(func.count()).select_from(Delivery).where(Delivery.state != "sent")
                    )
                return states.get("done", 0) == PATIENTS and len(states) == 1 and pending == 0

            wait_for(finished, 420, f"{PATIENTS} jobs done and delivered", logs)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGCONT)
                    p.terminate()
            for p in procs.values():
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
        in_pacs = orthanc.rest("/tools/find", "POST", {"Level": "Instance", "Query": {"Modality": "OT"}})

    with sm() as s:
        jobs = s.scalars(select(Job)).all()
        outputs = s.scalars(select(Output)).all()
        deliveries = s.scalars(select(Delivery)).all()
        n_instances = s.scalar(select(func.count()).select_from(Instance))
        events = s.scalars(select(Event).where(Event.entity.in_(("job", "delivery")))).all()
        open_assocs = s.scalar(
            select(func.count()).select_from(Association).where(Association.state == "open")
        )
        receivers = set(s.scalars(select(Association.receiver).where(Association.direction == "in")))
    sm.kw["bind"].dispose()

    assert n_instances == n_sent  # every instance stored once
    assert len(receivers - {None}) >= 1 and all(r.rsplit(":", 1)[1].isdigit() for r in receivers)
    keys = [(j.rule_name, j.reference_series_uid, j.moving_series_uid) for j in jobs]
    assert len(jobs) == PATIENTS and len(set(keys)) == PATIENTS  # no job created twice
    assert {j.rule_name for j in jobs} == {"mr-ct", "mr-pet"}
    created = [e for e in events if e.entity == "job" and e.old_state is None and e.new_state == "pending"]
    done = [e.entity_id for e in events if e.entity == "job" and e.new_state == "done"]
    assert len(created) == PATIENTS and sorted(done) == sorted(str(j.id) for j in jobs)  # each done once

    job_id, owner = victim
    taken = next(j for j in jobs if j.id == job_id)
    assert taken.state == "done" and taken.worker != owner and taken.worker in fuse
    reasons = [e.reason or "" for e in events if e.entity == "job" and e.entity_id == str(job_id)]
    assert f"lease of {owner} expired; taken over by {taken.worker}" in reasons

    assert len(outputs) == n_fused and {o.job_id for o in outputs} == {j.id for j in jobs}
    assert len(deliveries) == n_fused and all(d.state == "sent" for d in deliveries)
    sent = [e.entity_id for e in events if e.entity == "delivery" and e.new_state == "sent"]
    assert sorted(sent) == sorted(str(d.id) for d in deliveries)  # each delivery sent once
    arrivals = received.read_text().split()
    assert sorted(arrivals) == sorted(
        o.sop_instance_uid for o in outputs
    )  # each output reached the PACS once
    assert len(in_pacs) == n_fused  # and nothing of the interrupted attempt
    on_disk = {
        str(p.relative_to(tmp_path / "spool")) for p in (tmp_path / "spool" / "outgoing").rglob("*.dcm")
    }
    assert on_disk == {o.path for o in outputs}
    assert open_assocs == 0
