"""The command line: serve, status, jobs, resend, destinations, purge, db, fuse, echo, demo, train.

``--config`` and ``-v`` work before and after the sub-command. Configuration mistakes exit with
code 2 and one message naming the key; a refused admin action exits with code 1.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicomnode import __version__
from dicomnode.config import ConfigError, Settings, load_settings
from dicomnode.db.schema import SchemaError
from dicomnode.logs import configure_logging

if TYPE_CHECKING:
    from sqlalchemy import Engine

DEFAULT_CONFIG = "config.yaml"


def _settings(args: argparse.Namespace) -> Settings:
    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    settings = load_settings(path)
    configure_logging(settings.logging.format, settings.logging.level, verbose=args.verbose)
    return settings


def _actor() -> str:
    """Who acts from the command line, for the audit."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _db(args: argparse.Namespace) -> tuple[Settings, Any]:
    from dicomnode.node import open_database  # noqa: PLC0415

    settings = _settings(args)
    return settings, open_database(settings)


def cmd_serve(args: argparse.Namespace) -> int:
    from dicomnode.node import STAGES, Node  # noqa: PLC0415

    settings = _settings(args)
    stages = STAGES if not args.stage else tuple(args.stage)
    node = Node(settings, stages)
    logging.getLogger("dicomnode").info("dicomnode %s starting stages: %s", __version__, ", ".join(stages))
    node.serve_forever()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from dicomnode.admin import collect_status, format_status  # noqa: PLC0415

    settings, sm = _db(args)
    interrupted: list[int] = []
    if args.watch:
        # Ctrl-C (or SIGTERM) ends --watch between two redraws: an interrupt raised in the middle of
        # a query could leave a connection-pool lock held, and the exit would then wait on it.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda n, _frame: interrupted.append(n))
    while True:
        with sm() as s:
            st = collect_status(
                s, n_events=args.events, settings=settings, n_jobs=args.jobs, patient=args.patient
            )
        text = json.dumps(st, indent=1) if args.json else format_status(st)
        if args.watch and sys.stdout.isatty():
            text = "\x1b[2J\x1b[H" + text  # clear the screen, then draw
        print(text + ("\n" if args.watch and not sys.stdout.isatty() else ""), flush=True)
        if not args.watch:
            return 0
        deadline = time.monotonic() + args.interval
        while not interrupted and time.monotonic() < deadline:
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))
        if interrupted:
            return 0


def _print_result(result: Any, as_json: bool) -> int:
    print(
        json.dumps({"ok": True, "message": result.message, "changed": result.changed})
        if as_json
        else result.message
    )
    return 0


def _run_action(args: argparse.Namespace, name: str, *params: Any) -> int:
    from dicomnode.admin.actions import ActionError, AdminActions  # noqa: PLC0415

    settings, sm = _db(args)
    actions = AdminActions(settings, sm)
    try:
        result = getattr(actions, name)(*params, _actor())
    except ActionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return _print_result(result, getattr(args, "json", False))


def cmd_jobs(args: argparse.Namespace) -> int:
    from dicomnode.admin import queries  # noqa: PLC0415
    from dicomnode.admin.status import JOB_HEADERS, _job_row, _table  # noqa: PLC0415

    if args.jobs_command in ("retry", "cancel", "release"):
        return _run_action(args, f"{args.jobs_command}_job", args.job_id)
    _, sm = _db(args)
    with sm() as s:
        if args.jobs_command == "show":
            job = queries.job_detail(s, args.job_id)
            if job is None:
                print(f"error: no job {args.job_id}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(job, indent=1))
                return 0
            print(_format_job(job))
            return 0
        page = queries.list_jobs(s, state=args.state, rule=args.rule, patient=args.patient, limit=args.limit)
    if args.json:
        print(json.dumps(page.as_json(), indent=1))
    else:
        print("\n".join(_table(JOB_HEADERS, [_job_row(j) for j in page.items])))
    return 0


def _format_job(job: dict[str, Any]) -> str:
    lines = [
        f"job {job['id']} ({job['rule']}): {job['state']}" + (f": {job['error']}" if job["error"] else "")
    ]
    lines.append(f"  patient {job['patient_key']}, study {job['study_instance_uid']}")
    for src in job["sources"]:
        lines.append(
            f"  {src['role']}: {src['modality']} {src['description']!r} ({src['instances']} instances)"
        )
        if src.get("why"):
            lines.append(f"    chosen: {src['why']}")
    lines.append(f"  method {job['method']} {job['method_version'] or ''}; {job['alignment'] or ''}".rstrip())
    if job["timings"]:
        lines.append("  seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in job["timings"].items()))
    if job["quality"]:
        lines.append("  quality: " + ", ".join(f"{k} {v:.3f}" for k, v in job["quality"].items()))
    lines.append(f"  output series {job['output_series_uid'] or '-'} ({job['n_outputs']} instances)")
    for d in job["destinations"]:
        states = " ".join(f"{k}={v}" for k, v in sorted(d["states"].items()))
        lines.append(f"  to {d['destination']}: {states}; last sent {d['last_sent_at'] or 'never'}")
        if d.get("last_error"):
            lines.append(f"    last error: {d['last_error']}")
    lines.append("  events:")
    for e in job["events"]:
        who = f" [by {e['actor']}]" if e.get("actor") else ""
        lines.append(
            f"    {e['at']} {e['stage']:<8} {e['entity']} "
            f"{e['old_state'] or '-'} -> {e['new_state'] or '-'}: {e['reason'] or ''}{who}"
        )
    return "\n".join(lines)


def cmd_resend(args: argparse.Namespace) -> int:
    from dicomnode.admin.actions import ActionError, AdminActions  # noqa: PLC0415

    settings, sm = _db(args)
    actions = AdminActions(settings, sm)
    try:
        if args.job is not None:
            result = actions.resend_job(args.job, _actor(), args.destination)
        else:
            result = actions.resend_output(args.output, _actor(), args.destination)
    except ActionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return _print_result(result, False)


def cmd_destinations(args: argparse.Namespace) -> int:
    if args.destinations_command == "pause":
        from dicomnode.admin.actions import ActionError, AdminActions  # noqa: PLC0415

        settings, sm = _db(args)
        try:
            result = AdminActions(settings, sm).pause_destination(args.name, _actor(), args.reason)
        except ActionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return _print_result(result, False)
    if args.destinations_command == "resume":
        return _run_action(args, "resume_destination", args.name)
    from dicomnode.admin import queries  # noqa: PLC0415
    from dicomnode.admin.status import _table  # noqa: PLC0415

    settings, sm = _db(args)
    with sm() as s:
        rows = queries.list_destinations(s, settings)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    headers = ["name", "address", "state", "pending", "held", "failed", "last success"]
    print(
        "\n".join(
            _table(
                headers,
                [
                    [d["name"], f"{d['ae_title']}@{d['host']}:{d['port']}", d["state"]]
                    + [str(d[k]) for k in ("pending", "held", "failed")]
                    + [d["last_success_at"] or "never"]
                    for d in rows
                ],
            )
        )
    )
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from dicomnode.admin.actions import ActionError, AdminActions  # noqa: PLC0415

    settings, sm = _db(args)
    actions = AdminActions(settings, sm)
    try:
        if args.patient is not None:
            result = actions.purge_patient(args.patient, _actor())
        else:
            result = actions.purge_older_than(args.older_than, _actor())
    except ActionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return _print_result(result, False)


def cmd_db(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import OperationalError  # noqa: PLC0415

    from dicomnode.db import make_engine, schema  # noqa: PLC0415

    if args.db_command == "revision":
        path = schema.make_revision(args.message)
        print(f"wrote {path}: review it, then commit it with the models it follows")
        return 0
    settings = _settings(args)
    engine = make_engine(settings.storage.database_url)
    try:
        return _db_command(args, engine)
    except OperationalError as exc:
        print(f"error: cannot use the database ({engine.url!r}): {exc.orig}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()


def _db_command(args: argparse.Namespace, engine: Engine) -> int:
    from dicomnode.db import schema  # noqa: PLC0415

    if args.db_command == "upgrade":
        before, after = schema.upgrade(engine)
        if before.kind == "current":
            print(f"database already at {after.revision}")
        elif before.kind == "empty":
            print(f"database created at revision {after.revision}")
        else:
            print(f"database upgraded: {before.describe()} -> revision {after.revision}")
        return 0
    state = schema.current(engine)
    print(state.describe())
    return 0 if state.kind == "current" or not args.check else 1


def cmd_echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE  # noqa: PLC0415
    from pynetdicom.sop_class import Verification  # noqa: PLC0415

    target = args.target
    try:
        aet, _, hostport = target.partition("@")
        host, _, port_s = hostport.rpartition(":")
        port = int(port_s)
        if not aet or not host:
            raise ValueError
    except ValueError:
        print(f"error: target must look like AE@HOST:PORT, got {target!r}", file=sys.stderr)
        return 2
    ae = AE(ae_title=args.calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = args.timeout
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        print(f"C-ECHO to {target}: association failed (rejected, aborted or no answer)", file=sys.stderr)
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    code = int(getattr(status, "Status", -1)) if status else -1
    if code == 0:
        print(f"C-ECHO to {target}: success (0x0000)")
        return 0
    print(
        f"C-ECHO to {target}: failed (status {code:#06x})"
        if code >= 0
        else f"C-ECHO to {target}: no response",
        file=sys.stderr,
    )
    return 1


def cmd_fuse(args: argparse.Namespace) -> int:
    from dicomnode.fusion.pipeline import FusionError  # noqa: PLC0415
    from dicomnode.fusion.volume import VolumeError  # noqa: PLC0415
    from dicomnode.output import OutputError  # noqa: PLC0415
    from dicomnode.runner.batch import fuse_dicom_dirs, fuse_png_dirs  # noqa: PLC0415

    options = {"method": args.method, "device": args.device, "batch_size": args.batch_size}
    user_errors = (FileNotFoundError, ValueError) if args.png else (VolumeError, FusionError, OutputError)
    try:
        if args.png:
            n = fuse_png_dirs(args.ref_dir, args.moving_dir, args.out_dir, modality=args.modality, **options)
            done = f"fused {n} PNG pairs into {args.out_dir}"
        else:
            ref, moving, out = Path(args.ref_dir), Path(args.moving_dir), Path(args.out_dir)
            written = fuse_dicom_dirs(ref, moving, out, **options)
            done = f"wrote {len(written)} Secondary Capture instances to {args.out_dir}"
    except user_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:  # unknown fusion method
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    print(done)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dicomnode.demo import run_demo  # noqa: PLC0415

    return run_demo(
        Path(args.workdir), scale=args.scale, modalities=args.modalities.split(","), config=args.config
    )


def _global_options(p: argparse.ArgumentParser, top: bool) -> None:
    """``--config`` and ``-v``; on sub-commands they default to "not given" so either place works."""
    p.add_argument(
        "--config",
        default=None if top else argparse.SUPPRESS,
        help="config file (default: ./config.yaml when present)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="debug logging",
    )


def _add_global_options_everywhere(p: argparse.ArgumentParser) -> None:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any("--config" in a.option_strings for a in sub._actions):
                    _global_options(sub, top=False)
                _add_global_options_everywhere(sub)


def build_parser(with_train: bool = True) -> argparse.ArgumentParser:
    """The parser; without ``with_train`` the ``train`` commands are a stub (they import torch: seconds)."""
    p = argparse.ArgumentParser(prog="dicomnode", description=__doc__)
    p.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    _global_options(p, top=True)
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("serve", help="run the node (all stages, or one with --stage)")
    sp.add_argument(
        "--stage",
        action="append",
        choices=["receive", "assemble", "retrieve", "fuse", "dispatch", "admin"],
        help="run only this stage (repeatable); default: all stages in one process",
    )
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser(
        "status", help="counts, queues, disk, destinations, jobs (patient, deliveries), failures, events"
    )
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--events", type=int, default=20, help="how many recent milestone events (default 20)")
    sp.add_argument("--jobs", type=int, default=20, help="how many recent jobs (default 20)")
    sp.add_argument("--patient", metavar="KEY", help="only this patient's jobs (patient ID, or ISSUER^ID)")
    sp.add_argument("--watch", action="store_true", help="redraw every --interval seconds until Ctrl-C")
    sp.add_argument("--interval", type=float, default=2.0, help="seconds between redraws (default 2)")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("jobs", help="list, show, retry, cancel or release fusion jobs")
    jobs = sp.add_subparsers(dest="jobs_command", required=True)
    jp = jobs.add_parser("list", help="jobs newest first")
    jp.add_argument("--state", help="pending, running, done, failed, superseded, held, cancelled")
    jp.add_argument("--rule", help="rule name")
    jp.add_argument("--patient", metavar="KEY", help="patient key")
    jp.add_argument("--limit", type=int, default=50)
    jp.add_argument("--json", action="store_true")
    jp.set_defaults(func=cmd_jobs)
    jp = jobs.add_parser("show", help="one job: sources, timings, quality, deliveries, events")
    jp.add_argument("job_id", type=int)
    jp.add_argument("--json", action="store_true")
    jp.set_defaults(func=cmd_jobs)
    for name, text in (
        ("retry", "run a failed, held or cancelled job again"),
        ("cancel", "cancel a pending, running or held job"),
        ("release", "send a job held by the quality gate as it is"),
    ):
        jp = jobs.add_parser(name, help=text)
        jp.add_argument("job_id", type=int)
        jp.set_defaults(func=cmd_jobs)

    sp = sub.add_parser("resend", help="send a done job's outputs (or one output) again")
    which = sp.add_mutually_exclusive_group(required=True)
    which.add_argument("--job", type=int, help="every output of this job")
    which.add_argument("--output", type=int, help="this output")
    sp.add_argument("--destination", help="only this destination (default: all)")
    sp.set_defaults(func=cmd_resend)

    sp = sub.add_parser("destinations", help="list destinations, pause or resume one")
    dests = sp.add_subparsers(dest="destinations_command", required=True)
    dp = dests.add_parser("list", help="state, pending, held, failed, last success")
    dp.add_argument("--json", action="store_true")
    dp.set_defaults(func=cmd_destinations)
    dp = dests.add_parser("pause", help="stop sending to a destination (deliveries wait)")
    dp.add_argument("name")
    dp.add_argument("--reason", help="shown in the audit and the dashboard")
    dp.set_defaults(func=cmd_destinations)
    dp = dests.add_parser("resume", help="send to a paused destination again")
    dp.add_argument("name")
    dp.set_defaults(func=cmd_destinations)

    sp = sub.add_parser("purge", help="delete patients' spool files and rows (the audit stays)")
    which = sp.add_mutually_exclusive_group(required=True)
    which.add_argument("--patient", metavar="KEY", help="this patient (patient ID, or ISSUER^ID)")
    which.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        help="every patient with nothing unfinished, idle this long",
    )
    sp.set_defaults(func=cmd_purge)
    sp = sub.add_parser("db", help="the database schema: current revision, upgrade")
    db_sub = sp.add_subparsers(dest="db_command", required=True)
    db_cur = db_sub.add_parser("current", help="the schema revision of storage.database_url")
    db_cur.add_argument("--check", action="store_true", help="exit 1 unless the schema is current")
    db_sub.add_parser("upgrade", help="upgrade the schema to this release's revision (back it up first)")
    db_rev = db_sub.add_parser(
        "revision", help="developers: write the next migration from the models (autogenerated)"
    )
    db_rev.add_argument("-m", "--message", required=True, help="what the revision changes")
    sp.set_defaults(func=cmd_db)

    sp = sub.add_parser("echo", help="C-ECHO a DICOM peer: dicomnode echo AE@HOST:PORT")
    sp.add_argument("target")
    sp.add_argument("--calling-aet", default="DICOMNODE")
    sp.add_argument("--timeout", type=float, default=10.0)
    sp.set_defaults(func=cmd_echo)

    sp = sub.add_parser(
        "fuse", help="batch-fuse two series folders into Secondary Capture files (no network)"
    )
    sp.add_argument("ref_dir", help="reference (MR) series folder, or MRI PNG folder with --png")
    sp.add_argument("moving_dir", help="moving (CT/PT/NM) series folder, or PNG folder with --png")
    sp.add_argument("out_dir")
    sp.add_argument("--png", action="store_true", help="fuse folders of registered PNG pairs instead")
    sp.add_argument("--modality", default=None, help="with --png: CT, PT or NM (which specialisation to use)")
    sp.add_argument("--method", default="default", help="fuser name (default: the shipped model)")
    sp.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    sp.add_argument("--batch-size", type=int, default=16)
    sp.set_defaults(func=cmd_fuse)

    sp = sub.add_parser(
        "demo", help="start Orthanc and the node, send a generated study, show the fused series"
    )
    sp.add_argument("--workdir", default="demo-out")
    sp.add_argument("--scale", type=float, default=1.0, help="study size (1.0 = realistic grids)")
    sp.add_argument("--modalities", default="MR,CT,PT", help="comma-separated, e.g. MR,CT,PT,NM")
    sp.set_defaults(func=cmd_demo)

    try:
        if not with_train:
            raise ImportError
        from dicomnode.fusion.training.cli import add_train_parser  # noqa: PLC0415
    except ImportError:
        sub.add_parser("train", help="build the fusion training database and fit the CNN")
    else:
        add_train_parser(sub)
    _add_global_options_everywhere(p)
    return p


def _command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (None when there is none yet, e.g. ``--help``)."""
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # A stage process (serve --stage receive, ...) starts without loading torch for `train`.
    parser = build_parser(with_train=_command(argv) in (None, "train"))
    args = parser.parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SchemaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
