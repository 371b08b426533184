"""Admin: per-job quality, retention marks, paused destinations, who acted, list indexes.

- ``jobs.quality`` (the sampled fusion metrics, JSON);
- retention: ``instances.file_deleted_at``, ``outputs.size_bytes`` (64 bit, as instances) and
  ``outputs.file_deleted_at`` (the row stays for the audit when its file goes);
- ``events.actor`` (who asked for an admin action);
- ``destination_states`` (a destination paused by an admin, by whom, why);
- indexes for the admin API's lists and filters: ``ix_jobs_patient``, ``ix_jobs_rule``,
  ``ix_deliveries_state``, ``ix_deliveries_destination_state``, ``ix_events_entity``.

Every step is skipped when its result is already there, as in 0004 (a database that a build
between releases made with ``create_all``).

Revision ID: 0005_admin_quality_retention
Revises: 0004_leases_retrieval_output
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dicomnode.db.idempotent_ops import (
    add_column_if_missing,
    create_index_if_missing,
    create_table_if_missing,
)

revision = "0005_admin_quality_retention"
down_revision = "0004_leases_retrieval_output"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_column_if_missing("jobs", sa.Column("quality", sa.Text(), nullable=True))
    add_column_if_missing("instances", sa.Column("file_deleted_at", sa.DateTime(), nullable=True))
    add_column_if_missing("outputs", sa.Column("size_bytes", sa.BigInteger(), nullable=True))
    add_column_if_missing("outputs", sa.Column("file_deleted_at", sa.DateTime(), nullable=True))
    add_column_if_missing("events", sa.Column("actor", sa.String(length=80), nullable=True))
    create_table_if_missing(
        "destination_states",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("changed_by", sa.String(length=80), nullable=False),
        sa.Column("changed_at", sa.DateTime(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    create_index_if_missing("ix_jobs_patient", "jobs", ["patient_key"])
    create_index_if_missing("ix_jobs_rule", "jobs", ["rule_name"])
    create_index_if_missing("ix_deliveries_state", "deliveries", ["state"])
    create_index_if_missing(
        "ix_deliveries_destination_state", "deliveries", ["destination", "state", "sent_at"]
    )
    create_index_if_missing("ix_events_entity", "events", ["entity", "entity_id"])


def downgrade() -> None:
    for name, table in (
        ("ix_events_entity", "events"),
        ("ix_deliveries_destination_state", "deliveries"),
        ("ix_deliveries_state", "deliveries"),
        ("ix_jobs_rule", "jobs"),
        ("ix_jobs_patient", "jobs"),
    ):
        op.drop_index(name, table_name=table)
    op.drop_table("destination_states")
    for table, column in (
        ("events", "actor"),
        ("outputs", "file_deleted_at"),
        ("outputs", "size_bytes"),
        ("instances", "file_deleted_at"),
        ("jobs", "quality"),
    ):
        with op.batch_alter_table(table) as batch:
            batch.drop_column(column)
