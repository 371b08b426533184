"""Schema migrations on SQLite and PostgreSQL: the migrations build the models' schema, a database
made before migrations existed is recognised and upgraded with its rows, a newer or unknown one is
refused with a message that says what to do, and processes starting together create it once."""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path

import legacy_schema as legacy
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import (
    Column,
    Connection,
    Integer,
    MetaData,
    create_engine,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError

from dicomnode.cli import main as cli_main
from dicomnode.db import (
    Delivery,
    Event,
    Instance,
    Job,
    QuarantinedInstance,
    SchemaError,
    Worker,
    make_engine,
    make_sessionmaker,
)
from dicomnode.db.models import LEGACY_GUARD_VERSION, Base
from dicomnode.db.schema import (
    BASELINE,
    alembic_config,
    current,
    head_revision,
    make_revision,
    schema_differences,
)

pytestmark = pytest.mark.both_backends

T = datetime(2025, 3, 4, 5, 6, 7)
LEGACY = {"first": legacy.metadata, "last": legacy.last_metadata}
GIB = 1 << 30


def migrate(url: str, target: str = "head") -> None:
    """Run the shipped migrations themselves (not create_all) up to ``target``."""
    engine = make_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), target)
    engine.dispose()


def make_legacy_database(url: str, release: str = "first") -> dict[str, list[tuple]]:
    """A database as a release before migrations made it, with a row in every table.

    ``release``: ``first`` (the baseline's schema) or ``last`` (the last one before migrations,
    whose tables the upgrade finds already made)."""
    metadata = LEGACY[release]
    engine = create_engine(url)
    with engine.begin() as conn:
        metadata.create_all(conn)
        conn.execute(insert(legacy.schema_info).values(id=1, version=1))
        conn.execute(
            insert(legacy.associations).values(
                id=1,
                direction="in",
                calling_aet="SCANNER",
                called_aet="DICOMNODE",
                peer_host="10.0.0.7",
                peer_port=40000,
                state="released",
                reason=None,
                n_stored=2,
                n_failed=0,
                started_at=T,
                ended_at=T,
            )
        )
        for n in (1, 2):
            conn.execute(
                insert(legacy.instances).values(
                    id=n,
                    sop_instance_uid=f"1.2.3.{n}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    series_instance_uid="1.2.3.100",
                    study_instance_uid="1.2.3.1000",
                    patient_id="P1",
                    issuer_of_patient_id="",
                    modality="CT",
                    frame_of_reference_uid="1.2.3.9",
                    instance_number=n,
                    image_position=f"0\\0\\{n}",
                    image_orientation="1\\0\\0\\0\\1\\0",
                    pixel_spacing="0.5\\0.5",
                    slice_thickness=1.0,
                    rows=512,
                    columns=512,
                    number_of_frames=1,
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=f"incoming/1.2.3.1000/1.2.3.100/1.2.3.{n}.dcm",
                    size_bytes=525_000 + n,
                    association_id=1,
                    received_at=T,
                )
            )
        conn.execute(
            insert(legacy.series).values(
                id=1,
                series_instance_uid="1.2.3.100",
                study_instance_uid="1.2.3.1000",
                patient_key="P1",
                patient_id="P1",
                issuer_of_patient_id="",
                patient_name="Doe^Jane",
                modality="CT",
                series_description="HEAD",
                protocol_name="",
                sequence_name="",
                body_part="HEAD",
                acquisition_type="",
                image_type="ORIGINAL\\PRIMARY\\AXIAL",
                frame_of_reference_uid="1.2.3.9",
                study_datetime=T,
                n_instances=2,
                generation=1,
                state="complete",
                first_received_at=T,
                last_received_at=T,
                completed_at=T,
            )
        )
        conn.execute(
            insert(legacy.jobs).values(
                id=1,
                rule_name="mr-ct",
                patient_key="P1",
                reference_series_uid="1.2.3.99",
                moving_series_uid="1.2.3.100",
                reference_generation=1,
                moving_generation=1,
                state="done",
                attempts=1,
                method="li2021-cnn",
                method_version="1",
                output_series_uid="1.2.3.200",
                error=None,
                details='{"alignment": "same frame of reference"}',
                worker="host:42",
                created_at=T,
                started_at=T,
                finished_at=T,
            )
        )
        conn.execute(
            insert(legacy.outputs).values(
                id=1,
                job_id=1,
                sop_instance_uid="1.2.3.201",
                series_instance_uid="1.2.3.200",
                instance_number=1,
                path="outgoing/1.2.3.200/1.2.3.201.dcm",
                created_at=T,
            )
        )
        conn.execute(
            insert(legacy.deliveries).values(
                id=1,
                output_id=1,
                destination="pacs",
                state="sent",
                attempts=1,
                last_error=None,
                last_status=0,
                next_attempt_at=T,
                sent_at=T,
                created_at=T,
            )
        )
        conn.execute(
            insert(legacy.events).values(
                id=1,
                at=T,
                stage="dispatch",
                entity="delivery",
                entity_id="1",
                old_state="pending",
                new_state="sent",
                reason="stored at pacs",
            )
        )
        if release == "last":
            _rows_of_the_last_release(conn)
        if engine.dialect.name == "postgresql":  # as if the rows came one by one from the sequences
            for name, table in metadata.tables.items():
                if "id" in table.c:
                    conn.execute(
                        text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), max(id)) FROM {name}")
                    )
    rows = dump(engine, metadata)
    engine.dispose()
    return rows


def _rows_of_the_last_release(conn: Connection) -> None:
    """A row in each table and column the last release before migrations added."""
    t = legacy.last_metadata.tables
    conn.execute(
        update(t["jobs"]).values(
            output_series_number=9101,
            replaces_series_uid="1.2.3.150",
            lease_owner=None,
            lease_expires_at=None,
        )
    )
    conn.execute(
        update(t["deliveries"]).values(failing_since=T, lease_owner="gone-1-abc", lease_expires_at=T)
    )
    conn.execute(update(t["series"]).values(series_number=3))
    conn.execute(update(t["associations"]).values(lease_owner="gone-1-abc", lease_expires_at=T))
    conn.execute(
        insert(t["workers"]).values(
            worker_id="gone-1-abc", stages="receive", host="h", started_at=T, lease_expires_at=T, tmp_dir="0a"
        )
    )
    conn.execute(
        insert(t["series_decisions"]).values(
            id=1,
            series_instance_uid="1.2.3.100",
            rule_name="mr-ct",
            decision="chosen",
            reason="",
            job_id=1,
            updated_at=T,
        )
    )
    conn.execute(
        insert(t["quarantined_instances"]).values(
            id=1,
            sop_instance_uid="1.2.3.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid="1.2.3.1000",
            series_instance_uid="1.2.3.100",
            transfer_syntax_uid="",
            path="quarantine/1.2.3.1000/1.2.3.100/1.2.3.1.dcm",
            size_bytes=1000,
            calling_aet="SCANNER",
            peer_host="10.0.0.7",
            association_id=1,
            reason="other content",
            received_at=T,
        )
    )
    conn.execute(
        insert(t["series_removals"]).values(
            id=1,
            series_instance_uid="1.2.3.150",
            destination="pacs",
            replaced_by_job_id=1,
            state="deleted",
            attempts=1,
            reason=None,
            next_attempt_at=T,
            created_at=T,
            finished_at=T,
        )
    )
    conn.execute(
        insert(t["prior_fetches"]).values(
            id=1,
            rule_name="mr-ct",
            patient_key="P1",
            anchor_series_uid="1.2.3.99",
            anchor_modality="MR",
            wanted_modality="CT",
            state="retrieved",
            reason=None,
            due_at=T,
            attempts=1,
            next_attempt_at=T,
            source="pacs",
            chosen_study_uid="1.2.3.1000",
            chosen_series_uid="1.2.3.100",
            created_at=T,
            updated_at=T,
            finished_at=T,
        )
    )
    conn.execute(
        insert(t["prior_queries"]).values(
            id=1, fetch_id=1, source="pacs", level="STUDY", state="done", n_matches=1, started_at=T
        )
    )
    conn.execute(
        insert(t["prior_retrieves"]).values(
            id=1,
            fetch_id=1,
            source="pacs",
            method="c-move",
            patient_key="P1",
            study_instance_uid="1.2.3.1000",
            series_instance_uid="1.2.3.100",
            state="done",
            attempts=1,
            next_attempt_at=T,
            n_completed=2,
            created_at=T,
        )
    )


def dump(engine, metadata: MetaData) -> dict[str, list[tuple]]:  # type: ignore[no-untyped-def]
    """Every row of every table of ``metadata``, ordered by key (``schema_info`` left out)."""
    with engine.connect() as conn:
        return {
            name: [tuple(r) for r in conn.execute(select(*table.c).order_by(*table.primary_key.columns))]
            for name, table in metadata.tables.items()
            if name != "schema_info"
        }


def test_migrations_build_the_models_schema(db_url: str):
    """Fails when a model changes without a revision: write one with `dicomnode db revision -m ...`."""
    migrate(db_url)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        diffs = schema_differences(conn)
        guard = conn.scalar(text("SELECT version FROM schema_info"))
    engine.dispose()
    assert diffs == [], "models and migrations disagree; add a revision (dicomnode db revision -m ...)"
    assert guard == LEGACY_GUARD_VERSION


def test_new_database_is_created_from_the_models_and_stamped(db_url: str):
    sm = make_sessionmaker(db_url, auto_migrate=False)  # creating is not upgrading: always done
    engine = sm.kw["bind"]
    assert current(engine).kind == "current"
    with engine.connect() as conn:
        assert schema_differences(conn) == []
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) == head_revision()
        assert conn.scalar(text("SELECT version FROM schema_info")) == LEGACY_GUARD_VERSION
    engine.dispose()


def test_baseline_is_the_schema_before_migrations(db_url: str):
    migrate(db_url, BASELINE)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diffs = compare_metadata(ctx, legacy.metadata)
        version = conn.scalar(text("SELECT version FROM schema_info"))
    engine.dispose()
    assert [d for d in diffs if not _is_version_table(d)] == []
    assert version == 1


def _is_version_table(diff: object) -> bool:
    return isinstance(diff, tuple) and diff[0] == "remove_table" and diff[1].name == "alembic_version"


@pytest.mark.parametrize("release", ["first", "last"])
def test_database_from_before_migrations_is_upgraded_with_its_rows(db_url: str, release: str):
    before = make_legacy_database(db_url, release)
    engine = make_engine(db_url)
    assert current(engine).kind == "legacy"
    if engine.dialect.name == "postgresql":  # what the upgrade is for: 32-bit sizes on PostgreSQL
        with pytest.raises(DBAPIError), engine.begin() as conn:
            conn.execute(text("UPDATE instances SET size_bytes = :n WHERE id = 1"), {"n": 3 * GIB})
    engine.dispose()

    sm = make_sessionmaker(db_url, auto_migrate=True)
    engine = sm.kw["bind"]
    assert current(engine).kind == "current"
    assert dump(engine, LEGACY[release]) == before  # every row kept, column for column
    with engine.connect() as conn:
        assert schema_differences(conn) == []
        assert conn.scalar(text("SELECT version FROM schema_info")) == LEGACY_GUARD_VERSION
    with sm() as s:  # the node works on it: new rows next to the old ones
        big = s.get(Instance, 1)
        big.size_bytes = 3 * GIB
        s.get(Job, 1).worker = "h" * 64 + ":4194304"
        s.add(Event(stage="admin", entity="delivery", entity_id="1", reason="checked after upgrade"))
        s.add(
            QuarantinedInstance(
                sop_instance_uid="1.2.3.2",
                sop_class_uid="1.2",
                study_instance_uid="1.2.3",
                series_instance_uid="1.2.4",
                path="quarantine/x.dcm",
                size_bytes=3 * GIB,
            )
        )
        s.add(Worker(worker_id="w-after-upgrade", lease_expires_at=T))
        s.commit()
    with sm() as s:
        assert s.get(Instance, 1).size_bytes == 3 * GIB
        assert (
            s.scalar(select(QuarantinedInstance.size_bytes).order_by(QuarantinedInstance.id.desc()))
            == 3 * GIB
        )
        assert s.scalar(select(Delivery.state)) == "sent"
        assert [e.id for e in s.scalars(select(Event).order_by(Event.id))] == [1, 2]
    engine.dispose()


def test_older_schema_is_refused_without_auto_migrate(db_url: str):
    before = make_legacy_database(db_url)
    with pytest.raises(SchemaError) as err:
        make_sessionmaker(db_url, auto_migrate=False)
    assert "dicomnode db upgrade" in str(err.value) and "auto_migrate" in str(err.value)
    engine = make_engine(db_url)
    assert "alembic_version" not in inspect(engine).get_table_names()  # untouched
    assert dump(engine, legacy.metadata) == before
    engine.dispose()


def test_by_default_sqlite_is_upgraded_at_start_and_a_server_database_is_not(db_url: str):
    make_legacy_database(db_url)
    if db_url.startswith("sqlite"):
        assert current(make_sessionmaker(db_url).kw["bind"]).kind == "current"
    else:
        with pytest.raises(SchemaError, match="dicomnode db upgrade"):
            make_sessionmaker(db_url)


def test_newer_schema_is_refused(db_url: str):
    make_sessionmaker(db_url).kw["bind"].dispose()
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    engine.dispose()
    for auto in (None, True):
        with pytest.raises(SchemaError) as err:
            make_sessionmaker(db_url, auto_migrate=auto)
        assert "0099_from_the_future" in str(err.value) and "newer than this release" in str(err.value)


def test_tables_without_a_revision_are_refused(db_url: str):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        legacy.instances.to_metadata(MetaData()).create(conn)
    engine.dispose()
    with pytest.raises(SchemaError) as err:
        make_sessionmaker(db_url, auto_migrate=True)
    assert "not a dicomnode schema" in str(err.value)


def test_processes_starting_together_create_the_schema_once(db_url: str):
    """Eight engines (as eight stage processes would) start on one empty database at once."""
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def start() -> None:
        engine = make_engine(db_url)
        try:
            barrier.wait(timeout=60)
            from dicomnode.db import init_db  # noqa: PLC0415

            init_db(engine, auto_migrate=False)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    engine = make_engine(db_url)
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT count(*) FROM alembic_version")) == 1
        assert conn.scalar(text("SELECT count(*) FROM schema_info")) == 1
        assert schema_differences(conn) == []
    engine.dispose()


def test_db_commands(db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    make_legacy_database(db_url)
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"storage: {{database_url: '{db_url}', spool_dir: '{tmp_path / 'spool'}'}}\n")
    assert cli_main(["--config", str(cfg), "db", "current", "--check"]) == 1
    assert "before migrations" in capsys.readouterr().out
    assert cli_main(["--config", str(cfg), "db", "upgrade"]) == 0
    assert (
        f"upgraded: schema from before migrations (schema_info 1); this release needs {head_revision()}"
        in (capsys.readouterr().out)
    )
    assert cli_main(["--config", str(cfg), "db", "current", "--check"]) == 0
    assert "(current)" in capsys.readouterr().out
    assert cli_main(["--config", str(cfg), "db", "upgrade"]) == 0
    assert "already at" in capsys.readouterr().out


def test_revision_tool_writes_what_the_models_add(tmp_path: Path):
    """The developer tool (`dicomnode db revision`) works on a scratch SQLite database."""
    models = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(models)
    models.tables["jobs"].append_column(Column("priority", Integer, nullable=True))
    path = make_revision(
        "job priority, for the urgent studies of the night", directory=tmp_path, metadata=models
    )
    source = path.read_text()
    # the revision id fits Alembic's version table (32 characters; PostgreSQL refuses more)
    assert path.parent == tmp_path and path.name.endswith("_job_priority_for_the_urgent.py")
    assert len(path.stem) <= 32
    assert (
        f"down_revision = '{head_revision()}'" in source or f'down_revision = "{head_revision()}"' in source
    )
    assert "batch_alter_table('jobs'" in source and "add_column" in source and "'priority'" in source
