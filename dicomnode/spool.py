"""The spool: files on disk that stages hand to each other, written durably.

Layout (paths stored in the DB are relative to ``spool_dir``):
  incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   written by receive
  outgoing/<SeriesInstanceUID>/<SOPInstanceUID>.dcm                      written by the fuse stage
  tmp/                                                                   partial writes
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

_SAFE = re.compile(r"[^0-9A-Za-z.\-]")


def safe_name(uid: str) -> str:
    """A UID as a file-name component (UIDs are digits and dots; anything else is replaced)."""
    name = _SAFE.sub("_", uid.strip()) or "unknown"
    return name[:128]


def incoming_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
    return f"incoming/{safe_name(study_uid)}/{safe_name(series_uid)}/{safe_name(sop_uid)}.dcm"


def outgoing_path(series_uid: str, sop_uid: str) -> str:
    return f"outgoing/{safe_name(series_uid)}/{safe_name(sop_uid)}.dcm"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Durable writes into the spool directory: temp file, fsync, rename, fsync the directory."""

    def __init__(self, root: str | os.PathLike[str], fsync: bool = True, node_id: str = "") -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.node_id = node_id  # storage.node_id: names this node's files on a spool shared by several
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()

    def abspath(self, relpath: str) -> Path:
        return self.root / relpath

    def _ensure_dir(self, d: Path) -> None:
        if d in self._known_dirs:
            return
        missing = []
        p = d
        while not p.exists():
            missing.append(p)
            p = p.parent
        d.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            for m in reversed(missing):
                _fsync_dir(m.parent)
        self._known_dirs.add(d)

    def write(self, relpath: str, chunks: list[bytes] | bytes) -> int:
        """Write ``chunks`` to ``relpath`` durably; returns the number of bytes written."""
        if isinstance(chunks, bytes | bytearray | memoryview):
            chunks = [bytes(chunks)]
        final = self.root / relpath
        self._ensure_dir(final.parent)
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        size = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            for c in chunks:
                view = memoryview(c)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                    size += n
            if self.fsync:
                os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, final)
        if self.fsync:
            _fsync_dir(final.parent)
        return size
