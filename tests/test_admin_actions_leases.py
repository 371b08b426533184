"""Admin actions over the pipeline's leases and newer rows: re-send by the dispatcher's re-queue
rules, pause in the delivery claim, cancel settles replacement removals, purge takes fetch and
quarantine rows along and waits for deliveries in flight; metrics count refusal summaries."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from admin_rows import add_patient
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from sqlalchemy import func, select

from dicomnode.admin.actions import ActionError, AdminActions
from dicomnode.admin.metrics import NodeCollector
from dicomnode.config import load_settings
from dicomnode.db import (
    Delivery,
    DestinationState,
    Event,
    Job,
    Output,
    PriorFetch,
    PriorRetrieve,
    QuarantinedInstance,
    Series,
    SeriesRemoval,
    make_sessionmaker,
    record,
    utcnow,
)
from dicomnode.db.leases import claim_deliveries
from dicomnode.receive.refusals import Summary
from dicomnode.spool import Spool


@pytest.fixture
def node(tmp_path: Path):  # type: ignore[no-untyped-def]
    spool = tmp_path / "spool"
    settings = load_settings(
        None,
        storage={"spool_dir": str(spool), "database_url": f"sqlite:///{tmp_path}/n.db"},
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
            {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 4243},
        ],
    )
    Spool(spool)
    sm = make_sessionmaker(settings.storage.database_url)
    return settings, sm, spool, AdminActions(settings, sm)


def _deliveries(sm, job_id: int) -> dict[tuple[int, str], Delivery]:  # type: ignore[no-untyped-def]
    with sm() as s:
        return {
            (d.output_id, d.destination): d
            for d in s.scalars(select(Delivery).join(Output).where(Output.job_id == job_id))
        }


def test_resend_follows_the_requeue_rules_and_leaves_a_delivery_in_flight(node):
    settings, sm, spool, actions = node
    job = add_patient(sm, spool, "P1", destinations=("pacs", "archive"), n_outputs=2)
    now = utcnow()
    rows = _deliveries(sm, job)
    (o1, o2) = sorted({k[0] for k in rows})
    with sm() as s, s.begin():  # o1: failed at pacs (give-up clock running); o2: being sent to pacs now
        d = s.get(Delivery, rows[(o1, "pacs")].id)
        d.state, d.failing_since, d.attempts = "failed", now - timedelta(days=8), 40
        d = s.get(Delivery, rows[(o2, "pacs")].id)
        d.state, d.lease_owner, d.lease_expires_at = "pending", "dispatch-1", now + timedelta(seconds=30)
    result = actions.resend_job(job, "alice")
    rows = _deliveries(sm, job)
    failed_again = rows[(o1, "pacs")]
    assert failed_again.state == "pending" and failed_again.attempts == 0
    assert failed_again.failing_since is None and failed_again.lease_owner is None
    assert rows[(o2, "pacs")].lease_owner == "dispatch-1"  # left to its dispatcher
    assert rows[(o1, "archive")].state == rows[(o2, "archive")].state == "pending"
    assert rows[(o1, "archive")].sent_at is None
    assert result.changed == 3
    with sm() as s:
        ev = s.scalars(
            select(Event).where(Event.entity == "delivery", Event.entity_id == str(failed_again.id))
        ).all()[-1]
    assert (ev.old_state, ev.new_state, ev.actor) == ("failed", "pending", "alice")


def test_paused_destination_is_skipped_by_the_delivery_claim(node):
    settings, sm, spool, actions = node
    add_patient(sm, spool, "P1", destinations=("pacs", "archive"), delivery_state="pending", n_outputs=2)
    actions.pause_destination("pacs", "alice", "maintenance")
    with sm() as s:
        paused = s.scalars(select(DestinationState.name).where(DestinationState.paused)).all()
        claims = claim_deliveries(
            s, "d1", utcnow(), utcnow() + timedelta(seconds=30), limit=100, skip_destinations=paused
        )
    assert {c.destination for c in claims} == {"archive"} and len(claims) == 2


def test_cancel_of_a_held_job_leaves_the_series_it_would_replace(node):
    settings, sm, spool, actions = node
    job = add_patient(sm, spool, "P1", job_state="held", delivery_state="held")
    with sm() as s, s.begin():
        s.add(SeriesRemoval(series_instance_uid="1.2.3.4", destination="pacs", replaced_by_job_id=job))
    actions.cancel_job(job, "alice")
    with sm() as s:
        removal = s.scalars(select(SeriesRemoval)).one()
        states = set(s.scalars(select(Delivery.state)).all())
    assert removal.state == "left" and "cancelled by alice" in removal.reason
    assert states == {"cancelled"}


def test_cancel_takes_the_lease_of_a_running_job(node):
    settings, sm, spool, actions = node
    job = add_patient(sm, spool, "P1", job_state="running")
    with sm() as s, s.begin():
        j = s.get(Job, job)
        j.lease_owner, j.lease_expires_at = "fuse-1", utcnow() + timedelta(seconds=30)
    actions.cancel_job(job, "alice")
    with sm() as s:
        j = s.get(Job, job)
        last = s.scalars(select(Event).where(Event.entity == "job").order_by(Event.id.desc())).first()
    assert (j.state, j.lease_owner, j.lease_expires_at) == ("cancelled", None, None)
    assert "worker fuse-1 discards its result" in last.reason
    actions.retry_job(job, "alice")
    with sm() as s:
        j = s.get(Job, job)
    assert (j.state, j.attempts) == ("pending", 1)  # attempts stay: the fencing token only grows


def test_purge_waits_for_deliveries_in_flight_and_takes_fetch_and_quarantine_rows(node):
    settings, sm, spool, actions = node
    job = add_patient(sm, spool, "P1", delivery_state="pending")
    with sm() as s, s.begin():
        uid = s.scalars(select(Series.series_instance_uid).where(Series.patient_key == "P1")).first()
        fetch = PriorFetch(
            rule_name="mr-ct",
            patient_key="P1",
            anchor_series_uid=uid,
            anchor_modality="MR",
            wanted_modality="CT",
            state="retrieved",
        )
        s.add(fetch)
        s.flush()
        s.add(
            PriorRetrieve(
                fetch_id=fetch.id,
                source="pacs",
                method="c-move",
                patient_key="P1",
                study_instance_uid="1.2",
                series_instance_uid="1.2.3",
                state="done",
            )
        )
        (spool / "quarantine/1/q.dcm").parent.mkdir(parents=True)
        (spool / "quarantine/1/q.dcm").write_bytes(b"x")
        s.add(
            QuarantinedInstance(
                sop_instance_uid="1.2.3.4",
                sop_class_uid="1.2",
                study_instance_uid="1.2",
                series_instance_uid=uid,
                path="quarantine/1/q.dcm",
            )
        )
        d = s.scalars(select(Delivery).join(Output).where(Output.job_id == job)).first()
        d.lease_owner, d.lease_expires_at = "dispatch-1", utcnow() + timedelta(seconds=30)
    with pytest.raises(ActionError, match="being sent right now"):
        actions.purge_patient("P1", "alice")
    with sm() as s, s.begin():
        s.execute(Delivery.__table__.update().values(lease_owner=None, lease_expires_at=None))
    actions.purge_patient("P1", "alice")
    with sm() as s:
        for model in (PriorFetch, PriorRetrieve, QuarantinedInstance, Job, Series):
            assert s.scalar(select(func.count()).select_from(model)) == 0, model
    assert not (spool / "quarantine/1/q.dcm").exists()


def test_purge_older_than_keeps_patients_with_fused_series_not_yet_sent(node):
    settings, sm, spool, actions = node
    add_patient(sm, spool, "OLD-SENT", age=timedelta(days=40))
    add_patient(sm, spool, "OLD-UNSENT", age=timedelta(days=40), delivery_state="pending")
    assert actions.purge_older_than(30, "alice").changed == 1
    with sm() as s:
        assert set(s.scalars(select(Series.patient_key)).all()) == {"OLD-UNSENT"}


def _scrape(settings, sm) -> dict[tuple[str, tuple], float]:  # type: ignore[no-untyped-def]
    registry = CollectorRegistry()
    registry.register(NodeCollector(settings, sm))
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.parametrize("first_scrape_after", [True, False])
def test_refusal_summaries_count_every_instance_and_takeovers_are_no_attempts(node, first_scrape_after):
    """Receive writes 5 refusals one by one and one summary for the rest; a dispatcher taking over
    a dead one's delivery is not a failed attempt. Counted alike on the first scrape and after it."""
    settings, sm, spool, _ = node
    job = add_patient(sm, spool, "P1", delivery_state="pending", n_outputs=1)
    if not first_scrape_after:
        _scrape(settings, sm)
    with sm() as s, s.begin():
        for _ in range(5):
            record(s, "receive", "instance", "1.2.3", None, "failed", "0xC000: no SOP Instance UID")
        summary = Summary("10.0.0.9", "instance 0xC000, required attribute missing", 12, 60, "missing UID")
        record(s, "receive", "instance", "10.0.0.9", None, "failed", summary.reason)
        d = s.scalars(select(Delivery).join(Output).where(Output.job_id == job)).one()
        record(s, "dispatch", "delivery", d.id, "pending", "pending", "lease of d1 expired; taken over by d2")
        record(s, "dispatch", "delivery", d.id, "pending", "pending", "association rejected; retry in 2 s")
    m = _scrape(settings, sm)
    assert m[("dicomnode_instances_refused_total", (("status", "0xC000"),))] == 17
    assert m[("dicomnode_delivery_attempts_total", (("destination", "pacs"), ("result", "retry")))] == 1
