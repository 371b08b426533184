"""Wiring: starts the stages as workers in one process (the embedded default) or one stage alone."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable

from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import ConfigError, Settings
from dicomnode.db import storage_sessionmaker
from dicomnode.db.leases import WorkerLeases
from dicomnode.logs import log_context
from dicomnode.spool import Spool

log = logging.getLogger("dicomnode.node")
STAGES = ("receive", "assemble", "retrieve", "fuse", "dispatch", "admin")


def open_database(settings: Settings) -> sessionmaker[Session]:
    """The DB named by ``storage.database_url``; a ConfigError naming the key when it cannot be used."""
    try:
        return storage_sessionmaker(settings.storage)
    except (OSError, ArgumentError, SQLAlchemyError) as exc:
        why = getattr(exc, "orig", None) or exc
        raise ConfigError(
            f"storage.database_url: cannot open the database ({type(why).__name__}: "
            f"{str(why).splitlines()[0][:200]}); check the path or server and its permissions"
        ) from None


def open_spool(settings: Settings, tmp_dir: str | None = None) -> Spool:
    """The spool at ``storage.spool_dir``; a ConfigError naming the key when it cannot be created."""
    try:
        return Spool(settings.storage.spool_dir, fsync=settings.storage.fsync, tmp_dir=tmp_dir)
    except OSError as exc:
        raise ConfigError(
            f"storage.spool_dir: cannot create {settings.storage.spool_dir} ({exc.strerror or exc}); "
            "choose a directory the node's user may write"
        ) from None


class Node:
    """The stages of one process; each stage talks to the others only through the DB and spool."""

    def __init__(self, settings: Settings, stages: Iterable[str] = STAGES) -> None:
        self.settings = settings
        self.stages = tuple(stages)
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage(s): {', '.join(sorted(unknown))}; known: {', '.join(STAGES)}")
        if "admin" in self.stages:
            problem = settings.admin.exposure_problem()
            if problem:
                raise ConfigError(problem)
        if "fuse" in self.stages:
            from dicomnode.runner.stage import require_device  # noqa: PLC0415 (torch: fuse only)

            require_device(settings.fusion.device)  # before any stage starts
        self.sessionmaker: sessionmaker[Session] = open_database(settings)
        # One worker identity per process: its heartbeat and every lease its stages hold.
        self.leases = WorkerLeases(
            self.sessionmaker,
            settings.workers.lease_seconds,
            settings.workers.worker_id,
            stages=self.stages,
            node_id=settings.storage.node_id,
        )
        self.leases.register()  # before the spool's tmp folder exists, so no sweep takes it for a dead one
        self.spool = open_spool(settings, tmp_dir=self.leases.tmp_dir)
        self.stop_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self.receiver = None
        self.receive_processes = None
        self.http = None

    def start(self) -> None:
        s = self.settings
        self.leases.start()
        log.info("worker id %s (lease %g s)", self.leases.owner, self.leases.seconds)
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

            self.receiver = ReceiveStage(s, self.sessionmaker, self.spool, leases=self.leases)
            self.receiver.start()
            log.info("receiving as %s on %s:%d", s.node.ae_title, s.node.host, self.receiver.port)
        workers = []
        if "assemble" in self.stages:
            from dicomnode.assemble import AssembleStage  # noqa: PLC0415

            workers.append(("assemble", AssembleStage(s, self.sessionmaker)))
        if "retrieve" in self.stages:
            from dicomnode.retrieve import RetrieveStage  # noqa: PLC0415

            workers.append(("retrieve", RetrieveStage(s, self.sessionmaker, self.spool, leases=self.leases)))
        if "fuse" in self.stages:
            from dicomnode.runner import FuseStage  # noqa: PLC0415

            workers.append(("fuse", FuseStage(s, self.sessionmaker, self.spool, leases=self.leases)))
        if "dispatch" in self.stages:
            from dicomnode.dispatch import DispatchOutbox, SeriesRemover  # noqa: PLC0415

            workers.append(("dispatch", DispatchOutbox(s, self.sessionmaker, self.spool, leases=self.leases)))
            workers.append(("removal", SeriesRemover(s, self.sessionmaker)))
        if "admin" in self.stages:
            from dicomnode.admin.retention import SpoolCleaner  # noqa: PLC0415

            cleaner = SpoolCleaner(s, self.sessionmaker)
            if cleaner.enabled:
                workers.append(("admin", cleaner))
        for name, worker in workers:
            t = threading.Thread(
                target=log_context.run_as,
                args=(name, worker.run_forever, self.stop_event),
                name=name,
                daemon=True,
            )
            t.start()
            self._threads.append(t)
        if "admin" in self.stages and s.admin.http_port:
            from dicomnode.admin.app import create_app  # noqa: PLC0415
            from dicomnode.admin.server import AdminServer  # noqa: PLC0415

            self.http = AdminServer(create_app(s, self.sessionmaker), s.admin)
            self.http.start()
            log.info("admin on http://%s:%d/", s.admin.http_host, self.http.port)

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
        self.leases.stop()  # gives back what is still held, so other workers take it at once

    def serve_forever(self) -> None:
        """Start, then block until SIGINT/SIGTERM (a signal during start stops it once started)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop_event.set())
        self.start()
        try:
            while not self.stop_event.wait(1.0):
                pass
        finally:
            self.stop()
