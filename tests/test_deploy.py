"""The deployment files: no unauthenticated HTTP port published to the network, a systemd unit that
creates its state as its own user, a Docker health check that asks the admin app."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_the_image_keeps_the_admin_http_port_on_loopback() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    hosts = re.findall(r"DICOMNODE_ADMIN__HTTP_HOST=(\S+)", dockerfile)
    assert hosts == ["127.0.0.1"]
    exposed = {p for line in re.findall(r"^EXPOSE (.+)$", dockerfile, re.M) for p in line.split()}
    assert "8080" not in exposed and "11112" in exposed


def test_compose_publishes_http_only_on_the_hosts_loopback() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    http_ports = {"dicomnode": "8080", "orthanc": "8042"}
    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            parts = str(mapping).split(":")
            if parts[-1] == http_ports.get(name):
                assert len(parts) == 3 and parts[0] == "127.0.0.1", f"{name} publishes {mapping}"


def _unit() -> dict[str, list[str]]:
    """The [Service] keys of the systemd unit (a key may repeat)."""
    keys: dict[str, list[str]] = {}
    section = ""
    for line in (DEPLOY / "dicomnode.service").read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#") and section == "Service":
            key, value = line.split("=", 1)
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def test_systemd_unit_creates_its_state_as_its_own_user(tmp_path: Path) -> None:
    """The unit names a user, has systemd create /var/lib/dicomnode privately, and says how to install it."""
    keys = _unit()
    assert keys.get("DynamicUser") == ["yes"] or keys.get("User")
    assert keys["StateDirectory"] == ["dicomnode"] and keys["StateDirectoryMode"] == ["0700"]
    assert keys["UMask"] == ["0077"]
    env = dict(v.split("=", 1) for v in keys["Environment"])
    assert env["DICOMNODE_STORAGE__SPOOL_DIR"].startswith("/var/lib/dicomnode/")
    assert env["DICOMNODE_STORAGE__DATABASE_URL"] == "sqlite:////var/lib/dicomnode/dicomnode.db"
    comment = (DEPLOY / "dicomnode.service").read_text().split("[Unit]")[0]
    for step in ("pip install", "/etc/dicomnode/config.yaml", "systemctl enable --now dicomnode"):
        assert step in comment, step
    verify = shutil.which("systemd-analyze")
    if verify is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "dicomnode.service"  # verify checks that ExecStart exists: point it at a real program
    unit.write_text(
        (DEPLOY / "dicomnode.service").read_text().replace("/opt/dicomnode/venv/bin/dicomnode", "/bin/true")
    )
    res = subprocess.run([verify, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr


def test_docker_healthcheck_asks_the_admin_app(tmp_path: Path) -> None:
    """The image's HEALTHCHECK command, run as written (port moved), passes against the admin app
    and fails once it is gone."""
    from dicomnode.admin.app import create_app  # noqa: PLC0415
    from dicomnode.admin.server import AdminServer  # noqa: PLC0415
    from dicomnode.config import load_settings  # noqa: PLC0415
    from dicomnode.db import make_sessionmaker  # noqa: PLC0415

    dockerfile = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    (command,) = re.findall(r"^HEALTHCHECK .*?CMD (.+)$", dockerfile, re.M)
    assert "127.0.0.1:8080/healthz" in command
    settings = load_settings(
        None,
        storage={"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path}/n.db"},
        admin={"http_port": 0},
    )
    server = AdminServer(
        create_app(settings, make_sessionmaker(settings.storage.database_url)), settings.admin
    )
    server.start()
    argv = [sys.executable if a == "python" else a for a in shlex.split(command)]
    argv = [a.replace("127.0.0.1:8080", f"127.0.0.1:{server.port}") for a in argv]
    try:
        assert subprocess.run(argv, capture_output=True, timeout=60).returncode == 0
    finally:
        server.stop()
    assert subprocess.run(argv, capture_output=True, timeout=60).returncode != 0
