"""Baseline: the schema dicomnode created before migrations existed (schema_info version 1).

A database made by such a release is recognised by its ``schema_info`` row and stamped with this
revision without running it; a new database is created from the models and stamped with the
head. This revision runs only when the migrations themselves are checked against the models.

Revision ID: 0001_baseline
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schema_info",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute("INSERT INTO schema_info (id, version) VALUES (1, 1)")
    op.create_table(
        "associations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("direction", sa.String(length=8), nullable=False),
        sa.Column("calling_aet", sa.String(length=16), nullable=False),
        sa.Column("called_aet", sa.String(length=16), nullable=False),
        sa.Column("peer_host", sa.String(length=64), nullable=False),
        sa.Column("peer_port", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("n_stored", sa.Integer(), nullable=False),
        sa.Column("n_failed", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("entity", sa.String(length=16), nullable=False),
        sa.Column("entity_id", sa.String(length=80), nullable=False),
        sa.Column("old_state", sa.String(length=16), nullable=True),
        sa.Column("new_state", sa.String(length=16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_events_at", "events", ["at"], unique=False)
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("frame_of_reference_uid", sa.String(length=64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("image_position", sa.String(length=128), nullable=True),
        sa.Column("image_orientation", sa.String(length=256), nullable=True),
        sa.Column("pixel_spacing", sa.String(length=64), nullable=True),
        sa.Column("slice_thickness", sa.Float(), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("association_id", sa.Integer(), nullable=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    op.create_index("ix_instances_series_instance_uid", "instances", ["series_instance_uid"], unique=False)
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rule_name", sa.String(length=64), nullable=False),
        sa.Column("patient_key", sa.String(length=140), nullable=False),
        sa.Column("reference_series_uid", sa.String(length=64), nullable=False),
        sa.Column("moving_series_uid", sa.String(length=64), nullable=False),
        sa.Column("reference_generation", sa.Integer(), nullable=False),
        sa.Column("moving_generation", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=64), nullable=True),
        sa.Column("method_version", sa.String(length=32), nullable=True),
        sa.Column("output_series_uid", sa.String(length=64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("details", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "rule_name",
            "reference_series_uid",
            "moving_series_uid",
            "reference_generation",
            "moving_generation",
            name="uq_job_pair_generation",
        ),
    )
    op.create_index("ix_jobs_state", "jobs", ["state"], unique=False)
    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("patient_key", sa.String(length=140), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=False),
        sa.Column("patient_name", sa.String(length=200), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("series_description", sa.String(length=200), nullable=False),
        sa.Column("protocol_name", sa.String(length=200), nullable=False),
        sa.Column("sequence_name", sa.String(length=200), nullable=False),
        sa.Column("body_part", sa.String(length=64), nullable=False),
        sa.Column("acquisition_type", sa.String(length=8), nullable=False),
        sa.Column("image_type", sa.String(length=200), nullable=False),
        sa.Column("frame_of_reference_uid", sa.String(length=64), nullable=False),
        sa.Column("study_datetime", sa.DateTime(), nullable=True),
        sa.Column("n_instances", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("first_received_at", sa.DateTime(), nullable=False),
        sa.Column("last_received_at", sa.DateTime(), nullable=False),
        sa.Column("completed_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("series_instance_uid"),
    )
    op.create_index("ix_series_patient_key", "series", ["patient_key"], unique=False)
    op.create_index("ix_series_study_instance_uid", "series", ["study_instance_uid"], unique=False)
    op.create_table(
        "outputs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    op.create_index("ix_outputs_job_id", "outputs", ["job_id"], unique=False)
    op.create_index("ix_outputs_series_instance_uid", "outputs", ["series_instance_uid"], unique=False)
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("output_id", sa.Integer(), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["output_id"], ["outputs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("output_id", "destination", name="uq_delivery"),
    )
    op.create_index("ix_deliveries_state_next", "deliveries", ["state", "next_attempt_at"], unique=False)


def downgrade() -> None:
    raise NotImplementedError("the baseline is the oldest schema; restore a backup instead")
