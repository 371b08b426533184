"""The command line: global options anywhere, config mistakes (one message, exit 2), admin actions, status."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from admin_rows import add_patient
from sqlalchemy import select

from dicomnode.cli import build_parser
from dicomnode.cli import main as cli_main
from dicomnode.db import Delivery, DestinationState, Event, Job, Output, make_sessionmaker, record
from dicomnode.spool import Spool
from dicomnode.testing.peers import free_port


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _leaves(sub, (*path, name))


def _required(parser: argparse.ArgumentParser) -> list[str]:
    """The fewest arguments the sub-command accepts (a value of the right kind for each)."""
    out: list[str] = []
    grouped = set()
    for group in parser._mutually_exclusive_groups:
        if group.required:
            action = group._group_actions[0]
            out += [action.option_strings[0], str(action.choices[0]) if action.choices else "1"]
            grouped |= {id(a) for a in group._group_actions}
    for a in parser._actions:
        if id(a) in grouped or isinstance(a, argparse._HelpAction):
            continue
        value = str(list(a.choices)[0]) if a.choices else "1"
        if not a.option_strings:
            out.append(value if a.nargs is None else value)
        elif a.required:
            out += [a.option_strings[0], value]
    return out


LEAVES = list(_leaves(build_parser()))


@pytest.mark.parametrize("path", [p for p, _ in LEAVES], ids=[" ".join(p) for p, _ in LEAVES])
def test_config_and_verbose_before_and_after_every_subcommand(path):
    leaf = dict(LEAVES)[path]
    rest = _required(leaf)
    parser = build_parser()
    before = parser.parse_args(["--config", "x.yaml", "-v", *path, *rest])
    after = parser.parse_args([*path, *rest, "--config", "x.yaml", "-v"])
    mixed = parser.parse_args(["-v", *path, *rest, "--config", "x.yaml"])
    plain = parser.parse_args([*path, *rest])
    for args in (before, after, mixed):
        assert args.config == "x.yaml" and args.verbose is True
    assert plain.config is None and plain.verbose is False


# -- configuration mistakes -----------------------------------------------------------------------


def _write(tmp: Path, data: dict) -> Path:
    p = tmp / "config.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _base(tmp: Path) -> dict:
    return {
        "node": {"port": free_port()},
        "storage": {"spool_dir": str(tmp / "spool"), "database_url": f"sqlite:///{tmp}/n.db"},
        "admin": {"http_port": free_port()},
    }


def _config_error(tmp: Path, data: dict, command: list[str], capsys) -> str:
    cfg = _write(tmp, data)
    assert cli_main([*command, "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ")
    return err


def test_postgresql_url_without_its_driver(tmp_path: Path, capsys):
    for url, fix in (
        ("postgresql+psycopg2://dicom:secret@db/dicomnode", "postgresql+psycopg://"),
        ("postgres://dicom:secret@db/dicomnode", "postgresql+psycopg://"),
    ):
        data = _base(tmp_path) | {"storage": {"database_url": url}}
        err = _config_error(tmp_path, data, ["status"], capsys)
        assert "storage.database_url" in err and fix in err
        assert "secret" not in err  # the password is never repeated


def test_spool_dir_that_cannot_be_created(tmp_path: Path, capsys):
    (tmp_path / "a-file").write_text("x")
    data = _base(tmp_path)
    data["storage"]["spool_dir"] = str(tmp_path / "a-file" / "spool")
    err = _config_error(tmp_path, data, ["serve"], capsys)
    assert "storage.spool_dir" in err and "choose a directory" in err


def test_database_that_cannot_be_opened(tmp_path: Path, capsys):
    (tmp_path / "a-file").write_text("x")
    data = _base(tmp_path)
    data["storage"]["database_url"] = f"sqlite:///{tmp_path}/a-file/n.db"
    err = _config_error(tmp_path, data, ["status"], capsys)
    assert "storage.database_url" in err


def test_unknown_key_lists_valid_keys_and_a_guess(tmp_path: Path, capsys):
    data = _base(tmp_path) | {"node": {"prot": 104}}
    err = _config_error(tmp_path, data, ["status"], capsys)
    assert "node.prot: unknown key; did you mean 'port'?" in err
    assert "valid keys of node: ae_title, host, port" in err
    err = _config_error(tmp_path, _base(tmp_path) | {"destination": []}, ["status"], capsys)
    assert "did you mean 'destinations'?" in err


def test_duplicate_rule_names_are_named(tmp_path: Path, capsys):
    rules = [
        {"name": "mr-ct", "moving": "CT"},
        {"name": "mr-pet", "moving": "PT"},
        {"name": "mr-ct", "moving": "NM"},
    ]
    err = _config_error(tmp_path, _base(tmp_path) | {"rules": rules}, ["status"], capsys)
    assert "rule name 'mr-ct' is used by rules 0 and 2" in err


def test_open_admin_on_the_network_refused(tmp_path: Path, capsys):
    data = _base(tmp_path) | {"admin": {"http_host": "0.0.0.0", "http_port": free_port()}}
    err = _config_error(tmp_path, data, ["serve"], capsys)
    assert "admin.http_host" in err and "admin.tokens" in err


def test_config_error_from_a_process_exits_2_without_traceback(tmp_path: Path):
    cfg = _write(
        tmp_path, _base(tmp_path) | {"rules": [{"name": "a", "moving": "CT"}, {"name": "a", "moving": "PT"}]}
    )
    res = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr and "'a'" in res.stderr


# -- actions and status ---------------------------------------------------------------------------


@pytest.fixture()
def db(tmp_path: Path):
    data = _base(tmp_path) | {
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
            {"name": "archive", "ae_title": "ARCH", "host": "127.0.0.1", "port": 4243},
        ]
    }
    cfg = _write(tmp_path, data)
    Spool(tmp_path / "spool")
    sm = make_sessionmaker(data["storage"]["database_url"])
    jobs = {
        "done": add_patient(sm, tmp_path / "spool", "PAT-OK", destinations=("pacs", "archive")),
        "failed": add_patient(sm, tmp_path / "spool", "PAT-FAIL", job_state="failed", error="cannot read"),
        "held": add_patient(sm, tmp_path / "spool", "PAT-HELD", job_state="held", delivery_state="held"),
        "bad": add_patient(sm, tmp_path / "spool", "PAT-BAD", delivery_state="failed", n_outputs=25),
    }
    # 25 per-instance delivery failures: they must not push the milestones out of the status
    with sm() as s:
        for d in s.scalars(select(Delivery).where(Delivery.state == "failed")).all():
            record(s, "dispatch", "delivery", d.id, "pending", "failed", "gave up after 10 attempts: refused")
        s.commit()
    return cfg, sm, jobs


def test_status_answers_did_the_fusion_reach_the_pacs(db, capsys):
    cfg, _sm, jobs = db
    assert cli_main(["status", "--json", "--patient", "PAT-OK", "--config", str(cfg)]) == 0
    st = json.loads(capsys.readouterr().out)
    (job,) = st["recent_jobs"]
    assert job["patient_key"] == "PAT-OK" and job["study_instance_uid"] and job["output_series_uid"]
    assert job["reference_series_uid"] and job["moving_series_uid"]
    assert job["deliveries"] == {"pacs": {"sent": 2}, "archive": {"sent": 2}}
    assert {d["name"]: (d["pending"], d["failed"]) for d in st["destinations"]} == {
        "pacs": (0, 25),
        "archive": (0, 0),
    }

    assert cli_main(["--config", str(cfg), "status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert all(e["entity"] not in ("delivery", "output", "instance") for e in st["events"])
    assert {e["entity_id"] for e in st["events"] if e["entity"] == "job"} >= {str(j) for j in jobs.values()}
    assert [j["id"] for j in st["failures"]["jobs"]] == [jobs["held"], jobs["failed"]]
    (bad,) = st["failures"]["deliveries"]
    assert bad == {
        "job_id": jobs["bad"],
        "destination": "pacs",
        "failed": 25,
        "last_error": "association rejected",
    }
    assert st["disk"]["spool_bytes"] > 0 and st["disk"]["disk_free_bytes"] > 0
    assert st["queue"] == {"assemble": 0, "retrieve": 0, "fuse": 0, "held": 1, "dispatch": 0}

    assert cli_main(["status", "--config", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "needs attention:" in text and "25 deliveries to pacs failed" in text
    assert "archive: sent=2; pacs: sent=2" in text and "spool:" in text


def test_job_and_destination_actions(db, capsys):
    cfg, sm, jobs = db
    c = ["--config", str(cfg)]
    assert cli_main(["jobs", "list", "--state", "failed", *c]) == 0
    assert "PAT-FAIL" in capsys.readouterr().out
    assert cli_main(["jobs", "show", str(jobs["done"]), *c]) == 0
    out = capsys.readouterr().out
    assert "to pacs: sent=2" in out and "chosen: T1 3D first" in out
    assert cli_main(["jobs", "retry", str(jobs["failed"]), *c]) == 0
    assert cli_main(["jobs", "retry", str(jobs["done"]), *c]) == 1
    assert "use resend" in capsys.readouterr().err
    assert cli_main(["jobs", "release", str(jobs["held"]), *c]) == 0
    assert cli_main(["jobs", "cancel", str(jobs["failed"]), *c]) == 0  # pending again, so it cancels
    assert cli_main(["resend", "--job", str(jobs["done"]), "--destination", "archive", *c]) == 0
    with sm() as s:
        out_id = s.scalars(select(Output.id).where(Output.job_id == jobs["bad"])).first()
    assert cli_main(["resend", "--output", str(out_id), *c]) == 0
    assert cli_main(["destinations", "pause", "archive", "--reason", "PACS maintenance", *c]) == 0
    assert cli_main(["destinations", "list", *c]) == 0
    assert "paused" in capsys.readouterr().out
    assert cli_main(["destinations", "resume", "nope", *c]) == 1
    with sm() as s:
        assert s.get(Job, jobs["failed"]).state == "cancelled"
        assert s.get(Job, jobs["held"]).state == "done"
        assert s.get(DestinationState, "archive").paused
        resent = dict(
            s.execute(
                select(Delivery.destination, Delivery.state).join(Output).where(Output.job_id == jobs["done"])
            ).all()
        )
        assert resent == {"pacs": "sent", "archive": "pending"}
        actors = set(s.scalars(select(Event.actor).where(Event.stage == "admin")).all())
    assert len(actors) == 1 and next(iter(actors)).startswith("cli")


def test_purge_by_patient_and_by_age(db, capsys, tmp_path: Path):
    cfg, sm, jobs = db
    c = ["--config", str(cfg)]
    assert cli_main(["purge", "--patient", "PAT-OK", *c]) == 0
    assert cli_main(["purge", "--patient", "PAT-OK", *c]) == 1  # gone
    assert cli_main(["purge", "--older-than", "30", *c]) == 0
    assert "0 patients purged" in capsys.readouterr().out  # everything is recent
    with sm() as s:
        for job in s.scalars(select(Job)).all():
            job.created_at = job.finished_at = job.created_at.replace(year=2000)
        from dicomnode.db import Series  # noqa: PLC0415

        for ser in s.scalars(select(Series)).all():
            ser.last_received_at = ser.last_received_at.replace(year=2000)
        s.commit()
    assert cli_main(["purge", "--older-than", "30", *c]) == 0
    # the held job is unfinished: its patient stays
    with sm() as s:
        assert {j.patient_key for j in s.scalars(select(Job)).all()} == {"PAT-HELD"}


def test_status_watch_redraws_until_interrupted(db):
    cfg, _sm, _jobs = db
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dicomnode.cli",
            "status",
            "--watch",
            "--interval",
            "0.5",
            "--config",
            str(cfg),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        seen, deadline = 0, time.monotonic() + 120
        while seen < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen += line.startswith("dicomnode status")
        assert seen == 2
    finally:
        proc.send_signal(signal.SIGINT)
        # communicate() keeps reading both pipes: a writer blocked on a full pipe cannot exit.
        proc.communicate(timeout=120)
    assert proc.returncode == 0
