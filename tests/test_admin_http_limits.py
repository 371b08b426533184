"""The admin HTTP server drops slow and idle clients (slowloris) and keeps serving everyone else."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from dicomnode.admin.app import create_app
from dicomnode.admin.server import AdminServer
from dicomnode.config import load_settings
from dicomnode.db import make_sessionmaker

LIMIT = 2.0  # seconds a request may take to arrive (headers, then body)
DROPPED_WITHIN = 40.0  # generous: the machine is shared; a dropped socket reads EOF long before this


@pytest.fixture()
def server(tmp_path: Path):
    settings = load_settings(
        None,
        storage={"spool_dir": str(tmp_path / "spool"), "database_url": f"sqlite:///{tmp_path}/n.db"},
        admin={
            "http_port": 0,
            "http_header_timeout_seconds": LIMIT,
            "http_body_timeout_seconds": LIMIT,
            "http_keepalive_seconds": LIMIT,
            "http_max_connections": 100,
        },
    )
    srv = AdminServer(create_app(settings, make_sessionmaker(settings.storage.database_url)), settings.admin)
    srv.start()
    yield srv
    srv.stop()


def _connect(port: int, first: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if first:
        s.sendall(first)
    s.settimeout(DROPPED_WITHIN)
    return s


def _closed_by_server(s: socket.socket) -> bool:
    """True when the server closed the connection (EOF, perhaps after a 408), False when it kept it open."""
    try:
        while True:
            data = s.recv(4096)
            if not data:
                return True
            if b"408" not in data:
                return False  # an answer to a request that was never completed: wrong
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_idle_partial_and_dripping_clients_are_dropped_and_block_nobody(server: AdminServer):
    port = server.port
    idle = [_connect(port) for _ in range(25)]
    partial_headers = [_connect(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ") for _ in range(25)]
    partial_body = [
        _connect(
            port,
            b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 1000\r\n\r\ntoken=",
        )
        for _ in range(10)
    ]
    kept_alive = _connect(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # then never asks again

    dripped = {"bytes": 0, "cut": False}

    def drip() -> None:  # one header byte every 0.2 s: each read is quick, the request never ends
        s = _connect(port)
        try:
            for _ in range(int(DROPPED_WITHIN / 0.2)):
                s.sendall(b"X")
                dripped["bytes"] += 1
                time.sleep(0.2)
        except OSError:
            dripped["cut"] = True
        finally:
            s.close()

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()

    # everyone else is served while those 61 connections hang on
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        for _ in range(5):
            assert client.get("/healthz").status_code == 200
            assert client.get("/api/v1/jobs").status_code == 200

    assert kept_alive.recv(4096).startswith(b"HTTP/1.1 200")
    for s in [*idle, *partial_headers, *partial_body, kept_alive]:
        assert _closed_by_server(s), "a slow or idle client was kept open"
        s.close()
    dripper.join(timeout=DROPPED_WITHIN + 10)
    assert dripped["cut"], f"a client dripping header bytes was kept for {dripped['bytes']} bytes"

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        assert client.get("/healthz").status_code == 200  # and the server is still fine


def test_oversized_headers_and_bodies_are_refused(server: AdminServer):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
        r = client.get("/healthz", headers={"X-Big": "a" * 40000})
        assert r.status_code in (400, 431)
        r = client.post(
            "/login",
            content=b"token=" + b"a" * 200000,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 413


def test_listening_socket_says_tcp_so_replies_are_not_delayed(server: AdminServer):
    """asyncio disables Nagle only on sockets created as IPPROTO_TCP (else ~40 ms per kept-alive request)."""
    assert server.sock.proto == socket.IPPROTO_TCP
