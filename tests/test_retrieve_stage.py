"""Retrieve stage: rows in (series, fetches), rows and audit events out; a scripted Q/R peer for answers.

The end-to-end behaviour with Orthanc as the PACS is in test_e2e_prior_fetch.py; here each rule of
the stage is pinned on its own: the wait and its cancellation, what counts as a usable partner
(the assemble pair window), retries with backoff, and what a hostile source answer is worth.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import select

from dicomnode.assemble import AssembleStage
from dicomnode.config import load_settings
from dicomnode.db import Event, Job, PriorFetch, PriorQuery, PriorRetrieve, Series, make_sessionmaker, utcnow
from dicomnode.retrieve import RetrieveStage
from dicomnode.spool import Spool
from dicomnode.testing.peers import free_port

T0 = datetime(2024, 3, 12, 10, 0, 0)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class ScriptedPacs:
    """A pynetdicom Study Root Q/R SCP answering C-FIND from lists and C-MOVE with a chosen status."""

    port: int
    studies: list[Dataset] = field(default_factory=list)
    series: dict[str, list[Dataset]] = field(default_factory=dict)
    finds: list[str] = field(default_factory=list)
    moves: int = 0
    server: Any = None

    def on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        ident = event.identifier
        level = str(ident.QueryRetrieveLevel)
        self.finds.append(level)
        matches = self.studies if level == "STUDY" else self.series.get(str(ident.StudyInstanceUID), [])
        for m in matches:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, m
        yield 0x0000, None

    def on_move(self, event: Any) -> Iterator[Any]:
        self.moves += 1
        yield None, None  # the move destination is unknown to this PACS: 0xA801


@pytest.fixture()
def pacs() -> Iterator[ScriptedPacs]:
    ae = AE(ae_title="PACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
    handle = ScriptedPacs(port=free_port())
    handle.server = ae.start_server(
        ("127.0.0.1", handle.port),
        block=False,
        evt_handlers=[(evt.EVT_C_FIND, handle.on_find), (evt.EVT_C_MOVE, handle.on_move)],
    )
    try:
        yield handle
    finally:
        handle.server.shutdown()


def make_env(
    tmp_path: Path, source_port: int, **fetch: Any
) -> tuple[Any, RetrieveStage, AssembleStage, Clock]:
    fm = {"enabled": True, "lookback_days": 30, "wait_minutes": 10, **fetch}
    settings = load_settings(
        None,
        storage={"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path}/t.db"},
        assembly={"series_stable_seconds": 30, "pair_window_hours": 24},
        rules=[{"name": "mr-ct", "reference": "MR", "moving": "CT", "fetch_missing": fm}],
        sources=[
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": source_port,
                "timeout_seconds": 5,
            }
        ],
        retrieve={"max_attempts": 2, "backoff_initial_seconds": 60, "max_studies": 5},
    )
    sm = make_sessionmaker(settings.storage.database_url)
    clock = Clock()
    stage = RetrieveStage(settings, sm, Spool(settings.storage.spool_dir), clock=clock, worker_id="test")
    return sm, stage, AssembleStage(settings, sm, clock=clock), clock


def add_series(
    sm: Any, uid: str, modality: str, *, study: str = "s-today", study_dt: datetime = T0, **kw: Any
) -> None:
    kw.setdefault("n_instances", 40)
    kw.setdefault("state", "complete")
    kw.setdefault("patient_id", "P1")
    with sm() as s:
        s.add(
            Series(
                series_instance_uid=uid,
                study_instance_uid=study,
                patient_key=kw.pop("patient_key", kw["patient_id"]),
                modality=modality,
                study_datetime=study_dt,
                last_received_at=T0,
                completed_at=kw.pop("completed_at", T0 if kw["state"] == "complete" else None),
                **kw,
            )
        )
        s.commit()


def add_retrieve(
    sm: Any, series_uid: str, study_uid: str, *, fetch_state: str = "retrieving", **kw: Any
) -> None:
    """A fetch of P1's CT for MR 'mr1' under rule mr-ct, with one retrieve row of ``series_uid``."""
    with sm() as s:
        fetch = PriorFetch(
            rule_name="mr-ct",
            patient_key="P1",
            anchor_series_uid="mr1",
            anchor_modality="MR",
            wanted_modality="CT",
            state=fetch_state,
        )
        s.add(fetch)
        s.flush()
        s.add(
            PriorRetrieve(
                fetch_id=fetch.id,
                source="pacs",
                method="c-move",
                patient_key="P1",
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                **kw,
            )
        )
        s.commit()


def fetches(sm: Any) -> list[PriorFetch]:
    with sm() as s:
        return list(s.scalars(select(PriorFetch).order_by(PriorFetch.id)))


def fetch_events(sm: Any, fetch_id: int) -> list[Event]:
    with sm() as s:
        return list(
            s.scalars(
                select(Event)
                .where(Event.entity == "fetch", Event.entity_id == str(fetch_id))
                .order_by(Event.id)
            )
        )


def closed_port() -> int:
    return free_port()  # nothing listens there


def test_waiting_fetch_is_cancelled_when_the_partner_arrives_by_itself(tmp_path: Path) -> None:
    sm, stage, _assemble, clock = make_env(tmp_path, closed_port())
    add_series(sm, "mr1", "MR", series_description="T1 3D AX", acquisition_type="3D")
    clock.now = T0 + timedelta(minutes=1)
    assert stage.run_once() == 1
    (fetch,) = fetches(sm)
    assert (fetch.state, fetch.wanted_modality, fetch.due_at) == ("waiting", "CT", T0 + timedelta(minutes=10))
    assert "waiting 10 min" in (fetch.reason or "")
    stage.run_once()  # before the wait is over nothing happens, and nothing is created twice
    assert [f.state for f in fetches(sm)] == ["waiting"]
    add_series(sm, "ct1", "CT", series_description="CT HEAD")
    clock.now = T0 + timedelta(minutes=2)
    stage.run_once()
    (fetch,) = fetches(sm)
    assert fetch.state == "cancelled" and fetch.reason == "partner arrived by itself: 'CT HEAD' (ct1)"
    assert [(e.old_state, e.new_state) for e in fetch_events(sm, fetch.id)] == [
        (None, "waiting"),
        ("waiting", "cancelled"),
    ]


def test_prior_held_within_lookback_is_paired_and_not_fetched(tmp_path: Path) -> None:
    """A CT of 5 days ago is a usable partner of a rule that fetches priors up to 30 days old: the
    node does not fetch it again, and assemble pairs it although pair_window_hours is 24."""
    sm, stage, assemble, clock = make_env(tmp_path, closed_port())
    add_series(
        sm, "ct-old", "CT", study="s-old", study_dt=T0 - timedelta(days=5), series_description="CT HEAD"
    )
    add_series(sm, "mr1", "MR", series_description="T1 3D AX")
    clock.now = T0 + timedelta(minutes=20)
    stage.run_once()
    assemble.run_once()
    assert fetches(sm) == []
    with sm() as s:
        (job,) = s.scalars(select(Job)).all()
    assert (job.reference_series_uid, job.moving_series_uid) == ("mr1", "ct-old")


def test_without_fetch_missing_the_pair_window_stays_24_hours(tmp_path: Path) -> None:
    sm, stage, assemble, clock = make_env(tmp_path, closed_port(), enabled=False)
    add_series(sm, "ct-old", "CT", study="s-old", study_dt=T0 - timedelta(days=5))
    add_series(sm, "mr1", "MR")
    clock.now = T0 + timedelta(minutes=20)
    assert stage.run_once() == 0
    assemble.run_once()
    with sm() as s:
        assert s.scalars(select(Job)).all() == []


def test_prior_older_than_lookback_is_not_a_partner(tmp_path: Path) -> None:
    sm, stage, assemble, clock = make_env(tmp_path, closed_port(), lookback_days=3)
    old = T0 - timedelta(days=5)
    add_series(sm, "ct-old", "CT", study="s-old", study_dt=old, completed_at=old)
    add_series(sm, "mr1", "MR")
    clock.now = T0 + timedelta(minutes=1)
    stage.run_once()
    assemble.run_once()
    assert [f.anchor_series_uid for f in fetches(sm)] == ["mr1"]
    with sm() as s:
        assert s.scalars(select(Job)).all() == []


def test_the_wait_goes_on_while_the_wanted_modality_is_arriving(tmp_path: Path) -> None:
    sm, stage, _assemble, clock = make_env(tmp_path, closed_port(), wait_minutes=1)
    add_series(sm, "mr1", "MR")
    clock.now = T0 + timedelta(seconds=30)
    stage.run_once()
    add_series(sm, "ct-arriving", "CT", state="receiving")
    clock.now = T0 + timedelta(minutes=5)
    stage.run_once()
    assert [f.state for f in fetches(sm)] == ["waiting"]


def test_a_new_pet_waits_for_its_mr(tmp_path: Path) -> None:
    sm, stage, _assemble, clock = make_env(tmp_path, closed_port())
    stage.rules["mr-ct"] = stage.rules["mr-ct"].model_copy(update={"moving": "PT"})
    add_series(sm, "pt1", "PT", series_description="PET FDG AC")
    clock.now = T0 + timedelta(minutes=1)
    stage.run_once()
    (fetch,) = fetches(sm)
    assert (fetch.anchor_series_uid, fetch.anchor_modality, fetch.wanted_modality) == ("pt1", "PT", "MR")


def test_fetched_and_old_series_never_start_a_fetch(tmp_path: Path) -> None:
    sm, stage, _assemble, clock = make_env(tmp_path, closed_port(), max_age_hours=2)
    add_series(sm, "mr-fetched", "MR", study="s1")
    add_series(sm, "mr-old", "MR", study="s2")
    add_retrieve(sm, "mr-fetched", "s1", state="done")
    with sm() as s:
        old = s.scalar(select(Series).where(Series.series_instance_uid == "mr-old"))
        old.completed_at = T0 - timedelta(hours=3)
        s.commit()
    clock.now = T0 + timedelta(minutes=1)
    assert stage.discover() == 0


def test_query_rounds_back_off_then_give_up(tmp_path: Path) -> None:
    port = closed_port()
    sm, stage, _assemble, clock = make_env(tmp_path, port, wait_minutes=0)
    add_series(sm, "mr1", "MR")
    clock.now = T0 + timedelta(seconds=1)
    stage.run_once()
    (fetch,) = fetches(sm)
    assert fetch.state == "querying" and fetch.attempts == 1
    assert fetch.next_attempt_at == clock.now + timedelta(seconds=60)
    assert f"cannot connect to PACS@127.0.0.1:{port}" in (fetch.reason or "")
    clock.now += timedelta(seconds=30)
    stage.run_once()
    assert fetches(sm)[0].attempts == 1  # not due yet
    clock.now += timedelta(seconds=31)
    stage.run_once()
    (fetch,) = fetches(sm)
    assert fetch.state == "failed" and fetch.reason.startswith(
        "query failed 2 times, giving up: pacs: cannot connect"
    )
    with sm() as s:
        queries = s.scalars(select(PriorQuery)).all()
    assert [(q.level, q.state) for q in queries] == [("STUDY", "failed"), ("STUDY", "failed")]


def _study(uid: str, patient: str = "P1", issuer: str = "", date: str = "20240307") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient
    ds.IssuerOfPatientID = issuer
    ds.StudyInstanceUID = uid
    ds.StudyDate = date
    ds.StudyTime = "101500"
    return ds


def _series(uid: str, description: str, n: int, modality: str = "CT") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.SeriesInstanceUID = uid
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.NumberOfSeriesRelatedInstances = str(n)
    return ds


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the invalid values the peer sends
def test_hostile_answers_are_bounded_and_filtered(tmp_path: Path, pacs: ScriptedPacs) -> None:
    sm, stage, _assemble, clock = make_env(tmp_path, pacs.port, wait_minutes=0)
    pacs.studies = [
        _study("1.2.3.1", patient="P1*"),  # a PACS that took the ID as a pattern
        _study("1.2.3.2", issuer="OTHER"),  # another issuer's patient P1
        _study("not a uid"),
        _study("1.2.3.4"),
        *[_study(f"1.2.3.{n}") for n in range(5, 500)],
    ]
    pacs.series = {
        "1.2.3.4": [
            _series("1.2.3.4.1", "CT HEAD \x00\x1b[2J" + "x" * 5000, 120),
            _series("1.2.3.4.2", "MR sneaked in", 120, modality="MR"),
            _series("1" * 70, "too long a UID", 120),
        ]
    }
    add_series(sm, "mr1", "MR")
    clock.now = T0 + timedelta(seconds=1)
    stage.run_once()
    (fetch,) = fetches(sm)
    with sm() as s:
        study_q = s.scalar(select(PriorQuery).where(PriorQuery.level == "STUDY"))
        series_q = s.scalars(select(PriorQuery).where(PriorQuery.level == "SERIES")).all()
        retrieve = s.scalar(select(PriorRetrieve))
    # at most max_studies (5) matches are read; then the query is cancelled
    assert study_q.state == "done" and study_q.n_matches == 5
    assert pacs.finds.count("SERIES") == len(series_q) == 2  # studies 1.2.3.4 and 1.2.3.5
    chose = [e.reason for e in fetch_events(sm, fetch.id) if e.new_state == "retrieving"][0] or ""
    assert "1 candidate CT series" in chose and "(1.2.3.4.1) chosen" in chose
    assert retrieve is not None and retrieve.series_instance_uid == "1.2.3.4.1"
    assert "\x1b" not in chose and len(chose) < 1000
    with sm() as s:
        done = s.scalars(
            select(Event).where(Event.entity == "query", Event.new_state == "done").order_by(Event.id)
        )
        reasons = [e.reason or "" for e in done]
    assert "study 1.2.3.1: Patient ID differs" in reasons[0]
    assert "study 1.2.3.2: Issuer of Patient ID differs" in reasons[0]
    assert "a study match without a valid Study Instance UID" in reasons[0]
    assert "series 1.2.3.4.2: modality MR, not CT" in reasons[1]
    assert "a series match without a valid Series Instance UID" in reasons[1]


def test_chosen_series_already_held_is_not_fetched_again(tmp_path: Path, pacs: ScriptedPacs) -> None:
    sm, stage, _assemble, clock = make_env(tmp_path, pacs.port, wait_minutes=0)
    pacs.studies = [_study("1.2.3.4")]
    pacs.series = {"1.2.3.4": [_series("1.2.3.4.1", "CT HEAD", 120)]}
    add_series(sm, "mr1", "MR")
    clock.now = T0 + timedelta(seconds=1)
    stage.discover()
    with sm() as s:  # the wait is over and the query is about to run when the CT starts arriving
        s.get(PriorFetch, 1).state = "querying"
        s.commit()
    add_series(sm, "1.2.3.4.1", "CT", study="1.2.3.4", state="receiving", n_instances=7)
    stage.advance_fetches()
    (fetch,) = fetches(sm)
    assert fetch.state == "cancelled"
    assert fetch.reason.endswith("the node already holds it (receiving, 7 instances): not fetched again")
    assert pacs.moves == 0


def test_failed_retrieve_is_retried_with_backoff_then_fails(tmp_path: Path, pacs: ScriptedPacs) -> None:
    sm, stage, assemble, clock = make_env(tmp_path, pacs.port, wait_minutes=0)
    pacs.studies = [_study("1.2.3.4")]
    pacs.series = {"1.2.3.4": [_series("1.2.3.4.1", "CT HEAD", 120)]}
    add_series(sm, "mr1", "MR")
    clock.now = T0 + timedelta(seconds=1)
    stage.run_once()
    with sm() as s:
        r = s.scalar(select(PriorRetrieve))
    assert r is not None and (r.state, r.attempts, r.last_status) == ("pending", 1, 0xA801)
    assert r.next_attempt_at == clock.now + timedelta(seconds=60)
    assert "answered the C-MOVE with 0xA801" in (r.error or "")
    assert fetches(sm)[0].state == "retrieving"
    # while the retrieve is pending, a partial copy of the series is not paired by assemble
    add_series(sm, "1.2.3.4.1", "CT", study="1.2.3.4", study_dt=T0 - timedelta(days=5), n_instances=3)
    assemble.run_once()
    with sm() as s:
        assert s.scalars(select(Job)).all() == []
    clock.now += timedelta(seconds=61)
    stage.run_retrieves()
    with sm() as s:
        r = s.scalar(select(PriorRetrieve))
        events = s.scalars(select(Event).where(Event.entity == "retrieve").order_by(Event.id)).all()
    assert r is not None and (r.state, r.attempts) == ("failed", 2) and pacs.moves == 2
    assert [e.new_state for e in events] == ["pending", "running", "pending", "running", "failed"]
    assert "retry in 60 s" in (events[2].reason or "")
    (fetch,) = fetches(sm)
    assert fetch.state == "failed" and "answered the C-MOVE with 0xA801" in (fetch.reason or "")


def test_a_retrieve_whose_worker_stopped_is_taken_over_when_its_lease_expires(
    tmp_path: Path, pacs: ScriptedPacs
) -> None:
    sm, stage, _assemble, clock = make_env(tmp_path, pacs.port)
    add_series(sm, "mr1", "MR")
    add_retrieve(
        sm,
        "1.2.3.4.1",
        "1.2.3.4",
        state="running",
        attempts=1,
        lease_owner="other-host:123",
        lease_expires_at=T0 + timedelta(seconds=60),
    )
    clock.now = T0 + timedelta(seconds=30)
    assert stage.run_retrieves() == 0  # its worker may still be on it
    clock.now = T0 + timedelta(seconds=61)
    assert stage.run_retrieves() == 1
    assert pacs.moves == 1
    with sm() as s:
        r = s.scalar(select(PriorRetrieve))
        ev = s.scalars(select(Event).where(Event.entity == "retrieve").order_by(Event.id)).all()
    assert r is not None and (r.state, r.attempts) == ("failed", 2)  # max_attempts is 2 here
    assert ev[0].old_state == "running" and "attempt 2 (its previous worker stopped)" in (ev[0].reason or "")


def test_retrieved_series_is_complete_when_its_retrieve_is_done(tmp_path: Path) -> None:
    sm, _stage, assemble, clock = make_env(tmp_path, closed_port())
    add_series(sm, "ct1", "CT", state="receiving")
    add_retrieve(sm, "ct1", "s-today", state="done", finished_at=T0 + timedelta(seconds=1))
    clock.now = T0 + timedelta(seconds=2)  # long before series_stable_seconds (30)
    assert assemble.complete_stable_series() == 1
    with sm() as s:
        ev = s.scalars(select(Event).where(Event.entity == "series")).one()
    assert ev.reason.startswith("retrieve 1 from pacs done, every sub-operation answered")


def test_serve_stage_retrieve_as_its_own_process(tmp_path: Path) -> None:
    """`dicomnode serve --stage retrieve` works on the shared DB alone and stops cleanly on SIGTERM."""
    import subprocess
    import sys
    import time

    import yaml

    port = closed_port()
    cfg = {
        "storage": {"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path}/t.db"},
        "rules": [
            {"name": "mr-ct", "moving": "CT", "fetch_missing": {"enabled": True, "wait_minutes": 0}},
        ],
        "sources": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
        "retrieve": {"poll_seconds": 0.2, "backoff_initial_seconds": 0.2, "max_attempts": 2},
        "admin": {"http_port": 0},
    }
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(cfg))
    sm = make_sessionmaker(cfg["storage"]["database_url"])  # type: ignore[index]
    with sm() as s:
        now = utcnow()
        s.add(
            Series(
                series_instance_uid="mr1",
                study_instance_uid="s1",
                patient_key="P1",
                patient_id="P1",
                modality="MR",
                study_datetime=now,
                state="complete",
                n_instances=40,
                completed_at=now,
                last_received_at=now,
            )
        )
        s.commit()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dicomnode.cli",
            "--config",
            str(tmp_path / "node.yaml"),
            "serve",
            "--stage",
            "retrieve",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (fetches(sm) and fetches(sm)[0].state == "failed"):
            time.sleep(0.2)
        (fetch,) = fetches(sm)
        assert fetch.state == "failed" and "query failed 2 times, giving up" in (fetch.reason or "")
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]


def test_a_partner_arriving_while_a_retrieve_waits_for_its_retry_cancels_it(tmp_path: Path) -> None:
    sm, stage, _assemble, clock = make_env(tmp_path, closed_port())
    add_series(sm, "mr1", "MR")
    add_retrieve(sm, "1.2.3.4.1", "1.2.3.4", state="pending", attempts=1, next_attempt_at=T0)
    add_series(sm, "ct-sent", "CT", series_description="CT HEAD")
    clock.now = T0 + timedelta(seconds=1)
    assert stage.run_retrieves() == 1
    with sm() as s:
        r = s.scalar(select(PriorRetrieve))
    assert r is not None and r.state == "cancelled" and r.attempts == 1  # the source was not asked again
    (fetch,) = fetches(sm)
    assert (fetch.state, fetch.reason) == ("cancelled", "partner arrived by itself: 'CT HEAD' (ct-sent)")
