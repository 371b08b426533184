"""64-bit instance sizes, room for long worker names, and the guard against pre-migration releases.

PostgreSQL's INTEGER is 32 bit (SQLite's is 64): a data set over 2 GiB would not fit
``instances.size_bytes``. ``jobs.worker`` holds "<host name>:<pid>" and a host name alone may
be 64 characters. ``schema_info.version`` becomes 2 so that a release from before migrations
(which accepts only version 1) refuses this database.

Revision ID: 0002_wider_sizes
Revises: 0001_baseline
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_wider_sizes"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.alter_column("size_bytes", existing_type=sa.Integer(), type_=sa.BigInteger())
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("worker", existing_type=sa.String(length=64), type_=sa.String(length=128))
    op.execute("UPDATE schema_info SET version = 2")


def downgrade() -> None:
    op.execute("UPDATE schema_info SET version = 1")
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("worker", existing_type=sa.String(length=128), type_=sa.String(length=64))
    with op.batch_alter_table("instances") as batch:
        batch.alter_column("size_bytes", existing_type=sa.BigInteger(), type_=sa.Integer())
