"""The spool: names that cannot collide or escape, writes that never replace, private permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from sqlalchemy import text

from dicomnode.db import make_sessionmaker
from dicomnode.partial_writes import remove_orphaned_partials
from dicomnode.spool import (
    Spool,
    SpoolPathError,
    incoming_path,
    outgoing_path,
    quarantine_path,
    uid_name,
)

# Distinct UIDs that a character-replacing sanitiser maps to one name, and traversal attempts.
COLLIDING = ["X_7", "X/7", "X 7", "X\x00 7", "X\\7", "X:7", "X_7 "]
TRAVERSAL = ["..", ".", "../..", "../../../../etc/passwd", "/abs", "a/../..", "1.2/../../x", ""]


def test_uid_names_never_collide_and_never_leave_their_folder() -> None:
    names = [uid_name(u) for u in COLLIDING + TRAVERSAL]
    assert len(set(names)) == len(names)
    for name in names:
        assert "/" not in name and "\\" not in name and "\x00" not in name
        assert name not in (".", "..", "")
    assert uid_name("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"  # valid UIDs stay readable


@pytest.mark.parametrize("bad", TRAVERSAL)
def test_paths_from_any_uid_stay_inside_the_spool(tmp_path: Path, bad: str) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    for rel in (incoming_path(bad, bad, bad), quarantine_path(bad, bad, bad), outgoing_path(bad, bad)):
        rel_written, _ = spool.write_new(rel, b"data")
        written = (spool.root / rel_written).resolve()
        assert spool.root.resolve() in written.parents
    assert [p for p in tmp_path.iterdir() if p.name != "spool"] == []


@pytest.mark.parametrize(
    "rel", ["../x.dcm", "incoming/../../x.dcm", "/tmp/x.dcm", "a//b.dcm", "a/./b", "a\x00b"]
)
def test_a_path_that_would_leave_the_spool_is_refused(tmp_path: Path, rel: str) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    with pytest.raises(SpoolPathError):
        spool.write(rel, b"x")
    with pytest.raises(SpoolPathError):
        spool.abspath(rel)


def test_a_folder_symlinked_out_of_the_spool_is_not_written_through(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    outside = tmp_path / "outside"
    outside.mkdir()
    (spool.root / "incoming").symlink_to(outside)
    with pytest.raises(SpoolPathError):
        spool.write("incoming/a/b.dcm", b"x")
    assert list(outside.rglob("*")) == []


def test_colliding_uids_each_keep_their_own_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    for n, uid in enumerate(COLLIDING):
        spool.write(incoming_path("1.2", "1.2.3", uid), f"instance {n}".encode())
    for n, uid in enumerate(COLLIDING):
        assert spool.abspath(incoming_path("1.2", "1.2.3", uid)).read_bytes() == f"instance {n}".encode()


def test_a_write_never_replaces_an_existing_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    rel = outgoing_path("1.2.3", "1.2.3.4")
    spool.write(rel, b"first")
    with pytest.raises(FileExistsError):
        spool.write(rel, b"second")
    assert spool.abspath(rel).read_bytes() == b"first"
    assert spool.write_new(rel, b"second") == ("outgoing/1.2.3/1.2.3.4~1.dcm", 6)
    assert spool.write_new(rel, b"third")[0] == "outgoing/1.2.3/1.2.3.4~2.dcm"
    assert spool.abspath(rel).read_bytes() == b"first"
    assert list(spool.tmp.iterdir()) == []


@pytest.mark.parametrize("how", ["renameat2", "hard link", "exclusive claim"])
def test_every_way_of_placing_a_file_refuses_to_replace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """renameat2(RENAME_NOREPLACE) first; file systems without it get a hard link; without links,
    the name is claimed with an exclusive create."""
    import errno

    import dicomnode.spool as spool_module

    if how != "renameat2":
        monkeypatch.setattr(spool_module, "_renameat2", None)
    if how == "exclusive claim":

        def no_links(src: object, dst: object) -> None:
            raise OSError(errno.EPERM, "hard links not supported here")

        monkeypatch.setattr(os, "link", no_links)
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.write("incoming/a/b.dcm", b"first")
    with pytest.raises(FileExistsError):
        spool.write("incoming/a/b.dcm", b"second")
    assert spool.write_new("incoming/a/b.dcm", b"second")[0] == "incoming/a/b~1.dcm"
    assert spool.abspath("incoming/a/b.dcm").read_bytes() == b"first"
    assert spool.abspath("incoming/a/b~1.dcm").read_bytes() == b"second"
    assert list(spool.tmp.iterdir()) == []


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_files_are_0600_and_folders_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        spool = Spool(tmp_path / "var" / "spool")
        rel, _ = spool.write_new(incoming_path("1.2", "1.2.3", "1.2.3.4"), b"data")
    finally:
        os.umask(old)
    assert _mode(spool.abspath(rel)) == 0o600
    for d in (spool.root, spool.tmp, spool.root / "incoming", spool.abspath(rel).parent):
        assert _mode(d) == 0o700, d


def test_an_existing_spool_root_is_made_private(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    Spool(root, fsync=False)
    assert _mode(root) == 0o700


def test_the_sqlite_database_and_its_wal_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    db = tmp_path / "var" / "node.db"
    old = os.umask(0o000)
    try:
        sessions = make_sessionmaker(f"sqlite:///{db}")
        with sessions() as s:
            s.execute(text("CREATE TABLE IF NOT EXISTS probe (x INTEGER)"))
            s.execute(text("INSERT INTO probe VALUES (1)"))
            s.commit()
            files = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
            assert all(f.exists() for f in files)
            assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        os.umask(old)


def test_an_existing_world_readable_database_is_made_private(tmp_path: Path) -> None:
    db = tmp_path / "node.db"
    make_sessionmaker(f"sqlite:///{db}")
    os.chmod(db, 0o644)
    make_sessionmaker(f"sqlite:///{db}")
    assert _mode(db) == 0o600


def test_a_worker_whose_folders_were_swept_away_still_writes(tmp_path: Path) -> None:
    """On a stalled machine a live worker's heartbeat can lapse; another worker's sweep then removes
    its tmp folder (and empty output folders). Its next writes make them again instead of failing."""
    spool = Spool(tmp_path / "spool", fsync=False, tmp_dir="node-a-0123")
    spool.write("outgoing/1.2/1.2.1.dcm", b"first")
    assert remove_orphaned_partials(spool.root, live_tmp_dirs=set(), grace_seconds=0) == 0
    assert not spool.tmp.exists()
    spool.write("outgoing/1.2/1.2.2.dcm", b"second")
    spool.write("outgoing/1.3/1.3.1.dcm", b"third")
    (spool.root / "outgoing" / "1.3" / "1.3.1.dcm").unlink()
    (spool.root / "outgoing" / "1.3").rmdir()  # a sweep removing an output folder found empty
    spool.write("outgoing/1.3/1.3.2.dcm", b"fourth")
    assert (spool.root / "outgoing/1.3/1.3.2.dcm").read_bytes() == b"fourth"
    assert (spool.root / "outgoing/1.2/1.2.2.dcm").read_bytes() == b"second"


@pytest.mark.parametrize("fsync", [True, False])
def test_a_partial_file_written_piece_by_piece_is_placed_whole_and_never_over_another(
    tmp_path: Path, fsync: bool
) -> None:
    """The receive stage streams a data set into a partial file as it arrives; placing it takes the
    name or its next free version, as every other write does, and leaves nothing in tmp."""
    spool = Spool(tmp_path / "spool", fsync=fsync, tmp_dir="node-a-1")
    pieces = [b"head", memoryview(os.urandom(300_000)), bytearray(b"x" * 70_000), b"tail"]
    part = spool.open_partial()
    assert part.tmp.parent == spool.tmp and part.tmp.exists()
    for piece in pieces:
        part.write(piece)
    rel, size = spool.place_partial(part, "incoming/1.2/1.2.3/1.2.3.4.dcm")
    expected = b"".join(bytes(p) for p in pieces)
    assert (rel, size) == ("incoming/1.2/1.2.3/1.2.3.4.dcm", len(expected))
    assert spool.abspath(rel).read_bytes() == expected
    assert stat.S_IMODE(spool.abspath(rel).stat().st_mode) == 0o600

    again = spool.open_partial()
    again.write(b"another data set")
    rel2, _ = spool.place_partial(again, "incoming/1.2/1.2.3/1.2.3.4.dcm")
    assert rel2 == "incoming/1.2/1.2.3/1.2.3.4~1.dcm"
    assert spool.abspath(rel).read_bytes() == expected  # the first is untouched
    assert list(spool.tmp.iterdir()) == []


def test_a_discarded_partial_file_leaves_nothing_and_cannot_be_placed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    part = spool.open_partial()
    part.write(b"half a data set")
    part.discard()
    part.discard()  # twice is harmless
    assert list(spool.tmp.iterdir()) == []
    assert not part.ok
    part.write(b"more")  # ignored: no file to write to
    with pytest.raises(OSError):
        spool.place_partial(part, "incoming/1.2/1.2.3/1.2.3.5.dcm")
    assert not (spool.root / "incoming").exists() or not any((spool.root / "incoming").rglob("*.dcm"))


def test_a_write_error_in_a_partial_file_is_kept_and_raised_when_placed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes happen in the connection's reading thread, which must not die of a full disk: the
    error waits for the store, which answers with a failure status."""
    spool = Spool(tmp_path / "spool", fsync=False)
    part = spool.open_partial()
    part.write(b"first piece")

    def full(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    part.write(b"second piece")  # kept, not raised
    monkeypatch.undo()
    assert not part.ok
    with pytest.raises(OSError, match="No space left"):
        spool.place_partial(part, "incoming/1.2/1.2.3/1.2.3.6.dcm")
    assert list(spool.tmp.iterdir()) == []
    assert not any(spool.root.rglob("*.dcm"))
