"""Application logging: text or JSON lines (``logging.format``) with stage, association and job.

The context is per thread (each stage runs in its own threads, each association in its own):
:data:`log_context` binds ``stage``, ``association_id`` and ``job_id`` where the work starts, and a
filter copies them onto every record. Patient names, IDs and birth dates are never logged: the
audit DB holds identifiers, the log says "job 12" or "association 7".
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

_CONTEXT: ContextVar[dict[str, Any]] = ContextVar("dicomnode_log_context")
FIELDS = ("stage", "association_id", "job_id")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogContext:
    """Binds context values for the records of the current thread."""

    def get(self) -> dict[str, Any]:
        return _CONTEXT.get({})

    def set(self, **values: Any) -> None:
        """Bind for the rest of this thread's work (a stage's worker, an association's thread)."""
        _CONTEXT.set({**self.get(), **values})

    @contextmanager
    def bind(self, **values: Any) -> Iterator[None]:
        """Bind for a block (one job)."""
        token = _CONTEXT.set({**self.get(), **values})
        try:
            yield
        finally:
            _CONTEXT.reset(token)

    def run_as(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` with ``stage`` bound: the target of a stage's thread."""
        self.set(stage=stage)
        return fn(*args)


log_context = LogContext()


class ContextFilter(logging.Filter):
    """Puts stage, association_id and job_id (None when unbound) on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _CONTEXT.get({})
        for name in FIELDS:
            if not hasattr(record, name):
                setattr(record, name, ctx.get(name))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, stage, association_id, job_id."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            out[name] = getattr(record, name, None)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to ``sys.stderr`` as it is when a record comes (not as it was when configured)."""

    @property  # type: ignore[override]
    def stream(self):  # type: ignore[no-untyped-def]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # type: ignore[no-untyped-def]
        pass


def configure_logging(fmt: str = "text", level: str = "INFO", verbose: bool = False) -> None:
    """Send all logs to stderr in ``fmt`` (text | json) at ``level`` (DEBUG with ``verbose``).

    Replaces the handler an earlier call installed; handlers others installed stay.
    """
    handler = StderrHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, StderrHandler):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else getattr(logging, level.upper(), logging.INFO))
    net = logging.DEBUG if os.environ.get("DICOMNODE_DEBUG_NET") else logging.WARNING
    logging.getLogger("pynetdicom").setLevel(net)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Alembic narrates every migration step; dicomnode.db.schema says what an upgrade did.
    logging.getLogger("alembic").setLevel(logging.DEBUG if verbose else logging.WARNING)
