"""Real DICOM peers for tests, benchmarks and the demo: Orthanc (the PACS) and dcmtk programs.

Everything binds 127.0.0.1 on free ports and runs with TCP_NODELAY=1 (Debian's dcmtk/Orthanc
otherwise stall ~40 ms per instance on Nagle's algorithm).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORTHANC_BIN = "/usr/sbin/Orthanc"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peer_env() -> dict[str, str]:
    """Environment for dcmtk and Orthanc processes."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def have_orthanc() -> bool:
    return Path(ORTHANC_BIN).exists() or shutil.which("Orthanc") is not None


def have_dcmtk() -> bool:
    return shutil.which("storescu") is not None and shutil.which("echoscu") is not None


@dataclass
class Orthanc:
    """A running Orthanc with its own storage folder; ``rest()`` talks to its REST API."""

    workdir: Path
    aet: str = "ORTHANC"
    dicom_port: int = 0
    http_port: int = 0
    modalities: dict[str, list[Any]] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()
        config = {
            "Name": "dicomnode-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "StorageCompression": False,
            "DicomModalities": self.modalities,
            "Plugins": [],
            "HttpServerEnabled": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "StableAge": 1,
        }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=1))
        binary = ORTHANC_BIN if Path(ORTHANC_BIN).exists() else "Orthanc"
        log = open(self.workdir / "orthanc.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [binary, str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=peer_env(), cwd=self.workdir
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"Orthanc exited with {code}; see {self.workdir}/orthanc.log")
            try:
                self.rest("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("Orthanc did not answer on its REST port in time")

    def rest(self, path: str, method: str = "GET", data: bytes | None = None, raw: bool = False) -> Any:
        req = urllib.request.Request(self.url + path, method=method, data=data)
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read()
        return body if raw else json.loads(body or b"null")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Orthanc:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def storescu(
    files_or_dirs: list[Path] | list[str],
    port: int,
    called_aet: str = "DICOMNODE",
    calling_aet: str = "SCANNER",
    host: str = "127.0.0.1",
    timeout: float = 600,
    extra: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Send files (folders are scanned recursively) in one association with dcmtk storescu."""
    args = ["storescu", "-aet", calling_aet, "-aec", called_aet, "+sd", "+r", "-nh"]
    args += list(extra or [])
    args += [host, str(port)] + [str(p) for p in files_or_dirs]
    return subprocess.run(args, capture_output=True, text=True, env=peer_env(), timeout=timeout)


def echoscu(
    port: int, called_aet: str = "DICOMNODE", calling_aet: str = "SCANNER", host: str = "127.0.0.1"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-aet", calling_aet, "-aec", called_aet, host, str(port)],
        capture_output=True,
        text=True,
        env=peer_env(),
        timeout=60,
    )
