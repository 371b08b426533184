"""Receivers for the ingest benchmark, each in its own process on a free loopback port.

dcmtk ``storescp`` (no fsync), Orthanc (via dicomnode.testing.peers.Orthanc) and the dicomnode
receive stage (``python -m dicomnode.receive``), plus a timed ``storescu`` sender.
"""

from __future__ import annotations

import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from dicomnode.testing.peers import Orthanc, free_port, peer_env

__all__ = [
    "DicomnodeReceiver", "Orthanc", "OrthancReceiver", "StoreScp", "fresh_dir", "send_folder", "wait_port",
]


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class StoreScp:
    """dcmtk storescp writing into a fresh folder (no fsync), accepting all transfer syntaxes."""

    name = "storescp"
    aet = "STORESCP"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.out = workdir / "out"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreScp:
        self.out.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = open(self.workdir / "storescp.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["storescp", "-aet", self.aet, "+xa", "-od", str(self.out), str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env=peer_env(),
        )
        wait_port(self.port, self.proc)
        return self

    def count(self) -> int:
        return sum(1 for _ in self.out.iterdir())

    def stop(self) -> None:
        _stop(self.proc)


class OrthancReceiver:
    """Orthanc with a fresh storage folder, uncompressed storage."""

    name = "orthanc"
    aet = "ORTHANC"

    def __init__(self, workdir: Path) -> None:
        self.orthanc = Orthanc(workdir, aet=self.aet)
        self.port = 0

    def start(self) -> OrthancReceiver:
        self.orthanc.start()
        self.port = self.orthanc.dicom_port
        wait_port(self.port)
        return self

    def count(self) -> int:
        return int(self.orthanc.rest("/statistics")["CountInstances"])

    def stop(self) -> None:
        self.orthanc.stop()


class DicomnodeReceiver:
    """The dicomnode receive stage in its own process (durable spool + SQLite index)."""

    aet = "DICOMNODE"

    def __init__(self, workdir: Path, fsync: bool = True, name: str = "dicomnode") -> None:
        self.workdir = workdir
        self.fsync = fsync
        self.name = name
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DicomnodeReceiver:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "config.yaml"
        cfg.write_text(
            f"node: {{ae_title: {self.aet}, host: 127.0.0.1, port: 11112}}\n"
            f"storage: {{spool_dir: '{self.workdir / 'spool'}', "
            f"database_url: 'sqlite:///{self.workdir / 'dicomnode.db'}', fsync: {str(self.fsync).lower()}}}\n"
        )
        log = open(self.workdir / "receive.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode.receive", "--config", str(cfg), "--port", "0"],
            stdout=subprocess.PIPE, stderr=log,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("LISTENING "):
            _stop(self.proc)
            raise RuntimeError(f"dicomnode receiver did not start; see {self.workdir / 'receive.log'}")
        self.port = int(line.split()[1])
        return self

    def count(self) -> int:
        with sqlite3.connect(self.workdir / "dicomnode.db") as db:
            return int(db.execute("SELECT count(*) FROM instances").fetchone()[0])

    def stop(self) -> None:
        _stop(self.proc)


def send_folder(folder: Path, port: int, called_aet: str, calling_aet: str = "SCANNER") -> float:
    """Send every file of ``folder`` with one storescu association; returns the wall time in s."""
    args = ["storescu", "-aet", calling_aet, "-aec", called_aet, "+sd", "127.0.0.1", str(port), str(folder)]
    t0 = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, env=peer_env(), timeout=1800)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return elapsed


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
