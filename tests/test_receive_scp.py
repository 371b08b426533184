"""Receive stage against real dcmtk storescu/echoscu: durable spool files, index rows, audit events."""

from __future__ import annotations

import errno
import struct
import subprocess
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from dicomnode.config import load_settings
from dicomnode.db import Association, Event, Instance, Series, make_sessionmaker
from dicomnode.receive import ReceiveStage
from dicomnode.spool import PartialFile, Spool
from dicomnode.testing.peers import echoscu, have_dcmtk, storescu

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="dcmtk (storescu/echoscu) not installed")


def make_ct(
    path: Path,
    *,
    study: str,
    series: str,
    sop: str | None = None,
    index: int = 0,
    patient_id: str = "PAT-1",
    issuer: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    drop: tuple[str, ...] = (),
) -> Path:
    """Write a small CT slice (16x16, 16 bit) with realistic geometry tags."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop or generate_uid()
    ds.StudyDate, ds.StudyTime = "20240305", "141516.25"
    ds.Modality = "CT"
    ds.SeriesDescription = "HEAD CT"
    ds.SeriesNumber = 4
    ds.PatientName = "Doe^Jane"
    ds.PatientID = patient_id
    if issuer:
        ds.IssuerOfPatientID = issuer
    ds.SliceThickness = "1.25"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = ["-120", "-110.5", f"{-60 + 1.25 * index:g}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = 16, 16
    ds.PixelSpacing = ["0.5", "0.5"]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    pixels = (np.arange(256, dtype=np.uint16).reshape(16, 16) * (index + 1)).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    for keyword in drop:
        delattr(ds, keyword)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if transfer_syntax == RLELossless:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(RLELossless, pixels)
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta Information of a Part 10 file."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length :]


class Node:
    """A started stage with its DB and spool, for assertions."""

    def __init__(
        self, tmp: Path, db_url: str, allowed: list[str] | None = None, sources: list[dict] | None = None
    ) -> None:
        self.settings = load_settings(
            None,
            node={"ae_title": "DICOMNODE", "host": "127.0.0.1", "allowed_calling_aets": allowed or []},
            storage={"spool_dir": str(tmp / "spool"), "database_url": db_url},
            sources=sources or [],
        )
        self.settings.node.port = 0  # any free port
        self.sessions = make_sessionmaker(self.settings.storage.database_url)
        self.spool = Spool(self.settings.storage.spool_dir)
        self.stage = ReceiveStage(self.settings, self.sessions, self.spool)

    @property
    def port(self) -> int:
        assert self.stage.port
        return self.stage.port

    def rows(self, model: type) -> list:
        with self.sessions() as s:
            return list(s.scalars(select(model).order_by(model.id)))

    def events(self, entity: str) -> list[Event]:
        return [e for e in self.rows(Event) if e.entity == entity]


@pytest.fixture
def node(tmp_path: Path, db_url: str) -> Iterator[Node]:
    n = Node(tmp_path, db_url)
    n.stage.start()
    try:
        yield n
    finally:
        n.stage.stop()


def wait_closed(node: Node) -> None:
    """Association rows are closed by the SCP thread just after the SCU exits."""
    import time

    for _ in range(200):
        if all(a.state != "open" for a in node.rows(Association)):
            return
        time.sleep(0.02)


def test_echo_is_answered_and_association_recorded(node: Node) -> None:
    result = echoscu(node.port)
    assert result.returncode == 0, result.stderr
    wait_closed(node)
    (assoc,) = node.rows(Association)
    assert (assoc.calling_aet, assoc.called_aet, assoc.state) == ("SCANNER", "DICOMNODE", "released")
    assert [(e.old_state, e.new_state) for e in node.events("association")] == [
        (None, "open"),
        ("open", "released"),
    ]


@pytest.mark.both_backends
def test_store_writes_identical_files_and_index_rows(node: Node, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    study, series = generate_uid(), generate_uid()
    files = [make_ct(src / f"{i}.dcm", study=study, series=series, index=i) for i in range(3)]
    result = storescu([src], node.port)
    assert result.returncode == 0, result.stderr
    wait_closed(node)

    instances = node.rows(Instance)
    assert len(instances) == 3
    by_uid = {i.sop_instance_uid: i for i in instances}
    for f in files:
        source = dcmread(f)
        row = by_uid[source.SOPInstanceUID]
        stored = node.spool.abspath(row.path)
        assert row.path.startswith(f"incoming/{study}/{series}/")
        assert dataset_bytes(stored) == dataset_bytes(f)
        assert row.size_bytes == stored.stat().st_size
        meta = dcmread(stored).file_meta
        assert meta.TransferSyntaxUID == row.transfer_syntax_uid == source.file_meta.TransferSyntaxUID
        assert meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID
        assert meta.SourceApplicationEntityTitle == "SCANNER"
        assert row.image_position == "\\".join(v.original_string for v in source.ImagePositionPatient)
        assert row.instance_number == source.InstanceNumber
    row = instances[0]
    assert (row.modality, row.patient_id, row.study_instance_uid) == ("CT", "PAT-1", study)
    assert row.image_orientation == "1\\0\\0\\0\\1\\0"
    assert (row.pixel_spacing, row.slice_thickness, row.rows, row.columns) == ("0.5\\0.5", 1.25, 16, 16)
    assert row.frame_of_reference_uid == "1.2.826.0.1.3680043.8.498.1"
    (assoc,) = node.rows(Association)
    assert {i.association_id for i in instances} == {assoc.id}
    assert (assoc.state, assoc.n_stored, assoc.n_failed) == ("released", 3, 0)

    (ser,) = node.rows(Series)
    assert (ser.series_instance_uid, ser.n_instances) == (series, 3)
    assert (ser.state, ser.generation) == ("receiving", 1)
    assert (ser.patient_key, ser.patient_name, ser.modality) == ("PAT-1", "Doe^Jane", "CT")
    assert ser.series_description == "HEAD CT" and ser.series_number == 4
    assert ser.study_datetime is not None and ser.study_datetime.isoformat() == "2024-03-05T14:15:16.250000"
    assert [(e.entity_id, e.old_state, e.new_state) for e in node.events("series")] == [
        (series, None, "receiving")
    ]
    assert list(node.spool.tmp.iterdir()) == []


def test_issuer_makes_patient_key(node: Node, tmp_path: Path) -> None:
    f = make_ct(tmp_path / "a.dcm", study=generate_uid(), series=generate_uid(), issuer="HOSP-A")
    assert storescu([f], node.port).returncode == 0
    (ser,) = node.rows(Series)
    assert ser.patient_key == "HOSP-A^PAT-1"
    assert ser.issuer_of_patient_id == "HOSP-A"


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless])
def test_other_transfer_syntaxes_are_stored_as_received(node: Node, tmp_path: Path, syntax: str) -> None:
    f = make_ct(tmp_path / "a.dcm", study=generate_uid(), series=generate_uid(), transfer_syntax=syntax)
    # Propose the file's own transfer syntax (first) so that nothing is converted on the way.
    option = {ImplicitVRLittleEndian: "-xi", DeflatedExplicitVRLittleEndian: "-xd", RLELossless: "-xr"}
    result = storescu([f], node.port, extra=["-R", option[syntax]])
    assert result.returncode == 0, result.stderr
    (row,) = node.rows(Instance)
    assert row.transfer_syntax_uid == syntax
    assert (row.rows, row.columns, row.pixel_spacing) == (16, 16, "0.5\\0.5")
    stored = node.spool.abspath(row.path)
    assert dataset_bytes(stored) == dataset_bytes(f)
    if syntax == DeflatedExplicitVRLittleEndian:
        zlib.decompressobj(-zlib.MAX_WBITS).decompress(dataset_bytes(stored))  # still deflated
    assert dcmread(stored).pixel_array.shape == (16, 16)


@pytest.mark.both_backends
def test_same_instance_twice_is_stored_once(node: Node, tmp_path: Path) -> None:
    f = make_ct(tmp_path / "a.dcm", study=generate_uid(), series=generate_uid())
    assert storescu([f], node.port).returncode == 0
    assert storescu([f], node.port).returncode == 0
    wait_closed(node)
    assert len(node.rows(Instance)) == 1
    (ser,) = node.rows(Series)
    assert ser.n_instances == 1
    dup = [e for e in node.events("instance") if "duplicate ignored" in (e.reason or "")]
    assert len(dup) == 1
    assert len(list(node.spool.root.glob("incoming/*/*/*.dcm"))) == 1


def test_each_data_set_is_written_once_while_it_arrives_and_served_where_it_was_read(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stored file is the one the connection's reading thread wrote while the data set arrived
    (no second write after it), and that thread also answers the C-STORE (no hand-off to the
    association thread and back); C-ECHO on the same association still works."""
    from dicomnode.receive.transport import BoundedDUL

    def second_write(*args: object) -> tuple[str, int]:
        raise AssertionError("the data set was written a second time")

    monkeypatch.setattr(Spool, "write_new", second_write)
    node = Node(tmp_path, db_url)
    served_by: list[str] = []
    on_store = node.stage._on_store

    def spy(event):  # type: ignore[no-untyped-def]
        served_by.append(type(threading.current_thread()).__name__)
        return on_store(event)

    node.stage._on_store = spy  # type: ignore[method-assign]  # bound as the handler at start
    node.stage.start()
    try:
        src = tmp_path / "src"
        src.mkdir()
        study, series = generate_uid(), generate_uid()
        files = [make_ct(src / f"{i}.dcm", study=study, series=series, index=i) for i in range(4)]
        result = storescu([src], node.port)
        assert result.returncode == 0, result.stderr
        assert echoscu(node.port).returncode == 0
        assert served_by == [BoundedDUL.__name__] * 4
        stored = {i.sop_instance_uid: node.spool.abspath(i.path) for i in node.rows(Instance)}
        for f in files:
            assert dataset_bytes(stored[dcmread(f).SOPInstanceUID]) == dataset_bytes(f)
        assert list(node.spool.tmp.iterdir()) == []
    finally:
        node.stage.stop()


@pytest.mark.both_backends
def test_concurrent_associations_store_each_uid_once(node: Node, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    study, series = generate_uid(), generate_uid()
    for i in range(8):
        make_ct(src / f"{i}.dcm", study=study, series=series, index=i)
    results: list[subprocess.CompletedProcess[str]] = []

    def send() -> None:
        results.append(storescu([src], node.port))

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert len(node.rows(Instance)) == 8
    (ser,) = node.rows(Series)
    assert ser.n_instances == 8
    assert len(list(node.spool.root.glob("incoming/*/*/*.dcm"))) == 8


@pytest.mark.both_backends
def test_new_instance_after_completion_reopens_series(node: Node, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    f1 = make_ct(tmp_path / "a.dcm", study=study, series=series, index=0)
    assert storescu([f1], node.port).returncode == 0
    with node.sessions() as s:
        ser = s.scalar(select(Series))
        ser.state, ser.completed_at = "complete", ser.last_received_at
        s.commit()
    f2 = make_ct(tmp_path / "b.dcm", study=study, series=series, index=1)
    assert storescu([f2], node.port).returncode == 0
    (ser,) = node.rows(Series)
    assert (ser.state, ser.generation, ser.n_instances, ser.completed_at) == ("receiving", 2, 2, None)
    reopen = [e for e in node.events("series") if e.old_state == "complete"]
    assert len(reopen) == 1 and "new instance after completion" in (reopen[0].reason or "")


def test_disallowed_calling_ae_is_rejected(tmp_path: Path, db_url: str) -> None:
    n = Node(tmp_path, db_url, allowed=["MODALITY1"])
    n.stage.start()
    try:
        f = make_ct(tmp_path / "a.dcm", study=generate_uid(), series=generate_uid())
        result = storescu([f], n.port, calling_aet="INTRUDER")
        assert result.returncode != 0
        assert "Rejected" in result.stderr + result.stdout
        assert storescu([f], n.port, calling_aet="MODALITY1").returncode == 0
    finally:
        n.stage.stop()
    wait_closed(n)
    assocs = n.rows(Association)
    assert [(a.calling_aet, a.state) for a in assocs] == [("INTRUDER", "rejected"), ("MODALITY1", "released")]
    rejected = [e for e in n.events("association") if e.new_state == "rejected"]
    assert len(rejected) == 1 and "INTRUDER" in (rejected[0].reason or "")
    assert len(n.rows(Instance)) == 1


def test_pacs_sources_are_admitted_with_an_allow_list(tmp_path: Path, db_url: str) -> None:
    """A C-MOVE to the node arrives as C-STORE from the PACS's own AE title: a configured source
    is admitted without being listed in node.allowed_calling_aets."""
    source = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}
    n = Node(tmp_path, db_url, allowed=["MODALITY1"], sources=[source])
    n.stage.start()
    try:
        f = make_ct(tmp_path / "a.dcm", study=generate_uid(), series=generate_uid())
        assert storescu([f], n.port, calling_aet="INTRUDER").returncode != 0
        result = storescu([f], n.port, calling_aet="PACS")
        assert result.returncode == 0, result.stderr
    finally:
        n.stage.stop()
    wait_closed(n)
    assert [(a.calling_aet, a.state) for a in n.rows(Association)] == [
        ("INTRUDER", "rejected"),
        ("PACS", "released"),
    ]
    rejected = [e for e in n.events("association") if e.new_state == "rejected"]
    assert "is not in node.allowed_peers or node.allowed_calling_aets" in (rejected[0].reason or "")


def test_missing_series_uid_is_refused_with_c000(node: Node, tmp_path: Path) -> None:
    f = make_ct(tmp_path / "a.dcm", study=generate_uid(), series="1.2.3", drop=("SeriesInstanceUID",))
    result = storescu([f], node.port, extra=["-d"])
    assert "0xc000" in (result.stdout + result.stderr).lower()
    wait_closed(node)
    assert node.rows(Instance) == [] and node.rows(Series) == []
    (ev,) = [e for e in node.events("instance") if e.new_state == "failed"]
    assert "0xC000" in (ev.reason or "") and "Series Instance UID" in (ev.reason or "")
    (assoc,) = node.rows(Association)
    assert (assoc.n_stored, assoc.n_failed) == (0, 1)


def test_garbage_dataset_is_refused_with_c000(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom import AE, _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes as they are

    f = make_ct(tmp_path / "a.dcm", study=generate_uid(), series=generate_uid())
    data = f.read_bytes()
    (group_length,) = struct.unpack("<I", data[140:144])
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(data[: 144 + group_length] + b"\xff\xff\x12\x00NOT DICOM AT ALL" * 3)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    status = assoc.send_c_store(garbage)
    assoc.release()
    assert status.Status == 0xC000
    assert node.rows(Instance) == []
    (ev,) = [e for e in node.events("instance") if e.new_state == "failed"]
    assert "cannot be parsed" in (ev.reason or "")


def test_disk_full_answers_a700_and_indexes_nothing(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object) -> tuple[str, int]:
        raise OSError(errno.ENOSPC, "No space left on device")

    # Both ways a data set reaches its name: the file streamed while it arrived, and a new write.
    monkeypatch.setattr(PartialFile, "place", full)
    monkeypatch.setattr(Spool, "write_new", full)
    f = make_ct(tmp_path / "a.dcm", study=generate_uid(), series=generate_uid())
    result = storescu([f], node.port, extra=["-d"])
    assert "0xa700" in (result.stdout + result.stderr).lower()
    assert node.rows(Instance) == [] and node.rows(Series) == []
    assert list(node.spool.tmp.iterdir()) == []
    (ev,) = [e for e in node.events("instance") if e.new_state == "failed"]
    assert "No space left on device" in (ev.reason or "") and "0xA700" in (ev.reason or "")


@pytest.mark.both_backends
def test_db_failure_answers_a700_and_leaves_no_file(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> bool:
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr(node.stage.index, "add_instance", broken)
    f = make_ct(tmp_path / "a.dcm", study=generate_uid(), series=generate_uid())
    result = storescu([f], node.port, extra=["-d"])
    assert "0xa700" in (result.stdout + result.stderr).lower()
    assert list(node.spool.root.glob("incoming/*/*/*.dcm")) == []
    assert list(node.spool.tmp.iterdir()) == []
    (ev,) = [e for e in node.events("instance") if e.new_state == "failed"]
    assert "database is locked" in (ev.reason or "")
