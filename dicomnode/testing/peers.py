"""Real DICOM peers for tests, benchmarks and the demo: Orthanc (the PACS), dcmtk storescp/storescu/echoscu
and an in-process pynetdicom SCP that answers C-STORE with a chosen status.

Everything runs on free loopback ports with ``TCP_NODELAY=1`` (Debian's dcmtk/Orthanc otherwise stall
~40 ms per instance on Nagle's algorithm) and is waited for until it answers; a peer that does not come
up raises ``PeerError`` with the tail of its log. ``stop()`` is idempotent and also runs at interpreter
exit, so a failing test or an interrupted demo leaves no process behind. Orthanc 1.10 has no
bind-address option: it listens on all interfaces, with HTTP remote access switched off
(``RemoteAccessAllowed: false``), on random high ports, for the peer's lifetime.
"""

from __future__ import annotations

import atexit
import base64
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_DEBIAN_ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_BIN = os.environ.get("DICOMNODE_TEST_ORTHANC") or (
    _DEBIAN_ORTHANC if Path(_DEBIAN_ORTHANC).exists() else shutil.which("Orthanc") or _DEBIAN_ORTHANC
)
STORESCP_BIN = shutil.which("storescp") or "/usr/bin/storescp"
# Where Debian (orthanc-dicomweb, orthanc-webviewer, ...) puts Orthanc's plugins.
ORTHANC_PLUGIN_DIRS = tuple(
    Path(d)
    for d in (
        os.environ.get("DICOMNODE_TEST_ORTHANC_PLUGINS"),
        "/usr/share/orthanc/plugins",
        "/usr/lib/orthanc",
    )
    if d
)
ORTHANC_PLUGINS = {"dicomweb": "libOrthancDicomWeb.so", "webviewer": "libOrthancWebViewer.so"}
_LIVE: set[Any] = set()  # started peers not stopped yet (stopped at interpreter exit)

__all__ = [
    "ORTHANC_BIN",
    "Orthanc",
    "PeerError",
    "StatusScp",
    "Storescp",
    "echoscu",
    "free_port",
    "have_dcmtk",
    "have_orthanc",
    "have_orthanc_plugin",
    "orthanc_plugin",
    "peer_env",
    "port_open",
    "start_orthanc",
    "start_status_scp",
    "start_storescp",
    "stop_process",
    "storescu",
    "wait_until",
]


class PeerError(RuntimeError):
    """A peer could not be started; the message carries the tail of its log."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (starters retry on the rare race)."""
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
    """Environment for dcmtk programs and Orthanc: TCP_NODELAY avoids ~40 ms stalls per instance."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def have_orthanc() -> bool:
    """True when the Orthanc binary is installed."""
    return Path(ORTHANC_BIN).exists() or shutil.which("Orthanc") is not None


def orthanc_plugin(name: str) -> Path | None:
    """The shared library of an Orthanc plugin (``dicomweb``, ``webviewer``), or None when not installed."""
    lib = ORTHANC_PLUGINS.get(name)
    if lib is None:
        raise ValueError(f"unknown Orthanc plugin {name!r}; known: {', '.join(sorted(ORTHANC_PLUGINS))}")
    for folder in ORTHANC_PLUGIN_DIRS:
        for path in sorted(folder.glob(lib + "*")):
            if path.is_file():
                return path
    return None


def have_orthanc_plugin(*names: str) -> bool:
    """True when Orthanc and every named plugin are installed."""
    return have_orthanc() and all(orthanc_plugin(n) is not None for n in names)


def have_dcmtk() -> bool:
    """True when dcmtk's storescu and echoscu are on PATH."""
    return shutil.which("storescu") is not None and shutil.which("echoscu") is not None


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def wait_until(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes] | None, timeout: float, interval: float = 0.05
) -> bool:
    """Poll ``ready()`` until it is true (True) or ``proc`` exited / ``timeout`` passed (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if ready():
            return True
        time.sleep(interval)
    return False


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0, graceful: bool = True) -> None:
    """Stop a child process: SIGTERM and wait (SIGKILL after ``timeout``), or SIGKILL right away."""
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


def _spawn(args: Sequence[str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a peer process in its own session, stdout+stderr appended to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(args),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=peer_env(),
            cwd=cwd,
            start_new_session=True,
        )


@dataclass(eq=False)
class Orthanc:
    """One Orthanc with its own storage folder; ``rest()`` talks to its REST API.

    Usable as a context manager. Ports left at 0 are picked on the first ``start()``; a later
    ``start()`` after ``stop()`` reuses the same ports and storage (a PACS coming back).
    ``stop_graceful`` is the default of ``stop()``: SIGTERM and wait (about 3.5 s for Orthanc 1.10)
    or, when False, SIGKILL (a PACS crash; Orthanc's index is transactional).
    ``plugins`` loads Debian's plugins by name: ``dicomweb`` (DICOMweb under ``/dicom-web/``) and
    ``webviewer`` (``/web-viewer/app/viewer.html?series=<id>``). ``users`` switches HTTP basic
    authentication on with these user: password pairs (``rest()`` then logs in as the first one);
    ``lua`` is a Lua script Orthanc loads (e.g. an ``IncomingHttpRequestFilter``).
    """

    workdir: Path
    aet: str = "ORTHANC"
    dicom_port: int = 0
    http_port: int = 0
    modalities: dict[str, list[Any]] = field(default_factory=dict)
    check_called_aet: bool = False
    extra_config: dict[str, Any] = field(default_factory=dict)
    stop_graceful: bool = True
    plugins: tuple[str, ...] = ()
    users: dict[str, str] = field(default_factory=dict)
    lua: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def config(self) -> dict[str, Any]:
        """The Orthanc configuration file's content (``extra_config`` overrides)."""
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
            "DicomModalities": self.modalities,
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
        cfg.update(self._plugin_config())
        cfg.update(self.extra_config)
        return cfg

    @property
    def dicomweb_url(self) -> str:
        """Root of the DICOMweb API (with the ``dicomweb`` plugin)."""
        return f"{self.url}/dicom-web"

    def _plugin_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {}
        paths = []
        for name in self.plugins:
            path = orthanc_plugin(name)
            if path is None:
                raise PeerError(f"Orthanc plugin {name!r} ({ORTHANC_PLUGINS[name]}) is not installed")
            paths.append(str(path))
        if paths:
            cfg["Plugins"] = paths
        if "dicomweb" in self.plugins:
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": False}
        if "webviewer" in self.plugins:
            cfg["WebViewer"] = {"CachePath": str(self.workdir / "webviewer-cache"), "Threads": 2}
        if self.users:
            cfg["AuthenticationEnabled"] = True
            cfg["RegisteredUsers"] = dict(self.users)
        if self.lua:
            script = self.workdir / "filter.lua"
            script.write_text(self.lua)
            cfg["LuaScripts"] = [str(script)]
        return cfg

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> Orthanc:
        """Start Orthanc and wait until REST and DICOM answer; ports picked here are re-picked on a clash."""
        if self.running():
            return self
        if not Path(ORTHANC_BIN).exists():
            raise PeerError(f"Orthanc not found at {ORTHANC_BIN}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        pick_dicom, pick_http = self.dicom_port == 0, self.http_port == 0
        for attempt in range(3):
            if pick_dicom:
                self.dicom_port = free_port()
            if pick_http:
                self.http_port = free_port()
                while self.http_port == self.dicom_port:
                    self.http_port = free_port()
            cfg_path = self.workdir / "orthanc.json"
            cfg_path.write_text(json.dumps(self.config(), indent=2))
            self.proc = _spawn([ORTHANC_BIN, str(cfg_path)], self.log_path, cwd=self.workdir)
            _LIVE.add(self)
            if wait_until(self._answers, self.proc, timeout, interval=0.1):
                return self
            stop_process(self.proc, timeout=10.0)
            if not (pick_dicom or pick_http) or attempt == 2:
                break
        self.proc = None
        _LIVE.discard(self)
        raise PeerError(
            f"Orthanc did not come up on DICOM {self.dicom_port} / HTTP {self.http_port}:\n"
            f"{_tail(self.log_path)}"
        )

    def _answers(self) -> bool:
        try:
            self.rest("/system", timeout=2)
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return port_open(self.dicom_port)

    def stop(self, graceful: bool | None = None) -> None:
        """Stop Orthanc (``graceful`` defaults to ``stop_graceful``); storage stays for a later start()."""
        stop_process(self.proc, timeout=15.0, graceful=self.stop_graceful if graceful is None else graceful)
        self.proc = None
        _LIVE.discard(self)

    def rest(
        self,
        path: str,
        method: str = "GET",
        data: bytes | dict[str, Any] | list[Any] | None = None,
        raw: bool = False,
        timeout: float = 30.0,
    ) -> Any:
        """REST call: bytes when ``raw`` or not JSON, else parsed JSON (dict/list ``data`` sent as JSON)."""
        body = json.dumps(data).encode() if isinstance(data, dict | list) else data
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=timeout) as rsp:  # noqa: S310 - loopback only
            content = rsp.read()
            ctype = rsp.headers.get("Content-Type", "")
        if raw:
            return content
        if "json" in ctype or not content:
            return json.loads(content or b"null")
        return content

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

    def upload(self, paths: Iterable[Path | str]) -> int:
        """Store DICOM files through the REST API (a PACS that already holds a study); returns how many."""
        n = 0
        for path in paths:
            self.rest("/instances", "POST", Path(path).read_bytes())
            n += 1
        return n

    def file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file of one instance."""
        return bytes(self.rest(f"/instances/{orthanc_id}/file", raw=True))

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_orthanc(
    tmp_path: Path,
    *,
    aet: str = "ORTHANC",
    check_called_aet: bool = False,
    extra_config: dict[str, Any] | None = None,
    modalities: dict[str, list[Any]] | None = None,
    timeout: float = 30.0,
    plugins: Sequence[str] = (),
    users: dict[str, str] | None = None,
) -> Orthanc:
    """Start Orthanc on free loopback ports with storage under ``tmp_path/orthanc-<aet>``; stop() kills it.

    ``plugins`` and ``users`` as in :class:`Orthanc`.
    ``modalities`` are the DICOM peers it knows (``{"node": ["DICOMNODE", "127.0.0.1", 11112]}``): a
    C-MOVE destination must be one of them, and they may C-FIND, C-MOVE and C-GET.
    """
    handle = Orthanc(
        workdir=Path(tmp_path) / f"orthanc-{aet}",
        aet=aet,
        modalities=dict(modalities or {}),
        check_called_aet=check_called_aet,
        extra_config=dict(extra_config or {}),
        stop_graceful=False,
        plugins=tuple(plugins),
        users=dict(users or {}),
    )
    return handle.start(timeout=timeout)


@dataclass(eq=False)
class Storescp:
    """One dcmtk storescp process writing into ``out_dir``."""

    out_dir: Path
    port: int
    aet: str
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.out_dir.parent / f"storescp-{self.aet}.log"

    def files(self) -> list[Path]:
        """The files storescp has written so far."""
        return sorted(p for p in self.out_dir.rglob("*") if p.is_file())

    def stop(self) -> None:
        stop_process(self.proc, timeout=10.0)
        self.proc = None
        _LIVE.discard(self)


def start_storescp(
    tmp_path: Path, *, aet: str = "STORESCP", args: tuple[str, ...] = (), timeout: float = 15.0
) -> Storescp:
    """Start storescp (all transfer syntaxes, into ``tmp_path/storescp-<aet>``) on a free port, waited for.

    Extra ``args`` e.g. ``("--refuse",)`` or ``("--abort-after",)``.
    """
    out_dir = Path(tmp_path) / f"storescp-{aet}"
    out_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        port = free_port()
        handle = Storescp(out_dir=out_dir, port=port, aet=aet)
        handle.proc = _spawn(
            [STORESCP_BIN, "-aet", aet, "-od", str(out_dir), "+xa", *args, str(port)], handle.log_path
        )
        _LIVE.add(handle)
        if wait_until(functools.partial(port_open, port), handle.proc, timeout):
            return handle
        handle.stop()
    raise PeerError(f"storescp did not come up:\n{_tail(out_dir.parent / f'storescp-{aet}.log')}")


@dataclass(eq=False)
class StatusScp:
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
        _LIVE.discard(self)


def start_status_scp(
    *,
    status: int = 0x0000,
    aet: str = "STATUSSCP",
    port: int = 0,
    sop_classes: Sequence[str] | None = None,
) -> StatusScp:
    """Start an in-process SCP on loopback answering C-STORE with ``status``.

    ``port`` 0 picks a free one; ``sop_classes`` limits the storage SOP classes it accepts (default all).
    """
    from pynetdicom import AE, AllStoragePresentationContexts, evt  # noqa: PLC0415

    handle = StatusScp(port=0, aet=aet, status=status)

    def on_store(event: Any) -> int:
        handle.received.append(str(event.request.AffectedSOPInstanceUID))
        return handle.status

    ae = AE(ae_title=aet)
    if sop_classes is None:
        ae.supported_contexts = AllStoragePresentationContexts
    else:
        for uid in sop_classes:
            ae.add_supported_context(uid)
    for attempt in range(3):
        handle.port = port or free_port()
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


@atexit.register
def _stop_all() -> None:
    for handle in list(_LIVE):
        handle.stop()


def storescu(
    files_or_dirs: Sequence[Path | str],
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
    """C-ECHO a peer with dcmtk echoscu."""
    return subprocess.run(
        ["echoscu", "-aet", calling_aet, "-aec", called_aet, host, str(port)],
        capture_output=True,
        text=True,
        env=peer_env(),
        timeout=60,
    )
