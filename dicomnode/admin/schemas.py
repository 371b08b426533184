"""Response models of the admin API (they make the OpenAPI document at /openapi.json)."""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel, Field

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page, newest first: ask for the next with ``cursor=next_cursor`` (or ``offset=next_offset``)."""

    items: list[T]
    next_cursor: int | None = None
    next_offset: int | None = None


class JobOut(BaseModel):
    id: int
    rule: str
    state: str = Field(description="pending | running | done | failed | superseded | held | cancelled")
    attempts: int
    patient_key: str
    patient_id: str | None
    patient_name: str | None
    study_instance_uid: str | None
    reference_series_uid: str
    reference_modality: str | None
    moving_series_uid: str
    moving_modality: str | None
    method: str | None
    method_version: str | None
    alignment: str | None
    timings: dict[str, float] = Field(description="seconds per phase: resample, fuse, quality, output, total")
    error: str | None = Field(description="why the job failed, or why the quality gate held it")
    quality: dict[str, float] | None = Field(description="mean of the nine fusion metrics on sampled slices")
    output_series_uid: str | None
    output_series_number: int | None = Field(None, description="the fused series' Series Number")
    deliveries: dict[str, dict[str, int]] = Field(
        description="per destination, the job's deliveries by state"
    )
    created_at: str | None
    started_at: str | None
    finished_at: str | None


class EventOut(BaseModel):
    id: int
    at: str | None
    stage: str
    entity: str
    entity_id: str
    old_state: str | None
    new_state: str | None
    reason: str | None
    actor: str | None = Field(description="who asked, for admin actions")


class DecisionOut(BaseModel):
    rule: str
    decision: str = Field(description="chosen (for a job) | skipped | waiting (for a partner series)")
    reason: str | None = Field(description="why the rule chose, skipped or waits on the series")
    job_id: int | None


class SeriesOut(BaseModel):
    series_instance_uid: str
    study_instance_uid: str
    patient_key: str
    modality: str
    description: str
    instances: int
    state: str
    generation: int
    first_received_at: str | None
    last_received_at: str | None
    completed_at: str | None
    decisions: list[DecisionOut]
    role: str | None = None
    why: str | None = Field(None, description="why the rule chose this series for the job")


class DestinationDeliveries(BaseModel):
    destination: str
    states: dict[str, int]
    last_sent_at: str | None
    last_error: str | None = None


class JobDetailOut(JobOut):
    details: dict[str, object]
    quality_report: dict[str, object] | None
    sources: list[SeriesOut]
    destinations: list[DestinationDeliveries]
    n_outputs: int
    events: list[EventOut]


class StudyOut(BaseModel):
    study_instance_uid: str
    patient_key: str
    series: int
    instances: int
    modalities: list[str]
    study_datetime: str | None
    first_received_at: str | None
    last_received_at: str | None


class PatientOut(BaseModel):
    patient_key: str
    patient_id: str | None
    patient_name: str | None
    studies: int
    series: int
    last_received_at: str | None
    jobs: dict[str, int]


class OutputOut(BaseModel):
    id: int
    job_id: int
    sop_instance_uid: str
    series_instance_uid: str
    instance_number: int
    size_bytes: int | None
    created_at: str | None
    file_deleted_at: str | None = Field(description="when retention deleted the file")


class DeliveryOut(BaseModel):
    id: int
    output_id: int
    job_id: int
    destination: str
    state: str = Field(description="pending | sent | failed | held | cancelled")
    attempts: int
    next_attempt_at: str | None
    last_error: str | None
    last_status: int | None
    sent_at: str | None


class DestinationOut(BaseModel):
    name: str
    type: str = Field(description="dimse (C-STORE) | dicomweb (STOW-RS)")
    where: str = Field(description="AE@host:port, or the DICOMweb service URL")
    ae_title: str | None
    host: str | None
    port: int | None
    state: str = Field(description="active | paused")
    changed_by: str | None
    changed_at: str | None
    pending: int
    failed: int
    held: int
    last_success_at: str | None


class AssociationOut(BaseModel):
    id: int
    direction: str
    calling_aet: str
    called_aet: str
    peer_host: str
    peer_port: int
    state: str
    reason: str | None
    n_stored: int
    n_failed: int
    started_at: str | None
    ended_at: str | None


class ErrorOut(BaseModel):
    detail: str = Field(description="what went wrong, for a person to act on")


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut, "description": "no or unknown credentials"},
    403: {"model": ErrorOut, "description": "the token's role may not do this, or a missing CSRF token"},
    404: {"model": ErrorOut, "description": "no such job, output, destination or patient"},
    409: {"model": ErrorOut, "description": "the action does not apply in the current state"},
}


class ActionOut(BaseModel):
    ok: bool = True
    message: str
    changed: int


class FetchOut(BaseModel):
    id: int
    rule: str
    patient_key: str
    anchor_series_uid: str = Field(description="the complete series waiting for its partner")
    anchor_modality: str
    wanted: str = Field(description="the partner modality fetched from the sources")
    state: str = Field(
        description="waiting | querying | retrieving | retrieved | not_found | cancelled | failed"
    )
    reason: str | None
    attempts: int
    source: str | None
    chosen_series_uid: str | None
    created_at: str | None
    updated_at: str | None


class SeriesNotFusedOut(BaseModel):
    series_instance_uid: str
    modality: str
    description: str
    rule: str
    decision: str = Field(description="skipped | waiting")
    reason: str | None
    updated_at: str | None


class StatusOut(BaseModel):
    series: dict[str, int]
    jobs: dict[str, int]
    deliveries: dict[str, int]
    fetches: dict[str, int]
    totals: dict[str, int]
    queue: dict[str, int]
    disk: dict[str, int]
    destinations: list[DestinationOut]
    recent_jobs: list[JobOut]
    failures: dict[str, list[dict[str, object]]]
    series_not_fused: list[SeriesNotFusedOut] = Field(
        description="series a rule skipped or that wait for a partner, most recent first, with the reason"
    )
    recent_fetches: list[FetchOut]
    events: list[EventOut]
