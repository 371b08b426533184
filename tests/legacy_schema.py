"""The schema dicomnode created before it had migrations (``schema_info`` version 1), frozen.

Copied column for column from the models of that release, as plain tables, so that the tests can
make a database exactly as that release did (``create_all`` plus the ``schema_info`` row) and
check that the baseline revision describes it and that upgrading it keeps every row.
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

schema_info = Table(
    "schema_info",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
)

associations = Table(
    "associations",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("direction", String(8), nullable=False),
    Column("calling_aet", String(16), nullable=False),
    Column("called_aet", String(16), nullable=False),
    Column("peer_host", String(64), nullable=False),
    Column("peer_port", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", Text, nullable=True),
    Column("n_stored", Integer, nullable=False),
    Column("n_failed", Integer, nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("ended_at", DateTime, nullable=True),
)

instances = Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_instance_uid", String(64), unique=True, nullable=False),
    Column("sop_class_uid", String(64), nullable=False),
    Column("series_instance_uid", String(64), index=True, nullable=False),
    Column("study_instance_uid", String(64), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("issuer_of_patient_id", String(64), nullable=False),
    Column("modality", String(16), nullable=False),
    Column("frame_of_reference_uid", String(64), nullable=False),
    Column("instance_number", Integer, nullable=True),
    Column("image_position", String(128), nullable=True),
    Column("image_orientation", String(256), nullable=True),
    Column("pixel_spacing", String(64), nullable=True),
    Column("slice_thickness", Float, nullable=True),
    Column("rows", Integer, nullable=True),
    Column("columns", Integer, nullable=True),
    Column("number_of_frames", Integer, nullable=False),
    Column("transfer_syntax_uid", String(64), nullable=False),
    Column("path", Text, nullable=False),
    Column("size_bytes", Integer, nullable=False),
    Column("association_id", Integer, nullable=True),
    Column("received_at", DateTime, nullable=False),
)

series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("series_instance_uid", String(64), unique=True, nullable=False),
    Column("study_instance_uid", String(64), index=True, nullable=False),
    Column("patient_key", String(140), index=True, nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("issuer_of_patient_id", String(64), nullable=False),
    Column("patient_name", String(200), nullable=False),
    Column("modality", String(16), nullable=False),
    Column("series_description", String(200), nullable=False),
    Column("protocol_name", String(200), nullable=False),
    Column("sequence_name", String(200), nullable=False),
    Column("body_part", String(64), nullable=False),
    Column("acquisition_type", String(8), nullable=False),
    Column("image_type", String(200), nullable=False),
    Column("frame_of_reference_uid", String(64), nullable=False),
    Column("study_datetime", DateTime, nullable=True),
    Column("n_instances", Integer, nullable=False),
    Column("generation", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("first_received_at", DateTime, nullable=False),
    Column("last_received_at", DateTime, nullable=False),
    Column("completed_at", DateTime, nullable=True),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("rule_name", String(64), nullable=False),
    Column("patient_key", String(140), nullable=False),
    Column("reference_series_uid", String(64), nullable=False),
    Column("moving_series_uid", String(64), nullable=False),
    Column("reference_generation", Integer, nullable=False),
    Column("moving_generation", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("method", String(64), nullable=True),
    Column("method_version", String(32), nullable=True),
    Column("output_series_uid", String(64), nullable=True),
    Column("error", Text, nullable=True),
    Column("details", Text, nullable=True),
    Column("worker", String(64), nullable=True),
    Column("created_at", DateTime, nullable=False),
    Column("started_at", DateTime, nullable=True),
    Column("finished_at", DateTime, nullable=True),
    UniqueConstraint(
        "rule_name",
        "reference_series_uid",
        "moving_series_uid",
        "reference_generation",
        "moving_generation",
        name="uq_job_pair_generation",
    ),
    Index("ix_jobs_state", "state"),
)

outputs = Table(
    "outputs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), index=True, nullable=False),
    Column("sop_instance_uid", String(64), unique=True, nullable=False),
    Column("series_instance_uid", String(64), index=True, nullable=False),
    Column("instance_number", Integer, nullable=False),
    Column("path", Text, nullable=False),
    Column("created_at", DateTime, nullable=False),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("output_id", Integer, ForeignKey("outputs.id"), nullable=False),
    Column("destination", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("last_status", Integer, nullable=True),
    Column("next_attempt_at", DateTime, nullable=False),
    Column("sent_at", DateTime, nullable=True),
    Column("created_at", DateTime, nullable=False),
    UniqueConstraint("output_id", "destination", name="uq_delivery"),
    Index("ix_deliveries_state_next", "state", "next_attempt_at"),
)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", DateTime, index=True, nullable=False),
    Column("stage", String(16), nullable=False),
    Column("entity", String(16), nullable=False),
    Column("entity_id", String(80), nullable=False),
    Column("old_state", String(16), nullable=True),
    Column("new_state", String(16), nullable=True),
    Column("reason", Text, nullable=True),
)
