"""The receive stage's transport under hostile and careless peers, over real TCP on loopback.

Memory and CPU are measured on the node's own process (/proc), as an operator would see them.
Other loopback addresses (127.0.0.2, ...) stand for other hosts. Set DICOMNODE_RECEIVER_CODE to
another checkout of dicomnode to run the default-config checks against it.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AddressInformation
from sqlalchemy import func, select
from test_receive_scp import dataset_bytes, make_ct

from dicomnode.config import load_settings
from dicomnode.db import Association, Event, Instance, make_sessionmaker
from dicomnode.receive import ReceiveStage
from dicomnode.spool import Spool
from dicomnode.testing.peers import have_dcmtk, storescu
from dicomnode.testing.receiver import ReceiveProcess, start_receive_process

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="dcmtk (storescu/echoscu) not installed")
OTHER_CODE = os.environ.get("DICOMNODE_RECEIVER_CODE")


# -- raw protocol helpers ----------------------------------------------------------------------


def associate_rq(calling: str = "RAW", called: str = "DICOMNODE", abstract: str = Verification) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing one presentation context (ID 1): Verification by default."""
    p = A_ASSOCIATE()
    p.application_context_name = "1.2.840.10008.3.1.1.1"
    p.calling_ae_title, p.called_ae_title = calling, called
    p.calling_presentation_address = AddressInformation("127.0.0.1", 1)
    p.called_presentation_address = AddressInformation("127.0.0.1", 2)
    cx = build_context(abstract, ExplicitVRLittleEndian)
    cx.context_id = 1
    p.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    p.user_information = [ml]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(p)
    return bytes(pdu.encode())


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    return sock


def read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next PDU (type, body) or None at end of stream."""
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        if not chunk:
            return None
        head += chunk
    pdu_type, _, length = struct.unpack(">BBL", head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(min(length - len(body), 65536))
        if not chunk:
            return None
        body += chunk
    return pdu_type, body


def associated(
    port: int, source: str = "127.0.0.1", calling: str = "RAW", abstract: str = Verification
) -> socket.socket:
    """A raw connection with an accepted association."""
    sock = connect(port, source)
    sock.sendall(associate_rq(calling, abstract=abstract))
    answer = read_pdu(sock)
    assert answer is not None and answer[0] == 0x02, f"association not accepted: {answer}"
    return sock


def ended_by_node(sock: socket.socket, timeout: float = 30.0) -> bool:
    """True when the node ends the connection (A-ABORT and/or close) within ``timeout`` seconds."""
    sock.settimeout(timeout)
    try:
        while True:
            pdu = read_pdu(sock)
            if pdu is None or pdu[0] == 0x07:
                return True
    except TimeoutError:
        return False
    except OSError:
        return True
    finally:
        sock.close()


def wait_for(ready, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    """Rows are written by the node's threads just after the peer sees the answer."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, "the node did not record it"
        time.sleep(0.05)


def send_ct(port: int, tmp_path: Path, calling: str = "SCANNER") -> int:
    f = make_ct(tmp_path / f"{generate_uid()}.dcm", study=generate_uid(), series=generate_uid())
    return storescu([f], port, calling_aet=calling, timeout=120).returncode


# -- a node process with the default configuration ----------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReceiveProcess]:
    proc = start_receive_process(
        tmp_path_factory.mktemp("network") / "node",
        storage={"fsync": False},
        code=Path(OTHER_CODE) if OTHER_CODE else None,
    )
    try:
        yield proc
    finally:
        proc.stop()


def quiet_log(node: ReceiveProcess) -> None:
    log = node.log_text()
    assert "Traceback" not in log and "MemoryError" not in log


def test_a_pdu_declaring_4_gib_ends_the_connection_without_allocating(
    node: ReceiveProcess, tmp_path: Path
) -> None:
    rss = node.rss_kb()
    for header in (b"\x01\x00\xff\xff\xff\xff", b"\x04\x00\xff\xff\xff\xff"):  # before any association
        sock = connect(node.port)
        sock.sendall(header + b"\x00" * 64)
        assert ended_by_node(sock), f"connection kept open after {header.hex()}"
    sock = associated(node.port)  # and within one
    sock.sendall(b"\x04\x00\xff\xff\xff\xff" + b"\x00" * 64)
    assert ended_by_node(sock)
    assert (node.peak_rss_kb() - rss) / 1024 < 64, "memory grew with a declared length"
    quiet_log(node)
    assert send_ct(node.port, tmp_path) == 0


def test_random_bytes_do_not_push_memory_up(node: ReceiveProcess, tmp_path: Path) -> None:
    rng = random.Random(20241119)
    rss = node.rss_kb()
    for n in range(60):
        sock = connect(node.port, source="127.0.0.5")  # an attacker's host; the scanner is 127.0.0.1
        if n % 3 == 0:  # a plausible PDU type and a random declared length, then garbage
            blob = struct.pack(">BBL", rng.randrange(1, 8), 0, rng.getrandbits(32))
        elif n % 3 == 1:
            blob = associate_rq()
        else:
            blob = b""
        blob += rng.randbytes(rng.randrange(1, 32 * 1024))
        try:
            sock.sendall(blob)
        except OSError:
            pass  # the node may end it before everything is sent
        sock.close()
    assert (node.peak_rss_kb() - rss) / 1024 < 100, "random bytes pushed memory up"
    quiet_log(node)
    assert send_ct(node.port, tmp_path) == 0


def test_idle_connections_of_one_host_do_not_lock_out_a_scanner(node: ReceiveProcess, tmp_path: Path) -> None:
    idle = [connect(node.port, source="127.0.0.2") for _ in range(12)]
    try:
        assert send_ct(node.port, tmp_path) == 0
    finally:
        for sock in idle:
            sock.close()


def test_connections_closed_by_the_peer_free_their_place_at_once(
    node: ReceiveProcess, tmp_path: Path
) -> None:
    for _ in range(12):
        connect(node.port).close()
    deadline = time.monotonic() + 5  # far below the ACSE timeout that used to hold each one
    while send_ct(node.port, tmp_path) != 0:
        assert time.monotonic() < deadline, "closed connections still hold the node's places"
        time.sleep(0.5)


def test_idle_associations_cost_no_cpu(node: ReceiveProcess) -> None:
    socks = [associated(node.port, source="127.0.0.3") for _ in range(8)]
    try:
        time.sleep(0.5)
        before = node.cpu_seconds()
        time.sleep(3)
        used = node.cpu_seconds() - before
    finally:
        for sock in socks:
            sock.close()
    assert used < 0.5, f"{used:.2f} s of CPU in 3 s for 8 idle associations"


def test_the_called_ae_title_must_be_the_nodes(node: ReceiveProcess) -> None:
    sock = connect(node.port)
    sock.sendall(associate_rq(called="SOMEONE-ELSE"))
    answer = read_pdu(sock)
    sock.close()
    assert answer is not None and answer[0] == 0x03, "an association to another AE title was accepted"
    assert answer[1][1:4] == bytes([0x01, 0x01, 0x07])  # permanent, service user, called AE not recognised
    sessions = make_sessionmaker(node.database_url)

    def rows() -> list[Association]:
        with sessions() as s:
            return list(s.scalars(select(Association).where(Association.called_aet == "SOMEONE-ELSE")))

    wait_for(rows)
    (row,) = rows()
    assert row.state == "rejected" and "check_called_aet" in (row.reason or "")


# -- limits and timeouts, with the stage in this process -----------------------------------------


class Node:
    """A receive stage configured for one test, with its DB."""

    def __init__(self, tmp: Path, **node: object) -> None:
        settings = load_settings(
            None,
            node={"ae_title": "DICOMNODE", "host": "127.0.0.1", **node},
            storage={"spool_dir": str(tmp / "spool"), "database_url": f"sqlite:///{tmp / 'db.sqlite'}"},
        )
        settings.node.port = 0
        self.sessions = make_sessionmaker(settings.storage.database_url)
        self.stage = ReceiveStage(settings, self.sessions, Spool(settings.storage.spool_dir, fsync=False))
        self.stage.start()
        assert self.stage.port
        self.port = self.stage.port

    def rows(self) -> list[Association]:
        with self.sessions() as s:
            return list(s.scalars(select(Association).order_by(Association.id)))

    def events(self) -> list[Event]:
        with self.sessions() as s:
            return list(s.scalars(select(Event).order_by(Event.id)))


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator:
    nodes: list[Node] = []

    def make(**node: object) -> Node:
        nodes.append(Node(tmp_path / f"n{len(nodes)}", **node))
        return nodes[-1]

    yield make
    for n in nodes:
        n.stage.stop()


def rejection(port: int, source: str) -> tuple[int, int, int] | None:
    """None when an association from ``source`` is accepted (and kept open), else its RJ fields."""
    sock = connect(port, source)
    sock.sendall(associate_rq())
    answer = read_pdu(sock)
    assert answer is not None
    if answer[0] == 0x02:
        held.append(sock)
        return None
    sock.close()
    assert answer[0] == 0x03
    return answer[1][1], answer[1][2], answer[1][3]


held: list[socket.socket] = []


def test_associations_are_limited_per_address_and_in_total(make_node) -> None:
    node = make_node(max_associations=4, max_associations_per_address=2)
    local_limit = (0x02, 0x03, 0x02)  # transient, service provider, local limit exceeded
    try:
        assert [rejection(node.port, "127.0.0.2") for _ in range(3)] == [None, None, local_limit]
        assert [rejection(node.port, "127.0.0.3") for _ in range(2)] == [None, None]
        assert rejection(node.port, "127.0.0.4") == local_limit  # 4 in total
        held.pop(0).close()  # one of 127.0.0.2's ends: its place is free again
        deadline = time.monotonic() + 10
        while rejection(node.port, "127.0.0.4") is not None:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        while held:
            held.pop().close()

    def reasons() -> list[str]:
        return [r.reason or "" for r in node.rows() if r.state == "rejected"]

    wait_for(
        lambda: any("127.0.0.2 already has 2" in r and "max_associations_per_address" in r for r in reasons())
    )
    wait_for(lambda: any("4 connections open (node.max_associations)" in r for r in reasons()))


def test_a_connection_stopped_mid_pdu_is_dropped(make_node) -> None:
    node = make_node(network_timeout_seconds=1.5, acse_timeout_seconds=1.5)
    rq = associate_rq()
    sock = connect(node.port)
    sock.sendall(rq[: len(rq) // 2])  # half an association request, then nothing
    assert ended_by_node(sock)
    sock = associated(node.port)
    sock.sendall(b"\x04\x00\x00\x00\x03\xe8" + b"\x00" * 100)  # a P-DATA-TF of 1000 bytes, 100 sent
    assert ended_by_node(sock)
    wait_for(lambda: any(r.state == "aborted" for r in node.rows()))
    (aborted,) = [r for r in node.rows() if r.state == "aborted"]
    assert "in the middle of a PDU" in (aborted.reason or "")


def test_an_idle_association_and_a_silent_connection_are_ended(make_node) -> None:
    node = make_node(network_timeout_seconds=1.5, acse_timeout_seconds=1.5)
    silent = connect(node.port)
    idle = associated(node.port)
    assert ended_by_node(silent) and ended_by_node(idle)


def test_a_data_set_over_the_limit_ends_the_association(make_node, tmp_path: Path) -> None:
    node = make_node(max_dataset_mb=1, max_pdu_size=65536)
    src = tmp_path / "big.dcm"
    make_ct(src, study=generate_uid(), series=generate_uid())
    from pydicom import dcmread

    ds = dcmread(src)
    ds.Rows, ds.Columns = 1024, 1024
    ds.PixelData = b"\x00\x01" * (1024 * 1024)
    ds.save_as(src, enforce_file_format=True)
    result = storescu([src], node.port, timeout=120)
    assert result.returncode != 0
    wait_for(lambda: node.rows() and node.rows()[0].state != "open")
    rows = node.rows()
    assert len(rows) == 1, [(r.state, r.reason, r.calling_aet, r.peer_port) for r in rows]
    (row,) = rows
    assert row.state == "aborted" and "node.max_dataset_mb" in (row.reason or "")
    wait_for(lambda: not any(node.stage.spool.tmp.iterdir()))  # its first megabyte was streamed to disk
    assert send_small_ok(node.port, tmp_path)


def store_pdus(dataset: bytes, max_pdu: int = 16384) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE-RQ (context 1) carrying ``dataset``: command, then data."""
    rq = C_STORE()
    rq.MessageID, rq.Priority = 1, 0
    rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = CTImageStorage, generate_uid()
    rq.DataSet = BytesIO(dataset)
    msg = C_STORE_RQ()
    msg.primitive_to_message(rq)
    pdus = []
    for primitive in msg.encode_msg(1, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(bytes(pdu.encode()))
    return pdus


def test_a_data_set_abandoned_mid_transfer_leaves_no_file(make_node, tmp_path: Path) -> None:
    """Data sets are written to the spool while they arrive: a peer that stops half way (here it
    closes the connection) leaves no partial file behind, and nothing is indexed."""
    node = make_node()
    src = make_ct(tmp_path / "a.dcm", study=generate_uid(), series=generate_uid())
    pdus = store_pdus(dataset_bytes(src) + b"\x00" * 200_000)
    assert len(pdus) > 6
    sock = associated(node.port, abstract=CTImageStorage)
    for pdu in pdus[: len(pdus) // 2]:
        sock.sendall(pdu)
    wait_for(lambda: any(node.stage.spool.tmp.iterdir()))  # its first half is on disk already
    sock.close()
    wait_for(lambda: node.rows() and node.rows()[0].state == "aborted")
    wait_for(lambda: not any(node.stage.spool.tmp.iterdir()))
    assert not any(node.stage.spool.root.rglob("*.dcm"))
    with node.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 0


def send_small_ok(port: int, tmp_path: Path) -> bool:
    return send_ct(port, tmp_path) == 0


def test_allowed_peers_match_ae_title_and_address(make_node) -> None:
    node = make_node(
        allowed_peers=[{"ae_title": "CT1", "address": "127.0.0.1"}, {"address": "127.0.0.2/32"}],
    )

    def echo(calling: str, source: str) -> bool:
        ae = AE(ae_title=calling)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE", bind_address=(source, 0))
        ok = assoc.is_established
        if ok:
            assoc.release()
        return ok

    assert echo("CT1", "127.0.0.1")
    assert echo("ANYONE", "127.0.0.2")
    assert not echo("INTRUDER", "127.0.0.1")
    assert not echo("CT1", "127.0.0.3")
    wait_for(lambda: len([r for r in node.rows() if r.state == "rejected"]) == 2)
    rejected = [r for r in node.rows() if r.state == "rejected"]
    assert [(r.calling_aet, r.peer_host) for r in rejected] == [
        ("INTRUDER", "127.0.0.1"),
        ("CT1", "127.0.0.3"),
    ]
    assert all("node.allowed_peers" in (r.reason or "") for r in rejected)


def test_rejections_are_rate_limited_in_the_audit(make_node) -> None:
    node = make_node(allowed_calling_aets=["CT1"])
    for _ in range(25):
        sock = connect(node.port)
        sock.sendall(associate_rq(calling="INTRUDER"))
        assert read_pdu(sock)[0] == 0x03
        sock.close()
    wait_for(lambda: not node.stage._server.active_associations)  # every rejection handled
    node.stage.stop()
    rows = [r for r in node.rows() if r.state == "rejected"]
    summaries = [e for e in node.events() if (e.reason or "").startswith("20 more refusals like this")]
    assert len(rows) == 5 and len(summaries) == 1


def test_many_parallel_connections_are_served_or_refused_never_hung(make_node, tmp_path: Path) -> None:
    node = make_node(max_associations=6, max_associations_per_address=6)
    results: list[int] = []

    def send() -> None:
        results.append(send_ct(node.port, tmp_path))

    threads = [threading.Thread(target=send) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert len(results) == 12 and results.count(0) >= 6
    wait_for(lambda: all(r.state in ("released", "rejected") for r in node.rows()))


def test_a_message_trickled_past_the_dimse_timeout_ends_the_association(make_node) -> None:
    node = make_node(dimse_timeout_seconds=1, network_timeout_seconds=30)
    sock = associated(node.port)

    def fragment(data: bytes) -> bytes:  # one P-DATA-TF with one command fragment, not the last
        item = struct.pack(">IBB", len(data) + 2, 1, 0x01) + data
        return struct.pack(">BBL", 0x04, 0, len(item)) + item

    sock.sendall(fragment(b"\x00" * 10))
    time.sleep(1.5)
    sock.sendall(fragment(b"\x00" * 10))
    assert ended_by_node(sock)
    wait_for(lambda: any(r.state == "aborted" for r in node.rows()))
    assert "node.dimse_timeout_seconds" in (node.rows()[0].reason or "")
