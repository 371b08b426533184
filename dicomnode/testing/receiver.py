"""The receive stage in its own process (``python -m dicomnode.receive``), for tests and benchmarks
that measure it from outside: its peak memory, CPU time and log, as an operator would see them.
"""

from __future__ import annotations

import json
import os
import resource
import select
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomnode.testing.peers import PeerError, stop_process

__all__ = ["ReceiveProcess", "process_cpu_seconds", "start_receive_process"]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time a process (all its threads) has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(eq=False)
class ReceiveProcess:
    """A running receive stage: its port, files, and what /proc says about it."""

    workdir: Path
    port: int
    proc: subprocess.Popen[bytes] = field(repr=False)

    @property
    def log_path(self) -> Path:
        return self.workdir / "receive.log"

    @property
    def spool_dir(self) -> Path:
        return self.workdir / "spool"

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.workdir / 'dicomnode.db'}"

    def _status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def rss_kb(self) -> int:
        """Resident memory now (KiB)."""
        return self._status("VmRSS")

    def peak_rss_kb(self) -> int:
        """The most resident memory the process ever had (KiB)."""
        return self._status("VmHWM")

    def cpu_seconds(self) -> float:
        """User + system CPU time the process (all its threads) has used."""
        return process_cpu_seconds(self.proc.pid)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop_process(self.proc, timeout=20.0)

    def __enter__(self) -> ReceiveProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_receive_process(
    workdir: Path,
    *,
    node: dict[str, Any] | None = None,
    storage: dict[str, Any] | None = None,
    log_level: str = "INFO",
    code: Path | None = None,
    memory_limit_mb: int | None = None,
    timeout: float = 60.0,
) -> ReceiveProcess:
    """Start the receive stage on a free loopback port with its spool and SQLite DB under ``workdir``.

    ``node``/``storage`` are merged into the config; ``code`` runs another checkout of dicomnode;
    ``memory_limit_mb`` caps the process's address space (a runaway allocation fails instead of
    taking the machine's memory).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": 0, **(node or {})},
        "storage": {
            "spool_dir": str(workdir / "spool"),
            "database_url": f"sqlite:///{workdir / 'dicomnode.db'}",
            **(storage or {}),
        },
    }
    cfg = workdir / "config.yaml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    env = dict(os.environ, TCP_NODELAY="1")
    if code is not None:
        env["PYTHONPATH"] = str(code.resolve())

    def limit_memory() -> None:
        if memory_limit_mb is not None:
            size = memory_limit_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (size, size))

    with open(workdir / "receive.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicomnode.receive", "--config", str(cfg), "--log-level", log_level],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=workdir,  # not the source tree: ``-m`` puts the working directory first on sys.path
            preexec_fn=limit_memory,
        )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if not line.startswith(b"LISTENING "):
        stop_process(proc)
        tail = (workdir / "receive.log").read_text(errors="replace")[-3000:]
        raise PeerError(f"the receive stage did not start:\n{tail}")
    return ReceiveProcess(workdir=workdir, port=int(line.split()[1]), proc=proc)
