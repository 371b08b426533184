"""End to end with real peers: storescu (scanner) -> dicomnode -> Orthanc (PACS).

A generated head study (MR, CT, PET; one frame of reference) is sent by dcmtk storescu to the node
running all stages in one process. Orthanc must end up holding one fused Secondary Capture series
per rule, in the same patient and study, one instance per MR slice, referencing the sources,
dciodvfy-clean, and with each source's contribution at the right place in the pixels.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import func, select

from dicomnode.admin import collect_status
from dicomnode.cli import main as cli_main
from dicomnode.config import Settings, load_settings
from dicomnode.db import Association, Delivery, Event, Instance, Job
from dicomnode.node import Node
from dicomnode.testing import GeneratedStudy, generate_study
from dicomnode.testing.peers import Orthanc, echoscu, free_port, have_dcmtk, have_orthanc, storescu

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.both_backends,
    pytest.mark.skipif(not (have_orthanc() and have_dcmtk()), reason="needs Debian orthanc and dcmtk"),
]


def node_settings(tmp: Path, pacs_port: int, db_url: str, **over: object) -> Settings:
    cfg: dict[str, object] = dict(
        node={"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port()},
        storage={"spool_dir": str(tmp / "spool"), "database_url": db_url},
        assembly={"series_stable_seconds": 1, "poll_seconds": 0.2},
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}],
        fusion={"device": "cpu", "batch_size": 8, "poll_seconds": 0.2},
        dispatch={"poll_seconds": 0.2, "backoff_initial_seconds": 0.5, "backoff_max_seconds": 2},
        admin={"http_port": free_port()},
    )
    cfg.update(over)
    return load_settings(None, **cfg)


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def fused_series(orthanc: Orthanc) -> dict[str, dict]:
    out = {}
    for s in orthanc.rest("/series?expand"):
        desc = s["MainDicomTags"].get("SeriesDescription", "")
        if desc.startswith("FUSED"):
            out[desc] = s
    return out


def download(orthanc: Orthanc, instance_id: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(orthanc.rest(f"/instances/{instance_id}/file", raw=True)))


class Run:
    study: GeneratedStudy
    orthanc: Orthanc
    node: Node
    tmp: Path
    series: dict[str, dict]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, db_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    r = Run()
    r.tmp = tmp
    r.study = generate_study(
        tmp / "study",
        modalities=("MR", "CT", "PT"),
        scale=0.25,
        seed=3,
        patient_id="E2E-0001",
        patient_name="Endto^End",
    )
    r.orthanc = Orthanc(tmp / "orthanc").start()
    r.node = Node(node_settings(tmp, r.orthanc.dicom_port, db_factory()))
    r.node.start()
    try:
        res = storescu([tmp / "study"], r.node.settings.node.port, calling_aet="SCANNER")
        assert res.returncode == 0, res.stderr
        n_mr = len(r.study.series["MR"].paths)

        def arrived():  # type: ignore[no-untyped-def]
            found = fused_series(r.orthanc)
            ok = len(found) == 2 and all(len(s["Instances"]) == n_mr for s in found.values())
            return found if ok else None

        r.series = wait_for(arrived, 240, "two fused series in Orthanc")
        yield r
    finally:
        r.node.stop()
        r.orthanc.stop()


def test_fused_series_in_same_patient_and_study(run: Run):
    assert len(run.series) == 2
    descs = sorted(run.series)
    assert descs[0].startswith("FUSED MR T1 3D AX + CT HEAD [")
    assert descs[1].startswith("FUSED MR T1 3D AX + PT PET FDG AC [")
    n_mr = len(run.study.series["MR"].paths)
    for s in run.series.values():
        study = run.orthanc.rest(f"/studies/{s['ParentStudy']}")
        assert study["MainDicomTags"]["StudyInstanceUID"] == run.study.study_instance_uid
        assert study["PatientMainDicomTags"]["PatientID"] == "E2E-0001"
        assert len(s["Instances"]) == n_mr
    # the sources are in the same Orthanc study? No: only the fused series were pushed, but the
    # study UID equality above is what makes PACS show them beside the originals.


def test_references_geometry_and_order(run: Run):
    mr_uids = [
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in run.study.series["MR"].paths
    ]
    for desc, s in run.series.items():
        moving = "CT" if "+ CT " in desc else "PT"
        mov_series_uid = run.study.series[moving].series_instance_uid
        seen = []
        for iid in s["Instances"]:
            ds = download(run.orthanc, iid)
            assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
            refs = [str(it.ReferencedSOPInstanceUID) for it in ds.SourceImageSequence]
            assert refs[0] in mr_uids
            seen.append((int(ds.InstanceNumber), refs[0]))
            series_refs = {str(it.SeriesInstanceUID) for it in ds.ReferencedSeriesSequence}
            assert run.study.series["MR"].series_instance_uid in series_refs
            assert mov_series_uid in series_refs or any(
                str(it.SeriesInstanceUID) == mov_series_uid
                for st in getattr(ds, "StudiesContainingOtherReferencedInstancesSequence", [])
                for it in st.ReferencedSeriesSequence
            )
            assert ds.PhotometricInterpretation == ("MONOCHROME2" if moving == "CT" else "RGB")
        seen.sort()
        assert [n for n, _ in seen] == list(range(1, len(mr_uids) + 1))
        assert sorted(u for _, u in seen) == sorted(mr_uids)  # one output per reference slice


def test_dciodvfy_clean(run: Run, tmp_path: Path):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    for s in run.series.values():
        path = tmp_path / "x.dcm"
        path.write_bytes(run.orthanc.rest(f"/instances/{s['Instances'][0]}/file", raw=True))
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
        assert errors == []


def _patient_points(mr_header: pydicom.Dataset, rows: int, cols: int) -> np.ndarray:
    pos = np.array([float(v) for v in mr_header.ImagePositionPatient])
    iop = np.array([float(v) for v in mr_header.ImageOrientationPatient])
    dr, dc = (float(v) for v in mr_header.PixelSpacing)
    j, i = np.mgrid[0:rows, 0:cols]
    return pos + i[..., None] * iop[:3] * dc + j[..., None] * iop[3:] * dr


def _slices(run: Run, desc_prefix: str):  # type: ignore[no-untyped-def]
    """(fused pixels, MR pixels, patient points) for every fused instance of one series."""
    mr = {}
    for p in run.study.series["MR"].paths:
        ds = pydicom.dcmread(p)
        mr[str(ds.SOPInstanceUID)] = ds
    s = next(v for k, v in run.series.items() if k.startswith(desc_prefix))
    for iid in s["Instances"]:
        fused = download(run.orthanc, iid)
        ref = mr[str(fused.SourceImageSequence[0].ReferencedSOPInstanceUID)]
        px = fused.pixel_array.astype(np.float32)
        yield px, ref.pixel_array.astype(np.float32), _patient_points(ref, px.shape[0], px.shape[1])


def test_ct_skull_is_visible_where_the_skull_is(run: Run):
    phantom = run.study.phantom
    fused_skull, fused_brain, mr_skull, mr_brain = [], [], [], []
    for px, mr_px, pts in _slices(run, "FUSED MR T1 3D AX + CT"):
        labels = phantom.labels(pts)
        skull, brain = labels == 2, np.isin(labels, (3, 4))
        if skull.sum() < 5 or brain.sum() < 5:
            continue
        fused_skull.append(px[skull].mean())
        fused_brain.append(px[brain].mean())
        mr_skull.append(mr_px[skull].mean())
        mr_brain.append(mr_px[brain].mean())
    assert len(fused_skull) >= 3
    # In T1 MR the cortical bone is dark; after fusion with CT it is the brightest structure.
    assert np.mean(mr_skull) < np.mean(mr_brain)
    assert np.mean(fused_skull) > np.mean(fused_brain) + 40


def test_pet_lesion_is_hot_at_the_lesion(run: Run):
    phantom = run.study.phantom
    found = 0
    for px, _mr, pts in _slices(run, "FUSED MR T1 3D AX + PT"):
        lesion = phantom.lesion_mask(pts)
        labels = phantom.labels(pts)
        brain = np.isin(labels, (3, 4)) & ~lesion
        # keep only the lesion core (the PET blur spreads its rim)
        dist = np.linalg.norm(pts - phantom.lesion_center_mm, axis=-1)
        core = lesion & (dist < phantom.lesion_radius_mm * 0.6)
        if core.sum() < 2:
            continue
        found += 1
        luma = px @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        assert luma[core].mean() > luma[brain].mean() + 40
        # Hot Iron: red rises first, green only for high uptake: the lesion is yellow-white where
        # the brain is red, and never blue-tinted
        assert px[core][:, 1].mean() > px[brain][:, 1].mean() + 40
        assert px[core][:, 0].mean() >= px[core][:, 2].mean()
    assert found >= 1, "no fused slice crosses the lesion core"


def test_audit_and_status(run: Run, capsys: pytest.CaptureFixture[str]):
    n_total = sum(len(s.paths) for s in run.study.series.values())
    n_mr = len(run.study.series["MR"].paths)
    sm = run.node.sessionmaker

    def all_sent():  # type: ignore[no-untyped-def]
        with sm() as s:
            st = collect_status(s)
        return st if st["deliveries"]["sent"] == 2 * n_mr else None

    st = wait_for(all_sent, 60, "deliveries marked sent")
    assert st["jobs"]["done"] == 2 and st["jobs"]["failed"] == 0
    assert st["series"]["complete"] == 3
    with sm() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == n_total
        assocs = s.scalars(select(Association).where(Association.direction == "in")).all()
        assert any(a.calling_aet == "SCANNER" and a.n_stored == n_total for a in assocs)
        for entity in ("association", "series", "job", "output", "delivery"):
            assert s.scalar(select(func.count()).select_from(Event).where(Event.entity == entity)) > 0, entity
        jobs = s.scalars(select(Job)).all()
        assert all(j.method and j.output_series_uid for j in jobs)
        assert all(json.loads(j.details)["alignment"].startswith("same frame of reference") for j in jobs)
        assert (
            s.scalar(select(func.count()).select_from(Delivery).where(Delivery.state == "sent")) == 2 * n_mr
        )
    # the admin CLI reads the same DB
    db_url = run.node.settings.storage.database_url
    cfg = run.tmp / "cli.yaml"
    cfg.write_text(f"storage: {{database_url: '{db_url}', spool_dir: '{run.tmp / 'spool'}'}}\n")
    assert cli_main(["--config", str(cfg), "status", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["jobs"]["done"] == 2 and 0 < len(out["events"]) <= 20
    assert all(
        e["entity"] not in ("instance", "output", "delivery") for e in out["events"]
    )  # milestones only
    assert cli_main(["--config", str(cfg), "status"]) == 0
    text = capsys.readouterr().out
    assert "jobs" in text and "done=2" in text and "events (per-instance events left out)" in text


def test_echo_both_ways(run: Run, capsys: pytest.CaptureFixture[str]):
    res = echoscu(run.node.settings.node.port, called_aet="DICOMNODE")
    assert res.returncode == 0, res.stderr
    assert cli_main(["echo", f"ORTHANC@127.0.0.1:{run.orthanc.dicom_port}"]) == 0
    assert "success" in capsys.readouterr().out
    assert cli_main(["echo", f"ORTHANC@127.0.0.1:{free_port()}"]) == 1


def test_http_status(run: Run):
    import urllib.request

    port = run.node.http.port  # type: ignore[union-attr]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as resp:
        st = json.loads(resp.read())
    assert st["jobs"]["done"] == 2
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert 'dicomnode_jobs{state="done"} 2' in resp.read().decode()


def test_orthanc_down_while_dispatching_then_delivered(tmp_path: Path, db_url: str):
    """The PACS is down when the fused series is ready; it is delivered once the PACS is back."""
    study = generate_study(tmp_path / "study", modalities=("MR", "CT"), scale=0.2, seed=5)
    pacs_port = free_port()
    node = Node(node_settings(tmp_path, pacs_port, db_url))
    node.start()
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=pacs_port)
    try:
        assert storescu([tmp_path / "study"], node.settings.node.port).returncode == 0
        n_mr = len(study.series["MR"].paths)

        def failed_attempts():  # type: ignore[no-untyped-def]
            with node.sessionmaker() as s:
                rows = s.scalars(select(Delivery)).all()
                return len(rows) == n_mr and all(d.attempts >= 2 and d.state == "pending" for d in rows)

        wait_for(failed_attempts, 120, "delivery attempts against the stopped PACS")
        with node.sessionmaker() as s:
            d = s.scalars(select(Delivery)).first()
            assert d.last_error  # the reason is recorded
        orthanc.start()
        wait_for(
            lambda: (
                len(fused_series(orthanc)) == 1
                and len(next(iter(fused_series(orthanc).values()))["Instances"]) == n_mr
            ),
            60,
            "delivery after the PACS came back",
        )

        def all_sent():  # type: ignore[no-untyped-def]
            # Orthanc lists an instance before the node has committed the C-STORE response it got
            with node.sessionmaker() as s:
                rows = s.scalars(select(Delivery)).all()
                return len(rows) == n_mr and all(d.state == "sent" for d in rows)

        wait_for(all_sent, 30, "every delivery recorded as sent")
    finally:
        node.stop()
        orthanc.stop()
