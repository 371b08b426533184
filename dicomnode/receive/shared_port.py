"""Receive processes sharing one port: SO_REUSEPORT on the listener, and N supervised processes.

With SO_REUSEPORT every process binds its own listening socket to the same address and the
kernel spreads incoming connections over them (Linux: by a hash of the peer's address and
port), so N receive processes use N cores without a proxy. Only sockets of the same user may
share a port. The processes share nothing but the database and the spool: the same SOP instance
arriving at two of them at once is stored once (the unique SOP Instance UID and the duplicate
path of the receive stage).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from enum import Enum
from typing import Any

from pydantic import SecretBytes, SecretStr

from dicomnode.config import Settings

log = logging.getLogger("dicomnode.receive")

PARENT_ENV = "DICOMNODE_PARENT_PID"  # set for a receive process started by ReceiveProcesses
_PR_SET_PDEATHSIG = 1
_RESTART_BACKOFF_MAX = 30.0


class ReusePortMixin:
    """For a socketserver TCPServer: set SO_REUSEPORT before the socket is bound."""

    socket: socket.socket

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()  # type: ignore[misc]


def die_with_parent() -> None:
    """In a receive process started by ReceiveProcesses: end when the parent ends (even by kill -9).

    Otherwise an orphaned receiver would keep taking associations on the shared port after the
    node that owns it is gone.
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent or not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _plain(value: Any) -> Any:
    """Settings as YAML-safe values, secrets included (JSON mode would mask them)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(v) for v in value]
    if isinstance(value, SecretStr | SecretBytes):
        return _plain(value.get_secret_value())
    if isinstance(value, bytes):
        return value.decode()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Enum):
        return _plain(value.value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    return str(value)  # Path, URL, IP network ...


def _config_variable(name: str, sections: dict[str, Any]) -> bool:
    """``DICOMNODE_<SECTION>`` or ``DICOMNODE_<SECTION>__<KEY>`` of a config section."""
    prefix = "DICOMNODE_"
    return name.upper().startswith(prefix) and name[len(prefix) :].split("__")[0].lower() in sections


class ReceiveProcesses:
    """``node.receive_processes`` receive processes on ``node.port``, restarted when one dies.

    Each is ``dicomnode serve --stage receive`` with this process's settings (written to a
    private temporary file: it may hold the database password) and ``node.reuse_port`` on.
    """

    def __init__(self, settings: Settings, count: int | None = None) -> None:
        self.settings = settings
        self.count = count or settings.node.receive_processes
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * self.count
        self._restarts = [0] * self.count
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._envs = [self._child_environment(slot) for slot in range(self.count)]
        self._watcher: threading.Thread | None = None

    @property
    def pids(self) -> list[int]:
        """PIDs of the running receive processes."""
        with self._lock:
            return [p.pid for p in self._procs if p is not None and p.poll() is None]

    def _child_environment(self, slot: int = 0) -> dict[str, str]:
        """This process's environment with the settings as DICOMNODE_<SECTION> JSON values.

        The settings travel in the environment, not in a file that a node killed with -9 would
        leave behind (it may hold the database password); the DICOMNODE_* variables they came
        from are replaced, so that none of them can undo ``receive_processes: 1``. A configured
        ``workers.worker_id`` gets the slot's number: every process holds its own leases.
        """
        data: dict[str, Any] = _plain(self.settings.model_dump(mode="python"))
        data["node"]["receive_processes"] = 1
        data["node"]["reuse_port"] = True
        if data["workers"].get("worker_id"):
            data["workers"]["worker_id"] = f"{data['workers']['worker_id'][:60]}-r{slot + 1}"
        env = {k: v for k, v in os.environ.items() if not _config_variable(k, data)}
        env.update({f"DICOMNODE_{section.upper()}": json.dumps(value) for section, value in data.items()})
        env[PARENT_ENV] = str(os.getpid())
        return env

    def _spawn(self, slot: int) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "dicomnode.receive", "--log-level", "INFO"]  # settings: environment
        env = self._envs[slot]
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        log.info("receive process %d started (pid %d)", slot + 1, proc.pid)
        return proc

    def start(self, timeout: float = 60.0) -> ReceiveProcesses:
        """Start the processes and wait until the port accepts connections."""
        with self._lock:
            for slot in range(self.count):
                self._procs[slot] = self._spawn(slot)
        node = self.settings.node
        host = "127.0.0.1" if node.host in ("0.0.0.0", "") else ("::1" if node.host == "::" else node.host)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p for p in self._procs if p is not None and p.poll() is not None]
            if dead:
                self.stop()
                raise RuntimeError(f"a receive process exited at start (status {dead[0].returncode})")
            try:
                with socket.create_connection((host, node.port), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"the receive processes did not listen on port {node.port} in {timeout:g} s")
        self._watcher = threading.Thread(target=self._watch, name="receive-processes", daemon=True)
        self._watcher.start()
        return self

    def _watch(self) -> None:
        """Restart a receive process that ended, with a growing pause if it keeps failing."""
        next_try = [0.0] * self.count
        while not self._stop.wait(0.5):
            with self._lock:
                for slot, proc in enumerate(self._procs):
                    if proc is None or proc.poll() is None or self._stop.is_set():
                        continue
                    now = time.monotonic()
                    if next_try[slot] == 0.0:
                        self._restarts[slot] += 1
                        pause = min(2.0 ** (self._restarts[slot] - 1), _RESTART_BACKOFF_MAX)
                        next_try[slot] = now + pause
                        log.error(
                            "receive process %d (pid %d) ended with status %s; restarting in %g s",
                            slot + 1,
                            proc.pid,
                            proc.returncode,
                            pause,
                        )
                    if now >= next_try[slot]:
                        next_try[slot] = 0.0
                        self._procs[slot] = self._spawn(slot)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every process (a clean stop of its associations), SIGKILL after ``timeout``."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        with self._lock:
            procs = [p for p in self._procs if p is not None]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=timeout)
