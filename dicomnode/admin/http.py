"""A small read-only HTTP status endpoint: GET /status (JSON), /healthz, /metrics (Prometheus text)."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.admin.status import collect_status

log = logging.getLogger("dicomnode.admin")


def _metrics(st: dict[str, Any]) -> str:
    lines = []
    for what in ("series", "jobs", "deliveries"):
        name = f"dicomnode_{what}"
        lines.append(f"# TYPE {name} gauge")
        lines += [f'{name}{{state="{k}"}} {v}' for k, v in st[what].items()]
    for k, v in st["totals"].items():
        lines += [f"# TYPE dicomnode_{k}_total counter", f"dicomnode_{k}_total {v}"]
    return "\n".join(lines) + "\n"


class StatusServer:
    """Serves status from the DB on host:port (port 0 = a free one) in a daemon thread."""

    def __init__(self, sessionmaker: sessionmaker[Session], host: str, port: int) -> None:
        sm = sessionmaker

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("http " + fmt, *args)

            def _send(self, code: int, body: str, ctype: str) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                try:
                    with sm() as s:
                        if path == "/healthz":
                            s.execute(text("SELECT 1"))
                            self._send(200, '{"ok": true}\n', "application/json")
                        elif path == "/status":
                            self._send(200, json.dumps(collect_status(s), indent=1), "application/json")
                        elif path == "/metrics":
                            self._send(200, _metrics(collect_status(s, 0)), "text/plain; version=0.0.4")
                        else:
                            self._send(404, '{"error": "not found"}\n', "application/json")
                except Exception as exc:
                    log.exception("status request failed")
                    self._send(503, json.dumps({"error": str(exc)}), "application/json")

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="admin-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
