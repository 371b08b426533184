"""The retrieve stage's rows: leases on them, and every state change with its audit event.

State is written in short transactions, never while waiting on the network: the receive stage
writes the instances of a C-MOVE while it runs. A row being worked on carries a lease (owner,
expiry) that is renewed while a query or retrieve makes progress, so a stage that dies loses
nothing: another one takes the row when the lease has expired.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, update
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import RetrieveConfig
from dicomnode.db import PriorFetch, PriorQuery, PriorRetrieve, Series, record
from dicomnode.retrieve.scu import FindResult

STAGE = "retrieve"
OPEN_FETCH = ("waiting", "querying", "retrieving")
ACTIVE_RETRIEVE = ("pending", "running")
LEASE_SECONDS = 60.0  # at least; the stage uses more than twice its slowest source's timeout


def label(series: Series) -> str:
    """How the audit names a series: its description and the end of its UID."""
    desc = series.series_description or "(no description)"
    return f"'{desc}' ({series.series_instance_uid[-12:]})"


def backoff_seconds(cfg: RetrieveConfig, attempts: int) -> float:
    """Exponential backoff after ``attempts`` failed attempts, capped."""
    return min(cfg.backoff_initial_seconds * 2 ** max(attempts - 1, 0), cfg.backoff_max_seconds)


class Ledger:
    """Leases and audited state changes of fetch, query and retrieve rows."""

    def __init__(
        self,
        sessionmaker_: sessionmaker[Session],
        clock: Callable[[], datetime],
        worker_id: str,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.sessionmaker = sessionmaker_
        self.clock = clock
        self.worker_id = worker_id
        self.lease = timedelta(seconds=lease_seconds)

    def claim(self, s: Session, model: Any, row_id: int, **values: Any) -> bool:
        """Take the lease on a row nobody else holds (or whose lease expired), setting ``values``."""
        now = self.clock()
        res = s.execute(
            update(model)
            .where(
                model.id == row_id,
                or_(
                    model.lease_expires_at.is_(None),
                    model.lease_expires_at < now,
                    model.lease_owner == self.worker_id,
                ),
            )
            .values(lease_owner=self.worker_id, lease_expires_at=now + self.lease, **values)
        )
        return res.rowcount == 1  # type: ignore[attr-defined]

    def renew(self, model: Any, row_id: int) -> None:
        with self.sessionmaker() as s:
            s.execute(
                update(model)
                .where(model.id == row_id, model.lease_owner == self.worker_id)
                .values(lease_expires_at=self.clock() + self.lease)
            )
            s.commit()

    def release(self, model: Any, row_id: int) -> None:
        with self.sessionmaker() as s:
            s.execute(
                update(model)
                .where(model.id == row_id, model.lease_owner == self.worker_id)
                .values(lease_owner=None, lease_expires_at=None)
            )
            s.commit()

    def fetch_to(self, s: Session, fetch: PriorFetch, state: str, reason: str, **values: Any) -> None:
        """Move a fetch to ``state`` with its audit event; an end state releases the lease."""
        now = self.clock()
        old = fetch.state  # read first: the ORM update below also changes the loaded object
        extra: dict[str, Any] = {}
        if state not in OPEN_FETCH:
            extra = {"finished_at": now, "lease_owner": None, "lease_expires_at": None}
        s.execute(
            update(PriorFetch)
            .where(PriorFetch.id == fetch.id)
            .values(state=state, reason=reason, updated_at=now, **extra, **values)
        )
        record(s, STAGE, "fetch", fetch.id, old, state, reason)

    def end(self, fetch_id: int, state: str, reason: str) -> None:
        """End a fetch (not_found, cancelled, failed) in its own transaction."""
        with self.sessionmaker() as s:
            fetch = s.get(PriorFetch, fetch_id)
            assert fetch is not None
            self.fetch_to(s, fetch, state, reason)
            s.commit()

    def query_sent(self, fetch_id: int, source: str, level: str, study_uid: str | None, what: str) -> int:
        with self.sessionmaker() as s:
            q = PriorQuery(
                fetch_id=fetch_id,
                source=source,
                level=level,
                study_instance_uid=study_uid,
                state="sent",
                started_at=self.clock(),
            )
            s.add(q)
            s.flush()
            record(s, STAGE, "query", q.id, None, "sent", f"fetch {fetch_id}: {what}")
            s.commit()
            return q.id

    def query_done(self, query_id: int, result: FindResult, summary: str, dropped: list[str]) -> None:
        """Close a query row; the matches not used are named in its event (the first 10)."""
        state = "failed" if result.error else "done"
        if dropped:
            more = f"; and {len(dropped) - 10} more" if len(dropped) > 10 else ""
            summary += f"; not used: {'; '.join(dropped[:10])}{more}"
        with self.sessionmaker() as s:
            s.execute(
                update(PriorQuery)
                .where(PriorQuery.id == query_id)
                .values(
                    state=state,
                    status=result.status,
                    error=result.error,
                    n_matches=len(result.matches),
                    finished_at=self.clock(),
                )
            )
            reason = "; ".join(x for x in (summary, result.error) if x)
            record(s, STAGE, "query", query_id, "sent", state, reason)
            s.commit()

    def retrieve_to(
        self, s: Session, retrieve_id: int, old: str, new: str, reason: str, **values: Any
    ) -> None:
        """Move a retrieve to ``new`` (releasing its lease) with its audit event."""
        s.execute(
            update(PriorRetrieve)
            .where(PriorRetrieve.id == retrieve_id)
            .values(state=new, lease_owner=None, lease_expires_at=None, **values)
        )
        record(s, STAGE, "retrieve", retrieve_id, old, new, reason)
