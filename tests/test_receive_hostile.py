"""Hostile data sets over real associations against the receive stage in its own process.

Every promise is checked from outside, as an operator would: the DICOM status of each instance,
files that stay inside the spool and are never replaced, one audit record per refusal (or its
share of a rate-limited summary), a log without tracebacks and of bounded size, bounded memory.
Set DICOMNODE_RECEIVER_CODE to another checkout of dicomnode to run the same checks against it.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, _config, evt
from sqlalchemy import select

from dicomnode.db import Event, Instance, QuarantinedInstance, make_sessionmaker
from dicomnode.dispatch.scu import guard_reactor_race, set_nodelay
from dicomnode.receive.filemeta import encode_file_meta
from dicomnode.testing.malformed import (
    CT_IMAGE_STORAGE,
    EXPLICIT_VR_LITTLE_ENDIAN,
    OK,
    REFUSED,
    ROOT,
    encode,
    hostile_cases,
    nested_sequence,
)
from dicomnode.testing.receiver import ReceiveProcess, start_receive_process

SEED = int(os.environ.get("DICOMNODE_HOSTILE_SEED", "20241119"))
OTHER_CODE = os.environ.get("DICOMNODE_RECEIVER_CODE")
SUMMARY = re.compile(r"^(\d+) more refusals like this")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the sending side


def _start(workdir: Path) -> ReceiveProcess:
    # fsync off: durability is not what these tests check, and the machine's disk is shared
    return start_receive_process(
        workdir, storage={"fsync": False}, code=Path(OTHER_CODE) if OTHER_CODE else None
    )


@pytest.fixture
def node(tmp_path: Path) -> Iterator[ReceiveProcess]:
    """A node of its own: the test stops it to read the refusal summaries written at stop."""
    proc = _start(tmp_path / "node")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReceiveProcess]:
    """One node for the tests that read only what is written before each answer."""
    proc = _start(tmp_path_factory.mktemp("shared") / "node")
    try:
        yield proc
    finally:
        proc.stop()


def send(port: int, items: list[tuple[str, bytes]], workdir: Path) -> list[int | None]:
    """C-STORE raw data sets (request SOP Instance UID, bytes) exactly as given, in one association
    (a new one if the node ends it); the status of each, None when there was no answer."""
    workdir.mkdir(parents=True, exist_ok=True)
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_VR_LITTLE_ENDIAN)
    statuses: list[int | None] = []
    assoc = None
    in_flight = threading.Event()
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's data set bytes as they are
    try:
        for n, (request_uid, dataset) in enumerate(items):
            path = workdir / f"{n}.dcm"
            path.write_bytes(
                encode_file_meta(CT_IMAGE_STORAGE, request_uid, EXPLICIT_VR_LITTLE_ENDIAN) + dataset
            )
            if assoc is None or not assoc.is_established:
                nodelay = (evt.EVT_CONN_OPEN, lambda event: set_nodelay(event.assoc))
                assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE", evt_handlers=[nodelay])
                assert assoc.is_established, "the node refused the association"
                # pynetdicom's requestor can lose a response to its own reactor; dispatch guards the same way
                guard_reactor_race(assoc, in_flight.is_set)
            in_flight.set()
            status = assoc.send_c_store(path)
            in_flight.clear()
            statuses.append(int(status.Status) if "Status" in status else None)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        if assoc is not None and assoc.is_established:
            assoc.release()
    return statuses


def minimal(sop: str, study: int) -> dict[int, tuple[bytes, bytes]]:
    """The elements every stored instance needs: SOP class and the three UIDs."""
    return {
        0x00080016: (b"UI", CT_IMAGE_STORAGE.encode()),
        0x00080018: (b"UI", sop.encode()),
        0x0020000D: (b"UI", f"{ROOT}.{study}".encode()),
        0x0020000E: (b"UI", f"{ROOT}.{study}.0".encode()),
    }


def stored_dataset(path: Path) -> bytes:
    data = path.read_bytes()
    return data[144 + int.from_bytes(data[140:144], "little") :]


def refusal_count(events: list[Event]) -> int:
    """Refusals the audit accounts for: one per own event plus the count of each summary."""
    total = 0
    for ev in events:
        m = SUMMARY.match(ev.reason or "")
        total += int(m.group(1)) if m else 1
    return total


def files_outside_spool(root: Path, spool: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and spool not in p.parents}


def test_hundreds_of_hostile_datasets_keep_every_promise(node: ReceiveProcess, tmp_path: Path) -> None:
    cases = hostile_cases(SEED, 300)
    assert {c.family.split(" (")[0] for c in cases} >= {
        "valid",
        "truncated",
        "wrong VR",
        "byte flips",
        "deep nesting",
        "huge length",
        "overflow numbers",
        "missing UID",
        "invalid UID",
        "request UID mismatch",
        "same UID, other content",
    }
    before = files_outside_spool(tmp_path, node.spool_dir)
    rss_before = node.rss_kb()
    items = [(c.sop_uid if c.sop_uid.isascii() else f"{ROOT}.1", c.dataset) for c in cases]
    statuses = send(node.port, items, tmp_path / "sent")
    peak_growth_mb = (node.peak_rss_kb() - rss_before) / 1024
    node.stop()  # writes the pending refusal summaries

    wrong = [
        (c.family, repr(c.sop_uid)[:40], s) for c, s in zip(cases, statuses, strict=True) if s not in c.expect
    ]
    assert not wrong, f"unexpected statuses (family, UID, status): {wrong[:20]}"
    assert Counter(statuses)[REFUSED] > 100 and Counter(statuses)[OK] > 50

    # Nothing written outside the spool, nothing left half-written inside it.
    new_outside = files_outside_spool(tmp_path, node.spool_dir) - before
    sent = {p for p in new_outside if (tmp_path / "sent") in p.parents}
    extra = {p.name for p in new_outside - sent} - {"dicomnode.db-wal", "dicomnode.db-shm"}
    assert extra == set(), f"files outside the spool: {sorted(extra)}"
    real_spool = node.spool_dir.resolve()
    for p in node.spool_dir.rglob("*"):
        assert real_spool in p.resolve().parents
    assert [p for p in (node.spool_dir / "tmp").rglob("*") if p.is_file()] == []  # no partial writes

    # Every acknowledged data set is on disk; the first of each UID is the indexed one, never replaced.
    sessions = make_sessionmaker(node.database_url)
    with sessions() as s:
        instances = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
        quarantined = list(s.scalars(select(QuarantinedInstance)))
        failed = list(s.scalars(select(Event).where(Event.entity == "instance", Event.new_state == "failed")))
    on_disk = {stored_dataset(node.spool_dir / row.path) for row in [*instances.values(), *quarantined]}
    first: dict[str, bytes] = {}
    for case, status in zip(cases, statuses, strict=True):
        if status == OK:
            assert case.dataset in on_disk, f"acknowledged {case.family} data set is not stored"
            first.setdefault(case.sop_uid, case.dataset)
    for uid, dataset in first.items():
        assert stored_dataset(node.spool_dir / instances[uid].path) == dataset
    assert quarantined, "different data sets under one SOP Instance UID must be kept"
    assert all(q.path.startswith("quarantine/") for q in quarantined)

    # One audit record per refusal (rate-limited ones counted in a summary), a quiet bounded log.
    assert refusal_count(failed) == Counter(statuses)[REFUSED]
    log = node.log_text()
    assert "Traceback" not in log
    assert len(log) < 64 * 1024, f"log of {len(log)} bytes for {len(cases)} instances"
    assert "Test^Hostile" not in log and "HOSTILE-1" not in log, "patient name or ID in the log"
    assert peak_growth_mb < 200, f"peak memory grew by {peak_growth_mb:.0f} MB"


def test_the_same_bad_instance_a_hundred_times_writes_a_few_lines(
    node: ReceiveProcess, tmp_path: Path
) -> None:
    sop = f"{ROOT}.5.1"
    elements = {**minimal(sop, 5), 0x00200013: (b"IS", b"1e999")}
    bad = encode(elements, nested_sequence(3000, undefined=True), 0x00081140)
    statuses = send(node.port, [(sop, bad)] * 100, tmp_path / "sent")
    node.stop()
    assert statuses == [REFUSED] * 100, Counter(statuses)
    log = node.log_text()
    assert "Traceback" not in log, log[-3000:]
    assert len(log) < 16 * 1024, f"{len(log)} bytes of log for one instance sent 100 times:\n{log[-3000:]}"
    sessions = make_sessionmaker(node.database_url)
    with sessions() as s:
        failed = list(s.scalars(select(Event).where(Event.entity == "instance", Event.new_state == "failed")))
    assert len(failed) <= 6 and refusal_count(failed) == 100, [e.reason for e in failed]
    assert "nested deeper than" in (failed[0].reason or "")


FINDINGS = [
    ("no SOP Instance UID in the data set", {0x00080018: None}, "SOP Instance UID"),
    ("Instance Number inf", {0x00200013: (b"IS", b"inf")}, "InstanceNumber"),
    ("Instance Number of 23 digits", {0x00200013: (b"IS", b"9" * 23)}, "InstanceNumber"),
    ("Slice Thickness 1e999", {0x00180050: (b"DS", b"1e999")}, "SliceThickness"),
    ("Study Instance UID '..'", {0x0020000D: (b"UI", b"..")}, "Study Instance UID"),
]


def test_each_header_finding_is_refused_with_c000(shared_node: ReceiveProcess, tmp_path: Path) -> None:
    node = shared_node
    items = []
    for n, (_what, changes, _message) in enumerate(FINDINGS):
        sop = f"{ROOT}.6.{n}"
        elements = {**minimal(sop, 6), 0x00180050: (b"DS", b"1.25"), 0x00200013: (b"IS", b"1")}
        for tag, value in changes.items():
            if value is None:
                del elements[tag]
            else:
                elements[tag] = value
        items.append((sop, encode(elements)))
    statuses = send(node.port, items, tmp_path / "sent")
    assert dict(zip([f[0] for f in FINDINGS], statuses, strict=True)) == {f[0]: REFUSED for f in FINDINGS}
    sessions = make_sessionmaker(node.database_url)
    uids = [sop for sop, _ in items]
    with sessions() as s:
        assert list(s.scalars(select(Instance).where(Instance.sop_instance_uid.in_(uids)))) == []
        events = list(
            s.scalars(
                select(Event).where(
                    Event.entity == "instance", Event.new_state == "failed", Event.entity_id.in_(uids)
                )
            )
        )
    reasons = [e.reason or "" for e in events]
    assert len(reasons) == len(FINDINGS)
    for (what, _changes, message), reason in zip(FINDINGS, reasons, strict=True):
        assert message in reason and reason.startswith("0xC000"), (what, reason)
    assert "Traceback" not in node.log_text()


def test_same_uid_with_other_content_is_quarantined_never_replacing(
    shared_node: ReceiveProcess, tmp_path: Path
) -> None:
    node = shared_node
    sop = f"{ROOT}.7.1"
    base = minimal(sop, 7)
    first = encode({**base, 0x7FE00010: (b"OW", b"\x01\x00" * 64)})
    second = encode({**base, 0x7FE00010: (b"OW", b"\x02\x00" * 64)})
    statuses = send(node.port, [(sop, first), (sop, second), (sop, second), (sop, first)], tmp_path / "sent")
    assert statuses == [OK] * 4
    sessions = make_sessionmaker(node.database_url)
    with sessions() as s:
        (inst,) = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop))
        (quarantined,) = s.scalars(
            select(QuarantinedInstance).where(QuarantinedInstance.sop_instance_uid == sop)
        )
        events = list(s.scalars(select(Event).where(Event.entity == "instance", Event.entity_id == sop)))
    assert stored_dataset(node.spool_dir / inst.path) == first
    assert stored_dataset(node.spool_dir / quarantined.path) == second
    assert [e.new_state for e in events].count("quarantined") == 1
    assert sum("duplicate ignored" in (e.reason or "") for e in events) == 2
    assert quarantined.calling_aet == "HOSTILE" and quarantined.peer_host == "127.0.0.1"
