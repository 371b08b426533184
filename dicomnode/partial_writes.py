"""Partial spool writes (``.part`` files) left behind by workers that died mid-write.

Every worker writes its partial files in its own folder ``tmp/<tmp_dir>/`` and names that folder in
its heartbeat row (``workers.tmp_dir``). A folder whose worker has no live heartbeat belongs to a
dead process: nothing will ever finish those writes, and no acknowledged instance depends on them
(a file is acknowledged only after it left ``tmp/``). Loose ``.part`` files directly in ``tmp/``
come from writers without a folder; they are removed once they are an hour old (a single write
never takes that long).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from dicomnode.db.leases import WorkerLeases, forget_dead_workers, live_workers

log = logging.getLogger("dicomnode.spool")

LOOSE_PART_MAX_AGE_SECONDS = 3600.0
FORGET_AFTER_SECONDS = 86400.0  # heartbeat rows of dead workers are kept a day for the admin


def _age(path: str, now: float) -> float:
    try:
        return now - os.stat(path, follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def remove_orphaned_partials(spool_root: Path, live_tmp_dirs: set[str], grace_seconds: float) -> int:
    """Remove tmp folders of workers not in ``live_tmp_dirs`` (untouched for ``grace_seconds``) and
    loose ``.part`` files older than an hour; returns the number of ``.part`` files removed."""
    tmp = Path(spool_root) / "tmp"
    if not tmp.is_dir():
        return 0
    now = time.time()
    removed = 0
    for entry in os.scandir(tmp):
        if entry.is_dir(follow_symlinks=False):
            if entry.name in live_tmp_dirs or _age(entry.path, now) < grace_seconds:
                continue
            removed += sum(1 for _ in Path(entry.path).rglob("*.part"))
            shutil.rmtree(entry.path, ignore_errors=True)
        elif entry.name.endswith(".part") and _age(entry.path, now) > LOOSE_PART_MAX_AGE_SECONDS:
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    return removed


def sweep_partials(sessionmaker: sessionmaker[Session], spool_root: Path, leases: WorkerLeases) -> int:
    """Remove the partial writes of every worker whose heartbeat expired (this one's are kept)."""
    now = leases.clock()
    with sessionmaker() as s:
        live = set(live_workers(s, now).values())
        forget_dead_workers(s, now - timedelta(seconds=FORGET_AFTER_SECONDS))
    live.add(leases.tmp_dir)
    n = remove_orphaned_partials(spool_root, live, grace_seconds=leases.seconds)
    if n:
        log.warning("removed %d partial spool writes of stopped workers", n)
    return n
