"""Who is asking: bearer tokens from ``admin.tokens``, the dashboard's session cookie, CSRF checks.

- ``Authorization: Bearer TOKEN`` names a configured token (role ``read`` or ``admin``).
- ``/login`` trades a token for a session cookie: HttpOnly, SameSite=Strict, signed with a key
  made at start (a restart signs everyone out); it carries a CSRF secret that the page sends back
  in ``X-CSRF-Token`` on every action.
- Without any configured token (allowed on loopback only) every caller is ``local`` with the
  admin role, as Orthanc does without authentication on localhost.
- Any state-changing request whose ``Origin`` is another site is refused, whatever it carries.

Tokens are compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import HTTPException, Request

from dicomnode.config import AdminConfig

SESSION_COOKIE = "dicomnode_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
ROLES = {"read": 0, "admin": 1}


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``name`` goes into the audit as the actor."""

    name: str
    role: str
    via: str  # token | session | open
    csrf: str | None = None

    def may(self, role: str) -> bool:
        return ROLES[self.role] >= ROLES[role]


class AuthError(HTTPException):
    """401 (who are you?) or 403 (not allowed)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Authenticator:
    """Resolves a request to a :class:`Principal`, issues and checks session cookies."""

    def __init__(self, cfg: AdminConfig) -> None:
        self.cfg = cfg
        self._tokens = [(t.token.get_secret_value().encode(), t.name, t.role) for t in cfg.tokens]
        self._roles = {t.name: t.role for t in cfg.tokens}
        self._key = secrets.token_bytes(32)

    @property
    def open(self) -> bool:
        """No token configured: everyone on loopback is ``local`` with the admin role."""
        return not self._tokens

    def token_principal(self, token: str) -> Principal | None:
        given = token.encode()
        found = None
        for secret, name, role in self._tokens:  # no early exit: the time does not tell which
            if hmac.compare_digest(secret, given):
                found = Principal(name, role, "token")
        return found

    # -- sessions --------------------------------------------------------------------------------

    def _sign(self, payload: bytes) -> str:
        return _b64(hmac.new(self._key, payload, hashlib.sha256).digest())

    def new_session(self, who: Principal) -> str:
        payload = json.dumps(
            {
                "n": who.name,
                "e": int(time.time() + self.cfg.session_hours * 3600),
                "c": secrets.token_urlsafe(24),
            }
        ).encode()
        return f"{_b64(payload)}.{self._sign(payload)}"

    def session_principal(self, cookie: str) -> Principal | None:
        try:
            body, sig = cookie.split(".", 1)
            payload = _unb64(body)
            if not hmac.compare_digest(sig, self._sign(payload)):
                return None
            data = json.loads(payload)
            name, expires, csrf = str(data["n"]), int(data["e"]), str(data["c"])
        except (ValueError, KeyError, TypeError):
            return None
        if expires < time.time():
            return None
        if self.open:
            return Principal(name, "admin", "session", csrf)
        role = self._roles.get(name)  # a token removed from the config ends its sessions at restart
        return Principal(name, role, "session", csrf) if role else None

    # -- requests --------------------------------------------------------------------------------

    def identify(self, request: Request) -> Principal | None:
        """The caller, or None when it did not say who it is (or said it wrong)."""
        header = request.headers.get("authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return None
            return self.token_principal(token.strip())
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            who = self.session_principal(cookie)
            if who is not None:
                return who
        if self.open:
            return Principal("local", "admin", "open")
        return None

    def require(self, request: Request, role: str) -> Principal:
        """The caller if it may act with ``role``; 401/403 otherwise, CSRF and origin checked."""
        unsafe = request.method not in SAFE_METHODS
        if unsafe:
            check_origin(request)
        who = self.identify(request)
        if who is None:
            raise AuthError(
                401,
                "missing or unknown credentials: send Authorization: Bearer TOKEN, or sign in at /login",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not who.may(role):
            raise AuthError(403, f"token {who.name!r} has the {who.role} role; this needs {role}")
        if unsafe and who.via == "session":
            sent = request.headers.get(CSRF_HEADER, "")
            if not who.csrf or not hmac.compare_digest(sent.encode(), who.csrf.encode()):
                raise AuthError(403, f"missing or wrong {CSRF_HEADER} header (reload the page)")
        return who


def check_origin(request: Request) -> None:
    """Refuse a state-changing request sent by a page of another site (cross-site request forgery)."""
    if request.headers.get("sec-fetch-site", "") == "cross-site":
        raise AuthError(403, "cross-site request refused")
    origin = request.headers.get("origin")
    if origin is None:  # not sent by a browser page
        return
    host = request.headers.get("host", "")
    if urlsplit(origin).netloc != host:
        raise AuthError(403, "cross-site request refused (Origin does not match Host)")
