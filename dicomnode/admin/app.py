"""The admin app (FastAPI): the /api/v1 API, the dashboard, /healthz, /metrics, sign-in.

Served by the ``admin`` stage (``dicomnode.admin.server``). Requests are logged at DEBUG with
the route's template (``/api/v1/patients/{key}``), never the raw path or query, which may carry a
patient ID, and never a header or body, which may carry a token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicomnode import __version__
from dicomnode.admin.actions import ActionError
from dicomnode.admin.api import make_api
from dicomnode.admin.context import AdminContext
from dicomnode.admin.dashboard import make_dashboard
from dicomnode.admin.status import collect_status
from dicomnode.config import Settings

log = logging.getLogger("dicomnode.admin")
access_log = logging.getLogger("dicomnode.admin.access")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer would make browsers send "Origin: null" on POSTs
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
}


MAX_HEADER_BYTES = 16 * 1024


class BodyLimit:
    """Refuses headers over 16 kB (431) and bodies over ``max_bytes`` (413) before a route reads them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            await PlainTextResponse("request headers too large", 431)(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.max_bytes):
                await PlainTextResponse("request body too large", 413)(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, "request body too large")
            return message

        await self.app(scope, limited, send)


def create_app(settings: Settings, sessionmaker: sessionmaker[Session]) -> FastAPI:
    """The admin app over one node's settings and DB."""
    ctx = AdminContext(settings, sessionmaker)
    cfg = settings.admin

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # routes are sync: they run in this bounded thread pool (DB work never blocks the event loop)
        anyio.to_thread.current_default_thread_limiter().total_tokens = cfg.http_workers
        yield

    app = FastAPI(
        title="dicomnode admin API",
        version=__version__,
        description="Read the node's state and act on it: jobs, outputs, deliveries, destinations, patients.",
        lifespan=lifespan,
        docs_url=None,  # the interactive pages load scripts from a CDN: nothing is fetched from outside
        redoc_url=None,
    )
    app.state.ctx = ctx

    @app.middleware("http")
    async def headers_and_access_log(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        response: Response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        route = request.scope.get("route")
        access_log.debug(
            "%s %s %d %.1f ms",
            request.method,
            getattr(route, "path", "(no route)"),
            response.status_code,
            (time.perf_counter() - t0) * 1000,
        )
        return response

    app.add_middleware(BodyLimit, max_bytes=cfg.http_max_body_bytes)

    @app.exception_handler(ActionError)
    async def action_error(_request: Request, exc: ActionError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        route = request.scope.get("route")
        log.error(
            "admin request %s %s failed: %s", request.method, getattr(route, "path", "?"), type(exc).__name__
        )
        log.debug("admin request failed", exc_info=exc)
        return JSONResponse({"detail": "internal error; see the node's log"}, status_code=500)

    def open_or_reader(request: Request, endpoint: str) -> None:
        if endpoint not in cfg.open_endpoints:
            ctx.auth.require(request, "read")

    @app.get("/healthz", tags=["status"])
    def healthz(request: Request) -> JSONResponse:
        """200 when the admin app can read the DB (open unless admin.open_endpoints says otherwise)."""
        open_or_reader(request, "healthz")
        try:
            with sessionmaker() as s:
                s.execute(text("SELECT 1"))
        except Exception as exc:
            log.error("healthz: database unavailable: %s", type(exc).__name__)
            return JSONResponse({"ok": False, "error": "database unavailable"}, status_code=503)
        return JSONResponse({"ok": True, "version": __version__})

    @app.get("/metrics", tags=["status"], response_class=PlainTextResponse)
    def metrics(request: Request) -> Response:
        """Prometheus exposition (counters, histograms, gauges read from the DB)."""
        open_or_reader(request, "metrics")
        return Response(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/status", tags=["status"])
    def legacy_status(request: Request) -> dict[str, Any]:
        """The status summary (the same as /api/v1/status)."""
        ctx.auth.require(request, "read")
        with sessionmaker() as s:
            return collect_status(s, settings=settings)

    app.include_router(make_api(ctx))
    app.include_router(make_dashboard(ctx))
    return app
