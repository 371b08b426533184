"""The spool: files on disk that stages hand to each other, written durably and never replaced.

Layout (paths stored in the DB are relative to ``spool_dir``):
  incoming/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm     written by receive
  quarantine/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm   a different dataset under a UID already stored
  outgoing/<SeriesUID>/<SOPInstanceUID>.dcm                written by the fuse stage
  thumbnails/<job id>.png                                  thumbnail strip (fuse stage)
  tmp/<worker tmp folder>/                                 partial writes (.part), one folder per worker

The path functions below are the only place that decides file names. A UID becomes a name by
:func:`uid_name`: the UID itself when it is a valid UID (digits and dots), otherwise ``x`` and a
SHA-256 prefix of it, so two different UIDs never share a name and no UID can point outside its
folder. A write never replaces an existing file (a rename that refuses to replace, a hard link or
an exclusive create); :meth:`Spool.write_new` takes the next free ``<name>~N.dcm`` instead. Every path is
checked to stay inside the spool. Files are created 0600 and folders 0700.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from dicomnode.uid import is_valid_uid

FILE_MODE = 0o600
DIR_MODE = 0o700
MAX_VERSIONS = 64  # "<name>~1" ... "<name>~64": more same-named files than that is an attack, not data
_NO_LINK = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _load_renameat2() -> Callable[..., int] | None:
    """glibc's renameat2 (Linux 3.15+): an atomic rename that fails instead of replacing."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


class SpoolPathError(ValueError):
    """A path that is not a plain relative path inside the spool."""


def uid_name(uid: str) -> str:
    """A UID as one file-name component: the UID when valid, else ``x`` + 40 hex digits of its SHA-256."""
    if is_valid_uid(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def incoming_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """Where receive stores an instance."""
    return f"incoming/{uid_name(study_uid)}/{uid_name(series_uid)}/{uid_name(sop_uid)}.dcm"


def quarantine_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """Where receive keeps a dataset that reuses the SOP Instance UID of a different stored one."""
    return f"quarantine/{uid_name(study_uid)}/{uid_name(series_uid)}/{uid_name(sop_uid)}.dcm"


def outgoing_path(series_uid: str, sop_uid: str) -> str:
    """Where the fuse stage writes an output instance."""
    return f"outgoing/{uid_name(series_uid)}/{uid_name(sop_uid)}.dcm"


def check_relpath(relpath: str) -> str:
    """``relpath`` when it is a plain relative path (no ``..``, no absolute path, no NUL), else raise."""
    if not relpath or "\x00" in relpath or relpath.startswith(("/", "\\")):
        raise SpoolPathError(f"not a relative spool path: {relpath!r}")
    if any(part in ("", ".", "..") for part in relpath.split("/")):
        raise SpoolPathError(f"spool path with an empty, '.' or '..' component: {relpath!r}")
    return relpath


def _versioned(relpath: str, n: int) -> str:
    if n == 0:
        return relpath
    head, dot, ext = relpath.rpartition(".")
    if not dot or "/" in ext:
        return f"{relpath}~{n}"
    return f"{head}~{n}.{ext}"


def thumbnail_path(job_id: int) -> str:
    """Where a job's thumbnail strip (MR | moving | fused) lies in the spool."""
    return f"thumbnails/{int(job_id)}.png"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _own_dir_private(path: Path) -> None:
    """chmod 0700 when this process owns ``path`` (an operator's folder owned by root stays as it is)."""
    try:
        st = path.stat()
        if st.st_uid == os.geteuid() and st.st_mode & 0o777 != DIR_MODE:
            os.chmod(path, DIR_MODE)
    except OSError:
        pass


def _load_sync_file_range() -> Callable[..., int] | None:
    """Linux's sync_file_range: starts writing a file's dirty pages back without waiting for them."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
_WRITEBACK_STEP = 256 * 1024  # start the disk writing once this much more is in the page cache


class PartialFile:
    """A file being written in the spool's tmp folder (``<uuid>.part``), not yet under its name.

    With fsync on, its pages start going to disk while it is still being written (the final
    fdatasync then waits for little more than the last pieces). A write error is kept, not raised
    mid-stream: :meth:`place` raises it. :meth:`discard` removes the file unless it was placed."""

    __slots__ = ("_error", "_fd", "_flushed", "_spool", "size", "tmp")

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self.tmp = spool.tmp / f"{uuid.uuid4().hex}.part"
        self.size = 0
        self._flushed = 0
        self._error: OSError | None = None
        try:
            self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileNotFoundError:
            # The tmp folder went away (another worker's sweep took this worker for a dead one).
            spool._known_dirs.discard(spool.tmp)
            spool._ensure_dir(spool.tmp)
            self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)

    @property
    def ok(self) -> bool:
        """Open and every write so far succeeded."""
        return self._fd >= 0 and self._error is None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.ok:
            return
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self.size += n
        except OSError as exc:
            self._error = exc
            return
        if self.size - self._flushed >= _WRITEBACK_STEP:
            self.start_writeback()

    def start_writeback(self) -> None:
        """Start writing what was written so far to disk, without waiting (with fsync on)."""
        if self._spool.fsync and _sync_file_range is not None and self.ok and self.size > self._flushed:
            _sync_file_range(self._fd, self._flushed, self.size - self._flushed, _SYNC_FILE_RANGE_WRITE)
            self._flushed = self.size

    def place(self, relpath: str, versions: int) -> tuple[str, int]:
        """fdatasync, then the name ``relpath`` or its next free ``~N`` version (never replacing a
        file), then fsync of its folder; returns (the relative path taken, the size)."""
        if self._error is not None:
            raise self._error
        if self._fd < 0:
            raise OSError(errno.EBADF, "partial spool file already placed or discarded")
        spool = self._spool
        final = spool.abspath(relpath)
        fd, self._fd = self._fd, -1
        try:
            if spool.fsync:
                os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        try:
            for n in range(versions + 1):
                name = _versioned(relpath, n)
                if spool._place(self.tmp, spool.root / name):
                    break
            else:
                raise FileExistsError(errno.EEXIST, f"{relpath} and its versions exist in the spool")
        finally:
            self.tmp.unlink(missing_ok=True)
        if spool.fsync:
            _fsync_dir(final.parent)
        return name, self.size

    def discard(self) -> None:
        """Close and remove the file unless it was placed (safe to call more than once)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)


class Spool:
    """Durable writes into the spool directory: temp file, fsync, link to a free name, fsync the folder."""

    def __init__(self, root: str | os.PathLike[str], fsync: bool = True, tmp_dir: str | None = None) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self._known_dirs: set[Path] = set()
        self._noreplace_rename = _renameat2 is not None
        self._make_dirs(self.root)
        _own_dir_private(self.root)
        self._real_root = os.path.realpath(self.root)
        # Each worker writes its partial files in its own folder, so leftovers name their writer.
        self.tmp = self.root / "tmp" / tmp_dir if tmp_dir else self.root / "tmp"
        self._ensure_dir(self.tmp)

    def abspath(self, relpath: str) -> Path:
        """The absolute path of a spool-relative path; SpoolPathError when it is not a plain one."""
        return self.root / check_relpath(relpath)

    @staticmethod
    def _make_dirs(d: Path) -> list[Path]:
        """Create ``d`` and its missing parents, each 0700; returns the folders created (outermost first)."""
        missing = []
        p = d
        while not p.exists():
            missing.append(p)
            p = p.parent
        created = []
        for m in reversed(missing):
            try:
                os.mkdir(m, DIR_MODE)
            except FileExistsError:
                continue
            os.chmod(m, DIR_MODE)  # mkdir's mode is filtered by the umask
            created.append(m)
        return created

    def _check_inside(self, d: Path) -> None:
        real = os.path.realpath(d)
        if real != self._real_root and not real.startswith(self._real_root + os.sep):
            raise SpoolPathError(f"spool folder {d} resolves outside the spool ({real})")

    def _ensure_dir(self, d: Path) -> None:
        if d in self._known_dirs:
            return
        existing = d
        while not existing.exists():
            existing = existing.parent
        self._check_inside(existing)  # before anything is created under it
        created = self._make_dirs(d)
        self._check_inside(d)
        if self.fsync:
            for m in created:
                _fsync_dir(m.parent)
        self._known_dirs.add(d)

    def write(self, relpath: str, chunks: list[bytes] | bytes) -> int:
        """Write ``chunks`` to ``relpath`` durably and return the size; FileExistsError if it exists."""
        _, size = self._write(relpath, chunks, versions=0)
        return size

    def write_new(self, relpath: str, chunks: list[bytes] | bytes) -> tuple[str, int]:
        """Write durably to ``relpath`` or, when taken, to the next free ``~N`` version of it.

        Returns (the relative path written, the size). FileExistsError when all versions are taken.
        """
        return self._write(relpath, chunks, versions=MAX_VERSIONS)

    def _write(self, relpath: str, chunks: list[bytes] | bytes, versions: int) -> tuple[str, int]:
        if isinstance(chunks, bytes | bytearray | memoryview):
            chunks = [bytes(chunks)]
        try:
            return self._write_once(relpath, chunks, versions)
        except FileNotFoundError:
            # A folder this process made went away: another worker's sweep took this worker for a
            # dead one (its heartbeat lapsed on a stalled machine) and removed its tmp folder, or
            # removed an output folder while it was still empty. Make them again; write once more.
            self._known_dirs.discard(self.tmp)
            self._known_dirs.discard(self.abspath(relpath).parent)
            self._ensure_dir(self.tmp)
            return self._write_once(relpath, chunks, versions)

    def _write_once(self, relpath: str, chunks: list[bytes], versions: int) -> tuple[str, int]:
        self._ensure_dir(self.abspath(relpath).parent)
        part = self.open_partial()
        try:
            for c in chunks:
                part.write(c)
            return part.place(relpath, versions)
        finally:
            part.discard()

    def open_partial(self) -> PartialFile:
        """A new partial file in this worker's tmp folder, to be written piece by piece and then
        placed (:meth:`place_partial`) or discarded."""
        return PartialFile(self)

    def place_partial(self, part: PartialFile, relpath: str) -> tuple[str, int]:
        """Place a partial file written elsewhere (the receive stage's upper layer streams a data set
        into one as it arrives) under ``relpath`` or its next free ``~N`` version, durably."""
        self._ensure_dir(self.abspath(relpath).parent)
        try:
            return part.place(relpath, MAX_VERSIONS)
        finally:
            part.discard()

    def _place(self, tmp: Path, final: Path) -> bool:
        """Give ``tmp``'s content the name ``final`` unless that name exists (then False).

        renameat2(RENAME_NOREPLACE) where the file system has it (as cheap as a rename), else a
        hard link (the temp name is removed afterwards), else an exclusive claim of the name.
        """
        if self._noreplace_rename and _renameat2 is not None:
            old, new = os.fsencode(tmp), os.fsencode(final)
            if _renameat2(_AT_FDCWD, old, _AT_FDCWD, new, _RENAME_NOREPLACE) == 0:
                return True
            err = ctypes.get_errno()
            if err == errno.EEXIST:
                return False
            if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise OSError(err, os.strerror(err), str(final))
            self._noreplace_rename = False  # not on this file system: fall back for good
        try:
            os.link(tmp, final)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
        # No hard links here (some network file systems): claim the name, then rename onto the claim.
        try:
            os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
        except FileExistsError:
            return False
        os.replace(tmp, final)
        return True
