"""Receivers for the ingest benchmark, each in its own process on a free loopback port.

dcmtk ``storescp`` and Orthanc (both started by dicomnode.testing.peers) and the dicomnode receive
stage (``python -m dicomnode.receive``), all with ``start()``/``count()``/``stop()``, plus a timed sender.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

from dicomnode.testing.peers import Orthanc, Storescp, start_storescp, storescu
from dicomnode.testing.receiver import ReceiveProcess, process_cpu_seconds, start_receive_process

__all__ = ["DicomnodeReceiver", "OrthancReceiver", "StoreScp", "fresh_dir", "send_folder"]


class StoreScp:
    """dcmtk storescp writing into a fresh folder under ``workdir`` (no fsync), all transfer syntaxes."""

    name = "storescp"
    aet = "STORESCP"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self.scp: Storescp | None = None

    def start(self) -> StoreScp:
        self.scp = start_storescp(self.workdir, aet=self.aet)
        self.port = self.scp.port
        return self

    def count(self) -> int:
        return len(self.scp.files()) if self.scp is not None else 0

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.scp.proc.pid) if self.scp and self.scp.proc else float("nan")

    def stop(self) -> None:
        if self.scp is not None:
            self.scp.stop()


class OrthancReceiver:
    """Orthanc with a fresh storage folder, uncompressed storage."""

    name = "orthanc"
    aet = "ORTHANC"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.orthanc = Orthanc(workdir, aet=self.aet)
        self.port = 0

    def start(self) -> OrthancReceiver:
        self.port = self.orthanc.start().dicom_port
        return self

    def count(self) -> int:
        return int(self.orthanc.rest("/statistics")["CountInstances"])

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.orthanc.proc.pid) if self.orthanc.proc else float("nan")

    def stop(self) -> None:
        self.orthanc.stop()


class DicomnodeReceiver:
    """The dicomnode receive stage in its own process (durable spool + SQLite index)."""

    aet = "DICOMNODE"

    def __init__(
        self, workdir: Path, fsync: bool = True, name: str = "dicomnode", code: Path | None = None
    ) -> None:
        self.workdir = workdir
        self.fsync = fsync
        self.name = name
        self.code = code  # another checkout of dicomnode to run instead of the installed one
        self.port = 0
        self.process: ReceiveProcess | None = None

    def start(self) -> DicomnodeReceiver:
        self.process = start_receive_process(
            self.workdir, storage={"fsync": self.fsync}, log_level="WARNING", code=self.code
        )
        self.port = self.process.port
        return self

    def count(self) -> int:
        with sqlite3.connect(self.workdir / "dicomnode.db") as db:
            return int(db.execute("SELECT count(*) FROM instances").fetchone()[0])

    def cpu_seconds(self) -> float:
        return self.process.cpu_seconds() if self.process is not None else float("nan")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def send_folder(folder: Path, port: int, called_aet: str, calling_aet: str = "SCANNER") -> float:
    """Send every file of ``folder`` with one storescu association; returns the wall time in s."""
    t0 = time.perf_counter()
    result = storescu([folder], port, called_aet=called_aet, calling_aet=calling_aet, timeout=1800)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return elapsed


def fresh_dir(path: Path) -> Path:
    """``path`` as a new empty folder (whatever was there is removed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
