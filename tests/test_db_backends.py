"""What SQLite lets pass and PostgreSQL does not: values that must fit their columns, and two
processes writing the same instance at the same moment (real concurrency on both backends)."""

from __future__ import annotations

import threading

import legacy_schema as legacy
import pytest
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Column, Integer, String, func, inspect, select, text

from dicomnode.config import ConfigError, load_settings
from dicomnode.db import Association, Event, Instance, Job, Series, make_engine, make_sessionmaker, record
from dicomnode.db.idempotent_ops import (
    add_column_if_missing,
    create_index_if_missing,
    create_table_if_missing,
)
from dicomnode.receive.header import InstanceHeader
from dicomnode.receive.index import InstanceIndex

pytestmark = pytest.mark.both_backends

GIB = 1 << 30


def header(sop: str, series: str = "1.2.826.0.1.3680043.8.498.100") -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=sop,
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        series_instance_uid=series,
        patient_id="P1",
        modality="CT",
        instance_number=1,
    )


def test_audit_event_keeps_an_overlong_identifier_from_the_network(db_url: str):
    """A refused instance's UID, as a hostile peer sent it, is cut to fit instead of losing the event."""
    sm = make_sessionmaker(db_url)
    with sm() as s:
        record(s, "receive", "instance", "1." * 150, None, "failed", "0xC000: not a UID")
        s.commit()
    with sm() as s:
        ev = s.scalars(select(Event)).one()
    assert len(ev.entity_id) == 80 and ev.entity_id.startswith("1.1.") and ev.entity_id.endswith("…")
    sm.kw["bind"].dispose()


def test_columns_hold_what_the_node_writes(db_url: str):
    """A data set over 2 GiB, a host name of 64 characters in a worker name, a destination's DNS name."""
    sm = make_sessionmaker(db_url)
    index = InstanceIndex(sm, receiver="n" * 64 + ":4194304")
    assert index.add_instance(
        header("1.2.3.4"),
        relpath="incoming/x.dcm",
        size=3 * GIB,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        association_id=None,
    )
    index.open_association("SCANNER", "DICOMNODE", "2001:db8::1", 40000)
    pacs = ".".join(["archive-of-the-radiology-department"] * 6)[:253]  # a destination's DNS name
    with sm() as s:
        s.add(Association(direction="out", calling_aet="DICOMNODE", called_aet="PACS", peer_host=pacs))
        s.commit()
    with sm() as s:
        s.add(
            Job(
                rule_name="r" * 64,
                patient_key="P",
                reference_series_uid="1",
                moving_series_uid="2",
                worker="h" * 64 + ":4194304",
            )
        )
        s.commit()
        assert s.scalar(select(Instance.size_bytes)) == 3 * GIB
    index.close()
    sm.kw["bind"].dispose()


def test_names_longer_than_their_columns_are_refused_by_the_config():
    long = "x" * 65
    with pytest.raises(ConfigError, match=r"destinations\.0\.name"):
        load_settings(None, destinations=[{"name": long, "ae_title": "PACS", "host": "h", "port": 104}])
    with pytest.raises(ConfigError, match=r"rules\.0\.name"):
        load_settings(None, rules=[{"name": long, "moving": "CT"}])


def test_same_instances_from_two_processes_at_once_are_stored_once(db_factory):
    """Two receive processes (each its own engine and index) get the same 40 instances at the same moment."""
    url = db_factory()
    sm_a, sm_b = make_sessionmaker(url), make_sessionmaker(url)
    indexes = [InstanceIndex(sm_a, receiver="a:1"), InstanceIndex(sm_b, receiver="b:2")]
    uids = [f"1.2.826.0.1.3680043.8.498.{1000 + n}" for n in range(40)]
    results: dict[str, list[bool]] = {uid: [] for uid in uids}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def receive(index: InstanceIndex, order: list[str]) -> None:
        try:
            barrier.wait(timeout=30)
            for uid in order:
                added = index.add_instance(
                    header(uid),
                    relpath=f"incoming/{uid}.dcm",
                    size=10,
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    association_id=None,
                )
                results[uid].append(added)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=receive, args=(indexes[0], uids)),
        threading.Thread(target=receive, args=(indexes[1], uids)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert all(sorted(r) == [False, True] for r in results.values()), results
    with sm_a() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 40
        series = s.scalars(select(Series)).one()  # created once, though both raced to create it
        assert series.n_instances == 40 and series.generation == 1
    for index in indexes:
        index.close()
    for sm in (sm_a, sm_b):
        sm.kw["bind"].dispose()


def test_idempotent_ops_work_with_and_without_what_they_add(db_url: str):
    """A later revision adds what releases before migrations may already have created."""
    engine = make_engine(db_url)
    with engine.begin() as conn:
        legacy.metadata.create_all(conn)
        conn.execute(text("ALTER TABLE jobs ADD COLUMN lease_owner VARCHAR(128)"))
        with Operations.context(MigrationContext.configure(conn)):
            for _ in range(2):
                for table in ("jobs", "deliveries"):
                    add_column_if_missing(table, Column("lease_owner", String(128), nullable=True))
                create_table_if_missing("leases", Column("id", Integer, primary_key=True))
                create_index_if_missing("ix_jobs_lease_owner", "jobs", ["lease_owner"])
        columns = {t: {c["name"] for c in inspect(conn).get_columns(t)} for t in ("jobs", "deliveries")}
        assert all("lease_owner" in c for c in columns.values())
        assert "leases" in inspect(conn).get_table_names()
        assert "ix_jobs_lease_owner" in {i["name"] for i in inspect(conn).get_indexes("jobs")}
    engine.dispose()
