"""Prometheus metrics of the node, read from the DB at scrape time (so every stage process counts).

Counters that follow the audit (jobs ended, deliveries by result, refused instances) and the
histograms (fusion seconds per phase, study complete -> delivered) advance over the events appended
since the last scrape; gauges (queues, destinations, spool and disk) are read fresh each scrape.
Counters start from the whole audit on the first scrape, so a restart of the admin stage does not
reset them; purging a patient lowers the instance counters, which Prometheus reads as a reset.
"""

from __future__ import annotations

import json
import re
import threading
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.admin import queries
from dicomnode.admin.retention import spool_usage
from dicomnode.config import Settings
from dicomnode.db import Association, Delivery, Event, Instance, Job, Output, Series, utcnow

JOB_END_STATES = ("done", "held", "failed", "superseded", "cancelled")
PHASES = ("resample", "fuse", "quality", "output", "total")
PHASE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
DELIVERED_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)
CHUNK = 20000


# receive writes a burst of refusals one by one, then one summary event for the rest of the minute:
# "N more refusals like this from ADDRESS ... (instance 0xC000, what); the last: ..."
_SUMMARY = re.compile(r"^(\d+) more refusals like this .*?\(instance (0x[0-9A-Fa-f]{4})")
TAKEOVER = "lease of "  # a delivery taken over from a dead dispatcher: not an attempt


def _refusals(reason: str | None) -> tuple[str, int]:
    """(DICOM status, how many instances) that one ``instance -> failed`` event stands for."""
    reason = reason or ""
    m = _SUMMARY.match(reason)
    if m:
        return "0x" + m.group(2)[2:].upper(), int(m.group(1))
    code = reason[:6]
    return (code if code.startswith("0x") else "other"), 1


def _delivery_result(old: str | None, new: str | None, reason: str | None = None) -> str | None:
    """sent | failed (gave up) | retry (an attempt failed, another follows) | None (not an attempt)."""
    if new in ("sent", "failed"):
        return new
    if old == "pending" and new == "pending" and not (reason or "").startswith(TAKEOVER):
        return "retry"
    return None


class _Histogram:
    """Bucket counts kept by the collector (the values come from DB rows, not from live code)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(total)))
        return out


class NodeCollector(Collector):
    """Collects the node's metrics from one database."""

    def __init__(self, settings: Settings, sessionmaker: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self._lock = threading.Lock()
        self._last_event = 0
        self._bootstrapped = False
        self._jobs_ended: Counter[str] = Counter()
        self._deliveries: Counter[tuple[str, str]] = Counter()
        self._refused: Counter[str] = Counter()
        self._phases = {p: _Histogram(PHASE_BUCKETS) for p in PHASES}
        self._delivered = _Histogram(DELIVERED_BUCKETS)
        self._delivered_jobs: set[int] = set()

    # -- following the audit ---------------------------------------------------------------------

    def _bootstrap(self, s: Session) -> None:
        """The first scrape: the whole audit so far in a few aggregate queries (not event by event)."""
        last = int(s.scalar(select(func.max(Event.id))) or 0)
        upto = Event.id <= last
        ended = Event.new_state.in_(JOB_END_STATES) & (
            Event.old_state.is_(None) | Event.old_state.not_in(JOB_END_STATES)
        )
        for new, n in s.execute(
            select(Event.new_state, func.count())
            .where(Event.entity == "job", ended, upto)
            .group_by(Event.new_state)
        ):
            self._jobs_ended[new] += int(n)
        runs = s.execute(
            select(Event.entity_id, func.count())
            .where(
                Event.entity == "job",
                Event.old_state == "running",
                Event.new_state.in_(("done", "held")),
                upto,
            )
            .group_by(Event.entity_id)
        ).all()
        self._observe_phases(s, [int(j) for j, n in runs if j.isdigit() for _ in range(int(n))])
        summary = Event.reason.like("% more refusals like this %(instance 0x%")
        # One expression, grouped by its label: PostgreSQL binds each literal separately and would
        # not see the select's substr() and the GROUP BY's as the same expression.
        prefix = func.substr(Event.reason, 1, 6).label("prefix")
        for reason, n in s.execute(
            select(prefix, func.count())
            .where(
                Event.entity == "instance",
                Event.new_state == "failed",
                or_(Event.reason.is_(None), ~summary),
                upto,
            )
            .group_by(prefix)
        ):
            self._refused[reason if (reason or "").startswith("0x") else "other"] += int(n)
        for (reason,) in s.execute(
            select(Event.reason).where(Event.entity == "instance", Event.new_state == "failed", summary, upto)
        ):
            code, n = _refusals(reason)
            self._refused[code] += n
        destination = dict(s.execute(select(Delivery.id, Delivery.destination)).all())
        for entity_id, old, new, n in s.execute(
            select(Event.entity_id, Event.old_state, Event.new_state, func.count())
            .where(
                Event.entity == "delivery",
                or_(Event.reason.is_(None), ~Event.reason.startswith(TAKEOVER)),
                upto,
            )
            .group_by(Event.entity_id, Event.old_state, Event.new_state)
        ):
            result = _delivery_result(old, new)
            if result and entity_id.isdigit():
                self._deliveries[(destination.get(int(entity_id), "(purged)"), result)] += int(n)
        self._bootstrap_delivered(s)
        self._last_event = last

    def _bootstrap_delivered(self, s: Session) -> None:
        unsent = func.sum(case((Delivery.state.in_(("sent", "cancelled")), 0), else_=1))
        sent = func.sum(case((Delivery.state == "sent", 1), else_=0))
        done = {
            job_id: last_sent
            for job_id, last_sent, n_unsent, n_sent in s.execute(
                select(Output.job_id, func.max(Delivery.sent_at), unsent, sent)
                .join(Delivery, Delivery.output_id == Output.id)
                .group_by(Output.job_id)
            )
            if not n_unsent and n_sent and last_sent is not None
        }
        source = or_(
            Series.series_instance_uid == Job.reference_series_uid,
            Series.series_instance_uid == Job.moving_series_uid,
        )
        ids = sorted(done)
        for i in range(0, len(ids), 500):
            for job_id, completed in s.execute(
                select(Job.id, func.max(Series.completed_at))
                .join(Series, source)
                .where(Job.id.in_(ids[i : i + 500]))
                .group_by(Job.id)
            ):
                if completed is not None:
                    self._delivered.observe(max(0.0, (done[job_id] - completed).total_seconds()))
        self._delivered_jobs.update(ids)

    def _advance(self, s: Session) -> None:
        if not self._bootstrapped:
            self._bootstrap(s)
            self._bootstrapped = True
        while True:
            rows = s.execute(
                select(
                    Event.id, Event.entity, Event.entity_id, Event.old_state, Event.new_state, Event.reason
                )
                .where(Event.id > self._last_event, Event.entity.in_(("job", "delivery", "instance")))
                .order_by(Event.id)
                .limit(CHUNK)
            ).all()
            if not rows:
                return
            self._last_event = rows[-1].id
            finished_jobs: list[int] = []
            delivery_events: list[tuple[int, str]] = []
            for _id, entity, entity_id, old, new, reason in rows:
                if entity == "job" and new in JOB_END_STATES and old not in JOB_END_STATES:
                    self._jobs_ended[new] += 1  # a release (held -> done) is not a second end
                    if new in ("done", "held") and entity_id.isdigit():
                        finished_jobs.append(int(entity_id))
                elif entity == "delivery" and entity_id.isdigit():
                    result = _delivery_result(old, new, reason)
                    if result:
                        delivery_events.append((int(entity_id), result))
                elif entity == "instance" and new == "failed":
                    code, n = _refusals(reason)
                    self._refused[code] += n
            self._observe_phases(s, finished_jobs)
            self._count_deliveries(s, delivery_events)
            if len(rows) < CHUNK:
                return

    def _observe_phases(self, s: Session, job_ids: list[int]) -> None:
        for i in range(0, len(job_ids), 500):
            for (details,) in s.execute(select(Job.details).where(Job.id.in_(job_ids[i : i + 500]))):
                try:
                    d = json.loads(details or "{}")
                except ValueError:
                    continue
                for phase in PHASES:
                    v = d.get(f"seconds_{phase}")
                    if isinstance(v, int | float):
                        self._phases[phase].observe(float(v))

    def _count_deliveries(self, s: Session, events: list[tuple[int, str]]) -> None:
        ids = sorted({i for i, _ in events})
        where: dict[int, tuple[str, int]] = {}
        for i in range(0, len(ids), 500):
            for did, dest, job_id in s.execute(
                select(Delivery.id, Delivery.destination, Output.job_id)
                .join(Output, Output.id == Delivery.output_id)
                .where(Delivery.id.in_(ids[i : i + 500]))
            ):
                where[did] = (dest, job_id)
        sent_jobs = set()
        for did, result in events:
            dest, job_id = where.get(did, ("(purged)", 0))
            self._deliveries[(dest, result)] += 1
            if result == "sent" and job_id:
                sent_jobs.add(job_id)
        self._observe_delivered(s, sorted(sent_jobs - self._delivered_jobs))

    def _observe_delivered(self, s: Session, job_ids: list[int]) -> None:
        """Study complete -> last delivery sent, for jobs whose every delivery is now sent."""
        for job_id in job_ids:
            states = dict(
                s.execute(
                    select(Delivery.state, func.max(Delivery.sent_at))
                    .join(Output, Output.id == Delivery.output_id)
                    .where(Output.job_id == job_id)
                    .group_by(Delivery.state)
                ).all()
            )
            if set(states) - {"sent", "cancelled"} or "sent" not in states:
                continue
            job = s.get(Job, job_id)
            if job is None:
                continue
            completed = s.scalar(
                select(func.max(Series.completed_at)).where(
                    Series.series_instance_uid.in_([job.reference_series_uid, job.moving_series_uid])
                )
            )
            last_sent: datetime | None = states["sent"]
            if completed is not None and last_sent is not None:
                self._delivered.observe(max(0.0, (last_sent - completed).total_seconds()))
            self._delivered_jobs.add(job_id)

    # -- the scrape ------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        with self._lock, self.sessionmaker() as s:
            self._advance(s)
            yield from self._counters(s)
            yield from self._histograms()
            yield from self._gauges(s)

    def _counters(self, s: Session) -> Iterator[Metric]:
        n, size = s.execute(select(func.count(), func.coalesce(func.sum(Instance.size_bytes), 0))).one()
        c = CounterMetricFamily("dicomnode_instances_received", "Instances received and indexed.")
        c.add_metric([], float(n))
        yield c
        c = CounterMetricFamily(
            "dicomnode_received_bytes", "Bytes of received instances written to the spool."
        )
        c.add_metric([], float(size))
        yield c
        c = CounterMetricFamily(
            "dicomnode_instances_refused", "Instances refused, by DICOM status.", labels=["status"]
        )
        for code, k in sorted(self._refused.items()):
            c.add_metric([code], float(k))
        yield c
        c = CounterMetricFamily(
            "dicomnode_associations",
            "Associations by direction and end state.",
            labels=["direction", "state"],
        )
        for direction, state, k in s.execute(
            select(Association.direction, Association.state, func.count()).group_by(
                Association.direction, Association.state
            )
        ):
            c.add_metric([direction, state], float(k))
        yield c
        c = CounterMetricFamily(
            "dicomnode_jobs_finished", "Fusion runs ended, by end state.", labels=["state"]
        )
        for state in JOB_END_STATES:
            c.add_metric([state], float(self._jobs_ended[state]))
        yield c
        c = CounterMetricFamily(
            "dicomnode_delivery_attempts",
            "Delivery attempts per destination by result (sent; retry: failed, will retry; failed: gave up).",
            labels=["destination", "result"],
        )
        for (dest, result), k in sorted(self._deliveries.items()):
            c.add_metric([dest, result], float(k))
        yield c

    def _histograms(self) -> Iterator[Metric]:
        h = HistogramMetricFamily(
            "dicomnode_fusion_phase_seconds",
            "Seconds per fusion phase of each finished job.",
            labels=["phase"],
        )
        for phase, hist in self._phases.items():
            h.add_metric([phase], hist.buckets(), hist.sum)
        yield h
        h = HistogramMetricFamily(
            "dicomnode_study_complete_to_delivered_seconds",
            "From the later source series complete to the job's last delivery sent.",
        )
        h.add_metric([], self._delivered.buckets(), self._delivered.sum)
        yield h

    def _gauges(self, s: Session) -> Iterator[Metric]:
        for what, column in (("series", Series.state), ("jobs", Job.state), ("deliveries", Delivery.state)):
            g = GaugeMetricFamily(
                f"dicomnode_{what}", f"{what.capitalize()} by current state.", labels=["state"]
            )
            for state, k in s.execute(select(column, func.count()).group_by(column)):
                g.add_metric([state], float(k))
            yield g
        g = GaugeMetricFamily("dicomnode_queue_depth", "Work waiting per stage.", labels=["stage"])
        for stage, k in queries.queue_depth(s).items():
            g.add_metric([stage], float(k))
        yield g
        oldest = s.scalar(select(func.min(Job.created_at)).where(Job.state == "pending"))
        g = GaugeMetricFamily(
            "dicomnode_oldest_pending_job_age_seconds", "Age of the oldest pending job (0: none)."
        )
        g.add_metric([], max(0.0, (utcnow() - oldest).total_seconds()) if oldest else 0.0)
        yield g
        dests = queries.list_destinations(s, self.settings)
        pending = GaugeMetricFamily(
            "dicomnode_destination_deliveries",
            "Deliveries waiting (pending, held) or failed, per destination.",
            labels=["destination", "state"],
        )
        paused = GaugeMetricFamily(
            "dicomnode_destination_paused", "1 when an admin paused the destination.", labels=["destination"]
        )
        last = GaugeMetricFamily(
            "dicomnode_destination_last_success_timestamp_seconds",
            "Unix time of the last instance the destination stored (0: never).",
            labels=["destination"],
        )
        for d in dests:
            for state in ("pending", "held", "failed"):
                pending.add_metric([d["name"], state], float(d[state]))
            paused.add_metric([d["name"]], 1.0 if d["state"] == "paused" else 0.0)
            t = d["last_success_at"]
            last.add_metric(
                [d["name"]], datetime.fromisoformat(t).replace(tzinfo=UTC).timestamp() if t else 0.0
            )
        yield from (pending, paused, last)
        usage = spool_usage(s, Path(self.settings.storage.spool_dir))
        for key, doc in (
            ("spool_bytes", "Bytes of spool files the node keeps (received and fused)."),
            ("disk_free_bytes", "Free bytes on the spool's file system."),
            ("disk_total_bytes", "Size of the spool's file system."),
        ):
            g = GaugeMetricFamily(f"dicomnode_{key}", doc)
            g.add_metric([], float(usage[key]))
            yield g


def make_registry(settings: Settings, sessionmaker: sessionmaker[Session]) -> CollectorRegistry:
    """A registry with only the node's metrics (no process metrics of the admin's own process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(settings, sessionmaker))
    return registry
