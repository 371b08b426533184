"""DICOMweb destinations: STOW-RS through the same outbox, retries and audit as C-STORE, against
Orthanc's DICOMweb plugin (basic auth by Orthanc's users, bearer tokens by an Orthanc Lua filter);
QIDO-RS and Orthanc's REST API as the sources of a study's Series Numbers; series deletion."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_dispatch_outbox import N_SLICES, Node, sqlite_url

from dicomnode.config import OrthancRestConfig, load_settings
from dicomnode.dispatch.dicomweb import qido_series_numbers, stow_result
from dicomnode.dispatch.orthanc_rest import OrthancRest
from dicomnode.dispatch.study_series import series_numbers_at
from dicomnode.dispatch.web_client import HttpAnswer
from dicomnode.testing.peers import Orthanc, free_port, have_orthanc_plugin

pytestmark = pytest.mark.skipif(not have_orthanc_plugin("dicomweb"), reason="needs orthanc-dicomweb")

USER, PASSWORD, TOKEN = "node", "s3cret", "tok-4711"
BEARER_FILTER = f"""
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if string.sub(uri, 1, 10) ~= '/dicom-web' then
    return true
  end
  return httpHeaders['authorization'] == 'Bearer {TOKEN}'
end
"""


@pytest.fixture(scope="module")
def basic_pacs(tmp_path_factory: pytest.TempPathFactory):
    handle = Orthanc(
        tmp_path_factory.mktemp("dw") / "basic",
        plugins=("dicomweb",),
        users={USER: PASSWORD},
        stop_graceful=False,
    )
    yield handle.start()
    handle.stop()


@pytest.fixture(scope="module")
def bearer_pacs(tmp_path_factory: pytest.TempPathFactory):
    handle = Orthanc(
        tmp_path_factory.mktemp("dw") / "bearer",
        plugins=("dicomweb",),
        lua=BEARER_FILTER,
        stop_graceful=False,
    )
    yield handle.start()
    handle.stop()


def web(url: str, **auth: str) -> dict:
    return {"name": "web", "type": "dicomweb", "url": url, **auth}


def test_stow_rs_delivers_with_rows_and_audit_like_c_store(basic_pacs: Orthanc, tmp_path: Path) -> None:
    node = Node(
        tmp_path, sqlite_url(tmp_path), [web(basic_pacs.dicomweb_url, username=USER, password=PASSWORD)]
    )
    uids = node.add_outputs(destinations=("web",))
    assert node.outbox.run_once() == N_SLICES
    assert set(uids) <= basic_pacs.sop_instance_uids()
    rows = node.deliveries()
    assert [(d.state, d.last_status, d.attempts) for d in rows] == [("sent", 0, 0)] * N_SLICES
    events = node.events()
    assert [(e.old_state, e.new_state) for e in events] == [("pending", "sent")] * N_SLICES
    assert all("stored at web" in (e.reason or "") for e in events)
    (assoc,) = node.associations()
    assert (assoc.direction, assoc.state, assoc.n_stored, assoc.n_failed) == ("out", "released", N_SLICES, 0)
    assert (assoc.called_aet, assoc.peer_host, assoc.peer_port) == ("", "127.0.0.1", basic_pacs.http_port)
    # nothing due any more: a second round sends nothing
    assert node.outbox.run_once() == 0
    assert len(node.associations()) == 1


def test_wrong_credentials_are_a_failed_attempt_with_the_reason(basic_pacs: Orthanc, tmp_path: Path) -> None:
    node = Node(
        tmp_path,
        sqlite_url(tmp_path),
        [web(basic_pacs.dicomweb_url, username=USER, password="wrong")],
        max_attempts=2,
    )
    node.add_outputs(n=1, destinations=("web",))
    assert node.outbox.run_once() == 0
    (row,) = node.deliveries()
    assert (row.state, row.attempts) == ("pending", 1)
    assert "refused the credentials (HTTP 401" in row.last_error
    assert row.next_attempt_at > node.clock.now  # backoff, as for C-STORE
    node.clock.advance(60)
    node.outbox.run_once()
    (row,) = node.deliveries()
    assert row.state == "failed" and row.attempts == 2
    assert "gave up after 2 attempts" in node.events()[-1].reason


def test_bearer_token(bearer_pacs: Orthanc, tmp_path: Path) -> None:
    good = Node(
        tmp_path / "good", sqlite_url(tmp_path / "good"), [web(bearer_pacs.dicomweb_url, bearer_token=TOKEN)]
    )
    uids = good.add_outputs(n=2, destinations=("web",))
    assert good.outbox.run_once() == 2
    assert set(uids) <= bearer_pacs.sop_instance_uids()
    bad = Node(
        tmp_path / "bad", sqlite_url(tmp_path / "bad"), [web(bearer_pacs.dicomweb_url, bearer_token="stolen")]
    )
    bad.add_outputs(n=1, destinations=("web",))
    assert bad.outbox.run_once() == 0
    assert "refused the credentials (HTTP 403" in bad.deliveries()[0].last_error


def test_server_down_then_up(tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "late", http_port=free_port(), plugins=("dicomweb",), stop_graceful=False)
    node = Node(tmp_path, sqlite_url(tmp_path), [web(pacs.dicomweb_url)])
    uids = node.add_outputs(n=2, destinations=("web",))
    assert node.outbox.run_once() == 0
    rows = node.deliveries()
    assert all(d.state == "pending" and d.attempts == 1 for d in rows)
    assert "cannot reach" in rows[0].last_error
    # the first refusal ends the round for this destination: the second file is not tried
    assert "not sent: an earlier request" in rows[1].last_error
    (assoc,) = node.associations()
    assert assoc.state == "aborted"
    with pacs:
        node.clock.advance(60)
        assert node.outbox.run_once() == 2
        assert set(uids) <= pacs.sop_instance_uids()


def test_stow_answers_are_read_per_instance() -> None:
    def answer(status: int, body: str) -> HttpAnswer:
        return HttpAnswer(status, "x", {}, body.encode())

    stored = '{"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2"]}}]}}'
    assert stow_result(answer(200, stored), "1.2", "w").stored
    warned = (
        '{"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2"]},'
        ' "00081196": {"vr": "US", "Value": [45056]}}]}}'
    )
    result = stow_result(answer(202, warned), "1.2", "w")
    assert result.stored and result.status == 0xB000 and "warning" in result.error
    failed = (
        '{"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2"]},'
        ' "00081197": {"vr": "US", "Value": [42752]}}]}}'
    )
    result = stow_result(answer(409, failed), "1.2", "w")
    assert not result.stored and result.status == 0xA700 and "0xA700" in result.error
    assert not stow_result(answer(503, "busy"), "1.2", "w").stored
    assert "HTTP 503 x: busy" in stow_result(answer(503, "busy"), "1.2", "w").error
    assert not stow_result(answer(202, "not json"), "1.2", "w").stored


def test_series_numbers_from_qido_and_orthanc_rest_and_deletion(basic_pacs: Orthanc, tmp_path: Path) -> None:
    node = Node(
        tmp_path, sqlite_url(tmp_path), [web(basic_pacs.dicomweb_url, username=USER, password=PASSWORD)]
    )
    uids = node.add_outputs(n=2, destinations=("web",))
    assert node.outbox.run_once() == 2
    tags = basic_pacs.instance_tags(basic_pacs.rest("/tools/lookup", "POST", uids[0].encode())[0]["ID"])
    study_uid, series_uid = tags["StudyInstanceUID"], tags["SeriesInstanceUID"]
    settings = load_settings(
        None,
        destinations=[
            web(basic_pacs.dicomweb_url, username=USER, password=PASSWORD),
            {
                "name": "pacs",
                "ae_title": "ORTHANC",
                "host": "127.0.0.1",
                "port": basic_pacs.dicom_port,
                "orthanc": {"url": basic_pacs.url, "username": USER, "password": PASSWORD},
            },
            {"name": "plain", "ae_title": "X", "host": "127.0.0.1", "port": 104},
        ],
    )
    by_qido, by_rest, plain = settings.destinations
    assert qido_series_numbers(by_qido, study_uid, 10) == {9001}
    assert series_numbers_at(by_rest, study_uid, 10) == ({9001}, "")
    assert series_numbers_at(plain, study_uid, 10) == (set(), "")
    assert series_numbers_at(by_qido, "1.2.3.999", 10) == (set(), "")
    assert "not usable" in series_numbers_at(by_qido, "1.2/../x", 10)[1]
    wrong = web(basic_pacs.dicomweb_url, username=USER, password="nope")
    numbers, note = series_numbers_at(
        load_settings(None, destinations=[wrong]).destinations[0], study_uid, 10
    )
    assert numbers == set() and "HTTP 401" in note
    rest = OrthancRest(OrthancRestConfig(url=basic_pacs.url, username=USER, password=PASSWORD), 10)
    orthanc_id = rest.find_series(series_uid)
    assert orthanc_id is not None and rest.made_by_us(orthanc_id)
    assert rest.find_series("1.2.3.999") is None
    rest.delete_series(orthanc_id)
    assert rest.find_series(series_uid) is None
    rest.close()
