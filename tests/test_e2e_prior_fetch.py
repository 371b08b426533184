"""Fetching a missing partner from PACS, end to end: Orthanc holds last week's CT, the node gets the MR.

The node runs every stage in one process. Its rule ``mr-ct`` fetches missing partners from two
Orthanc sources, one by C-MOVE (the node is a modality Orthanc knows) and one by C-GET. Each
test uses its own patient; the fused series goes to the C-MOVE Orthanc as destination.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from dicomnode.admin import collect_status
from dicomnode.cli import main as cli_main
from dicomnode.config import Settings, load_settings
from dicomnode.db import Association, Event, Job, PriorFetch, PriorQuery, PriorRetrieve, Series
from dicomnode.node import Node
from dicomnode.testing import Grid, generate_ct_series, generate_study
from dicomnode.testing.generator import GeneratedSeries
from dicomnode.testing.peers import Orthanc, free_port, have_dcmtk, have_orthanc, storescu

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (have_orthanc() and have_dcmtk()), reason="needs Debian orthanc and dcmtk"),
]

TODAY = datetime(2024, 3, 12, 9, 30)
# Small grids coarse enough to be quick and fine enough for the rigid registration's pyramid.
MR_GRID = Grid(rows=64, columns=64, pixel_spacing=(3.5, 3.5), slice_spacing=4.0, n_slices=40)
CT_GRID = Grid(rows=72, columns=72, pixel_spacing=(3.2, 3.2), slice_spacing=3.0, n_slices=56)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def node_settings(
    tmp: Path, port: int, destination: int, sources: list[dict[str, Any]], db_url: str, **over: Any
) -> Settings:
    cfg: dict[str, Any] = dict(
        node={
            "ae_title": "DICOMNODE",
            "host": "127.0.0.1",
            "port": port,
            "allowed_calling_aets": ["SCANNER"],
        },
        storage={"spool_dir": str(tmp / "spool"), "database_url": db_url},
        assembly={"series_stable_seconds": 1, "poll_seconds": 0.2},
        rules=[
            {
                "name": "mr-ct",
                "reference": "MR",
                "moving": "CT",
                "fetch_missing": {"enabled": True, "lookback_days": 30, "wait_minutes": 0.02},
            }
        ],
        sources=sources,
        retrieve={"poll_seconds": 0.2, "backoff_initial_seconds": 0.5, "backoff_max_seconds": 1},
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": destination}],
        fusion={"device": "cpu", "batch_size": 8, "poll_seconds": 0.2},
        dispatch={"poll_seconds": 0.2, "backoff_initial_seconds": 0.5, "backoff_max_seconds": 2},
        admin={"http_port": 0},
    )
    cfg.update(over)
    return load_settings(None, **cfg)


def head_series(tmp: Path, modality: str, patient: str, seed: int, days_ago: int) -> GeneratedSeries:
    """The patient's MR or CT of the study ``days_ago`` days before today: each study has its own
    Study Instance UID and frame of reference."""
    return generate_study(
        tmp / patient / f"{modality}-{days_ago}",
        (modality,),
        grids={"MR": MR_GRID, "CT": CT_GRID},
        seed=seed,
        patient_id=patient,
        study_datetime=TODAY - timedelta(days=days_ago),
        study_instance_uid=f"1.2.826.0.1.3680043.10.543.{seed}.{days_ago}",
    ).series[modality]


def mr_today(tmp: Path, patient: str, seed: int) -> GeneratedSeries:
    return head_series(tmp, "MR", patient, seed, 0)


def ct_prior(tmp: Path, patient: str, seed: int) -> GeneratedSeries:
    """The patient's head CT of another study 5 days earlier."""
    return head_series(tmp, "CT", patient, seed, 5)


def fused_of(orthanc: Orthanc, patient: str) -> list[dict[str, Any]]:
    found = orthanc.rest(
        "/tools/find", "POST", {"Level": "Series", "Query": {"PatientID": patient}, "Expand": True}
    )
    return [s for s in found if s["MainDicomTags"].get("SeriesDescription", "").startswith("FUSED")]


def first_instance(orthanc: Orthanc, series: dict[str, Any]) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(orthanc.rest(f"/instances/{series['Instances'][0]}/file", raw=True)))


def fetch_of(node: Node, patient: str) -> PriorFetch | None:
    with node.sessionmaker() as s:
        return s.scalar(select(PriorFetch).where(PriorFetch.patient_key == patient))


def events_of(node: Node, entity: str, ids: list[int]) -> list[Event]:
    with node.sessionmaker() as s:
        return list(
            s.scalars(
                select(Event)
                .where(Event.entity == entity, Event.entity_id.in_([str(i) for i in ids]))
                .order_by(Event.id)
            )
        )


@dataclass
class Site:
    tmp: Path
    pacs_move: Orthanc
    pacs_get: Orthanc
    node: Node


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The in-process fuse stage registers every fetched prior; on a CPU shared with other busy
    processes one torch thread is several times faster than the default (see register_rigid)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, db_factory: Callable[[], str]) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("prior")
    port = free_port()
    known = {"dicomnode": ["DICOMNODE", "127.0.0.1", port]}
    pacs_move = Orthanc(tmp / "pacs-move", aet="ORTHANC", modalities=known).start()
    pacs_get = Orthanc(tmp / "pacs-get", aet="ARCHIVE", modalities=known).start()
    sources = [
        {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_move.dicom_port},
        {
            "name": "archive",
            "ae_title": "ARCHIVE",
            "host": "127.0.0.1",
            "port": pacs_get.dicom_port,
            "retrieve": "c-get",
        },
    ]
    node = Node(node_settings(tmp, port, pacs_move.dicom_port, sources, db_factory()))
    node.start()
    try:
        yield Site(tmp, pacs_move, pacs_get, node)
    finally:
        node.stop()
        pacs_move.stop()
        pacs_get.stop()


def check_fused_with_retrieved_ct(
    site: Site,
    patient: str,
    ct: GeneratedSeries,
    mr: GeneratedSeries,
    retrieved: GeneratedSeries | None = None,
) -> Job:
    """The fused MR+CT series is in Orthanc, registered, referencing both; ``retrieved`` (the CT by
    default) is held by the node with all its instances."""
    retrieved = retrieved or ct

    def arrived() -> list[dict[str, Any]]:
        with site.node.sessionmaker() as s:
            failed = s.scalar(select(Job).where(Job.patient_key == patient, Job.state == "failed"))
        assert failed is None, f"job {failed.id} failed: {failed.error}"
        return [s for s in fused_of(site.pacs_move, patient) if len(s["Instances"]) == len(mr.paths)]

    fused = wait_for(arrived, 180, f"the fused series of {patient} in Orthanc")
    assert len(fused) == 1
    desc = fused[0]["MainDicomTags"]["SeriesDescription"]
    assert desc.startswith("FUSED MR ") and " + CT " in desc and "REG" in desc.split()
    ds = first_instance(site.pacs_move, fused[0])
    referenced = {str(it.SeriesInstanceUID) for it in ds.ReferencedSeriesSequence}
    referenced |= {
        str(it.SeriesInstanceUID)
        for st in getattr(ds, "StudiesContainingOtherReferencedInstancesSequence", [])
        for it in st.ReferencedSeriesSequence
    }
    assert ct.series_instance_uid in referenced and mr.series_instance_uid in referenced
    with site.node.sessionmaker() as s:
        job = s.scalar(select(Job).where(Job.patient_key == patient))
        assert job is not None and job.state == "done"
        assert job.moving_series_uid == ct.series_instance_uid
        assert json.loads(job.details)["alignment"].startswith("different frames of reference: rigid")
        held = s.scalar(select(Series).where(Series.series_instance_uid == retrieved.series_instance_uid))
        assert held is not None and held.n_instances == len(retrieved.paths)
    return job


def test_missing_ct_is_fetched_by_c_move_and_fused(site: Site) -> None:
    patient = "PRIOR-MOVE"
    ct = ct_prior(site.tmp, patient, seed=11)
    assert site.pacs_move.upload(ct.paths) == len(ct.paths)
    mr = mr_today(site.tmp, patient, seed=11)
    res = storescu([mr.directory], site.node.settings.node.port, calling_aet="SCANNER")
    assert res.returncode == 0, res.stderr
    check_fused_with_retrieved_ct(site, patient, ct, mr)

    fetch = fetch_of(site.node, patient)
    assert fetch is not None and fetch.state == "retrieved"
    assert fetch.source == "pacs" and fetch.chosen_series_uid == ct.series_instance_uid
    with site.node.sessionmaker() as s:
        queries = s.scalars(select(PriorQuery).where(PriorQuery.fetch_id == fetch.id)).all()
        retrieves = s.scalars(select(PriorRetrieve).where(PriorRetrieve.fetch_id == fetch.id)).all()
        # the C-MOVE sub-operations came from the source's AE although only SCANNER is allowed
        assert any(
            a.calling_aet == "ORTHANC" and a.n_stored == len(ct.paths) for a in s.scalars(select(Association))
        )
    assert {(q.source, q.level, q.state) for q in queries} >= {
        ("pacs", "STUDY", "done"),
        ("pacs", "SERIES", "done"),
        ("archive", "STUDY", "done"),
    }
    assert [(r.method, r.state, r.n_completed, r.n_failed) for r in retrieves] == [
        ("c-move", "done", len(ct.paths), 0)
    ]
    changes = [(e.old_state, e.new_state) for e in events_of(site.node, "fetch", [fetch.id])]
    assert changes == [
        (None, "waiting"),
        ("waiting", "querying"),
        ("querying", "retrieving"),
        ("retrieving", "retrieved"),
    ]
    retrieve_events = events_of(site.node, "retrieve", [retrieves[0].id])
    assert [e.new_state for e in retrieve_events] == ["pending", "running", "done"]
    assert f"{len(ct.paths)} completed, 0 failed" in (retrieve_events[-1].reason or "")


def test_missing_ct_is_fetched_by_c_get_and_fused(site: Site) -> None:
    patient = "PRIOR-GET"
    ct = ct_prior(site.tmp, patient, seed=12)
    site.pacs_get.upload(ct.paths)
    mr = mr_today(site.tmp, patient, seed=12)
    assert storescu([mr.directory], site.node.settings.node.port, calling_aet="SCANNER").returncode == 0
    check_fused_with_retrieved_ct(site, patient, ct, mr)
    fetch = fetch_of(site.node, patient)
    assert fetch is not None and fetch.state == "retrieved" and fetch.source == "archive"
    with site.node.sessionmaker() as s:
        r = s.scalar(select(PriorRetrieve).where(PriorRetrieve.fetch_id == fetch.id))
        assert r is not None and (r.method, r.state, r.n_completed) == ("c-get", "done", len(ct.paths))
        # stored by the receive stage's path: indexed, on an association recorded for the C-GET
        get_assoc = s.scalars(select(Association).where(Association.calling_aet == "ARCHIVE")).all()
        assert len(get_assoc) == 1 and get_assoc[0].n_stored == len(ct.paths)
    spool = Path(site.node.settings.storage.spool_dir)
    stored = list((spool / "incoming").rglob("*.dcm"))
    from_get = [p for p in stored if ct.series_instance_uid in str(p)]
    assert len(from_get) == len(ct.paths)
    meta = pydicom.dcmread(from_get[0], stop_before_pixels=True).file_meta
    assert meta.SourceApplicationEntityTitle.strip() == "ARCHIVE"


def test_a_new_ct_without_its_mr_fetches_the_mr(site: Site) -> None:
    """The other way round: the CT arrives today, the MR of 5 days ago is in PACS and is fetched."""
    patient = "PRIOR-MR"
    mr = head_series(site.tmp, "MR", patient, seed=16, days_ago=5)
    site.pacs_move.upload(mr.paths)
    ct = head_series(site.tmp, "CT", patient, seed=16, days_ago=0)
    assert storescu([ct.directory], site.node.settings.node.port, calling_aet="SCANNER").returncode == 0
    check_fused_with_retrieved_ct(site, patient, ct, mr, retrieved=mr)
    fetch = fetch_of(site.node, patient)
    assert fetch is not None and (fetch.anchor_modality, fetch.wanted_modality) == ("CT", "MR")
    assert fetch.state == "retrieved" and fetch.chosen_series_uid == mr.series_instance_uid


def test_no_prior_ends_the_wait_with_a_reason(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    patient = "PRIOR-NONE"
    mr = mr_today(site.tmp, patient, seed=13)
    assert storescu([mr.directory], site.node.settings.node.port, calling_aet="SCANNER").returncode == 0
    fetch = wait_for(
        lambda: (f := fetch_of(site.node, patient)) is not None and f.state == "not_found" and f,
        90,
        "the fetch to end with no partner found",
    )
    assert "no source holds a CT series of the patient dated 2024-02-11..2024-03-12" in fetch.reason
    with site.node.sessionmaker() as s:
        assert s.scalar(select(Job).where(Job.patient_key == patient)) is None
        assert collect_status(s)["fetches"]["not_found"] >= 1
    cfg = site.tmp / "cli.yaml"
    cfg.write_text(f"storage: {{database_url: '{site.node.settings.storage.database_url}'}}\n")
    assert cli_main(["--config", str(cfg), "status"]) == 0
    out = capsys.readouterr().out
    assert "recent fetches of missing series" in out and "not_found" in out and "no source holds a CT" in out


def test_of_two_candidates_the_head_ct_is_chosen_and_the_audit_says_why(site: Site) -> None:
    patient = "PRIOR-TWO"
    ct = ct_prior(site.tmp, patient, seed=14)
    scout = generate_ct_series(
        site.tmp / patient / "scout",
        n_slices=2,
        rows=32,
        columns=32,
        seed=14,
        patient_id=patient,
        study_datetime=TODAY - timedelta(days=5),
        study_instance_uid=f"1.2.826.0.1.3680043.10.543.{14}.5",
    )
    for path in scout.paths:
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = "Topogram 0.6 T20f"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(path)
    site.pacs_move.upload([*scout.paths, *ct.paths])
    mr = mr_today(site.tmp, patient, seed=14)
    assert storescu([mr.directory], site.node.settings.node.port, calling_aet="SCANNER").returncode == 0
    check_fused_with_retrieved_ct(site, patient, ct, mr)
    fetch = fetch_of(site.node, patient)
    assert fetch is not None and fetch.chosen_series_uid == ct.series_instance_uid
    chose = [e for e in events_of(site.node, "fetch", [fetch.id]) if e.new_state == "retrieving"][
        0
    ].reason or ""
    assert "2 candidate CT series" in chose
    assert f"'CT HEAD' ({ct.series_instance_uid[-12:]}) chosen" in chose
    assert (
        f"not eligible: 'Topogram 0.6 T20f' ({scout.series_instance_uid[-12:]}) excluded by pattern" in chose
    )
    with site.node.sessionmaker() as s:
        assert s.scalar(select(Series).where(Series.series_instance_uid == scout.series_instance_uid)) is None


def test_pacs_down_during_the_query_then_a_failing_move_are_retried(tmp_path: Path, db_url: str) -> None:
    """The PACS is down at the first query rounds (retried with backoff); once back it answers the
    queries, but its C-MOVE fails (it knows the node at a wrong port) until its admin fixes that."""
    patient = "PRIOR-DOWN"
    port = free_port()
    pacs = Orthanc(
        tmp_path / "pacs", modalities={"dicomnode": ["DICOMNODE", "127.0.0.1", free_port()]}
    ).start()
    node: Node | None = None
    try:
        ct = ct_prior(tmp_path, patient, seed=15)
        pacs.upload(ct.paths)
        pacs.stop()
        source = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}
        # Fusing a fetched prior is shown above; here the retries matter, up to the job they lead to.
        node = Node(
            node_settings(tmp_path, port, pacs.dicom_port, [source], db_url),
            ("receive", "assemble", "retrieve"),
        )
        node.start()
        mr = mr_today(tmp_path, patient, seed=15)
        assert storescu([mr.directory], port, calling_aet="SCANNER").returncode == 0

        def retried() -> bool:
            f = fetch_of(node, patient)  # type: ignore[arg-type]
            return f is not None and f.state == "querying" and f.attempts >= 2

        wait_for(retried, 90, "two failed query rounds while the PACS is down")
        fetch = fetch_of(node, patient)
        assert fetch is not None and "cannot connect to ORTHANC@127.0.0.1" in (fetch.reason or "")
        pacs.start()

        def move_failed() -> PriorRetrieve | None:
            with node.sessionmaker() as s:  # type: ignore[union-attr]
                r = s.scalar(select(PriorRetrieve).where(PriorRetrieve.patient_key == patient))
            return r if r is not None and r.attempts >= 1 and r.state == "pending" else None

        failed = wait_for(move_failed, 90, "a failed C-MOVE attempt waiting for its retry")
        assert failed.error and "answered the C-MOVE with 0x" in failed.error
        pacs.rest("/modalities/dicomnode", "PUT", {"AET": "DICOMNODE", "Host": "127.0.0.1", "Port": port})

        def job() -> Job | None:
            with node.sessionmaker() as s:  # type: ignore[union-attr]
                return s.scalar(select(Job).where(Job.patient_key == patient))

        created = wait_for(job, 90, "the MR+CT job after the retrieve")
        assert (created.reference_series_uid, created.moving_series_uid) == (
            mr.series_instance_uid,
            ct.series_instance_uid,
        )
        fetch = fetch_of(node, patient)
        assert fetch is not None and fetch.state == "retrieved"
        with node.sessionmaker() as s:
            states = [q.state for q in s.scalars(select(PriorQuery).where(PriorQuery.level == "STUDY"))]
            r = s.scalar(select(PriorRetrieve).where(PriorRetrieve.fetch_id == fetch.id))
        assert states.count("failed") >= 2 and states[-1] == "done"
        assert r is not None and r.state == "done" and r.attempts >= 2
        reasons = [e.reason or "" for e in events_of(node, "fetch", [fetch.id])]
        assert any("query attempt 1 of 8 failed" in r and "retry in" in r for r in reasons)
        retrieve_reasons = [e.reason or "" for e in events_of(node, "retrieve", [r.id])]
        assert any("retrieve failed (attempt 1 of 8)" in x and "retry in" in x for x in retrieve_reasons)
    finally:
        if node is not None:
            node.stop()
        pacs.stop()
