"""What the radiologist and the PACS see, end to end: scanner (storescu) -> dicomnode -> two PACS.

One node run serves the module: a Japanese study in ``\\ISO 2022 IR 87`` (MR, CT, PET), a Korean
one in UTF-8 and a Chinese one in GB18030 (MR, CT) go to the node; the fused series go to an
Orthanc over C-STORE (with its REST API as the capability to list and delete series, and the web
viewer plugin) and to a second Orthanc over DICOMweb STOW-RS with basic auth. The PACS already
holds a series numbered 9100 in the Japanese study, which the node never saw. Then a better CT
arrives for the Japanese patient: the re-fusion replaces the first MR+CT series, which is deleted
from the Orthanc that allows it and left in the other. Every fused instance is checked with
dciodvfy; the web viewer shows the fused series beside its MR in headless Chromium.
"""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid
from sqlalchemy import select
from test_e2e_pipeline import node_settings, wait_for

from dicomnode.db import Delivery, Event, Job, SeriesRemoval
from dicomnode.node import Node
from dicomnode.testing import GeneratedStudy, generate_ct_series, generate_study
from dicomnode.testing.charsets import CharsetCase, case
from dicomnode.testing.peers import Orthanc, have_dcmtk, have_orthanc_plugin, storescu

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (have_orthanc_plugin("dicomweb", "webviewer") and have_dcmtk()),
        reason="needs Debian orthanc with orthanc-dicomweb and orthanc-webviewer, and dcmtk",
    ),
]

USER, PASSWORD = "dicomnode", "pacs-secret"
EXTRA = {"PatientBirthTime": "093000", "OtherPatientNames": "Yamada^Taro", "PatientComments": "閉所恐怖症"}


class Run:
    """The module's node run and what it produced."""

    tmp: Path
    pacs: Orthanc  # C-STORE + REST capability + web viewer
    web: Orthanc  # DICOMweb STOW-RS with basic auth
    node: Node
    studies: dict[str, GeneratedStudy]
    foreign_series_uid: str
    first_ct_series: str  # the Japanese MR+CT series the re-fusion replaced
    refused_ct_series: str
    db_factory: Callable[[], str]  # fresh databases on the backend under test


def _fused(orthanc: Orthanc) -> list[dict]:
    return [
        s
        for s in orthanc.rest("/series?expand")
        if s["MainDicomTags"].get("SeriesDescription", "").startswith("FUSED")
    ]


def _complete(orthanc: Orthanc, n_series: int, sizes: dict[str, int]) -> bool:
    found = _fused(orthanc)
    if len(found) != n_series:
        return False
    for s in found:
        study = orthanc.rest(f"/studies/{s['ParentStudy']}")
        if len(s["Instances"]) != sizes[study["MainDicomTags"]["StudyInstanceUID"]]:
            return False
    return True


def _all_sent(node: Node) -> bool:
    with node.sessionmaker() as s:
        states = set(s.scalars(select(Delivery.state)).all())
    return states == {"sent"}


def _foreign_series(study: GeneratedStudy, folder: Path) -> tuple[Path, str]:
    """A series the PACS holds in the study but the node never receives, numbered 9100."""
    ds = pydicom.dcmread(study.series["MR"].paths[0])
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesNumber = 9100
    ds.SeriesDescription = "KEY IMAGES"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "foreign.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, str(ds.SeriesInstanceUID)


def _study(
    tmp: Path, key: str, c: CharsetCase, modalities: tuple[str, ...], seed: int, extra: dict | None = None
) -> GeneratedStudy:
    """A small study of one patient whose name and study description are in ``c``'s character set."""
    return generate_study(
        tmp / key,
        modalities,
        scale=0.25,
        seed=seed,
        patient_id=f"{key.upper()}-0001",
        patient_name=c.patient_name,
        specific_character_set=list(c.charset),
        extra_attributes={**(extra or {}), "StudyDescription": c.description},
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, db_factory: Callable[[], str]) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("clinical")
    r = Run()
    r.tmp = tmp
    r.db_factory = db_factory
    jp, kr, cn = case("japanese-ir87"), case("korean-utf8"), case("chinese-gb18030")
    r.studies = {
        "jp": _study(tmp, "jp", jp, ("MR", "CT", "PT"), 11, EXTRA),
        "kr": _study(tmp, "kr", kr, ("MR", "CT"), 12),
        "cn": _study(tmp, "cn", cn, ("MR", "CT"), 13),
    }
    # the Korean CT already carries the number the MR+CT rule would start at
    for path in r.studies["kr"].series["CT"].paths:
        ds = pydicom.dcmread(path)
        ds.SeriesNumber = 9100
        ds.save_as(path)
    r.pacs = Orthanc(tmp / "pacs", plugins=("dicomweb", "webviewer"), stop_graceful=False).start()
    r.web = Orthanc(
        tmp / "web", aet="WEBPACS", plugins=("dicomweb",), users={USER: PASSWORD}, stop_graceful=False
    ).start()
    try:
        foreign, r.foreign_series_uid = _foreign_series(r.studies["jp"], tmp / "foreign")
        r.pacs.rest("/instances", "POST", foreign.read_bytes())
        # the sources are in the PACS too, so the viewer shows the fused series beside them
        assert storescu([tmp / "jp"], r.pacs.dicom_port, called_aet="ORTHANC").returncode == 0
        destinations = [
            {
                "name": "pacs",
                "ae_title": "ORTHANC",
                "host": "127.0.0.1",
                "port": r.pacs.dicom_port,
                "orthanc": {"url": r.pacs.url},
            },
            {
                "name": "web",
                "type": "dicomweb",
                "url": r.web.dicomweb_url,
                "username": USER,
                "password": PASSWORD,
            },
        ]
        r.node = Node(
            node_settings(
                tmp,
                r.pacs.dicom_port,
                db_factory(),
                destinations=destinations,
                output={"replace_previous": True},
                # a series is complete after 3 quiet seconds: storescu pauses longer on a loaded machine
                assembly={"series_stable_seconds": 3, "poll_seconds": 0.2},
            )
        )
        r.node.start()
        sizes = {st.study_instance_uid: len(st.series["MR"].paths) for st in r.studies.values()}
        for key in ("jp", "kr", "cn"):
            res = storescu([tmp / key], r.node.settings.node.port, calling_aet="SCANNER")
            assert res.returncode == 0, res.stderr
        wait_for(lambda: _complete(r.pacs, 4, sizes) and _complete(r.web, 4, sizes), 300, "four fused series")
        wait_for(lambda: _all_sent(r.node), 60, "deliveries recorded")
        r.first_ct_series = next(
            s["MainDicomTags"]["SeriesInstanceUID"]
            for s in _fused(r.pacs)
            if s["MainDicomTags"]["SeriesNumber"] == "9101"
            and "+ CT" in s["MainDicomTags"]["SeriesDescription"]
            and r.pacs.rest(f"/studies/{s['ParentStudy']}")["MainDicomTags"]["StudyInstanceUID"]
            == r.studies["jp"].study_instance_uid
        )
        # a better CT of the Japanese patient arrives later: the MR+CT fusion is done again
        better = generate_ct_series(
            tmp / "jp-ct2",
            n_slices=40,
            rows=64,
            columns=64,
            seed=11,
            patient_id="JP-0001",
            patient_name=jp.patient_name,
            study_instance_uid=r.studies["jp"].study_instance_uid,
            frame_of_reference_uid=r.studies["jp"].frame_of_reference_uid,
            specific_character_set=list(jp.charset),
            extra_attributes={**EXTRA, "StudyDescription": jp.description},
        )
        for path in better.paths:
            ds = pydicom.dcmread(path)
            ds.SeriesDescription, ds.SeriesNumber = "CT BRAIN STD", 6
            ds.save_as(path)
        assert storescu([better.directory], r.node.settings.node.port).returncode == 0

        def replaced() -> bool:
            with r.node.sessionmaker() as s:
                rows = s.scalars(select(SeriesRemoval)).all()
            return len(rows) == 2 and all(row.state != "pending" for row in rows)

        wait_for(replaced, 300, "the re-fusion delivered and the replaced series settled")
        wait_for(lambda: _complete(r.web, 5, sizes), 60, "five fused series at the DICOMweb PACS")
        yield r
    finally:
        if hasattr(r, "node"):
            r.node.stop()
        r.pacs.stop()
        r.web.stop()


def _by_number(orthanc: Orthanc, study_uid: str) -> dict[int, dict]:
    study_id = orthanc.rest("/tools/lookup", "POST", study_uid.encode())[0]["ID"]
    return {int(s["MainDicomTags"]["SeriesNumber"]): s for s in orthanc.rest(f"/studies/{study_id}/series")}


def _download(orthanc: Orthanc, instance_id: str) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(orthanc.file(instance_id)))


def _tags(orthanc: Orthanc, series: dict) -> dict:
    return orthanc.instance_tags(series["Instances"][0])


def test_no_job_failed_and_every_character_set_reads_as_the_source(run: Run) -> None:
    with run.node.sessionmaker() as s:
        jobs = s.scalars(select(Job)).all()
    # a series completed early on a loaded machine gets a new generation: its job is superseded
    assert {j.state for j in jobs} <= {"done", "superseded"}
    assert len([j for j in jobs if j.state == "done"]) == 5
    for key, c in (("jp", "japanese-ir87"), ("kr", "korean-utf8"), ("cn", "chinese-gb18030")):
        study = run.studies[key]
        series = _by_number(run.pacs, study.study_instance_uid)
        fused = [s for s in series.values() if s["MainDicomTags"]["SeriesDescription"].startswith("FUSED")]
        source = pydicom.dcmread(study.series["MR"].paths[0], stop_before_pixels=True)
        for s in fused:
            ds = _download(run.pacs, s["Instances"][0])
            assert ds.get("SpecificCharacterSet") == source.get("SpecificCharacterSet")
            assert ds.get_item("PatientName").value == source.get_item("PatientName").value
            assert str(ds.PatientName).rstrip("=") == case(c).patient_name.rstrip("=")
            assert _tags(run.pacs, s)["PatientName"].rstrip("=") == case(c).patient_name.rstrip("=")
            assert _tags(run.pacs, s)["StudyDescription"] == case(c).description
    # the DICOMweb PACS shows the same names
    for s in _fused(run.web):
        assert _tags(run.web, s)["PatientName"].split("=")[0] in {
            "Yamada^Tarou",
            "Hong^Gildong",
            "Wang^XiaoDong",
        }


def test_patient_and_study_modules_are_complete(run: Run) -> None:
    study = run.studies["jp"]
    for s in _fused(run.pacs):
        ds = _download(run.pacs, s["Instances"][0])
        if ds.StudyInstanceUID != study.study_instance_uid:
            continue
        assert (str(ds.PatientBirthTime), str(ds.OtherPatientNames), ds.PatientComments) == (
            "093000",
            "Yamada^Taro",
            "閉所恐怖症",
        )
        assert (ds.PatientAge, str(ds.PatientWeight), ds.AccessionNumber) == (
            "066Y",
            "78",
            ds.AccessionNumber,
        )
        assert ds.StudyDescription == "頭部 MRI"


def test_series_numbers_collide_with_nothing_in_the_study_and_are_stable_per_rule(run: Run) -> None:
    jp = _by_number(run.pacs, run.studies["jp"].study_instance_uid)
    # 9100 is the PACS's own series; the first MR+CT took 9101 and was deleted; the re-fusion 9102
    assert jp[9100]["MainDicomTags"]["SeriesDescription"] == "KEY IMAGES"
    assert 9101 not in jp
    assert jp[9102]["MainDicomTags"]["SeriesDescription"].startswith("FUSED MR")
    assert jp[9200]["MainDicomTags"]["SeriesDescription"].startswith("FUSED MR T1 3D AX + PT PET FDG AC [")
    kr = _by_number(run.pacs, run.studies["kr"].study_instance_uid)
    assert kr[9101]["MainDicomTags"]["SeriesDescription"].startswith("FUSED MR T1 3D AX + CT HEAD [")
    cn = _by_number(run.pacs, run.studies["cn"].study_instance_uid)
    assert cn[9100]["MainDicomTags"]["SeriesDescription"].startswith("FUSED MR T1 3D AX + CT HEAD [")
    with run.node.sessionmaker() as s:
        numbers = {
            (j.rule_name, j.output_series_number) for j in s.scalars(select(Job).where(Job.state == "done"))
        }
    assert numbers == {("mr-ct", 9101), ("mr-ct", 9102), ("mr-pet", 9200), ("mr-ct", 9100)}


def test_descriptions_name_sources_method_notice_and_replacement(run: Run) -> None:
    jp = _by_number(run.pacs, run.studies["jp"].study_instance_uid)
    first = jp[9200]["MainDicomTags"]["SeriesDescription"]
    assert first == "FUSED MR T1 3D AX + PT PET FDG AC [li2021-cnn] RESEARCH USE ONLY"
    refusion = jp[9102]["MainDicomTags"]["SeriesDescription"]
    assert len(refusion) <= 64 and refusion.endswith("] RESEARCH USE ONLY REPLACES 9101")
    assert refusion == "FUSED MR + CT BRAIN [li2021-cnn] RESEARCH USE ONLY REPLACES 9101"
    web = {
        s["MainDicomTags"]["SeriesInstanceUID"]: s["MainDicomTags"]["SeriesDescription"]
        for s in _fused(run.web)
    }
    assert web[run.first_ct_series] == "FUSED MR T1 3D AX + CT HEAD [li2021-cnn] RESEARCH USE ONLY"


def test_refusion_replaces_the_earlier_series_where_the_pacs_allows(run: Run) -> None:
    with run.node.sessionmaker() as s:
        removals = {r.destination: r for r in s.scalars(select(SeriesRemoval))}
        refusion = s.scalar(select(Job).where(Job.replaces_series_uid.is_not(None)))
        done = s.scalar(
            select(Event).where(
                Event.entity == "job", Event.entity_id == str(refusion.id), Event.new_state == "done"
            )
        )
        removal_events = s.scalars(select(Event).where(Event.entity == "removal")).all()
    assert refusion.replaces_series_uid == run.first_ct_series
    assert f"replaces series {run.first_ct_series} (number 9101)" in done.reason
    assert removals["pacs"].state == "deleted" and removals["web"].state == "left"
    assert "offers no way to delete" in removals["web"].reason
    assert {e.new_state for e in removal_events} == {"pending", "deleted", "left"}
    pacs_series = {s["MainDicomTags"]["SeriesInstanceUID"] for s in run.pacs.rest("/series?expand")}
    assert run.first_ct_series not in pacs_series and run.foreign_series_uid in pacs_series
    assert run.first_ct_series in {s["MainDicomTags"]["SeriesInstanceUID"] for s in _fused(run.web)}


def test_notice_is_burned_into_every_image(run: Run) -> None:
    for s in _fused(run.pacs)[:2]:
        for iid in s["Instances"]:
            ds = _download(run.pacs, iid)
            assert ds.BurnedInAnnotation == "YES"
            px = ds.pixel_array
            luma = px.max(axis=-1) if px.ndim == 3 else px
            corners = [luma[:20, :24], luma[:20, -24:], luma[-20:, :24], luma[-20:, -24:]]
            assert max(int((c == 255).sum()) for c in corners) >= 20  # the letters


def _dciodvfy(data: bytes, folder: Path) -> list[str]:
    path = folder / "check.dcm"
    path.write_bytes(data)
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, timeout=60)
    lines = (proc.stdout + proc.stderr).decode("utf-8", "replace").splitlines()
    return [ln for ln in lines if ln.startswith(("Error", "Warning"))]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dciodvfy_finds_nothing_in_any_output(run: Run, tmp_path: Path) -> None:
    checked = 0
    for orthanc in (run.pacs, run.web):
        for s in _fused(orthanc):
            for iid in s["Instances"]:
                assert _dciodvfy(orthanc.file(iid), tmp_path) == [], s["MainDicomTags"]["SeriesDescription"]
                checked += 1
    # four series in the C-STORE PACS (the replaced one deleted), five in the DICOMweb one
    assert checked == 9 * len(run.studies["jp"].series["MR"].paths)


def test_dicomweb_destination_got_every_series_with_the_same_audit(run: Run) -> None:
    with run.node.sessionmaker() as s:
        web = s.scalars(select(Delivery).where(Delivery.destination == "web")).all()
        pacs = s.scalars(select(Delivery).where(Delivery.destination == "pacs")).all()
    assert len(web) == len(pacs) > 0
    assert {d.state for d in web} == {"sent"} and {d.last_status for d in web} == {0}
    assert len(_fused(run.web)) == 5


# --- the web viewer --------------------------------------------------------------------------

VIEWER_PAGE = """<!doctype html><html><body style="margin:0;background:#222">
<iframe id="left" src="{left}" style="width:49%;height:480px;border:0"></iframe>
<iframe id="right" src="{right}" style="width:49%;height:480px;border:0"></iframe>
</body></html>"""


def _browser(tmp: Path):  # type: ignore[no-untyped-def]
    from selenium import webdriver  # noqa: PLC0415
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tempfile.mkdtemp(dir=tmp)}",
        "--window-size=1200,720",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def _canvas(driver) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The viewer's canvas as a grayscale array (same origin inside the frame)."""
    data = driver.execute_script("return document.querySelector('#dicomImage canvas').toDataURL('image/png')")
    img = Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("L")
    return np.asarray(img, dtype=np.float32)


def _frame_state(driver, frame: str):  # type: ignore[no-untyped-def]
    driver.switch_to.default_content()
    driver.switch_to.frame(frame)
    return driver.execute_script("return $('#slider').slider('value')"), _canvas(driver)


def _scroll(driver, frame: str, steps: int) -> None:  # type: ignore[no-untyped-def]
    """Turn the mouse wheel over the image, as a reader does (one slice per notch)."""
    from selenium.webdriver.common.action_chains import ActionChains  # noqa: PLC0415
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin  # noqa: PLC0415
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    driver.switch_to.default_content()
    driver.switch_to.frame(frame)
    canvas = driver.find_element(By.CSS_SELECTOR, "#dicomImage canvas")
    for _ in range(steps):
        ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, 120).perform()
        time.sleep(0.05)


def _wait_rendered(driver, frame: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        driver.switch_to.default_content()
        driver.switch_to.frame(frame)
        ready = driver.execute_script("return !!document.querySelector('#dicomImage canvas')")
        if ready and _canvas(driver).max() > 0:
            return
        time.sleep(0.3)
    raise AssertionError(f"the viewer in {frame} rendered nothing")


def _corr(fused: np.ndarray, mr: np.ndarray) -> float:
    """Correlation of two views, leaving out the burned-in notice (white letters, grown by their
    black outline at the viewer's zoom) and the brightest bone."""
    notice = fused >= 245
    reach = max(2, fused.shape[1] // 60)
    grown = notice.copy()
    for dy in range(-reach, reach + 1, max(1, reach // 2)):
        for dx in range(-reach, reach + 1, max(1, reach // 2)):
            grown |= np.roll(np.roll(notice, dy, axis=0), dx, axis=1)
    keep = ~grown
    a, b = fused[keep] - fused[keep].mean(), mr[keep] - mr[keep].mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-9))


def _viewer_slices(orthanc: Orthanc, series_id: str) -> list[str]:
    return list(orthanc.rest(f"/web-viewer/series/{series_id}")["Slices"])


HAVE_CHROMIUM = Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()


@pytest.fixture(scope="module")
def browser(run: Run):  # type: ignore[no-untyped-def]
    if not HAVE_CHROMIUM:
        pytest.skip("needs Debian chromium and chromium-driver")
    driver = _browser(run.tmp)
    yield driver
    driver.quit()


def _side_by_side(driver, orthanc: Orthanc, mr_id: str, fused_id: str, shots: Path) -> str:  # type: ignore[no-untyped-def]
    """Open the MR and the fused series side by side, scroll both with the wheel to the first,
    middle and last slice, and check they stay in step and show the same anatomy; screenshots go
    to ``shots``. Returns the fused viewer's overlay text."""
    n = len(_viewer_slices(orthanc, mr_id))
    shots.mkdir(parents=True, exist_ok=True)
    page = shots / "side-by-side.html"
    viewer = f"{orthanc.url}/web-viewer/app/viewer.html?series="
    page.write_text(VIEWER_PAGE.format(left=viewer + mr_id, right=viewer + fused_id))
    driver.get(page.as_uri())
    for frame in ("left", "right"):
        _wait_rendered(driver, frame)
    driver.switch_to.default_content()
    driver.switch_to.frame("right")
    overlay = str(driver.execute_script("return document.querySelector('#topright').innerText"))
    views = []
    at = 0
    for k in (0, n // 2, n - 1):
        for frame in ("left", "right"):
            _scroll(driver, frame, k - at)
        at = k
        (k_mr, img_mr), (k_fused, img_fused) = _frame_state(driver, "left"), _frame_state(driver, "right")
        assert k_mr == k_fused == k
        views.append((img_mr, img_fused))
        driver.switch_to.default_content()
        driver.save_screenshot(str(shots / f"slice-{k:02d}.png"))
    # each fused view matches the MR view at the same slice better than the MR anywhere else
    for i, (_, fused_img) in enumerate(views):
        scores = [_corr(fused_img, mr_img) for mr_img, _ in views]
        assert int(np.argmax(scores)) == i, scores
    return overlay


def _series_with_uid(orthanc: Orthanc, series_uid: str) -> dict:
    return orthanc.rest(f"/series/{orthanc.rest('/tools/lookup', 'POST', series_uid.encode())[0]['ID']}")


def test_web_viewer_shows_the_fused_series_beside_the_mr_scrolling_in_step(run: Run, browser) -> None:  # type: ignore[no-untyped-def]
    study = run.studies["jp"]
    series = _by_number(run.pacs, study.study_instance_uid)
    mr = _series_with_uid(run.pacs, study.series["MR"].series_instance_uid)
    fused = series[9102]
    # the study in the PACS holds the sources, the PACS's own series and the current fused series
    assert {int(n) for n in series} >= {3, 2, 4, 9100, 9102, 9200}
    mr_slices, fused_slices = _viewer_slices(run.pacs, mr["ID"]), _viewer_slices(run.pacs, fused["ID"])
    assert len(mr_slices) == len(fused_slices) == len(study.series["MR"].paths)
    # same order: the fused slice k is derived from the MR slice the viewer shows at k
    for m, f in zip(mr_slices, fused_slices, strict=True):
        mr_uid = run.pacs.instance_tags(m.rsplit("_", 1)[0])["SOPInstanceUID"]
        src = _download(run.pacs, f.rsplit("_", 1)[0]).SourceImageSequence[0].ReferencedSOPInstanceUID
        assert src == mr_uid
    overlay = _side_by_side(browser, run.pacs, mr["ID"], fused["ID"], run.tmp / "screenshots" / "sc")
    assert "山田^太郎" in overlay and "REPLACES 9101" in overlay


# --- output.iod: multiframe-sc ---------------------------------------------------------------


@pytest.fixture(scope="module")
def multiframe(run: Run) -> Iterator[GeneratedStudy]:
    """A second node writing ``output.iod: multiframe-sc`` to the same PACS; its study's sources too."""
    tmp = run.tmp / "multiframe"
    study = generate_study(tmp / "study", ("MR", "CT", "PT"), scale=0.25, seed=14, patient_id="MF-0001")
    assert storescu([tmp / "study"], run.pacs.dicom_port, called_aet="ORTHANC").returncode == 0
    dest = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": run.pacs.dicom_port}
    node = Node(
        node_settings(
            tmp, run.pacs.dicom_port, run.db_factory(), destinations=[dest], output={"iod": "multiframe-sc"}
        )
    )
    node.start()
    try:
        n_mr = len(study.series["MR"].paths)
        assert storescu([tmp / "study"], node.settings.node.port).returncode == 0

        def arrived() -> bool:
            found = [
                s for s in _fused(run.pacs) if s["MainDicomTags"].get("SeriesNumber") in ("9100", "9200")
            ]
            mine = [s for s in found if _tags(run.pacs, s)["PatientID"] == "MF-0001"]
            return len(mine) == 2 and _all_sent(node)

        wait_for(arrived, 300, "two multi-frame fused series")
        assert n_mr > 2
        yield study
    finally:
        node.stop()


def _multiframe_series(run: Run, study: GeneratedStudy) -> dict[int, dict]:
    return {
        n: s
        for n, s in _by_number(run.pacs, study.study_instance_uid).items()
        if s["MainDicomTags"].get("SeriesDescription", "").startswith("FUSED")
    }


def test_multiframe_sc_carries_frame_of_reference_and_slice_positions(
    run: Run, multiframe: GeneratedStudy, tmp_path: Path
) -> None:
    mr_id = _series_with_uid(run.pacs, multiframe.series["MR"].series_instance_uid)["ID"]
    mr_slices = _viewer_slices(run.pacs, mr_id)
    mr_positions = [
        [float(v) for v in run.pacs.instance_tags(m.rsplit("_", 1)[0])["ImagePositionPatient"].split("\\")]
        for m in mr_slices
    ]
    expected = {9100: "1.2.840.10008.5.1.4.1.1.7.2", 9200: "1.2.840.10008.5.1.4.1.1.7.4"}
    for number, s in _multiframe_series(run, multiframe).items():
        (iid,) = s["Instances"]
        data = run.pacs.file(iid)
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.SOPClassUID == expected[number]
        assert ds.FrameOfReferenceUID == multiframe.frame_of_reference_uid
        assert int(ds.NumberOfFrames) == len(mr_slices)
        frames = [
            [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
            for f in ds.PerFrameFunctionalGroupsSequence
        ]
        assert np.allclose(frames, mr_positions, atol=1e-3)  # frame k is where the viewer's MR slice k is
        assert _viewer_slices(run.pacs, s["ID"]) == [f"{iid}_{k}" for k in range(len(mr_slices))]
        if shutil.which("dciodvfy"):
            assert _dciodvfy(data, tmp_path) == []


def test_web_viewer_scrolls_multiframe_fused_series_with_the_mr(  # type: ignore[no-untyped-def]
    run: Run, multiframe: GeneratedStudy, browser
) -> None:
    mr_id = _series_with_uid(run.pacs, multiframe.series["MR"].series_instance_uid)["ID"]
    for number, s in sorted(_multiframe_series(run, multiframe).items()):
        overlay = _side_by_side(
            browser, run.pacs, mr_id, s["ID"], run.tmp / "screenshots" / f"multiframe-{number}"
        )
        assert "FUSED MR T1 3D AX + " in overlay
