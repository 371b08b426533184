"""Leases and heartbeats, series decisions, quarantine, clinical output and prior retrieval.

- leases: ``lease_owner``/``lease_expires_at`` on jobs, deliveries and associations (with their
  indexes), ``deliveries.failing_since`` (give-up rule), the ``workers`` heartbeat table;
- ``series_decisions`` (what each rule chose, skipped or waits for);
- ``quarantined_instances`` (a SOP Instance UID reused with other content), 64-bit sizes;
- clinical output: ``series.series_number``, ``jobs.output_series_number``,
  ``jobs.replaces_series_uid``, ``series_removals``;
- prior retrieval: ``prior_fetches``, ``prior_queries``, ``prior_retrieves``.

Releases from before migrations created all of these with ``create_all`` once their models had
them; such a database is stamped with the baseline, so every step here is skipped when its
result is already there (:mod:`dicomnode.db.idempotent_ops`).

Revision ID: 0004_leases_retrieval_output
Revises: 0003_association_receiver
Create Date: 2025-01-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dicomnode.db.idempotent_ops import (
    add_column_if_missing,
    create_index_if_missing,
    create_table_if_missing,
    has_table,
)

revision = "0004_leases_retrieval_output"
down_revision = "0003_association_receiver"
branch_labels = None
depends_on = None


def _lease_columns() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
    ]


def upgrade() -> None:
    for table in ("associations", "jobs", "deliveries"):
        for column in _lease_columns():
            add_column_if_missing(table, column)
    add_column_if_missing("deliveries", sa.Column("failing_since", sa.DateTime(), nullable=True))
    add_column_if_missing("jobs", sa.Column("output_series_number", sa.Integer(), nullable=True))
    add_column_if_missing("jobs", sa.Column("replaces_series_uid", sa.String(length=64), nullable=True))
    add_column_if_missing("series", sa.Column("series_number", sa.Integer(), nullable=True))
    create_index_if_missing("ix_associations_state_owner", "associations", ["state", "lease_owner"])
    create_index_if_missing("ix_jobs_lease_owner", "jobs", ["lease_owner"])
    create_index_if_missing("ix_deliveries_lease_owner", "deliveries", ["lease_owner"])

    create_table_if_missing(
        "workers",
        sa.Column("worker_id", sa.String(length=64), nullable=False),
        sa.Column("stages", sa.String(length=128), nullable=False),
        sa.Column("host", sa.String(length=128), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=False),
        sa.Column("tmp_dir", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("worker_id"),
    )

    create_table_if_missing(
        "series_decisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("rule_name", sa.String(length=64), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("series_instance_uid", "rule_name", name="uq_series_decision"),
    )
    create_index_if_missing(
        "ix_series_decisions_series_instance_uid", "series_decisions", ["series_instance_uid"]
    )
    create_index_if_missing("ix_series_decisions_updated_at", "series_decisions", ["updated_at"])

    _quarantined_instances()

    create_table_if_missing(
        "series_removals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("replaced_by_job_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["replaced_by_job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("series_instance_uid", "destination", name="uq_series_removal"),
    )
    create_index_if_missing("ix_series_removals_state", "series_removals", ["state"])

    _prior_retrieval()


def _quarantined_instances() -> None:
    if has_table("quarantined_instances"):  # made by create_all with 32-bit sizes
        with op.batch_alter_table("quarantined_instances") as batch:
            batch.alter_column("size_bytes", existing_type=sa.Integer(), type_=sa.BigInteger())
    create_table_if_missing(
        "quarantined_instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("calling_aet", sa.String(length=16), nullable=False),
        sa.Column("peer_host", sa.String(length=64), nullable=False),
        sa.Column("association_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    create_index_if_missing(
        "ix_quarantined_instances_sop_instance_uid", "quarantined_instances", ["sop_instance_uid"]
    )


def _prior_retrieval() -> None:
    create_table_if_missing(
        "prior_fetches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rule_name", sa.String(length=64), nullable=False),
        sa.Column("patient_key", sa.String(length=140), nullable=False),
        sa.Column("anchor_series_uid", sa.String(length=64), nullable=False),
        sa.Column("anchor_modality", sa.String(length=16), nullable=False),
        sa.Column("wanted_modality", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("due_at", sa.DateTime(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=True),
        sa.Column("chosen_study_uid", sa.String(length=64), nullable=True),
        sa.Column("chosen_series_uid", sa.String(length=64), nullable=True),
        *_lease_columns(),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("rule_name", "anchor_series_uid", name="uq_prior_fetch"),
    )
    create_index_if_missing("ix_prior_fetches_patient_key", "prior_fetches", ["patient_key"])
    create_index_if_missing("ix_prior_fetches_state", "prior_fetches", ["state"])

    create_table_if_missing(
        "prior_queries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("fetch_id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("level", sa.String(length=8), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("n_matches", sa.Integer(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["fetch_id"], ["prior_fetches.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    create_index_if_missing("ix_prior_queries_fetch_id", "prior_queries", ["fetch_id"])

    create_table_if_missing(
        "prior_retrieves",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("fetch_id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("patient_key", sa.String(length=140), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("n_completed", sa.Integer(), nullable=True),
        sa.Column("n_failed", sa.Integer(), nullable=True),
        sa.Column("n_warning", sa.Integer(), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        *_lease_columns(),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["fetch_id"], ["prior_fetches.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    create_index_if_missing("ix_prior_retrieves_fetch_id", "prior_retrieves", ["fetch_id"])
    create_index_if_missing(
        "ix_prior_retrieves_series_instance_uid", "prior_retrieves", ["series_instance_uid"]
    )
    create_index_if_missing("ix_prior_retrieves_state_next", "prior_retrieves", ["state", "next_attempt_at"])


def downgrade() -> None:
    for table in ("prior_retrieves", "prior_queries", "prior_fetches", "series_removals"):
        op.drop_table(table)
    op.drop_table("quarantined_instances")
    op.drop_table("series_decisions")
    op.drop_table("workers")
    with op.batch_alter_table("series") as batch:
        batch.drop_column("series_number")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_lease_owner")
        for column in ("lease_expires_at", "lease_owner", "replaces_series_uid", "output_series_number"):
            batch.drop_column(column)
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_lease_owner")
        for column in ("lease_expires_at", "lease_owner", "failing_since"):
            batch.drop_column(column)
    with op.batch_alter_table("associations") as batch:
        batch.drop_index("ix_associations_state_owner")
        for column in ("lease_expires_at", "lease_owner"):
            batch.drop_column(column)
