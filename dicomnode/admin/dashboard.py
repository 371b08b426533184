"""The dashboard: server-rendered pages (Jinja2) with a little JS that refreshes them and sends actions.

``/`` shows queues, disk, what needs attention (failed and held jobs, failed deliveries), jobs,
destinations and the last milestone events; ``/jobs/{id}`` a job's timeline, sources, quality,
thumbnails and deliveries. Actions go to the API with the session's CSRF token.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from dicomnode import __version__
from dicomnode.admin import queries
from dicomnode.admin.auth import SESSION_COOKIE, AuthError, Principal, check_origin
from dicomnode.admin.context import AdminContext
from dicomnode.admin.status import collect_status
from dicomnode.spool import thumbnail_path

HERE = Path(__file__).parent
STATES_NEEDING_ATTENTION = ("failed", "held")


def _safe_next(target: str | None) -> str:
    """A local path to go back to after sign-in (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _size(n: int | None) -> str:
    n = float(n or 0)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _person_name(pn: str | None) -> str:
    """A DICOM Person Name (``Family^Given^Middle``) as people write it."""
    parts = [p for p in (pn or "").split("=")[0].split("^") if p]
    return f"{parts[0]}, {' '.join(parts[1:])}" if len(parts) > 1 else (parts[0] if parts else "")


def _short(text: str | None, n: int = 160) -> str:
    text = text or ""
    return text if len(text) <= n else text[: n - 1] + "…"


def make_dashboard(ctx: AdminContext) -> APIRouter:
    """Routes of the dashboard pages, sign-in and static files."""
    router = APIRouter(include_in_schema=False)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["size"] = _size
    templates.env.filters["pn"] = _person_name
    templates.env.filters["short"] = _short
    static = StaticFiles(directory=str(HERE / "static"))

    @router.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    @router.get("/static/{name}")
    async def static_file(request: Request, name: Annotated[str, PathParam(max_length=64)]) -> Response:
        return await static.get_response(name, request.scope)

    def viewer(request: Request) -> Principal | None:
        try:
            return ctx.auth.require(request, "read")
        except AuthError:
            return None

    def page(request: Request, name: str, who: Principal, **values: Any) -> HTMLResponse:
        return templates.TemplateResponse(
            request,
            name,
            {
                "who": who,
                "csrf": who.csrf or "",
                "can_act": who.may("admin"),
                "signed_in": who.via == "session",
                "ae_title": ctx.settings.node.ae_title,
                "version": __version__,
                **values,
            },
        )

    def to_login(request: Request) -> RedirectResponse:
        return RedirectResponse(f"/login?next={quote(_safe_next(request.url.path))}", status_code=303)

    @router.get("/", response_class=HTMLResponse)
    def overview(request: Request) -> Response:
        who = viewer(request)
        if who is None:
            return to_login(request)
        with ctx.sessionmaker() as s:
            st = collect_status(s, settings=ctx.settings, n_jobs=50, n_events=25)
        jobs = sorted(st["recent_jobs"], key=lambda j: (j["state"] not in STATES_NEEDING_ATTENTION, -j["id"]))
        return page(request, "index.html", who, st=st, jobs=jobs)

    @router.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(request: Request, job_id: Annotated[int, PathParam(ge=1, le=2**62)]) -> Response:
        who = viewer(request)
        if who is None:
            return to_login(request)
        with ctx.sessionmaker() as s:
            job = queries.job_detail(s, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        thumbs = (Path(ctx.settings.storage.spool_dir) / thumbnail_path(job_id)).is_file()
        return page(request, "job.html", who, job=job, thumbs=thumbs, destinations=ctx.settings.destinations)

    @router.get("/jobs/{job_id}/thumbnails.png")
    def thumbnails(request: Request, job_id: Annotated[int, PathParam(ge=1, le=2**62)]) -> Response:
        ctx.auth.require(request, "read")
        path = Path(ctx.settings.storage.spool_dir) / thumbnail_path(job_id)
        if not path.is_file():
            raise HTTPException(404, "no thumbnails for this job (not fused yet, or removed by retention)")
        return FileResponse(path, media_type="image/png")

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/") -> Response:  # noqa: A002
        return templates.TemplateResponse(
            request, "login.html", {"next": _safe_next(next), "error": None, "version": __version__}
        )

    @router.post("/login", response_class=HTMLResponse)
    def login(
        request: Request,
        token: Annotated[str, Form(max_length=512)],
        next: Annotated[str, Form(max_length=512)] = "/",  # noqa: A002
    ) -> Response:
        check_origin(request)
        if ctx.auth.open:
            who: Principal | None = Principal("local", "admin", "open")
        else:
            who = ctx.auth.token_principal(token.strip())
        if who is None:
            return templates.TemplateResponse(
                request,
                "login.html",
                {"next": _safe_next(next), "error": "Unknown token.", "version": __version__},
                status_code=401,
            )
        response = RedirectResponse(_safe_next(next), status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            ctx.auth.new_session(who),
            max_age=int(ctx.settings.admin.session_hours * 3600),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    @router.post("/logout")
    def logout(request: Request) -> Response:
        who = ctx.auth.identify(request)
        if who is not None and who.via == "session":
            sent = request.headers.get("X-CSRF-Token", "")
            if not hmac.compare_digest(sent.encode(), (who.csrf or "").encode()):
                raise AuthError(403, "missing or wrong X-CSRF-Token header")
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    return router
