"""The schemas dicomnode created before it had migrations (``schema_info`` version 1), frozen.

Copied column for column from the models of those releases, as plain tables, so that the tests can
make a database exactly as such a release did (``create_all`` plus the ``schema_info`` row) and
check that upgrading it keeps every row: ``metadata`` is the first release (the baseline revision
describes it), ``last_metadata`` the last one before migrations (leases, worker heartbeats, series
decisions, quarantine, clinical output, prior retrieval), which the upgrade meets half made.
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


# --- the last release before migrations: the first release's tables, and what it added ----------

last_metadata = MetaData()
for _table in metadata.tables.values():
    _table.to_metadata(last_metadata)


def _lease() -> list[Column]:  # type: ignore[type-arg]
    return [
        Column("lease_owner", String(64), nullable=True),
        Column("lease_expires_at", DateTime, nullable=True),
    ]


def _add(table: str, *columns: Column) -> None:  # type: ignore[type-arg]
    for column in columns:
        last_metadata.tables[table].append_column(column)


_add("associations", *_lease())
Index(
    "ix_associations_state_owner",
    last_metadata.tables["associations"].c.state,
    last_metadata.tables["associations"].c.lease_owner,
)
_add("series", Column("series_number", Integer, nullable=True))
_add(
    "jobs",
    Column("output_series_number", Integer, nullable=True),
    Column("replaces_series_uid", String(64), nullable=True),
    *_lease(),
)
Index("ix_jobs_lease_owner", last_metadata.tables["jobs"].c.lease_owner)
_add("deliveries", Column("failing_since", DateTime, nullable=True), *_lease())
Index("ix_deliveries_lease_owner", last_metadata.tables["deliveries"].c.lease_owner)

Table(
    "quarantined_instances",
    last_metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_instance_uid", String(64), index=True, nullable=False),
    Column("sop_class_uid", String(64), nullable=False),
    Column("study_instance_uid", String(64), nullable=False),
    Column("series_instance_uid", String(64), nullable=False),
    Column("transfer_syntax_uid", String(64), nullable=False),
    Column("path", Text, nullable=False),
    Column("size_bytes", Integer, nullable=False),
    Column("calling_aet", String(16), nullable=False),
    Column("peer_host", String(64), nullable=False),
    Column("association_id", Integer, nullable=True),
    Column("reason", Text, nullable=False),
    Column("received_at", DateTime, nullable=False),
)

Table(
    "workers",
    last_metadata,
    Column("worker_id", String(64), primary_key=True),
    Column("stages", String(128), nullable=False),
    Column("host", String(128), nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("lease_expires_at", DateTime, nullable=False),
    Column("tmp_dir", String(64), nullable=False),
)

Table(
    "series_decisions",
    last_metadata,
    Column("id", Integer, primary_key=True),
    Column("series_instance_uid", String(64), index=True, nullable=False),
    Column("rule_name", String(64), nullable=False),
    Column("decision", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    Column("job_id", Integer, nullable=True),
    Column("updated_at", DateTime, index=True, nullable=False),
    UniqueConstraint("series_instance_uid", "rule_name", name="uq_series_decision"),
)

Table(
    "series_removals",
    last_metadata,
    Column("id", Integer, primary_key=True),
    Column("series_instance_uid", String(64), nullable=False),
    Column("destination", String(64), nullable=False),
    Column("replaced_by_job_id", Integer, ForeignKey("jobs.id"), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("reason", Text, nullable=True),
    Column("next_attempt_at", DateTime, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("finished_at", DateTime, nullable=True),
    UniqueConstraint("series_instance_uid", "destination", name="uq_series_removal"),
    Index("ix_series_removals_state", "state"),
)

Table(
    "prior_fetches",
    last_metadata,
    Column("id", Integer, primary_key=True),
    Column("rule_name", String(64), nullable=False),
    Column("patient_key", String(140), index=True, nullable=False),
    Column("anchor_series_uid", String(64), nullable=False),
    Column("anchor_modality", String(16), nullable=False),
    Column("wanted_modality", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", Text, nullable=True),
    Column("due_at", DateTime, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime, nullable=False),
    Column("source", String(64), nullable=True),
    Column("chosen_study_uid", String(64), nullable=True),
    Column("chosen_series_uid", String(64), nullable=True),
    *_lease(),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("finished_at", DateTime, nullable=True),
    UniqueConstraint("rule_name", "anchor_series_uid", name="uq_prior_fetch"),
    Index("ix_prior_fetches_state", "state"),
)

Table(
    "prior_queries",
    last_metadata,
    Column("id", Integer, primary_key=True),
    Column("fetch_id", Integer, ForeignKey("prior_fetches.id"), index=True, nullable=False),
    Column("source", String(64), nullable=False),
    Column("level", String(8), nullable=False),
    Column("study_instance_uid", String(64), nullable=True),
    Column("state", String(16), nullable=False),
    Column("n_matches", Integer, nullable=False),
    Column("status", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime, nullable=True),
)

Table(
    "prior_retrieves",
    last_metadata,
    Column("id", Integer, primary_key=True),
    Column("fetch_id", Integer, ForeignKey("prior_fetches.id"), index=True, nullable=False),
    Column("source", String(64), nullable=False),
    Column("method", String(8), nullable=False),
    Column("patient_key", String(140), nullable=False),
    Column("study_instance_uid", String(64), nullable=False),
    Column("series_instance_uid", String(64), index=True, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime, nullable=False),
    Column("n_completed", Integer, nullable=True),
    Column("n_failed", Integer, nullable=True),
    Column("n_warning", Integer, nullable=True),
    Column("last_status", Integer, nullable=True),
    Column("error", Text, nullable=True),
    *_lease(),
    Column("created_at", DateTime, nullable=False),
    Column("started_at", DateTime, nullable=True),
    Column("finished_at", DateTime, nullable=True),
    Index("ix_prior_retrieves_state_next", "state", "next_attempt_at"),
)
