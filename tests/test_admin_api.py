"""The admin API over real uvicorn on loopback: auth rules, paging and filters, audited actions, metrics.

One server per module over rows as the stages write them (``admin_rows``); the schema fuzz test
has its own server, since its random actions change the rows.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import httpx
import pytest
from admin_rows import add_patient
from hypothesis import HealthCheck, given, settings
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from dicomnode.admin.app import create_app
from dicomnode.admin.server import AdminServer
from dicomnode.config import ConfigError, load_settings
from dicomnode.db import (
    Delivery,
    DestinationState,
    Event,
    Instance,
    Job,
    Output,
    PriorFetch,
    Series,
    SeriesDecision,
    make_sessionmaker,
    record,
)
from dicomnode.dispatch import DispatchOutbox
from dicomnode.node import Node
from dicomnode.spool import Spool
from dicomnode.testing import generate_study
from dicomnode.testing.peers import free_port, start_status_scp

READ_TOKEN = "read-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
TOKENS = [
    {"name": "viewer", "token": READ_TOKEN, "role": "read"},
    {"name": "alice", "token": ADMIN_TOKEN, "role": "admin"},
]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
READ = {"Authorization": f"Bearer {READ_TOKEN}"}


DESTINATIONS = [
    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
    {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 4243},
]


class Api:
    def __init__(self, tmp: Path, destinations: list[dict] = DESTINATIONS, **admin: object) -> None:
        self.tmp = tmp
        self.spool = tmp / "spool"
        self.settings = load_settings(
            None,
            storage={"spool_dir": str(self.spool), "database_url": f"sqlite:///{tmp}/node.db"},
            destinations=destinations,
            admin={"http_port": 0, "tokens": TOKENS, **admin},
        )
        Spool(self.spool)
        self.sm = make_sessionmaker(self.settings.storage.database_url)
        self.jobs = {
            "done": add_patient(
                self.sm, self.spool, "P-DONE", name="Done^Dora", destinations=("pacs", "archive")
            ),
            "failed": add_patient(self.sm, self.spool, "P-FAIL", job_state="failed", error="cannot read"),
            "held": add_patient(
                self.sm, self.spool, "P-HELD", job_state="held", delivery_state="held", error="quality gate"
            ),
            "running": add_patient(self.sm, self.spool, "P-RUN", job_state="running"),
        }
        for i in range(12):
            add_patient(self.sm, self.spool, f"P-MANY-{i:02d}", n_instances=1, n_outputs=1)
        self.server = AdminServer(create_app(self.settings, self.sm), self.settings.admin)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def close(self) -> None:
        self.client.close()
        self.server.stop()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    a = Api(tmp_path_factory.mktemp("admin-api"))
    yield a
    a.close()


# -- auth -----------------------------------------------------------------------------------------


def test_no_token_401_read_token_403_on_actions(api: Api):
    r = api.client.get("/api/v1/jobs")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert (
        api.client.get("/api/v1/jobs", headers={"Authorization": "Bearer wrong-token-xxxxxxxxxx"}).status_code
        == 401
    )
    assert api.client.get("/api/v1/jobs", headers={"Authorization": "Basic eDp5"}).status_code == 401
    assert api.client.get("/api/v1/jobs", headers=READ).status_code == 200
    r = api.client.post(f"/api/v1/jobs/{api.jobs['failed']}/retry", headers=READ)
    assert r.status_code == 403 and "read role" in r.json()["detail"]
    assert api.client.post(f"/api/v1/jobs/{api.jobs['failed']}/retry").status_code == 401
    assert api.client.delete("/api/v1/patients/P-DONE", headers=READ).status_code == 403
    with api.sm() as s:  # nothing happened
        assert s.get(Job, api.jobs["failed"]).state == "failed"
    # /healthz and /metrics are open by default; the dashboard sends strangers to /login
    assert api.client.get("/healthz").json()["ok"] is True
    assert api.client.get("/metrics").status_code == 200
    r = api.client.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")


def test_open_endpoints_can_be_closed(tmp_path: Path):
    a = Api(tmp_path, open_endpoints=[])
    try:
        assert a.client.get("/healthz").status_code == 401
        assert a.client.get("/metrics").status_code == 401
        assert a.client.get("/metrics", headers=READ).status_code == 200
    finally:
        a.close()


def test_login_cookie_and_csrf(api: Api):
    c = httpx.Client(base_url=api.url, timeout=30)
    r = c.post("/login", data={"token": "not-a-token-xxxxxxxxxxxx", "next": "/"})
    assert r.status_code == 401 and "Unknown token" in r.text
    r = c.post("/login", data={"token": ADMIN_TOKEN, "next": "//evil.example/"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"  # never to another site
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    page = c.get("/")
    assert page.status_code == 200 and "alice (admin)" in page.text
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)
    target = "/api/v1/destinations/archive/pause"
    assert c.post(target).status_code == 403  # the cookie alone does not act
    assert c.post(target, headers={"X-CSRF-Token": "wrong"}).status_code == 403
    evil = {"X-CSRF-Token": csrf, "Origin": "http://evil.example"}
    assert c.post(target, headers=evil).status_code == 403  # another site's page
    r = c.post(target, headers={"X-CSRF-Token": csrf, "Origin": api.url})
    assert r.status_code == 200, r.text
    r = c.post("/api/v1/destinations/archive/resume", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200
    with api.sm() as s:
        actors = s.scalars(select(Event.actor).where(Event.entity == "destination")).all()
    assert "alice" in actors
    # a tampered cookie is nobody
    c.cookies.set("dicomnode_session", c.cookies["dicomnode_session"][:-3] + "AAA")
    assert c.get("/api/v1/jobs").status_code == 401
    c.close()


def test_tokens_never_logged(api: Api, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    api.client.get("/api/v1/jobs", headers=ADMIN)
    api.client.get("/api/v1/jobs", headers={"Authorization": "Bearer guessed-token-1234567890"})
    api.client.post("/login", data={"token": READ_TOKEN})
    api.client.get("/api/v1/jobs", params={"patient": "P-DONE"}, headers=READ)
    app_records = [r for r in caplog.records if r.name.startswith(("dicomnode", "uvicorn"))]
    text = "\n".join(r.getMessage() for r in app_records)
    assert "/api/v1/jobs" in text  # the access log is there ...
    for secret in (ADMIN_TOKEN, READ_TOKEN, "guessed-token-1234567890", "P-DONE"):
        assert secret not in text  # ... without tokens or the patient in the query


def test_refuses_to_start_open_on_the_network(tmp_path: Path):
    settings = load_settings(
        None,
        storage={"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path}/n.db"},
        admin={"http_host": "0.0.0.0", "http_port": free_port()},
    )
    with pytest.raises(ConfigError, match=r"admin\.http_host .*admin\.tokens"):
        Node(settings)
    Node(settings, ["receive"])  # without the admin stage there is no HTTP server to refuse


# -- reads ----------------------------------------------------------------------------------------


def test_jobs_paging_and_filters(api: Api):
    seen, cursor = [], None
    while True:
        params = {"limit": 5} | ({"cursor": cursor} if cursor else {})
        page = api.client.get("/api/v1/jobs", params=params, headers=READ).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    with api.sm() as s:
        assert seen == sorted(s.scalars(select(Job.id)).all(), reverse=True)
    failed = api.client.get("/api/v1/jobs", params={"state": "failed"}, headers=READ).json()["items"]
    assert [j["id"] for j in failed] == [api.jobs["failed"]] and failed[0]["error"] == "cannot read"
    mine = api.client.get("/api/v1/jobs", params={"patient": "P-DONE", "rule": "mr-ct"}, headers=READ).json()
    job = mine["items"][0]
    assert job["patient_name"] == "Done^Dora" and job["study_instance_uid"] and job["moving_modality"] == "CT"
    assert job["deliveries"] == {"pacs": {"sent": 2}, "archive": {"sent": 2}}
    assert job["timings"]["total"] == 2.0 and job["quality"]["SSIM"] == 1.2
    assert api.client.get("/api/v1/jobs", params={"rule": "nope"}, headers=READ).json()["items"] == []


def test_job_detail_and_other_lists(api: Api):
    d = api.client.get(f"/api/v1/jobs/{api.jobs['done']}", headers=READ).json()
    assert [e["new_state"] for e in d["events"] if e["entity"] == "job"][:2] == ["pending", "done"]
    assert {s["role"] for s in d["sources"]} == {"reference", "moving"}
    assert next(s for s in d["sources"] if s["role"] == "reference")["why"] == "T1 3D first"
    assert {x["destination"] for x in d["destinations"]} == {"pacs", "archive"}
    assert api.client.get("/api/v1/jobs/999999", headers=READ).status_code == 404
    patients = api.client.get("/api/v1/patients", params={"limit": 100}, headers=READ).json()["items"]
    assert {"P-DONE", "P-FAIL", "P-HELD"} <= {p["patient_key"] for p in patients}
    studies = api.client.get("/api/v1/studies", params={"patient": "P-DONE"}, headers=READ).json()["items"]
    assert studies[0]["modalities"] == ["CT", "MR"]
    series = api.client.get("/api/v1/series", params={"patient": "P-DONE", "modality": "mr"}, headers=READ)
    assert [s["modality"] for s in series.json()["items"]] == ["MR"]
    outs = api.client.get("/api/v1/outputs", params={"job_id": api.jobs["done"]}, headers=READ).json()[
        "items"
    ]
    assert len(outs) == 2
    deliveries = api.client.get("/api/v1/deliveries", params={"state": "held"}, headers=READ).json()["items"]
    assert {x["job_id"] for x in deliveries} == {api.jobs["held"]}
    dests = api.client.get("/api/v1/destinations", headers=READ).json()
    assert [x["name"] for x in dests] == ["pacs", "archive"] and dests[0]["last_success_at"]
    events = api.client.get(
        "/api/v1/events", params={"entity": "job", "entity_id": str(api.jobs["failed"])}, headers=READ
    ).json()["items"]
    assert events and all(e["entity_id"] == str(api.jobs["failed"]) for e in events)
    assert (
        api.client.get("/api/v1/events", params={"since": "2999-01-01T00:00:00Z"}, headers=READ).json()[
            "items"
        ]
        == []
    )
    assert api.client.get("/api/v1/associations", headers=READ).status_code == 200
    doc = api.client.get("/openapi.json").json()
    for path in ("/api/v1/jobs", "/api/v1/jobs/{job_id}/retry", "/api/v1/patients/{key}", "/api/v1/events"):
        assert path in doc["paths"], path


def test_series_decisions_fetches_and_dicomweb_destinations(tmp_path: Path):
    """Which rule chose or skipped a series and why, fetches of missing series, and destinations of
    both types, in the API, the status and the dashboard."""
    web = {"name": "cloud", "type": "dicomweb", "url": "https://pacs.example/dicom-web", "bearer_token": "t"}
    a = Api(tmp_path, destinations=[*DESTINATIONS, web])
    try:
        with a.sm() as s, s.begin():
            mr, ct = s.scalars(
                select(Series.series_instance_uid)
                .where(Series.patient_key == "P-DONE")
                .order_by(Series.modality)
            ).all()[::-1]
            s.add(SeriesDecision(series_instance_uid=mr, rule_name="mr-ct", decision="chosen", job_id=1))
            s.add(
                SeriesDecision(
                    series_instance_uid=ct,
                    rule_name="mr-ct",
                    decision="skipped",
                    reason="LOCALIZER image type",
                )
            )
            s.add(
                PriorFetch(
                    rule_name="mr-ct",
                    patient_key="P-DONE",
                    anchor_series_uid=mr,
                    anchor_modality="MR",
                    wanted_modality="CT",
                    state="not_found",
                    reason="no source holds a CT of this patient",
                )
            )
        got = a.client.get("/api/v1/series", params={"decision": "skipped"}, headers=READ).json()["items"]
        assert [x["series_instance_uid"] for x in got] == [ct]
        assert got[0]["decisions"] == [
            {"rule": "mr-ct", "decision": "skipped", "reason": "LOCALIZER image type", "job_id": None}
        ]
        chosen = a.client.get("/api/v1/series", params={"decision": "chosen", "rule": "mr-ct"}, headers=READ)
        assert [x["series_instance_uid"] for x in chosen.json()["items"]] == [mr]
        fetches = a.client.get("/api/v1/fetches", params={"state": "not_found"}, headers=READ).json()["items"]
        assert fetches[0]["wanted"] == "CT" and "no source" in fetches[0]["reason"]
        st = a.client.get("/api/v1/status", headers=READ)
        assert st.status_code == 200, st.text
        st = st.json()
        assert [x["reason"] for x in st["series_not_fused"]] == ["LOCALIZER image type"]
        assert st["recent_fetches"][0]["state"] == "not_found" and st["fetches"]["not_found"] == 1
        assert "retrieve" in st["queue"]
        dests = a.client.get("/api/v1/destinations", headers=READ)
        assert dests.status_code == 200, dests.text
        cloud = dests.json()[-1]
        assert (cloud["type"], cloud["where"], cloud["ae_title"]) == ("dicomweb", web["url"], None)
        page = a.client.get("/", headers=READ).text
        assert "Series not fused" in page and "LOCALIZER image type" in page
        assert "no source holds a CT" in page and web["url"] in page
    finally:
        a.close()


# -- actions --------------------------------------------------------------------------------------


def test_retry_cancel_release_resend_are_audited(api: Api):
    r = api.client.post(f"/api/v1/jobs/{api.jobs['failed']}/retry", headers=ADMIN)
    assert r.status_code == 200 and r.json()["changed"] == 1
    r = api.client.post(f"/api/v1/jobs/{api.jobs['failed']}/retry", headers=ADMIN)
    assert r.status_code == 409 and "pending" in r.json()["detail"]
    r = api.client.post(f"/api/v1/jobs/{api.jobs['done']}/retry", headers=ADMIN)
    assert r.status_code == 409 and "resend" in r.json()["detail"]
    assert api.client.post(f"/api/v1/jobs/{api.jobs['running']}/cancel", headers=ADMIN).status_code == 200
    r = api.client.post(f"/api/v1/jobs/{api.jobs['held']}/release", headers=ADMIN)
    assert r.status_code == 200 and r.json()["changed"] == 2
    r = api.client.post(
        f"/api/v1/jobs/{api.jobs['done']}/resend", params={"destination": "pacs"}, headers=ADMIN
    )
    assert r.status_code == 200 and r.json()["changed"] == 2
    r = api.client.post(
        f"/api/v1/jobs/{api.jobs['done']}/resend", params={"destination": "nope"}, headers=ADMIN
    )
    assert r.status_code == 404 and "pacs, archive" in r.json()["detail"]
    with api.sm() as s:
        assert s.get(Job, api.jobs["failed"]).state == "pending"
        assert s.get(Job, api.jobs["running"]).state == "cancelled"
        assert s.get(Job, api.jobs["held"]).state == "done"
        held_states = s.scalars(
            select(Delivery.state).join(Output).where(Output.job_id == api.jobs["held"])
        ).all()
        assert set(held_states) == {"pending"}
        done_states = dict(
            s.execute(
                select(Delivery.destination, Delivery.state)
                .join(Output)
                .where(Output.job_id == api.jobs["done"])
            ).all()
        )
        assert done_states == {"pacs": "pending", "archive": "sent"}  # only the one destination
        audit = s.scalars(select(Event).where(Event.stage == "admin", Event.actor == "alice")).all()
    reasons = " | ".join(e.reason for e in audit)
    for word in ("retry requested by alice", "cancelled by alice", "released by alice", "re-sent by alice"):
        assert word in reasons


def test_pause_keeps_deliveries_pending_until_resume(tmp_path: Path):
    """A paused destination is skipped by the dispatcher; after resume its deliveries go out."""
    scp = start_status_scp(status=0x0000)
    try:
        a = Api(tmp_path)
        try:
            settings = a.settings.model_copy(
                update={
                    "destinations": [
                        a.settings.destinations[0].model_copy(update={"port": scp.port, "ae_title": scp.aet})
                    ]
                }
            )
            job = add_patient(a.sm, a.spool, "P-PAUSE", delivery_state="pending", n_outputs=2)
            study = generate_study(tmp_path / "study", modalities=("MR",), scale=0.1, seed=1)
            with a.sm() as s:
                for out, src in zip(  # any DICOM file will do as an output to send
                    s.scalars(select(Output).where(Output.job_id == job)).all(),
                    study.series["MR"].paths,
                    strict=False,
                ):
                    (a.spool / out.path).write_bytes(Path(src).read_bytes())
            assert a.client.post("/api/v1/destinations/pacs/pause", headers=ADMIN).status_code == 200
            outbox = DispatchOutbox(settings, a.sm, Spool(a.spool))
            assert outbox.run_once() == 0
            assert scp.received == []
            with a.sm() as s:
                assert s.get(DestinationState, "pacs").paused
            assert a.client.post("/api/v1/destinations/pacs/resume", headers=ADMIN).status_code == 200
            assert outbox.run_once() == 2
            assert len(scp.received) == 2
        finally:
            a.close()
    finally:
        scp.stop()


def test_purge_patient_keeps_the_audit(api: Api):
    with api.sm() as s:
        paths = s.scalars(
            select(Instance.path)
            .join(Series, Series.series_instance_uid == Instance.series_instance_uid)
            .where(Series.patient_key == "P-MANY-00")
        ).all()
        n_events = s.scalar(select(func.count()).select_from(Event))
    assert paths and all((api.spool / p).is_file() for p in paths)
    r = api.client.delete("/api/v1/patients/P-MANY-00", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert not any((api.spool / p).exists() for p in paths)
    with api.sm() as s:
        assert (
            s.scalar(select(func.count()).select_from(Series).where(Series.patient_key == "P-MANY-00")) == 0
        )
        assert s.scalar(select(func.count()).select_from(Job).where(Job.patient_key == "P-MANY-00")) == 0
        assert s.scalar(select(func.count()).select_from(Event)) == n_events + 1
        ev = s.scalars(select(Event).where(Event.entity == "patient", Event.entity_id == "P-MANY-00")).one()
        assert ev.new_state == "purged" and ev.actor == "alice"
    assert api.client.delete("/api/v1/patients/P-MANY-00", headers=ADMIN).status_code == 404


# -- metrics --------------------------------------------------------------------------------------


def test_metrics_parse_with_help_per_destination_and_durations(api: Api):
    text = api.client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    types = re.findall(r"^# TYPE (\S+)", text, re.M)
    assert len(types) == len(set(types)) == len(families), "two metric families share a name"
    for name in (
        "dicomnode_instances_received",
        "dicomnode_received_bytes",
        "dicomnode_instances_refused",
        "dicomnode_jobs_finished",
        "dicomnode_delivery_attempts",
        "dicomnode_fusion_phase_seconds",
        "dicomnode_study_complete_to_delivered_seconds",
        "dicomnode_queue_depth",
        "dicomnode_spool_bytes",
        "dicomnode_disk_free_bytes",
        "dicomnode_oldest_pending_job_age_seconds",
        "dicomnode_destination_deliveries",
        "dicomnode_destination_paused",
        "dicomnode_destination_last_success_timestamp_seconds",
    ):
        assert name in families, name
        assert families[name].documentation, f"{name} has no HELP"
    assert families["dicomnode_jobs_finished"].type == "counter"
    assert families["dicomnode_fusion_phase_seconds"].type == "histogram"
    fuse = [
        s
        for s in families["dicomnode_fusion_phase_seconds"].samples
        if s.name.endswith("_count") and s.labels["phase"] == "fuse"
    ]
    assert fuse[0].value >= 2  # the done and held jobs ran the fuse phase
    dests = {s.labels["destination"] for s in families["dicomnode_destination_deliveries"].samples}
    assert dests == {"pacs", "archive"}
    spool = families["dicomnode_spool_bytes"].samples[0].value
    assert spool > 0
    queue = {s.labels["stage"]: s.value for s in families["dicomnode_queue_depth"].samples}
    assert set(queue) == {"assemble", "retrieve", "fuse", "held", "dispatch"}

    def value(fams, name, **labels):  # type: ignore[no-untyped-def]
        return sum(
            s.value for s in fams[name].samples if all(s.labels.get(k) == v for k, v in labels.items())
        )

    # later scrapes follow the events appended since the last one
    before = (
        value(families, "dicomnode_jobs_finished", state="done"),
        value(families, "dicomnode_delivery_attempts", destination="archive", result="sent"),
    )
    job = add_patient(api.sm, api.spool, "P-METRICS", destinations=("archive",), n_outputs=1)
    with api.sm() as s:
        d = s.scalars(select(Delivery).join(Output).where(Output.job_id == job)).one()
        record(s, "dispatch", "delivery", d.id, "pending", "sent", "stored at archive")
        s.commit()
    again = {f.name: f for f in text_string_to_metric_families(api.client.get("/metrics").text)}
    assert value(again, "dicomnode_jobs_finished", state="done") == before[0] + 1
    assert value(again, "dicomnode_delivery_attempts", destination="archive", result="sent") == before[1] + 1


# -- the schema, fuzzed ---------------------------------------------------------------------------


def test_schema_fuzz_no_server_errors(tmp_path: Path):
    """schemathesis drives every operation of /openapi.json (bounded examples): no 500, responses conform."""
    import schemathesis  # noqa: PLC0415
    from schemathesis.checks import not_a_server_error  # noqa: PLC0415
    from schemathesis.specs.openapi.checks import (  # noqa: PLC0415
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    web = {"name": "cloud", "type": "dicomweb", "url": "https://pacs.example/dicom-web"}
    a = Api(tmp_path, destinations=[*DESTINATIONS, web])
    try:
        schema = schemathesis.openapi.from_dict(a.client.get("/openapi.json").json())
        checks = [
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ]
        operations = [op.ok() for op in schema.get_all_operations()]
        assert len(operations) >= 20
        for op in operations:

            @given(case=op.as_strategy())
            @settings(
                max_examples=8,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def run(case):  # type: ignore[no-untyped-def]
                response = case.call(base_url=a.url, headers=ADMIN, timeout=30)
                case.validate_response(response, checks=checks)

            run()
    finally:
        a.close()
