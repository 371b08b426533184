"""The deployment files do not publish the unauthenticated HTTP ports to the network."""

from __future__ import annotations

import re
from pathlib import Path

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
