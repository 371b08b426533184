"""A small HTTP(S) client for destinations reached over the web (DICOMweb, Orthanc's REST API).

One keep-alive connection per client, a timeout on every request, optional bearer or basic
authentication, and a bound on how much of an answer is read: a destination's answer is treated
as hostile like any other input. Every failure is an :class:`HttpError` whose message says where
and why, for the audit.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from dicomnode.config import HttpAuthConfig

MAX_ANSWER_BYTES = 4 << 20  # STOW-RS, QIDO-RS and Orthanc answers about a few series are far smaller


class HttpError(Exception):
    """The request got no usable answer (connection, TLS, timeout, oversized answer)."""


@dataclass
class HttpAnswer:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        """The body as JSON; None when it is empty or not JSON."""
        try:
            return json.loads(self.body) if self.body else None
        except (ValueError, UnicodeDecodeError):
            return None

    def short_body(self, limit: int = 200) -> str:
        return " ".join(self.body[:limit].decode("utf-8", "replace").split())


def auth_header(auth: HttpAuthConfig | None) -> str | None:
    """The Authorization header value for ``auth`` (None: no authentication)."""
    if auth is None:
        return None
    if auth.bearer_token:
        return f"Bearer {auth.bearer_token}"
    if auth.username:
        pair = f"{auth.username}:{auth.password or ''}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")
    return None


class HttpClient:
    """Requests to one base URL (``http://host:port/prefix``) over one keep-alive connection."""

    def __init__(self, base_url: str, auth: HttpAuthConfig | None, timeout: float) -> None:
        parts = urlsplit(base_url)
        self.base_url = base_url.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self._auth = auth_header(auth)
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.scheme == "https":
                self._conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=ssl.create_default_context()
                )
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        max_answer: int = MAX_ANSWER_BYTES,
    ) -> HttpAnswer:
        """One request; a keep-alive connection the server closed meanwhile is reopened once."""
        all_headers = dict(headers or {})
        if self._auth:
            all_headers["Authorization"] = self._auth
        url = self.prefix + path
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, url, body=body, headers=all_headers)
                rsp = conn.getresponse()
                data = rsp.read(max_answer + 1)
                if len(data) > max_answer:
                    self.close()
                    raise HttpError(f"{self.base_url} sent an answer over {max_answer} bytes")
                answer = HttpAnswer(rsp.status, rsp.reason, {k.lower(): v for k, v in rsp.getheaders()}, data)
                if rsp.will_close:
                    self.close()
                return answer
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                if attempt == 2:
                    raise HttpError(f"{self.base_url} closed the connection ({exc})") from exc
            except TimeoutError as exc:
                self.close()
                raise HttpError(f"no answer from {self.base_url} within {self.timeout:g} s") from exc
            except ssl.SSLError as exc:
                self.close()
                raise HttpError(f"TLS with {self.base_url} failed: {exc}") from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise HttpError(f"cannot reach {self.base_url}: {exc}") from exc
        raise AssertionError("unreachable")

    def json_request(self, method: str, path: str, data: Any = None) -> Any:
        """A JSON request; raises HttpError unless the answer is 2xx JSON (or empty)."""
        body = None if data is None else (data if isinstance(data, bytes) else json.dumps(data).encode())
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        answer = self.request(method, path, body, headers)
        if not 200 <= answer.status < 300:
            raise HttpError(
                f"{self.base_url}{path} answered HTTP {answer.status} {answer.reason}: {answer.short_body()}"
            )
        return answer.json()
