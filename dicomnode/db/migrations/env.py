"""Alembic environment: runs on the connection that ``dicomnode.db.schema`` hands over.

``render_as_batch`` makes column changes work on SQLite (which cannot ALTER a column) by
rebuilding the table; on PostgreSQL the same operations are plain ALTER TABLE statements.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from dicomnode.db.models import Base

config = context.config


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=config.attributes.get("target_metadata", Base.metadata),
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:  # the plain ``alembic`` command line with sqlalchemy.url set
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as conn:
        _run(conn)
