"""The receive process that took an inbound association ("<storage.node_id>:<pid>"); room for a
destination's full DNS name as the peer of an outbound one.

Several receive processes may share one port and several hosts one database: the row says which
one served the peer (and which one's rows to close when that process is gone). A destination's
host name may be up to 253 characters; PostgreSQL refused the row (and so the delivery round)
for one longer than 64.

Revision ID: 0003_association_receiver
Revises: 0002_wider_sizes
Create Date: 2025-01-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_association_receiver"
down_revision = "0002_wider_sizes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("associations") as batch:
        batch.add_column(sa.Column("receiver", sa.String(length=128), nullable=True))
        batch.alter_column("peer_host", existing_type=sa.String(length=64), type_=sa.String(length=255))


def downgrade() -> None:
    with op.batch_alter_table("associations") as batch:
        batch.alter_column("peer_host", existing_type=sa.String(length=255), type_=sa.String(length=64))
        batch.drop_column("receiver")
