"""Run the receive stage alone: ``python -m dicomnode.receive [--config PATH] [--port N]``.

Prints ``LISTENING <port>`` once the SCP is bound (benchmarks and tests wait for that line)
and runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from dicomnode.config import ConfigError, load_settings
from dicomnode.db import storage_sessionmaker
from dicomnode.db.leases import WorkerLeases
from dicomnode.receive.scp import ReceiveStage
from dicomnode.receive.shared_port import die_with_parent
from dicomnode.spool import Spool


def main(argv: list[str] | None = None) -> int:
    """Start the stage from a config file (plus env overrides) and serve until signalled."""
    parser = argparse.ArgumentParser(prog="python -m dicomnode.receive", description=__doc__)
    parser.add_argument("--config", default=None, help="config.yaml (default: built-in defaults)")
    parser.add_argument("--port", type=int, default=None, help="override node.port (0 = any free port)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    die_with_parent()  # when started by ReceiveProcesses: end with the node
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger().level))  # as the CLI
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.port is not None:
        settings.node.port = args.port
    sessions = storage_sessionmaker(settings.storage)
    leases = WorkerLeases(
        sessions,
        settings.workers.lease_seconds,
        settings.workers.worker_id,
        stages=("receive",),
        node_id=settings.storage.node_id,
    )
    leases.register()
    spool = Spool(settings.storage.spool_dir, fsync=settings.storage.fsync, tmp_dir=leases.tmp_dir)
    stage = ReceiveStage(settings, sessions, spool, leases=leases)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stage.start()
    print(f"LISTENING {stage.port}", flush=True)
    stop.wait()
    stage.stop()
    leases.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
