"""Real DICOM peers for tests: Orthanc as the PACS, dcmtk storescp as a plain storage SCP.

Both are started on free loopback ports with ``TCP_NODELAY=1`` and waited for until they answer;
``stop()`` is idempotent and also runs at interpreter exit, so a failing test leaves no process.
Orthanc 1.10 has no bind-address option: it listens on all interfaces, with HTTP remote access
switched off (``RemoteAccessAllowed: false``), on random high ports, for the test's lifetime.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORTHANC_BIN = os.environ.get("DICOMNODE_TEST_ORTHANC", "/usr/sbin/Orthanc")
STORESCP_BIN = shutil.which("storescp") or "/usr/bin/storescp"
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


class PeerError(RuntimeError):
    """A test peer could not be started; the message carries the tail of its log."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (callers retry on the rare race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def peer_env() -> dict[str, str]:
    """Environment for dcmtk-based programs (Orthanc too): TCP_NODELAY avoids ~40 ms stalls."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0, graceful: bool = True) -> None:
    if proc is None or proc.poll() is not None:
        return
    if not graceful:
        proc.kill()
        proc.wait(timeout=timeout)
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


@dataclass(eq=False)
class OrthancHandle:
    """One Orthanc process with its own storage folder; start/stop keep the ports and the data."""

    workdir: Path
    aet: str = "ORTHANC"
    check_called_aet: bool = False
    dicom_port: int = 0
    http_port: int = 0
    extra_config: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": False,
            "SaveJobs": False,
            "Plugins": [],
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 10,
            "DicomThreadsCount": 4,
            "DicomScpTimeout": 30,
            "OverwriteInstances": False,
            "StableAge": 1,
        }
        cfg.update(self.extra_config)
        return cfg

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> OrthancHandle:
        """Start Orthanc (same ports and storage as before, if it ran already) and wait for REST."""
        if self.running():
            return self
        if not Path(ORTHANC_BIN).exists():
            raise PeerError(f"Orthanc not found at {ORTHANC_BIN}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        first = self.dicom_port == 0
        for attempt in range(3):
            if first:
                self.dicom_port, self.http_port = free_port(), free_port()
                while self.http_port == self.dicom_port:
                    self.http_port = free_port()
            cfg_path = self.workdir / "orthanc.json"
            cfg_path.write_text(json.dumps(self.config(), indent=2))
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [ORTHANC_BIN, str(cfg_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=peer_env(),
                    cwd=self.workdir,
                    start_new_session=True,
                )
            _LIVE.add(self)
            if self._wait_ready(timeout):
                return self
            _terminate(self.proc)
            if not first or attempt == 2:
                break
        raise PeerError(
            f"Orthanc did not come up on DICOM {self.dicom_port} / HTTP {self.http_port}:\n"
            f"{_tail(self.log_path)}"
        )

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                self.rest("/system", timeout=2)
                if port_open(self.dicom_port):
                    return True
            except (OSError, urllib.error.URLError, ValueError):
                pass
            time.sleep(0.1)
        return False

    def stop(self, graceful: bool = False) -> None:
        """Stop Orthanc; its storage stays for a later start().

        Default SIGKILL (a PACS crash; Orthanc's index is transactional). ``graceful=True`` sends
        SIGTERM and waits for a clean shutdown, which takes Orthanc 1.10 about 3.5 s.
        """
        _terminate(self.proc, graceful=graceful)
        self.proc = None

    def rest(self, path: str, method: str = "GET", data: bytes | dict[str, Any] | list[Any] | None = None,
             timeout: float = 30.0) -> Any:
        """Call the REST API; JSON answers come back parsed, anything else as bytes."""
        body = json.dumps(data).encode() if isinstance(data, dict | list) else data
        req = urllib.request.Request(self.url + path, data=body, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as rsp:  # noqa: S310 - loopback only
            raw = rsp.read()
            ctype = rsp.headers.get("Content-Type", "")
        if "json" in ctype:
            return json.loads(raw or b"null")
        return raw

    def instances(self) -> list[str]:
        """Orthanc IDs of all stored instances."""
        return list(self.rest("/instances"))

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """``/instances/{id}/simplified-tags`` of one instance."""
        return dict(self.rest(f"/instances/{orthanc_id}/simplified-tags"))

    def sop_instance_uids(self) -> set[str]:
        """SOP Instance UIDs of all stored instances."""
        found = self.rest("/tools/find", "POST", {"Level": "Instance", "Query": {}, "Expand": True})
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in found}

    def file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file of one instance."""
        return bytes(self.rest(f"/instances/{orthanc_id}/file"))


def start_orthanc(tmp_path: Path, *, aet: str = "ORTHANC", check_called_aet: bool = False,
                  extra_config: dict[str, Any] | None = None, timeout: float = 30.0) -> OrthancHandle:
    """Start Orthanc on free loopback ports with storage under ``tmp_path/orthanc-<aet>``."""
    handle = OrthancHandle(
        workdir=Path(tmp_path) / f"orthanc-{aet}",
        aet=aet,
        check_called_aet=check_called_aet,
        extra_config=dict(extra_config or {}),
    )
    return handle.start(timeout=timeout)


@dataclass(eq=False)
class StorescpHandle:
    """One dcmtk storescp process writing into ``out_dir``."""

    out_dir: Path
    port: int
    aet: str
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.out_dir.parent / f"storescp-{self.aet}.log"

    def files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.rglob("*") if p.is_file())

    def stop(self) -> None:
        _terminate(self.proc)
        self.proc = None


def start_storescp(tmp_path: Path, *, aet: str = "STORESCP", args: tuple[str, ...] = (),
                   timeout: float = 15.0) -> StorescpHandle:
    """Start storescp on a free port (extra ``args`` e.g. ``("--refuse",)``) and wait until it listens."""
    out_dir = Path(tmp_path) / f"storescp-{aet}"
    out_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        port = free_port()
        handle = StorescpHandle(out_dir=out_dir, port=port, aet=aet)
        with open(handle.log_path, "ab") as log:
            handle.proc = subprocess.Popen(
                [STORESCP_BIN, "-aet", aet, "-od", str(out_dir), "+xa", *args, str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=peer_env(),
                start_new_session=True,
            )
        _LIVE.add(handle)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and handle.proc.poll() is None:
            if port_open(port):
                return handle
            time.sleep(0.05)
        handle.stop()
    raise PeerError(f"storescp did not come up:\n{_tail(out_dir.parent / f'storescp-{aet}.log')}")


@atexit.register
def _stop_all() -> None:
    for handle in list(_LIVE):
        handle.stop()


@dataclass(eq=False)
class StatusScpHandle:
    """A pynetdicom storage SCP that answers every C-STORE with a chosen status (fault tests)."""

    port: int
    aet: str
    status: int
    received: list[str] = field(default_factory=list)
    server: Any = field(default=None, repr=False)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def start_status_scp(*, status: int = 0x0000, aet: str = "STATUSSCP") -> StatusScpHandle:
    """Start an in-process SCP on a free loopback port answering C-STORE with ``status``."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt  # noqa: PLC0415

    handle = StatusScpHandle(port=0, aet=aet, status=status)

    def on_store(event: Any) -> int:
        handle.received.append(str(event.request.AffectedSOPInstanceUID))
        return handle.status

    ae = AE(ae_title=aet)
    ae.supported_contexts = AllStoragePresentationContexts
    for attempt in range(3):
        handle.port = free_port()
        try:
            handle.server = ae.start_server(
                ("127.0.0.1", handle.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
            )
            break
        except OSError:
            if attempt == 2:
                raise
    _LIVE.add(handle)
    return handle
