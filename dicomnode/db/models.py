"""SQLAlchemy models: the index, the pipeline state rows and the append-only audit events.

Stages talk only through these rows (and spool files). Each row that moves through a state
machine has a ``state`` column; every change of it is recorded in ``events``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

LEGACY_GUARD_VERSION = 2  # see SchemaInfo


def utcnow() -> datetime:
    """Now in UTC as a naive datetime: every DateTime column holds naive UTC, on every backend."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class SchemaInfo(Base):
    """A guard for dicomnode releases from before schema migrations.

    They wrote ``version`` 1 and refused any other value; a database managed by migrations holds
    ``LEGACY_GUARD_VERSION`` here, so such a release refuses it instead of writing into a schema it
    does not know. The schema's revision itself is Alembic's (table ``alembic_version``).
    """

    __tablename__ = "schema_info"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class Association(Base):
    """One DICOM association (accepted or rejected).

    An open association carries the lease of the process that serves it; when that lease expires
    (the process died) any stage closes the row as aborted.
    """

    __tablename__ = "associations"
    __table_args__ = (Index("ix_associations_state_owner", "state", "lease_owner"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    direction: Mapped[str] = mapped_column(String(8), default="in")  # in | out
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    called_aet: Mapped[str] = mapped_column(String(16), default="")
    peer_host: Mapped[str] = mapped_column(String(255), default="")  # an address, or a destination's DNS name
    peer_port: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default="open")  # open|rejected|released|aborted
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    n_stored: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # inbound: the receive process that took it, "<storage.node_id>:<pid>" (several share a port)
    receiver: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Instance(Base):
    """One stored SOP instance: where its file is and the tags the later stages need."""

    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    frame_of_reference_uid: Mapped[str] = mapped_column(String(64), default="")
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    image_position: Mapped[str | None] = mapped_column(String(128), nullable=True)  # "x\\y\\z"
    image_orientation: Mapped[str | None] = mapped_column(String(256), nullable=True)
    pixel_spacing: Mapped[str | None] = mapped_column(String(64), nullable=True)
    slice_thickness: Mapped[float | None] = mapped_column(Float, nullable=True)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64), default="")
    path: Mapped[str] = mapped_column(Text)  # relative to the spool dir
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # 64 bit: a data set may pass 2 GiB
    association_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    file_deleted_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # retention


class QuarantinedInstance(Base):
    """A data set received under a SOP Instance UID already stored with different content: kept, not fused.

    The first instance stays the indexed one; each different later one is a file under
    ``quarantine/`` and a row here, for an admin to compare and resolve.
    """

    __tablename__ = "quarantined_instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64), default="")
    path: Mapped[str] = mapped_column(Text)  # relative to the spool dir
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # 64 bit, as instances.size_bytes
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    peer_host: Mapped[str] = mapped_column(String(64), default="")
    association_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Series(Base):
    """A received series; state receiving -> complete (-> receiving again if more arrives)."""

    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    patient_key: Mapped[str] = mapped_column(String(140), index=True)  # "issuer^id" or "id"
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(200), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_description: Mapped[str] = mapped_column(String(200), default="")
    protocol_name: Mapped[str] = mapped_column(String(200), default="")
    sequence_name: Mapped[str] = mapped_column(String(200), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    acquisition_type: Mapped[str] = mapped_column(String(8), default="")  # MR: 2D | 3D
    image_type: Mapped[str] = mapped_column(String(200), default="")  # e.g. ORIGINAL\PRIMARY\AXIAL
    frame_of_reference_uid: Mapped[str] = mapped_column(String(64), default="")
    study_datetime: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[str] = mapped_column(String(16), default="receiving")  # receiving | complete
    first_received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Job(Base):
    """One fusion of a (reference, moving) series pair at given series generations."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint(
            "rule_name",
            "reference_series_uid",
            "moving_series_uid",
            "reference_generation",
            "moving_generation",
            name="uq_job_pair_generation",
        ),
        Index("ix_jobs_state", "state"),
        Index("ix_jobs_lease_owner", "lease_owner"),
        Index("ix_jobs_patient", "patient_key"),
        Index("ix_jobs_rule", "rule_name"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule_name: Mapped[str] = mapped_column(String(64))
    patient_key: Mapped[str] = mapped_column(String(140))
    reference_series_uid: Mapped[str] = mapped_column(String(64))
    moving_series_uid: Mapped[str] = mapped_column(String(64))
    reference_generation: Mapped[int] = mapped_column(Integer, default=1)
    moving_generation: Mapped[int] = mapped_column(Integer, default=1)
    # pending|running|done|failed|superseded|held (quality gate)|cancelled (admin)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    method: Mapped[str | None] = mapped_column(String(64), nullable=True)
    method_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    output_series_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    output_series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The fused series this job's output replaces (an earlier fusion of the rule in the same study).
    replaces_series_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    details: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: geometry, timings
    quality: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: sampled fusion metrics
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)  # host name (<= 64) : pid

    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # A running job is leased: its worker renews the expiry; ``attempts`` is the fencing token.
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Output(Base):
    """One Secondary Capture instance written to the spool by a job."""

    __tablename__ = "outputs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    instance_number: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)  # relative to the spool dir
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # 64 bit, as instances
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    file_deleted_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # retention


class Delivery(Base):
    """The outbox: one row per (output instance, destination)."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("output_id", "destination", name="uq_delivery"),
        Index("ix_deliveries_state_next", "state", "next_attempt_at"),
        Index("ix_deliveries_lease_owner", "lease_owner"),
        Index("ix_deliveries_destination_state", "destination", "state", "sent_at"),
        Index("ix_deliveries_state", "state"),  # (state, id): a page of one state, newest first
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("outputs.id"))
    destination: Mapped[str] = mapped_column(String(64))
    # pending|sent|failed|held (job held by the quality gate)|cancelled (admin)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    failing_since: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # first failed attempt
    # A delivery being sent stays 'pending' and is leased by its dispatcher.
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Worker(Base):
    """A live stage process: its heartbeat expiry, renewed with its leases (spool leftovers of a
    worker whose heartbeat expired are removed by the next stage that starts)."""

    __tablename__ = "workers"
    worker_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    stages: Mapped[str] = mapped_column(String(128), default="")
    host: Mapped[str] = mapped_column(String(128), default="")  # for people; never used for liveness
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    lease_expires_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    tmp_dir: Mapped[str] = mapped_column(String(64), default="")  # its partial writes: spool tmp/<tmp_dir>/


class SeriesDecision(Base):
    """What a rule decided about a series: chosen (for a job), skipped (and why) or waiting."""

    __tablename__ = "series_decisions"
    __table_args__ = (UniqueConstraint("series_instance_uid", "rule_name", name="uq_series_decision"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    rule_name: Mapped[str] = mapped_column(String(64))
    decision: Mapped[str] = mapped_column(String(16))  # chosen | skipped | waiting
    reason: Mapped[str] = mapped_column(Text, default="")
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


class SeriesRemoval(Base):
    """A replaced fused series to delete at one destination once its replacement is delivered there.

    state: pending (waiting for the replacement's deliveries, or retrying) | deleted | left (kept:
    the destination cannot delete, the series was not ours, or the replacement was not delivered)
    | failed (gave up after ``dispatch.max_attempts``).
    """

    __tablename__ = "series_removals"
    __table_args__ = (
        UniqueConstraint("series_instance_uid", "destination", name="uq_series_removal"),
        Index("ix_series_removals_state", "state"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str] = mapped_column(String(64))
    replaced_by_job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Event(Base):
    """Append-only audit event: who changed what from which state to which, and why."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_entity", "entity", "entity_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    stage: Mapped[str] = mapped_column(String(16))  # receive|assemble|retrieve|fuse|output|dispatch|admin
    # association|instance|series|job|output|delivery|removal|fetch|query|retrieve
    entity: Mapped[str] = mapped_column(String(16))
    entity_id: Mapped[str] = mapped_column(String(80), default="")
    old_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    new_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    actor: Mapped[str | None] = mapped_column(String(80), nullable=True)  # who, for admin actions


class DestinationState(Base):
    """Admin state of a destination: a paused destination keeps its deliveries pending, unsent."""

    __tablename__ = "destination_states"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    changed_by: Mapped[str] = mapped_column(String(80), default="")
    changed_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class PriorFetch(Base):
    """A complete series waiting for its rule's partner; when none arrives, the partner is fetched.

    state: waiting -> querying -> retrieving -> retrieved, or an end with a reason:
    not_found (no source holds a usable partner), cancelled (the partner arrived by itself,
    or the node already holds it), failed (retries exhausted).
    """

    __tablename__ = "prior_fetches"
    __table_args__ = (
        UniqueConstraint("rule_name", "anchor_series_uid", name="uq_prior_fetch"),
        Index("ix_prior_fetches_state", "state"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule_name: Mapped[str] = mapped_column(String(64))
    patient_key: Mapped[str] = mapped_column(String(140), index=True)
    anchor_series_uid: Mapped[str] = mapped_column(String(64))  # the series that waits
    anchor_modality: Mapped[str] = mapped_column(String(16))
    wanted_modality: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="waiting")
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    due_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)  # end of the wait
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # query rounds
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    source: Mapped[str | None] = mapped_column(String(64), nullable=True)
    chosen_study_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    chosen_series_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class PriorQuery(Base):
    """One C-FIND sent to a source for a fetch (study or series level); state sent -> done | failed."""

    __tablename__ = "prior_queries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fetch_id: Mapped[int] = mapped_column(ForeignKey("prior_fetches.id"), index=True)
    source: Mapped[str] = mapped_column(String(64))
    level: Mapped[str] = mapped_column(String(8))  # STUDY | SERIES
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)  # SERIES level
    state: Mapped[str] = mapped_column(String(16), default="sent")
    n_matches: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)  # final C-FIND status
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class PriorRetrieve(Base):
    """One series retrieved from a source (C-MOVE to the node, or C-GET); retried with backoff.

    state: pending -> running -> done, pending again after a failed attempt, failed after the
    last attempt, cancelled when the partner arrived by itself meanwhile.
    """

    __tablename__ = "prior_retrieves"
    __table_args__ = (Index("ix_prior_retrieves_state_next", "state", "next_attempt_at"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fetch_id: Mapped[int] = mapped_column(ForeignKey("prior_fetches.id"), index=True)
    source: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(8))  # c-move | c-get
    patient_key: Mapped[str] = mapped_column(String(140))
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    n_completed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    n_failed: Mapped[int | None] = mapped_column(Integer, nullable=True)
    n_warning: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
