"""Wiring: starts the stages as workers in one process (the embedded default) or one stage alone."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.db import storage_sessionmaker
from dicomnode.spool import Spool

log = logging.getLogger("dicomnode.node")
STAGES = ("receive", "assemble", "fuse", "dispatch", "admin")


class Node:
    """The stages of one process; each stage talks to the others only through the DB and spool."""

    def __init__(self, settings: Settings, stages: Iterable[str] = STAGES) -> None:
        self.settings = settings
        self.stages = tuple(stages)
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage(s): {', '.join(sorted(unknown))}; known: {', '.join(STAGES)}")
        self.sessionmaker: sessionmaker[Session] = storage_sessionmaker(settings.storage)
        self.spool = Spool(
            settings.storage.spool_dir, fsync=settings.storage.fsync, node_id=settings.storage.node_id
        )
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self.receiver = None
        self.receive_processes = None
        self.http = None

    def start(self) -> None:
        s = self.settings
        if "receive" in self.stages and s.node.receive_processes > 1:
            from dicomnode.receive.shared_port import ReceiveProcesses  # noqa: PLC0415

            self.receive_processes = ReceiveProcesses(s).start()
            log.info(
                "receiving as %s on %s:%d in %d processes",
                s.node.ae_title,
                s.node.host,
                s.node.port,
                s.node.receive_processes,
            )
        elif "receive" in self.stages:
            from dicomnode.receive import ReceiveStage  # noqa: PLC0415

            self.receiver = ReceiveStage(s, self.sessionmaker, self.spool)
            self.receiver.start()
            log.info("receiving as %s on %s:%d", s.node.ae_title, s.node.host, self.receiver.port)
        workers = []
        if "assemble" in self.stages:
            from dicomnode.assemble import AssembleStage  # noqa: PLC0415

            workers.append(("assemble", AssembleStage(s, self.sessionmaker)))
        if "fuse" in self.stages:
            from dicomnode.runner import FuseStage  # noqa: PLC0415

            workers.append(("fuse", FuseStage(s, self.sessionmaker, self.spool)))
        if "dispatch" in self.stages:
            from dicomnode.dispatch import DispatchOutbox  # noqa: PLC0415

            workers.append(("dispatch", DispatchOutbox(s, self.sessionmaker, self.spool)))
        for name, worker in workers:
            t = threading.Thread(target=worker.run_forever, args=(self.stop_event,), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if "admin" in self.stages and s.admin.http_port:
            from dicomnode.admin.http import StatusServer  # noqa: PLC0415

            self.http = StatusServer(self.sessionmaker, s.admin.http_host, s.admin.http_port)
            self.http.start()
            log.info("status on http://%s:%d/status", s.admin.http_host, self.http.port)

    def stop(self) -> None:
        self.stop_event.set()
        if self.receiver is not None:
            self.receiver.stop()
        if self.receive_processes is not None:
            self.receive_processes.stop()
        if self.http is not None:
            self.http.stop()
        for t in self._threads:
            t.join(timeout=30)

    def serve_forever(self) -> None:
        """Start, then block until SIGINT/SIGTERM."""
        self.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop_event.set())
        try:
            while not self.stop_event.wait(1.0):
                pass
        finally:
            self.stop()
