"""Migration operations that are no-ops when their result is already there.

Releases before migrations created every table and column of their models with ``create_all``;
such a database is stamped with the baseline revision and then upgraded. A revision that adds
something those releases already created (columns and tables added to the models between the
baseline and the first revision that describes them) uses these, so that it works on both a
database that lacks them and one that has them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


def _inspector() -> sa.Inspector:
    return sa.inspect(op.get_bind())


def has_table(table: str) -> bool:
    return table in _inspector().get_table_names()


def has_column(table: str, column: str) -> bool:
    return has_table(table) and column in {c["name"] for c in _inspector().get_columns(table)}


def has_index(table: str, index: str) -> bool:
    return has_table(table) and index in {i["name"] for i in _inspector().get_indexes(table)}


def add_column_if_missing(table: str, column: sa.Column) -> None:  # type: ignore[type-arg]
    """``op.add_column`` (batch mode, for SQLite) unless the column exists."""
    if not has_column(table, column.name):
        with op.batch_alter_table(table) as batch:
            batch.add_column(column)


def create_table_if_missing(table: str, *elements: sa.SchemaItem, **kw: object) -> None:
    """``op.create_table`` unless the table exists."""
    if not has_table(table):
        op.create_table(table, *elements, **kw)


def create_index_if_missing(index: str, table: str, columns: list[str], **kw: object) -> None:
    """``op.create_index`` unless an index of that name exists on the table."""
    if not has_index(table, index):
        op.create_index(index, table, columns, **kw)
