"""The admin API under /api/v1: read views (paged, filtered) and the audited admin actions."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from sqlalchemy.orm import Session

from dicomnode.admin import queries, schemas
from dicomnode.admin.actions import ActionResult
from dicomnode.admin.auth import Principal
from dicomnode.admin.context import AdminContext
from dicomnode.admin.status import collect_status

MAX_ID = 2**62  # ids beyond this cannot exist (SQLite integers are 64-bit)
Limit = Annotated[int, Query(ge=1, le=500, description="items per page")]
Cursor = Annotated[int | None, Query(ge=1, le=MAX_ID, description="next_cursor of the previous page")]
Offset = Annotated[int, Query(ge=0, le=100000, description="items to skip")]
Text = Annotated[str | None, Query(max_length=140)]
JobId = Annotated[int, Path(ge=1, le=MAX_ID)]
Destination = Annotated[str | None, Query(max_length=64, description="one destination; default: all")]


def reader(request: Request) -> Principal:
    """The caller, when it may read (401 or 403 otherwise)."""
    ctx: AdminContext = request.app.state.ctx
    return ctx.auth.require(request, "read")


def admin(request: Request) -> Principal:
    """The caller, when it may act (401 or 403 otherwise; CSRF checked for the dashboard)."""
    ctx: AdminContext = request.app.state.ctx
    return ctx.auth.require(request, "admin")


Reader = Annotated[Principal, Depends(reader)]
Admin = Annotated[Principal, Depends(admin)]


class PageArgs:
    """The page a list request asks for: ``limit`` items after ``cursor`` (or ``offset``)."""

    def __init__(self, limit: Limit = 50, cursor: Cursor = None, offset: Offset = 0) -> None:
        self.limit, self.cursor, self.offset = limit, cursor, offset


Paging = Annotated[PageArgs, Depends()]


def make_api(ctx: AdminContext) -> APIRouter:
    """The /api/v1 router over one node's DB."""
    router = APIRouter(prefix="/api/v1", responses=schemas.ERROR_RESPONSES)

    @contextmanager
    def session() -> Iterator[Session]:
        with ctx.sessionmaker() as s:
            yield s

    def page_of(
        list_fn: Callable[..., queries.Page], page: PageArgs, keyset: bool = True, **filters: Any
    ) -> Any:
        """One page of a list from ``queries`` (patients and studies page by offset only)."""
        paging: dict[str, Any] = {"limit": page.limit, "offset": page.offset}
        if keyset:
            paging["cursor"] = page.cursor
        with session() as s:
            return list_fn(s, **filters, **paging).as_json()

    def act(fn: Callable[..., ActionResult], *args: Any, **kwargs: Any) -> dict[str, Any]:
        result = fn(*args, **kwargs)
        return {"ok": True, "message": result.message, "changed": result.changed}

    # -- reads -----------------------------------------------------------------------------------

    @router.get("/status", response_model=schemas.StatusOut, tags=["status"])
    def status(_: Reader, patient: Text = None) -> dict[str, Any]:
        """Counts, queues, disk, destinations, recent jobs, failures and milestone events."""
        with session() as s:
            return collect_status(s, settings=ctx.settings, patient=patient)

    @router.get("/patients", response_model=schemas.Page[schemas.PatientOut], tags=["index"])
    def patients(_: Reader, page: Paging) -> dict[str, Any]:
        """Patients, most recently active first, with their jobs by state (``offset`` pages)."""
        return page_of(queries.list_patients, page, keyset=False)

    @router.get("/studies", response_model=schemas.Page[schemas.StudyOut], tags=["index"])
    def studies(_: Reader, page: Paging, patient: Text = None) -> dict[str, Any]:
        """Studies, most recently received first (``offset`` pages)."""
        return page_of(queries.list_studies, page, keyset=False, patient=patient)

    @router.get("/series", response_model=schemas.Page[schemas.SeriesOut], tags=["index"])
    def series(
        _: Reader,
        page: Paging,
        patient: Text = None,
        study: Text = None,
        state: Text = None,
        modality: Text = None,
        decision: Annotated[
            str | None, Query(max_length=16, description="chosen | skipped | waiting, by any rule")
        ] = None,
        rule: Annotated[str | None, Query(max_length=64, description="the rule that decided")] = None,
    ) -> dict[str, Any]:
        """Series with state, modality, instances, description, and which rule chose or skipped each
        (or keeps it waiting for a partner) and why."""
        return page_of(
            queries.list_series,
            page,
            patient=patient,
            study=study,
            state=state,
            modality=modality,
            decision=decision,
            rule=rule,
        )

    @router.get("/jobs", response_model=schemas.Page[schemas.JobOut], tags=["jobs"])
    def jobs(
        _: Reader,
        page: Paging,
        state: Text = None,
        rule: Text = None,
        patient: Text = None,
    ) -> dict[str, Any]:
        """Jobs newest first: rule, state, method, alignment, timings, error, quality, output series."""
        return page_of(queries.list_jobs, page, state=state, rule=rule, patient=patient)

    @router.get("/jobs/{job_id}", response_model=schemas.JobDetailOut, tags=["jobs"])
    def job(_: Reader, job_id: JobId) -> dict[str, Any]:
        """One job with its events, source series (and why they were chosen) and deliveries."""
        with session() as s:
            found = queries.job_detail(s, job_id)
        if found is None:
            raise HTTPException(404, f"no job {job_id}")
        return found

    @router.get("/outputs", response_model=schemas.Page[schemas.OutputOut], tags=["outputs"])
    def outputs(
        _: Reader,
        page: Paging,
        job_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    ) -> dict[str, Any]:
        """Fused instances written to the spool."""
        return page_of(queries.list_outputs, page, job_id=job_id)

    @router.get("/deliveries", response_model=schemas.Page[schemas.DeliveryOut], tags=["outputs"])
    def deliveries(
        _: Reader,
        page: Paging,
        state: Text = None,
        destination: Text = None,
        job_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    ) -> dict[str, Any]:
        """The outbox: state, attempts, next attempt and last error per (output, destination)."""
        return page_of(queries.list_deliveries, page, state=state, destination=destination, job_id=job_id)

    @router.get("/destinations", response_model=list[schemas.DestinationOut], tags=["destinations"])
    def destinations(_: Reader) -> list[dict[str, Any]]:
        """Configured destinations: active or paused, pending count, last success."""
        with session() as s:
            return queries.list_destinations(s, ctx.settings)

    @router.get("/fetches", response_model=schemas.Page[schemas.FetchOut], tags=["index"])
    def fetches(_: Reader, page: Paging, state: Text = None, patient: Text = None) -> dict[str, Any]:
        """Fetches of a rule's missing partner series from the PACS sources (C-FIND, C-MOVE/C-GET)."""
        return page_of(queries.list_fetches, page, state=state, patient=patient)

    @router.get("/associations", response_model=schemas.Page[schemas.AssociationOut], tags=["index"])
    def associations(
        _: Reader,
        page: Paging,
        direction: Text = None,
        state: Text = None,
    ) -> dict[str, Any]:
        """DICOM associations, inbound (scanners) and outbound (to destinations)."""
        return page_of(queries.list_associations, page, direction=direction, state=state)

    @router.get("/events", response_model=schemas.Page[schemas.EventOut], tags=["audit"])
    def events(
        _: Reader,
        page: Paging,
        entity: Annotated[str | None, Query(max_length=16)] = None,
        entity_id: Annotated[str | None, Query(max_length=140)] = None,
        since: datetime | None = None,
        stage: Annotated[str | None, Query(max_length=16)] = None,
    ) -> dict[str, Any]:
        """The audit log, newest first; ``since`` is an ISO time (UTC when it has no offset)."""
        if since is not None and since.tzinfo is not None:
            since = since.astimezone(UTC).replace(tzinfo=None)
        return page_of(
            queries.list_events, page, entity=entity, entity_id=entity_id, since=since, stage=stage
        )

    # -- actions ---------------------------------------------------------------------------------

    @router.post("/jobs/{job_id}/retry", response_model=schemas.ActionOut, tags=["actions"])
    def retry(who: Admin, job_id: JobId) -> dict[str, Any]:
        """A failed, held or cancelled job runs again."""
        return act(ctx.actions.retry_job, job_id, who.name)

    @router.post("/jobs/{job_id}/cancel", response_model=schemas.ActionOut, tags=["actions"])
    def cancel(who: Admin, job_id: JobId) -> dict[str, Any]:
        """A pending, running or held job ends cancelled; nothing of it is sent."""
        return act(ctx.actions.cancel_job, job_id, who.name)

    @router.post("/jobs/{job_id}/release", response_model=schemas.ActionOut, tags=["actions"])
    def release(who: Admin, job_id: JobId) -> dict[str, Any]:
        """A job held by the quality gate is sent as it is."""
        return act(ctx.actions.release_job, job_id, who.name)

    @router.post("/jobs/{job_id}/resend", response_model=schemas.ActionOut, tags=["actions"])
    def resend_job(who: Admin, job_id: JobId, destination: Destination = None) -> dict[str, Any]:
        """Every output of a done job is sent again (to one destination or all)."""
        return act(ctx.actions.resend_job, job_id, who.name, destination)

    @router.post("/outputs/{output_id}/resend", response_model=schemas.ActionOut, tags=["actions"])
    def resend_output(
        who: Admin, output_id: Annotated[int, Path(ge=1, le=MAX_ID)], destination: Destination = None
    ) -> dict[str, Any]:
        """One output is sent again (to one destination or all)."""
        return act(ctx.actions.resend_output, output_id, who.name, destination)

    @router.post("/destinations/{name}/pause", response_model=schemas.ActionOut, tags=["actions"])
    def pause(
        who: Admin,
        name: Annotated[str, Path(max_length=64)],
        reason: Annotated[str | None, Query(max_length=200)] = None,
    ) -> dict[str, Any]:
        """Stop sending to a destination; its deliveries wait."""
        return act(ctx.actions.pause_destination, name, who.name, reason)

    @router.post("/destinations/{name}/resume", response_model=schemas.ActionOut, tags=["actions"])
    def resume(who: Admin, name: Annotated[str, Path(max_length=64)]) -> dict[str, Any]:
        """Send to a paused destination again."""
        return act(ctx.actions.resume_destination, name, who.name)

    @router.delete("/patients/{key:path}", response_model=schemas.ActionOut, tags=["actions"])
    def purge(who: Admin, key: Annotated[str, Path(min_length=1, max_length=140)]) -> dict[str, Any]:
        """Delete a patient's spool files and rows; the audit events stay."""
        return act(ctx.actions.purge_patient, key, who.name)

    return router
