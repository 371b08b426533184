"""The dashboard in headless Chromium after a demo-like study, and the node's logs free of the patient's PHI.

storescu sends an MR+CT+PET head study with a distinctive name, ID and birth date to the node
(Orthanc as the PACS). One PET file is unreadable while the fuse stage runs, so the MR+PET job
fails; the file comes back and an admin signs in, sees both jobs, opens the done one (events,
thumbnails), clicks Retry on the failed one and watches it run again to done. Every log record
of the node at INFO and above is kept as JSON lines: none may carry the name, ID or birth date.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicomnode.config import load_settings
from dicomnode.db import Delivery, Event, Instance, Job
from dicomnode.logs import ContextFilter, JsonFormatter
from dicomnode.node import Node
from dicomnode.testing import generate_study
from dicomnode.testing.peers import Orthanc, free_port, have_dcmtk, have_orthanc, storescu, wait_until

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOKEN = "dashboard-admin-token-0123456789"
PATIENT_ID, PATIENT_NAME, BIRTH_DATE = "PHI-7734521", "Zyxwvut^Quorra", "19230405"
PHI = (PATIENT_ID, "Zyxwvut", "Quorra", BIRTH_DATE, "1923-04-05")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (have_orthanc() and have_dcmtk() and Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
        reason="needs Debian orthanc, dcmtk, chromium and chromium-driver",
    ),
]


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    assert wait_until(predicate, None, timeout, interval=0.3), f"timed out after {timeout:.0f} s: {what}"


class Run:
    tmp: Path
    log: io.StringIO
    node: Node
    fuse: Node
    url: str
    jobs: dict[str, int]
    orthanc: Orthanc


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    r = Run()
    r.tmp = tmp = tmp_path_factory.mktemp("dashboard")
    study = generate_study(
        tmp / "study",
        modalities=("MR", "CT", "PT"),
        scale=0.2,
        seed=11,
        patient_id=PATIENT_ID,
        patient_name=PATIENT_NAME,
    )
    for paths in (s.paths for s in study.series.values()):
        for p in paths:
            ds = pydicom.dcmread(p)
            ds.PatientBirthDate = BIRTH_DATE
            ds.save_as(p)

    r.log = io.StringIO()
    handler = logging.StreamHandler(r.log)
    handler.setLevel(logging.INFO)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)

    r.orthanc = Orthanc(tmp / "orthanc").start()
    admin_port = free_port()
    settings = load_settings(
        None,
        node={"port": free_port()},
        storage={"spool_dir": str(tmp / "spool"), "database_url": f"sqlite:///{tmp}/node.db"},
        assembly={"series_stable_seconds": 1, "poll_seconds": 0.2},
        destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": r.orthanc.dicom_port}
        ],
        fusion={"device": "cpu", "batch_size": 8, "poll_seconds": 0.2},
        dispatch={"poll_seconds": 0.2},
        admin={"http_port": admin_port, "tokens": [{"name": "alice", "token": TOKEN, "role": "admin"}]},
        logging={"format": "json"},
    )
    r.url = f"http://127.0.0.1:{admin_port}"
    r.node = Node(settings, ["receive", "assemble", "dispatch", "admin"])
    r.node.start()
    r.fuse = Node(settings, ["fuse"])
    sm = r.node.sessionmaker
    try:
        res = storescu([tmp / "study"], settings.node.port, calling_aet="SCANNER")
        assert res.returncode == 0, res.stderr

        def two_jobs():  # type: ignore[no-untyped-def]
            with sm() as s:
                rows = s.scalars(select(Job)).all()
            return {j.rule_name: j.id for j in rows} if len(rows) == 2 else None

        wait_for(two_jobs, 120, "two pending jobs")
        r.jobs = two_jobs()
        with sm() as s:
            pet_file = s.scalars(
                select(Instance.path).where(
                    Instance.series_instance_uid == study.series["PT"].series_instance_uid
                )
            ).first()
        spooled = tmp / "spool" / pet_file
        spooled.rename(spooled.with_suffix(".aside"))  # an unreadable file while the fuse stage runs
        r.fuse.start()

        def ended():  # type: ignore[no-untyped-def]
            with sm() as s:
                states = {j.rule_name: j.state for j in s.scalars(select(Job)).all()}
            return states if states == {"mr-ct": "done", "mr-pet": "failed"} else None

        wait_for(ended, 240, "the MR+CT job done and the MR+PET job failed")
        spooled.with_suffix(".aside").rename(spooled)  # the file is back: a retry can succeed
        yield r
    finally:
        r.fuse.stop()
        r.node.stop()
        r.orthanc.stop()
        root.removeHandler(handler)
        root.setLevel(old_level)


@pytest.fixture(scope="module")
def browser(run: Run):
    from selenium import webdriver  # noqa: PLC0415
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1440,1000",
        f"--user-data-dir={run.tmp / 'chromium-profile'}",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _shot(driver, run: Run, name: str) -> Path:  # type: ignore[no-untyped-def]
    path = run.tmp / "screenshots" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1440, max(1000, min(int(height) + 40, 4000)))
    driver.save_screenshot(str(path))
    return path


def test_dashboard_sign_in_jobs_job_page_and_retry(run: Run, browser):
    from selenium.common.exceptions import StaleElementReferenceException  # noqa: PLC0415
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    wait = WebDriverWait(browser, 60)
    browser.get(run.url + "/")
    assert "/login" in browser.current_url  # not signed in yet
    browser.find_element(By.NAME, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "sign-in").click()
    wait.until(lambda d: d.find_elements(By.ID, f"job-{run.jobs['mr-ct']}"))

    ct_row = browser.find_element(By.ID, f"job-{run.jobs['mr-ct']}").text
    pet_row = browser.find_element(By.ID, f"job-{run.jobs['mr-pet']}").text
    assert "done" in ct_row and "mr-ct" in ct_row and PATIENT_ID in ct_row and "SSIM" in ct_row
    assert "failed" in pet_row and "cannot read stored instance" in pet_row
    attention = browser.find_element(By.CSS_SELECTOR, "section.attention").text
    assert f"job {run.jobs['mr-pet']}" in attention
    assert "pacs" in browser.find_element(By.ID, "destination-pacs").text
    _shot(browser, run, "1-overview")

    browser.find_element(By.CSS_SELECTOR, f"#job-{run.jobs['mr-ct']} a").click()
    wait.until(lambda d: d.find_elements(By.ID, "thumbnails"))
    wait.until(lambda d: d.execute_script("return document.getElementById('thumbnails').naturalWidth") > 0)
    page = browser.find_element(By.ID, "content").text
    assert "Timeline" in page and "running → done" in page and "pending → running" in page
    assert "reference" in page and "moving" in page and "Qabf" in page
    _shot(browser, run, "2-job")

    browser.get(run.url + "/")
    button = wait.until(
        lambda d: d.find_element(By.CSS_SELECTOR, f"#job-{run.jobs['mr-pet']} button[data-action$='/retry']")
    )
    button.click()
    wait.until(lambda d: "pending again" in d.find_element(By.ID, "flash").text)

    def pet_done(d):  # type: ignore[no-untyped-def]
        badges = d.find_elements(By.CSS_SELECTOR, f"#job-{run.jobs['mr-pet']} td:nth-child(2) .badge")
        return badges and badges[0].text == "done"  # the page refreshes itself

    WebDriverWait(browser, 300, poll_frequency=1, ignored_exceptions=(StaleElementReferenceException,)).until(
        pet_done
    )
    _shot(browser, run, "3-after-retry")

    with run.node.sessionmaker() as s:
        job = s.get(Job, run.jobs["mr-pet"])
        assert job.state == "done" and job.attempts == 2
        changes = [
            (e.old_state, e.new_state, e.actor)
            for e in s.scalars(select(Event).where(Event.entity == "job", Event.entity_id == str(job.id)))
        ]
    assert ("failed", "pending", "alice") in changes and changes[-1][:2] == ("running", "done")


def test_logs_are_json_with_context_and_without_phi(run: Run):
    sm = run.node.sessionmaker

    def all_sent():  # type: ignore[no-untyped-def]
        with sm() as s:
            states = set(s.scalars(select(Delivery.state)).all())
        return states == {"sent"}

    wait_for(all_sent, 240, "every delivery sent")  # dispatch logs too
    lines = [json.loads(line) for line in run.log.getvalue().splitlines() if line.strip()]
    assert len(lines) > 10
    assert {"time", "level", "logger", "message", "stage", "association_id", "job_id"} <= set(lines[0])
    assert any(x["stage"] == "receive" and x["association_id"] for x in lines)
    assert any(x["stage"] == "fuse" and x["job_id"] for x in lines)
    assert any(x["stage"] == "dispatch" for x in lines)
    text = run.log.getvalue()
    for phi in PHI:
        assert phi not in text, f"{phi!r} is in the log"
