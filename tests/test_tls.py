"""DICOM TLS both ways, with a CA made for the test: dcmtk storescu/echoscu +tls against the receive
stage, and the dispatch stage against dcmtk storescp +tls."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from test_dispatch_outbox import Node as OutboxNode
from test_dispatch_outbox import sqlite_url
from test_receive_scp import make_ct

from dicomnode.config import ConfigError, load_settings
from dicomnode.db import Association, Instance
from dicomnode.testing.peers import have_dcmtk, peer_env, start_storescp
from dicomnode.testing.pki import Pki, make_test_pki
from dicomnode.testing.receiver import ReceiveProcess, start_receive_process

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="dcmtk (storescu/echoscu/storescp) not installed")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[ReceiveProcess]:
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key), "ca": str(pki.ca)}
    proc = start_receive_process(
        tmp_path_factory.mktemp("tls") / "node",
        node={"tls": {**tls, "require_client_cert": True}},
        storage={"fsync": False},
    )
    try:
        yield proc
    finally:
        proc.stop()


def dcmtk(
    program: str, port: int, *args: str, files: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess[str]:
    cmd = [program, *args, "-aet", "SCANNER", "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, env=peer_env(), timeout=120)


def rows(node: ReceiveProcess, model: type) -> list:
    from dicomnode.db import make_sessionmaker

    with make_sessionmaker(node.database_url)() as s:
        return list(s.scalars(select(model)))


def test_storescu_and_echoscu_over_tls_with_a_client_certificate(
    tls_node: ReceiveProcess, pki: Pki, tmp_path: Path
) -> None:
    f = make_ct(tmp_path / "a.dcm", study=generate_uid(), series=generate_uid())
    client = ("+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))
    assert dcmtk("echoscu", tls_node.port, *client).returncode == 0
    result = dcmtk("storescu", tls_node.port, *client, files=(f,))
    assert result.returncode == 0, result.stderr
    assert any(i.path.endswith(".dcm") for i in rows(tls_node, Instance))


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        ("anonymous", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
        ("stranger", "CERTIFICATE_VERIFY_FAILED"),
        ("plain", "TLS handshake failed"),
    ],
)
def test_peers_without_a_trusted_certificate_are_refused_and_audited(
    tls_node: ReceiveProcess, pki: Pki, tmp_path: Path, who: str, reason: str
) -> None:
    args = {
        "anonymous": ("+tla", "+cf", str(pki.ca)),
        "stranger": ("+tls", str(pki.stranger_key), str(pki.stranger_cert), "+cf", str(pki.ca)),
        "plain": (),
    }[who]
    f = make_ct(tmp_path / "a.dcm", study=generate_uid(), series=generate_uid())
    before = len(rows(tls_node, Instance))
    assert dcmtk("storescu", tls_node.port, *args, files=(f,)).returncode != 0
    assert len(rows(tls_node, Instance)) == before
    deadline = time.monotonic() + 20
    while not any(reason in (a.reason or "") for a in rows(tls_node, Association) if a.state == "rejected"):
        assert time.monotonic() < deadline, f"no audited refusal mentioning {reason}"
        time.sleep(0.1)


def test_tls_settings_are_checked_and_name_the_key(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ConfigError, match="node.tls.key"):
        load_settings(
            None, node={"tls": {"cert": str(pki.server_cert), "key": str(tmp_path / "missing.key")}}
        )
    with pytest.raises(ConfigError, match="require_client_cert needs ca"):
        load_settings(
            None,
            node={
                "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key), "require_client_cert": True}
            },
        )
    with pytest.raises(ConfigError, match="destinations.0.tls"):
        load_settings(
            None,
            destinations=[
                {
                    "name": "p",
                    "ae_title": "P",
                    "host": "h",
                    "port": 1,
                    "tls": {"ca": str(pki.ca), "cert": "x"},
                }
            ],
        )


def test_dispatch_delivers_over_tls_and_refuses_an_untrusted_pacs(tmp_path: Path, pki: Pki) -> None:
    scp = start_storescp(
        tmp_path,
        aet="TLSPACS",
        args=("+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca), "-rc"),
    )
    try:
        tls = {"ca": str(pki.ca), "cert": str(pki.client_cert), "key": str(pki.client_key)}
        pacs = {"name": "pacs", "ae_title": "TLSPACS", "host": "127.0.0.1", "port": scp.port, "tls": tls}
        node = OutboxNode(tmp_path / "trusted", sqlite_url(tmp_path / "trusted"), [pacs])
        uids = node.add_outputs(2)
        assert node.outbox.run_once() == 2
        assert [d.state for d in node.deliveries()] == ["sent", "sent"]
        assert len(scp.files()) == len(uids)

        # A PACS whose certificate our CA did not sign (here: we trust only the stranger's CA).
        untrusted = {**pacs, "tls": {**tls, "ca": str(pki.stranger_cert)}}
        other = OutboxNode(tmp_path / "untrusted", sqlite_url(tmp_path / "untrusted"), [untrusted])
        other.add_outputs(1)
        other.outbox.run_once()
        (delivery,) = other.deliveries()
        assert delivery.state == "pending" and "TLS" in (delivery.last_error or "")
        assert len(scp.files()) == len(uids)
    finally:
        scp.stop()
