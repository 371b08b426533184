"""The admin stage's HTTP server: uvicorn in a thread, with limits a slow or idle client cannot outlast.

- A request (line and headers) must arrive within ``admin.http_header_timeout_seconds`` of the
  connection opening or of the previous response; its body within ``http_body_timeout_seconds``
  more. Deadlines are totals, not per read, so a client that drips one byte at a time is dropped
  as surely as one that sends nothing.
- An idle kept-alive connection closes after ``http_keepalive_seconds``.
- At most ``http_max_connections`` connections are served (503 beyond), headers are limited to
  16 kB (here while they arrive, in the app once parsed), bodies to ``http_max_body_bytes``, and
  route code runs in a pool of ``http_workers`` threads.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from dicomnode.admin.app import MAX_HEADER_BYTES
from dicomnode.config import AdminConfig, ConfigError
from dicomnode.logs import log_context

log = logging.getLogger("dicomnode.admin")


def guarded_protocol(header_timeout: float, body_timeout: float) -> type[H11Protocol]:
    """An H11Protocol class that closes connections whose request does not arrive in time."""

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _phase = "idle"

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.access_log = False  # uvicorn's line has the raw path and query (a patient ID)

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm("headers", header_timeout)

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self.conn.their_state is h11.IDLE:
                self._arm("headers", header_timeout)  # a new request on a kept-alive connection
            super().data_received(data)
            state = self.conn.their_state
            if state is h11.SEND_BODY and self._phase == "headers":
                self._arm("body", body_timeout)
            elif state is not h11.IDLE and state is not h11.SEND_BODY:
                self._disarm()  # the request is complete: the app answers it

        def on_response_complete(self) -> None:
            self._disarm()
            super().on_response_complete()  # arms uvicorn's keep-alive timeout

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, phase: str, seconds: float) -> None:
            self._disarm()
            self._phase = phase
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = None
            self._phase = "idle"

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            log.debug(
                "admin http: closing a connection whose request did not arrive in time (%s)", self._phase
            )
            if self._phase == "body" and self.conn.our_state is h11.SEND_RESPONSE:
                try:
                    self.transport.write(
                        self.conn.send(
                            h11.Response(
                                status_code=408, headers=[("connection", "close"), ("content-length", "0")]
                            )
                        )
                    )
                except h11.LocalProtocolError:
                    pass
            self.transport.close()

    return GuardedH11Protocol


class AdminServer:
    """Serves the admin app on host:port (port 0 = a free one) from a daemon thread."""

    def __init__(self, app: FastAPI, cfg: AdminConfig) -> None:
        self.cfg = cfg
        family = socket.AF_INET6 if ":" in cfg.http_host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say they are TCP
        # (proto 0 would leave Nagle on: ~40 ms per kept-alive request against delayed ACKs)
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((cfg.http_host, cfg.http_port))
        except OSError as exc:
            self.sock.close()
            raise ConfigError(
                f"admin.http_host/admin.http_port: cannot listen on {cfg.http_host}:{cfg.http_port}: "
                f"{exc.strerror or exc}; choose a free port or another address"
            ) from None
        self.sock.listen(128)
        self.sock.setblocking(False)
        config = uvicorn.Config(
            app,
            http=guarded_protocol(cfg.http_header_timeout_seconds, cfg.http_body_timeout_seconds),
            ws="none",
            lifespan="on",
            log_config=None,
            access_log=False,
            timeout_keep_alive=cfg.http_keepalive_seconds,  # type: ignore[arg-type]
            limit_concurrency=cfg.http_max_connections,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            server_header=False,
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="admin-http", daemon=True)

    def _run(self) -> None:
        log_context.set(stage="admin")  # route threads copy this context
        try:
            self.server.run(sockets=[self.sock])
        except Exception:
            log.exception("admin http server stopped")

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the admin HTTP server did not start; see the log")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self.sock.close()
