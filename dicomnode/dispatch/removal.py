"""Delete fused series that a re-fusion replaced, at destinations that allow it (``output.replace_previous``).

The fuse stage writes one ``series_removals`` row per destination when a job's series replaces an
earlier one. A row waits until every instance of the replacement is stored at that destination
(a PACS never loses the fused view), then the earlier series is looked up through the
destination's Orthanc REST API and deleted, when this node made it. A replacement that failed to
reach the destination leaves the earlier series in place. Each outcome is one audit event.
Several dispatchers may work the rows: one holds a row while it deletes (``claim_removal``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import DestinationConfig, Settings
from dicomnode.db import Delivery, Output, SeriesRemoval, record, utcnow
from dicomnode.db.leases import claim_removal
from dicomnode.dispatch.orthanc_rest import OrthancRest
from dicomnode.dispatch.web_client import HttpError

log = logging.getLogger("dicomnode.dispatch")
STAGE = "dispatch"
MIN_POLL_SECONDS = 2.0


class SeriesRemover:
    """Works the pending ``series_removals`` rows; ``run_forever`` is a dispatch-stage worker."""

    def __init__(
        self, settings: Settings, sessionmaker: sessionmaker[Session], clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.clock = clock

    def run_forever(self, stop: threading.Event) -> None:
        poll = max(self.settings.dispatch.poll_seconds, MIN_POLL_SECONDS)
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # a DB outage must not kill the worker
                log.exception("series removal round failed")
            stop.wait(poll)

    def run_once(self) -> int:
        """Settle every due row whose replacement is delivered (or failed); returns rows settled."""
        with self.sessionmaker() as s:
            due = s.scalars(
                select(SeriesRemoval)
                .where(SeriesRemoval.state == "pending", SeriesRemoval.next_attempt_at <= self.clock())
                .order_by(SeriesRemoval.id)
                .limit(100)
            ).all()
        configured = {d.name: d for d in self.settings.destinations}
        settled = 0
        for row in due:
            dest = configured.get(row.destination)
            if dest is None or dest.orthanc is None:
                self._settle(row, "left", f"{row.destination} is not configured with an Orthanc REST API")
                settled += 1
                continue
            delivery = self._replacement_delivered(row)
            if delivery is None:
                continue  # still on its way
            if not delivery:
                self._settle(
                    row,
                    "left",
                    f"the replacing series (job {row.replaced_by_job_id}) was not delivered to "
                    f"{row.destination}; the earlier series stays",
                )
                settled += 1
                continue
            now = self.clock()
            hold = timedelta(seconds=3 * self.settings.dispatch.timeout_seconds + 30)
            with self.sessionmaker() as s:
                if not claim_removal(s, row.id, now, now + hold):
                    continue  # another dispatcher is deleting it
            settled += self._delete(row, dest)
        return settled

    def _replacement_delivered(self, row: SeriesRemoval) -> bool | None:
        """True when all of the replacing job's instances are stored at the row's destination,
        False when one failed for good, None while some are pending."""
        with self.sessionmaker() as s:
            counts = dict(
                s.execute(
                    select(Delivery.state, func.count())
                    .join(Output, Output.id == Delivery.output_id)
                    .where(Output.job_id == row.replaced_by_job_id, Delivery.destination == row.destination)
                    .group_by(Delivery.state)
                ).all()
            )
        if counts.get("failed"):
            return False
        if counts.get("pending") or not counts.get("sent"):
            return None
        return True

    def _delete(self, row: SeriesRemoval, dest: DestinationConfig) -> int:
        assert dest.orthanc is not None
        rest = OrthancRest(dest.orthanc, self.settings.dispatch.timeout_seconds)
        try:
            orthanc_id = rest.find_series(row.series_instance_uid)
            if orthanc_id is None:
                self._settle(row, "left", f"not held by {dest.name} (nothing to delete)")
            elif not rest.made_by_us(orthanc_id):
                self._settle(row, "left", f"the series at {dest.name} was not made by dicomnode; kept")
            else:
                rest.delete_series(orthanc_id)
                self._settle(
                    row,
                    "deleted",
                    f"deleted at {dest.name}: replaced by job {row.replaced_by_job_id}'s series",
                )
            return 1
        except HttpError as exc:
            return self._retry(row, str(exc))
        finally:
            rest.close()

    def _retry(self, row: SeriesRemoval, error: str) -> int:
        cfg = self.settings.dispatch
        with self.sessionmaker() as s, s.begin():
            r = s.get(SeriesRemoval, row.id)
            if r is None or r.state != "pending":
                return 0
            r.attempts += 1
            r.reason = error
            if r.attempts >= cfg.max_attempts:
                r.state, r.finished_at = "failed", self.clock()
                record(
                    s,
                    STAGE,
                    "removal",
                    r.id,
                    "pending",
                    "failed",
                    f"gave up after {r.attempts} attempts: {error}",
                )
                return 1
            delay = min(cfg.backoff_initial_seconds * 2 ** (r.attempts - 1), cfg.backoff_max_seconds)
            r.next_attempt_at = self.clock() + timedelta(seconds=delay)
            record(
                s,
                STAGE,
                "removal",
                r.id,
                "pending",
                "pending",
                f"attempt {r.attempts}/{cfg.max_attempts} failed: {error}; next in {delay:.1f} s",
            )
        log.warning("removal of a replaced series at %s failed: %s", row.destination, error)
        return 0

    def _settle(self, row: SeriesRemoval, state: str, reason: str) -> None:
        with self.sessionmaker() as s, s.begin():
            r = s.get(SeriesRemoval, row.id)
            if r is None or r.state != "pending":
                return
            r.state, r.reason, r.finished_at = state, reason, self.clock()
            record(s, STAGE, "removal", r.id, "pending", state, f"series {r.series_instance_uid}: {reason}")
        log.info("replaced series at %s: %s", row.destination, state)
