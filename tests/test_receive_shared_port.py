"""Receive processes sharing one port (node.receive_processes, SO_REUSEPORT), on SQLite and PostgreSQL.

`dicomnode serve --stage receive` with two receive processes; four storescu associations at once
send the same series again and again until both processes have served some. Every instance is
stored once, counted once in its series, and every association says which process took it.
Killing the node (kill -9) takes its receive processes with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from dicomnode.db import Association, Event, Instance, Series, make_sessionmaker
from dicomnode.testing import generate_ct_series
from dicomnode.testing.peers import echoscu, free_port, have_dcmtk, peer_env, port_open, storescu, wait_until

pytestmark = [
    pytest.mark.skipif(not have_dcmtk(), reason="dcmtk (storescu/echoscu) not installed"),
    pytest.mark.both_backends,
]
N_INSTANCES = 20
SENDERS = 4
MAX_ROUNDS = 12  # both processes are hit with probability 1 - 2**-47 by then


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie is gone too
    except FileNotFoundError:
        return True


def test_two_receive_processes_on_one_port_store_each_instance_once(tmp_path: Path, db_url: str):
    series = generate_ct_series(tmp_path / "study", n_slices=N_INSTANCES, rows=64, columns=64)
    port = free_port()
    cfg = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port, "receive_processes": 2},
        "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": db_url, "node_id": "host-a"},
    }
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(cfg))
    log = open(tmp_path / "node.log", "wb")  # noqa: SIM115 - closed below
    node = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dicomnode.cli",
            "--config",
            str(tmp_path / "node.yaml"),
            "serve",
            "--stage",
            "receive",
        ],
        env=peer_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    sm = make_sessionmaker(db_url)
    try:
        assert wait_until(lambda: echoscu(port).returncode == 0, node, timeout=120), (
            tmp_path / "node.log"
        ).read_text()[-3000:]
        rounds = 0
        receivers: set[str] = set()
        with ThreadPoolExecutor(SENDERS) as pool:
            while rounds < MAX_ROUNDS and len(receivers) < 2:
                rounds += 1
                results = list(pool.map(lambda _: storescu([series.paths[0].parent], port), range(SENDERS)))
                assert [r.returncode for r in results] == [0] * SENDERS, results[0].stderr
                with sm() as s:
                    receivers = set(
                        s.scalars(select(Association.receiver).where(Association.direction == "in")).all()
                    )
        assert len(receivers) == 2, f"after {rounds} rounds only {receivers} took associations"
        pids = {int(r.rsplit(":", 1)[1]) for r in receivers}
        assert all(r.startswith("host-a:") for r in receivers) and node.pid not in pids

        sent = rounds * SENDERS * N_INSTANCES
        with sm() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == N_INSTANCES
            (row,) = s.scalars(select(Series)).all()
            assert row.n_instances == N_INSTANCES and row.generation == 1
            events = s.scalars(select(Event).where(Event.entity == "instance")).all()
            assert [e for e in events if e.new_state != "stored"] == []  # nothing refused
            assert (
                len([e for e in events if (e.reason or "").startswith("duplicate ignored")])
                == sent - N_INSTANCES
            )
            assoc = s.scalars(select(Association).where(Association.direction == "in")).all()
            assert sum(a.n_stored for a in assoc) == sent and all(a.n_failed == 0 for a in assoc)

        node.send_signal(signal.SIGKILL)  # the node dies: its receive processes must not linger
        node.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(_gone(p) for p in pids):
            time.sleep(0.2)
        assert all(_gone(p) for p in pids)
        assert wait_until(lambda: not port_open(port), None, timeout=30)
    finally:
        if node.poll() is None:
            node.terminate()
            node.wait(timeout=60)
        log.close()
        sm.kw["bind"].dispose()
        for pid in os.listdir("/proc"):  # receive processes of a failed run: end them by their parent id
            if pid.isdigit():
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == node.pid:
                    os.kill(int(pid), signal.SIGKILL)


def test_receive_processes_get_every_setting_of_the_node(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The settings travel to the receive processes as environment values: every section and value
    type (durations, addresses, paths, secrets) must read back as the node had it."""
    from dicomnode.config import load_settings  # noqa: PLC0415
    from dicomnode.receive.shared_port import ReceiveProcesses  # noqa: PLC0415

    settings = load_settings(
        None,
        node={"port": 11999, "receive_processes": 2, "allowed_peers": [{"address": "10.1.0.0/16"}]},
        storage={"spool_dir": str(tmp_path / "spool"), "database_url": "postgresql://u:secret@db/x"},
        dispatch={"give_up_after": "3d"},
        workers={"lease_seconds": 12, "worker_id": "receive"},
        destinations=[
            {
                "name": "web",
                "type": "dicomweb",
                "url": "http://pacs/dicom-web",
                "password": "p",
                "username": "u",
            }
        ],
    )
    env = ReceiveProcesses(settings)._child_environment(slot=1)
    for name in [k for k in os.environ if k.startswith("DICOMNODE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("DICOMNODE_"):
            monkeypatch.setenv(name, value)
    child = load_settings(None)
    expected = settings.model_dump()
    expected["node"].update(receive_processes=1, reuse_port=True)
    expected["workers"]["worker_id"] = "receive-r2"  # each process its own leases
    assert child.model_dump() == expected
