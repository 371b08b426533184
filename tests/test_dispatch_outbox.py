"""Dispatch stage: Delivery rows + spool files in, instances in a real PACS and updated rows out."""

from __future__ import annotations

import io
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import JPEGLSLossless
from sqlalchemy import select
from test_output_sc import make_headers

from dicomnode.config import Settings, load_settings
from dicomnode.db import Association, Delivery, Event, Job, Output, make_sessionmaker, utcnow
from dicomnode.db.leases import WorkerLeases, claim_deliveries
from dicomnode.dispatch import DispatchOutbox, classify_status
from dicomnode.dispatch.outbox import requeue_failed
from dicomnode.dispatch.scu import FileInfo, presentation_contexts
from dicomnode.output import build_fused_series
from dicomnode.spool import Spool, outgoing_path
from dicomnode.testing.peers import free_port, start_orthanc, start_status_scp, start_storescp

N_SLICES = 4


class Clock:
    """A settable clock so backoff can be tested without sleeping."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Node:
    """Settings, DB, spool and outbox of one test node; helpers to add outputs and read rows."""

    def __init__(self, tmp_path: Path, db_url: str, destinations: list[dict], **dispatch: float) -> None:
        dispatch_cfg = {
            "max_attempts": 5,
            "backoff_initial_seconds": 2,
            "backoff_max_seconds": 30,
            "timeout_seconds": 5,
        }
        dispatch_cfg.update(dispatch)
        self.settings: Settings = load_settings(
            None,
            node={"ae_title": "DICOMNODE"},
            storage={"spool_dir": str(tmp_path / "spool"), "database_url": db_url},
            destinations=destinations,
            dispatch=dispatch_cfg,
        )
        self.sm = make_sessionmaker(self.settings.storage.database_url)
        self.spool = Spool(self.settings.storage.spool_dir, fsync=False)
        self.clock = Clock()
        self.outbox = DispatchOutbox(self.settings, self.sm, self.spool, clock=self.clock)

    def add_outputs(self, n: int = N_SLICES, destinations: tuple[str, ...] = ("pacs",)) -> list[str]:
        """Write n SC files to the spool with Output + Delivery rows; returns their SOP Instance UIDs."""
        ref = make_headers("MR", n, spacing=1.0, step=3.0, z0=0.0)
        mov = make_headers("CT", 2 * n, spacing=1.0, step=1.5, z0=0.0)
        fused = np.random.default_rng(0).integers(0, 256, (n, 16, 16), dtype=np.uint8)
        series = build_fused_series(
            fused, ref, mov, rule_name="mr-ct", method_name="test", method_version="1"
        )
        uids = []
        with self.sm() as s, s.begin():
            job = Job(
                rule_name="mr-ct",
                patient_key="PID-42",
                reference_series_uid=ref[0].SeriesInstanceUID,
                moving_series_uid=mov[0].SeriesInstanceUID,
                state="done",
            )
            s.add(job)
            s.flush()
            for sc in series:
                buf = io.BytesIO()
                sc.save_as(buf, enforce_file_format=True)
                rel = outgoing_path(sc.SeriesInstanceUID, sc.SOPInstanceUID)
                self.spool.write(rel, buf.getvalue())
                out = Output(
                    job_id=job.id,
                    sop_instance_uid=sc.SOPInstanceUID,
                    series_instance_uid=sc.SeriesInstanceUID,
                    instance_number=int(sc.InstanceNumber),
                    path=rel,
                )
                s.add(out)
                s.flush()
                for dest in destinations:
                    s.add(Delivery(output_id=out.id, destination=dest, next_attempt_at=self.clock.now))
                uids.append(str(sc.SOPInstanceUID))
        return uids

    def deliveries(self) -> list[Delivery]:
        with self.sm() as s:
            return list(s.scalars(select(Delivery).order_by(Delivery.id)))

    def events(self, entity: str = "delivery") -> list[Event]:
        with self.sm() as s:
            return list(s.scalars(select(Event).where(Event.entity == entity).order_by(Event.id)))

    def associations(self) -> list[Association]:
        with self.sm() as s:
            return list(s.scalars(select(Association).order_by(Association.id)))


def sqlite_url(folder: Path) -> str:
    """A SQLite database for one test node (these tests check dispatch, not the database)."""
    return f"sqlite:///{folder}/node.db"


def dest(name: str, aet: str, port: int) -> dict:
    return {"name": name, "ae_title": aet, "host": "127.0.0.1", "port": port}


@pytest.fixture
def orthanc(tmp_path: Path):
    handle = start_orthanc(tmp_path)
    yield handle
    handle.stop()


@pytest.mark.both_backends
def test_deliveries_reach_orthanc_and_rows_are_sent(tmp_path: Path, db_url: str, orthanc) -> None:
    node = Node(tmp_path, db_url, [dest("pacs", "ORTHANC", orthanc.dicom_port)])
    uids = node.add_outputs()
    assert node.outbox.run_once() == N_SLICES
    assert orthanc.sop_instance_uids() == set(uids)
    rows = node.deliveries()
    assert [d.state for d in rows] == ["sent"] * N_SLICES
    assert all(d.last_status == 0 and d.sent_at is not None and d.attempts == 0 for d in rows)
    events = node.events()
    assert [(e.old_state, e.new_state) for e in events] == [("pending", "sent")] * N_SLICES
    assert all(e.stage == "dispatch" for e in events)
    (assoc,) = node.associations()
    assert (assoc.direction, assoc.state, assoc.n_stored, assoc.n_failed) == ("out", "released", N_SLICES, 0)
    assert (assoc.calling_aet, assoc.called_aet) == ("DICOMNODE", "ORTHANC")
    assert assoc.peer_port == orthanc.dicom_port
    # nothing due any more: a second round sends nothing and opens no association
    assert node.outbox.run_once() == 0
    assert len(node.associations()) == 1
    # the stored instance is the file from the spool (pixels survive the trip)
    orthanc_id = orthanc.instances()[0]
    tags = orthanc.instance_tags(orthanc_id)
    assert tags["SeriesDescription"] == "FUSED MR + CT [test] RESEARCH USE ONLY"


def test_orthanc_down_then_up_delivers_after_backoff(tmp_path: Path, db_url: str) -> None:
    orthanc = start_orthanc(tmp_path)
    orthanc.stop()  # ports known, nobody listening
    try:
        node = Node(tmp_path, db_url, [dest("pacs", "ORTHANC", orthanc.dicom_port)])
        uids = node.add_outputs()
        before = node.clock.now
        assert node.outbox.run_once() == 0
        rows = node.deliveries()
        assert all(d.state == "pending" and d.attempts == 1 for d in rows)
        assert all("cannot connect" in (d.last_error or "") for d in rows)
        for d in rows:
            delay = (d.next_attempt_at - before).total_seconds()
            assert 2.0 <= delay <= 2.0 * 1.1 + 1e-6
        reasons = [e.reason for e in node.events()]
        assert len(reasons) == N_SLICES and all("attempt 1/5 failed" in r for r in reasons)
        # not due yet: no new attempt
        assert node.outbox.run_once() == 0
        assert all(d.attempts == 1 for d in node.deliveries())
        assert node.associations()[-1].state == "aborted"

        orthanc.start()
        node.clock.advance(3)
        assert node.outbox.run_once() == N_SLICES
        assert orthanc.sop_instance_uids() == set(uids)
        assert all(d.state == "sent" and d.attempts == 1 for d in node.deliveries())
    finally:
        orthanc.stop()


@pytest.mark.both_backends
def test_backoff_doubles_caps_and_gives_up_after_max_attempts(tmp_path: Path, db_url: str) -> None:
    port = free_port()  # nothing listens here
    node = Node(
        tmp_path,
        db_url,
        [dest("pacs", "NOBODY", port)],
        max_attempts=4,
        backoff_initial_seconds=2,
        backoff_max_seconds=5,
    )
    node.add_outputs(n=1)
    delays = []
    for _ in range(3):
        start = node.clock.now
        assert node.outbox.run_once() == 0
        (d,) = node.deliveries()
        assert d.state == "pending"
        delays.append((d.next_attempt_at - start).total_seconds())
        node.clock.now = d.next_attempt_at
    assert 2 <= delays[0] <= 2.2 + 1e-6
    assert 4 <= delays[1] <= 4.4 + 1e-6
    assert 5 <= delays[2] <= 5.5 + 1e-6  # capped at backoff_max
    assert node.outbox.run_once() == 0
    (d,) = node.deliveries()
    assert (d.state, d.attempts) == ("failed", 4)
    last = node.events()[-1]
    assert (last.old_state, last.new_state) == ("pending", "failed")
    assert "gave up after 4 attempts" in last.reason and "cannot connect" in last.reason
    # a failed delivery is never retried by the outbox
    node.clock.advance(3600)
    assert node.outbox.run_once() == 0
    assert node.deliveries()[0].attempts == 4


def test_permanent_rejection_fails_at_once_with_the_reason(tmp_path: Path, db_url: str) -> None:
    """Orthanc answers a wrong called AE title with A-ASSOCIATE-RJ "rejected permanent": retrying
    cannot help, so the deliveries fail at the first attempt with the reason (no week of retries)."""
    orthanc = start_orthanc(tmp_path, check_called_aet=True)
    try:
        node = Node(tmp_path, db_url, [dest("pacs", "NOT-ORTHANC", orthanc.dicom_port)])
        node.add_outputs(n=2)
        assert node.outbox.run_once() == 0
        rows = node.deliveries()
        assert all(d.state == "failed" and d.attempts == 1 for d in rows), [
            (d.state, d.attempts) for d in rows
        ]
        assert all("Rejected Permanent" in (d.last_error or "") for d in rows), [d.last_error for d in rows]
        assert all("Called AE title not recognised" in (d.last_error or "") for d in rows)
        events = node.events()
        assert [(e.old_state, e.new_state) for e in events] == [("pending", "failed")] * 2
        assert all(e.reason.startswith("refused permanently, not retried") for e in events)
        assoc = node.associations()[-1]
        assert assoc.state == "rejected" and "rejected" in (assoc.reason or "")
        node.clock.advance(3600)
        assert node.outbox.run_once() == 0 and len(node.associations()) == 1  # never tried again
        assert orthanc.instances() == []
    finally:
        orthanc.stop()


def test_storescp_refusing_association(tmp_path: Path, db_url: str) -> None:
    scp = start_storescp(tmp_path, args=("--refuse",))
    try:
        node = Node(tmp_path, db_url, [dest("pacs", "STORESCP", scp.port)])
        node.add_outputs(n=1)
        assert node.outbox.run_once() == 0
        (d,) = node.deliveries()
        assert d.attempts == 1 and "rejected" in (d.last_error or "")
        assert d.state == "failed"  # dcmtk refuses with "rejected permanent"
    finally:
        scp.stop()


def _defaults_node(tmp_path: Path, db_url: str, port: int) -> Node:
    """A node with the shipped dispatch defaults (backoff 2 s .. 300 s, give up after 7 days)."""
    node = Node(tmp_path, db_url, [dest("pacs", "STATUSSCP", port)])
    defaults = load_settings(None).dispatch
    node.settings.dispatch = defaults.model_copy(update={"timeout_seconds": 5})
    return node


def test_outage_longer_than_fourteen_minutes_is_still_delivered_with_defaults(
    tmp_path: Path, db_url: str
) -> None:
    """With the shipped settings a PACS that is down for 20 minutes gets the series when it is back
    (the attempts keep coming, at most backoff_max apart), with no manual step. The outage lasts
    until each delivery has failed more often than the old limit of 10 allowed (the random jitter
    decides whether 20 minutes hold 10 or 11 attempts of one delivery)."""
    port = free_port()  # the PACS: nobody listens during the outage
    node = _defaults_node(tmp_path, db_url, port)
    node.add_outputs(n=2)
    t0 = node.clock.now
    rounds = 0
    while node.clock.now - t0 < timedelta(minutes=20) or min(d.attempts for d in node.deliveries()) < 11:
        assert node.outbox.run_once() == 0
        rounds += 1
        rows = node.deliveries()
        assert all(d.state == "pending" for d in rows), [d.last_error for d in rows]
        gaps = {(d.next_attempt_at - node.clock.now).total_seconds() for d in rows}
        assert max(gaps) <= 300 * 1.1 + 1e-6  # capped backoff
        node.clock.now = min(d.next_attempt_at for d in rows)
    assert rounds >= 11  # more attempts than the old limit of 10 allowed
    scp = start_status_scp(status=0x0000, port=port)
    try:
        node.clock.now = max(d.next_attempt_at for d in node.deliveries())
        assert node.outbox.run_once() == 2
        assert len(scp.received) == 2
        assert all(d.state == "sent" and d.attempts >= 11 for d in node.deliveries())
    finally:
        scp.stop()


def test_give_up_after_ends_an_endless_outage(tmp_path: Path, db_url: str) -> None:
    port = free_port()
    node = _defaults_node(tmp_path, db_url, port)
    node.add_outputs(n=1)
    t0 = node.clock.now
    assert node.outbox.run_once() == 0
    (d,) = node.deliveries()
    assert d.state == "pending" and d.failing_since == t0
    node.clock.now = t0 + timedelta(days=7) - timedelta(seconds=1)
    assert node.outbox.run_once() == 0
    (d,) = node.deliveries()
    # the last attempt is at the deadline, not a backoff step beyond it
    assert d.state == "pending" and d.next_attempt_at == t0 + timedelta(days=7)
    node.clock.now = d.next_attempt_at
    assert node.outbox.run_once() == 0
    (d,) = node.deliveries()
    assert (d.state, d.attempts) == ("failed", 3)
    last = node.events()[-1]
    assert (last.old_state, last.new_state) == ("pending", "failed")
    assert "gave up after 3 attempts over 7 days" in last.reason and "cannot connect" in last.reason


@pytest.mark.parametrize("status", [0x0122, 0xA900, 0xC000])
def test_status_a_retry_cannot_change_fails_at_once(tmp_path: Path, db_url: str, status: int) -> None:
    scp = start_status_scp(status=status)
    try:
        node = Node(tmp_path, db_url, [dest("pacs", scp.aet, scp.port)])
        node.add_outputs(n=1)
        assert node.outbox.run_once() == 0
        (d,) = node.deliveries()
        assert (d.state, d.attempts, d.last_status) == ("failed", 1, status)
        assert f"0x{status:04X}" in d.last_error and "retry cannot change" in d.last_error
    finally:
        scp.stop()


def test_destination_without_the_sop_class_fails_at_once(tmp_path: Path, db_url: str) -> None:
    """A PACS that accepts no presentation context for Secondary Capture will not start to."""
    from pydicom.uid import CTImageStorage  # noqa: PLC0415

    scp = start_status_scp(sop_classes=[CTImageStorage])
    try:
        node = Node(tmp_path, db_url, [dest("pacs", scp.aet, scp.port)])
        node.add_outputs(n=2)
        assert node.outbox.run_once() == 0
        rows = node.deliveries()
        assert all((d.state, d.attempts) == ("failed", 1) for d in rows), [d.last_error for d in rows]
        assert all("presentation context" in d.last_error for d in rows)
        assert scp.received == []
    finally:
        scp.stop()


def test_failed_delivery_requeued_by_an_admin_is_sent(tmp_path: Path, db_url: str) -> None:
    scp = start_status_scp(status=0x0122)
    try:
        node = Node(tmp_path, db_url, [dest("pacs", scp.aet, scp.port)])
        node.add_outputs(n=2)
        assert node.outbox.run_once() == 0
        assert [d.state for d in node.deliveries()] == ["failed", "failed"]
        scp.status = 0x0000  # the PACS admin added the SOP class
        with node.sm() as s, s.begin():
            moved = requeue_failed(
                s, [d.id for d in node.deliveries()], "re-sent by admin", now=node.clock.now
            )
        assert len(moved) == 2
        rows = node.deliveries()
        assert all((d.state, d.attempts, d.failing_since) == ("pending", 0, None) for d in rows)
        assert node.outbox.run_once() == 2
        assert all(d.state == "sent" for d in node.deliveries())
        states = [(e.old_state, e.new_state) for e in node.events()]
        assert states.count(("failed", "pending")) == 2 and states.count(("pending", "sent")) == 2
    finally:
        scp.stop()


def test_leased_deliveries_are_not_sent_by_a_second_dispatcher(tmp_path: Path, db_url: str) -> None:
    """Two dispatchers on one database: rows leased by one are skipped by the other until the lease
    expires; then the other takes them over (audited) and sends each once."""
    scp = start_status_scp(status=0x0000)
    try:
        node = Node(tmp_path, db_url, [dest("pacs", scp.aet, scp.port)])
        node.add_outputs(n=3)
        other = DispatchOutbox(
            node.settings,
            node.sm,
            node.spool,
            clock=node.clock,
            leases=WorkerLeases(node.sm, 30, "dispatcher-b", clock=node.clock),
        )
        with node.sm() as s:  # dispatcher A claims the round, then dies without a word
            claimed = claim_deliveries(
                s, "dispatcher-a", node.clock.now, node.clock.now + timedelta(seconds=30), limit=10
            )
        assert len(claimed) == 3
        assert other.run_once() == 0 and scp.received == []
        node.clock.advance(31)
        assert other.run_once() == 3
        assert sorted(scp.received) == sorted(set(scp.received)) and len(scp.received) == 3
        rows = node.deliveries()
        assert all(d.state == "sent" and d.lease_owner is None for d in rows)
        taken = [e.reason for e in node.events() if e.new_state == "pending"]
        assert taken == ["lease of dispatcher-a expired; taken over by dispatcher-b"] * 3
        other.leases.stop()
    finally:
        scp.stop()


def test_failure_status_is_a_failed_attempt(tmp_path: Path, db_url: str) -> None:
    scp = start_status_scp(status=0xA700)
    try:
        node = Node(tmp_path, db_url, [dest("pacs", scp.aet, scp.port)])
        node.add_outputs(n=2)
        assert node.outbox.run_once() == 0
        assert len(scp.received) == 2  # the PACS did get the requests
        rows = node.deliveries()
        assert all(d.state == "pending" and d.attempts == 1 and d.last_status == 0xA700 for d in rows)
        assert all("0xA700" in (d.last_error or "") for d in rows)
        assoc = node.associations()[-1]
        assert (assoc.state, assoc.n_stored, assoc.n_failed) == ("released", 0, 2)
    finally:
        scp.stop()


def test_warning_status_counts_as_stored(tmp_path: Path, db_url: str) -> None:
    scp = start_status_scp(status=0xB000)
    try:
        node = Node(tmp_path, db_url, [dest("pacs", scp.aet, scp.port)])
        node.add_outputs(n=1)
        assert node.outbox.run_once() == 1
        (d,) = node.deliveries()
        assert (d.state, d.last_status) == ("sent", 0xB000)
        assert "warning" in (d.last_error or "")
    finally:
        scp.stop()


def test_unconfigured_destination_fails_with_reason(tmp_path: Path, db_url: str) -> None:
    node = Node(tmp_path, db_url, [dest("pacs", "ORTHANC", free_port())])
    node.add_outputs(n=1, destinations=("old-pacs",))
    assert node.outbox.run_once() == 0
    (d,) = node.deliveries()
    assert d.state == "failed" and "not configured" in (d.last_error or "")
    assert node.events()[-1].new_state == "failed"
    assert node.associations() == []


def test_missing_output_file_is_a_failed_attempt(tmp_path: Path, db_url: str, orthanc) -> None:
    node = Node(tmp_path, db_url, [dest("pacs", "ORTHANC", orthanc.dicom_port)])
    node.add_outputs(n=2)
    with node.sm() as s:
        first = s.scalars(select(Output).order_by(Output.id)).first()
        node.spool.abspath(first.path).unlink()
    assert node.outbox.run_once() == 1
    rows = node.deliveries()
    assert rows[0].state == "pending" and rows[0].attempts == 1 and "missing" in rows[0].last_error
    assert rows[1].state == "sent"


@pytest.mark.both_backends
def test_crash_before_recording_leaves_rows_pending_and_resends(
    tmp_path: Path, db_url: str, orthanc, monkeypatch
) -> None:
    node = Node(tmp_path, db_url, [dest("pacs", "ORTHANC", orthanc.dicom_port)])
    uids = node.add_outputs()

    def die(self, results):  # the process dies after the PACS stored, before the DB write
        raise SystemExit("killed")

    with monkeypatch.context() as m:
        m.setattr(DispatchOutbox, "_flush", die)
        with pytest.raises(SystemExit):
            node.outbox.run_once()
    assert orthanc.sop_instance_uids() == set(uids)
    assert all(d.state == "pending" and d.attempts == 0 for d in node.deliveries())
    assert node.outbox.run_once() == N_SLICES  # sent again, PACS takes the identical instances
    assert all(d.state == "sent" for d in node.deliveries())
    assert len(orthanc.instances()) == N_SLICES


def test_one_association_per_destination(tmp_path: Path, db_url: str, orthanc) -> None:
    scp = start_storescp(tmp_path)
    try:
        dests = [dest("pacs", "ORTHANC", orthanc.dicom_port), dest("archive", "STORESCP", scp.port)]
        node = Node(tmp_path, db_url, dests)
        node.add_outputs(destinations=("pacs", "archive"))
        assert node.outbox.run_once() == 2 * N_SLICES
        assocs = node.associations()
        per_dest = sorted((a.called_aet, a.n_stored) for a in assocs)
        assert per_dest == [("ORTHANC", N_SLICES), ("STORESCP", N_SLICES)]
        assert len(orthanc.instances()) == N_SLICES
        assert len(scp.files()) == N_SLICES
    finally:
        scp.stop()


def test_run_forever_sends_and_stops(tmp_path: Path, db_url: str, orthanc) -> None:
    node = Node(tmp_path, db_url, [dest("pacs", "ORTHANC", orthanc.dicom_port)])
    node.outbox.clock = utcnow
    node.add_outputs(n=2)
    stop = threading.Event()
    worker = threading.Thread(target=node.outbox.run_forever, args=(stop,), daemon=True)
    worker.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(d.state != "sent" for d in node.deliveries()):
        time.sleep(0.1)
    stop.set()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert all(d.state == "sent" for d in node.deliveries())


def test_presentation_contexts_follow_the_files() -> None:
    sc, mr = "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.4"
    files = [
        FileInfo(Path("a"), sc, "1.2.840.10008.1.2.1"),
        FileInfo(Path("b"), sc, "1.2.840.10008.1.2.1"),
        FileInfo(Path("c"), mr, JPEGLSLossless),
    ]
    ctx = presentation_contexts(files)
    assert ctx[sc] == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    assert ctx[mr] == [JPEGLSLossless]


@pytest.mark.parametrize(
    ("status", "stored"),
    [
        (0x0000, True),
        (0xB000, True),
        (0xB007, True),
        (0xB006, True),
        (0xA700, False),
        (0xC000, False),
        (0x0122, False),
    ],
)
def test_classify_status(status: int, stored: bool) -> None:
    result = classify_status(status)
    assert result.stored is stored and result.status == status
    if not stored:
        assert f"0x{status:04X}" in (result.error or "")


def test_peer_aborting_mid_association_fails_the_rest_with_reason(tmp_path: Path, db_url: str) -> None:
    scp = start_storescp(tmp_path, args=("--abort-after",))
    try:
        node = Node(tmp_path, db_url, [dest("pacs", "STORESCP", scp.port)])
        node.add_outputs(n=3)
        assert node.outbox.run_once() == 0
        rows = node.deliveries()
        assert all(d.state == "pending" and d.attempts == 1 for d in rows)
        assert "aborted" in rows[0].last_error
        assert all("ended before sending" in d.last_error for d in rows[1:]), [d.last_error for d in rows]
        assoc = node.associations()[-1]
        assert (assoc.state, assoc.n_stored, assoc.n_failed) == ("aborted", 0, 3)
    finally:
        scp.stop()


class _FakeAssoc:
    """Just enough of a pynetdicom Association for the reactor-race guard."""

    def __init__(self) -> None:
        import queue  # noqa: PLC0415

        self.served: list[object] = []
        self.dimse = type("D", (), {"msg_queue": queue.Queue()})()

    def _serve_request(self, msg: object, context_id: int) -> None:
        self.served.append(msg)


def test_reactor_race_guard_returns_stolen_responses_only_while_in_flight() -> None:
    from dicomnode.dispatch.scu import guard_reactor_race  # noqa: PLC0415

    response = type("Rsp", (), {"is_valid_request": False})()
    request = type("Rq", (), {"is_valid_request": True})()
    assoc, flight = _FakeAssoc(), {"on": True}
    guard_reactor_race(assoc, lambda: flight["on"])
    assoc._serve_request(response, 1)
    assert assoc.dimse.msg_queue.get_nowait() == (1, response) and assoc.served == []
    assoc._serve_request(request, 1)
    assert assoc.served == [request]
    flight["on"] = False
    assoc._serve_request(response, 1)
    assert assoc.served == [request, response] and assoc.dimse.msg_queue.empty()
