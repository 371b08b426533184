"""The command line: serve, status, db, fuse, echo, demo, train."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dicomnode import __version__
from dicomnode.config import ConfigError, Settings, load_settings
from dicomnode.db.schema import SchemaError

if TYPE_CHECKING:
    from sqlalchemy import Engine

DEFAULT_CONFIG = "config.yaml"


def _settings(args: argparse.Namespace) -> Settings:
    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    return load_settings(path)


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
    from dicomnode.db import storage_sessionmaker  # noqa: PLC0415

    settings = _settings(args)
    sm = storage_sessionmaker(settings.storage)
    with sm() as s:
        st = collect_status(s, n_events=args.events)
    print(json.dumps(st, indent=1) if args.json else format_status(st))
    return 0


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


def build_parser(with_train: bool = True) -> argparse.ArgumentParser:
    """The argument parser; ``with_train`` False leaves out ``train`` (whose import loads torch)."""
    p = argparse.ArgumentParser(prog="dicomnode", description=__doc__)
    p.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    p.add_argument("--config", default=None, help="config file (default: ./config.yaml when present)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("serve", help="run the node (all stages, or one with --stage)")
    sp.add_argument(
        "--stage",
        action="append",
        choices=["receive", "assemble", "retrieve", "fuse", "dispatch", "admin"],
        help="run only this stage (repeatable); default: all stages in one process",
    )
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("status", help="counts by state and the last events, from the audit DB")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--events", type=int, default=20, help="how many recent events (default 20)")
    sp.set_defaults(func=cmd_status)

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

    if not with_train:
        return p
    try:
        from dicomnode.fusion.training.cli import add_train_parser  # noqa: PLC0415
    except ImportError:
        pass
    else:
        add_train_parser(sub)
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
    command = _command(sys.argv[1:] if argv is None else argv)
    # A stage process (serve --stage receive, ...) starts without loading torch for `train`.
    parser = build_parser(with_train=command in (None, "train"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(
        logging.DEBUG if os.environ.get("DICOMNODE_DEBUG_NET") else logging.WARNING
    )
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
