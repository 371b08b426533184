"""Fusion throughput by number of fuse workers: jobs per minute for 1, 2 and 3 `serve --stage fuse`
processes sharing one database (SQLite and PostgreSQL) and one spool.

    .venv/bin/python benchmarks/scale.py [--patients 12] [--workers 1,2,3] [--threads 1] [--scale 0.25]

The jobs are made once by the product itself: generated MR+CT studies (one patient each) are sent
by storescu to a node running receive and assemble, which creates one pending job per patient.
Each round then starts from a copy of that database (and the same spool inputs), starts W fuse
workers (``fusion.device`` from ``--device``, ``--threads`` torch threads each), and waits until
every job is done. The table shows jobs/min (from the first claim to the last finished job, so
the workers' start-up is left out), the speed-up over one worker, and what the claims
did: every job claimed once (attempts 1, one pending->running event), none left. Nothing is
asserted. With ``--threads 1`` one worker uses one core; the last row gives one worker every core.

How it scales: a job's cost is the fusion (CPU or GPU) plus loading both series from the spool;
the database work per job is a handful of short transactions (claim, outputs, deliveries), so
the claims are not what bounds it: on a GPU host, one worker per GPU, throughput grows with the
GPUs until the spool's read bandwidth (each job reads both series) or the output writes bound it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from sqlalchemy import create_engine, func, select

from dicomnode.config import load_settings
from dicomnode.db import Event, Job
from dicomnode.node import Node
from dicomnode.testing import generate_study
from dicomnode.testing.peers import free_port, peer_env, stop_process, storescu, wait_until
from dicomnode.testing.postgres import PostgresServer, have_postgres


def make_studies(studies: Path, patients: int, scale: float) -> None:
    """One MR+CT study per patient (a job each)."""
    for k in range(patients):
        generate_study(
            studies / f"p{k:02d}",
            modalities=("MR", "CT"),
            scale=scale,
            seed=200 + k,
            patient_id=f"SCALE-{k:02d}",
        )


def make_jobs(work: Path, studies: Path, database_url: str, patients: int) -> int:
    """Send the studies to receive + assemble; returns the number of pending jobs."""
    settings = load_settings(
        None,
        node={"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port()},
        storage={"spool_dir": str(work / "spool"), "database_url": database_url, "fsync": False},
        assembly={"series_stable_seconds": 1, "poll_seconds": 0.2},
        rules=[{"name": "mr-ct", "reference": "MR", "moving": "CT"}],
        admin={"http_port": 0},
    )
    node = Node(settings, ("receive", "assemble"))
    node.start()
    try:
        res = storescu([studies], settings.node.port, timeout=3600)
        if res.returncode != 0:
            raise RuntimeError(f"storescu failed: {res.stderr[-500:]}")

        def pending() -> int:
            with node.sessionmaker() as s:
                return int(s.scalar(select(func.count()).select_from(Job)) or 0)

        wait_until(lambda: pending() >= patients, None, timeout=600, interval=0.5)
        return pending()
    finally:
        node.stop()
        node.sessionmaker.kw["bind"].dispose()


def run_workers(
    cfg_path: Path, database_url: str, jobs: int, workers: int, threads: int, log_dir: Path
) -> tuple[float, str]:
    """Start ``workers`` fuse processes, wait until every job is finished; (seconds, claims summary)."""
    env = peer_env()
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    engine = create_engine(database_url)
    procs = []
    for w in range(workers):
        with open(log_dir / f"fuse-{w}.log", "ab") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dicomnode.cli", "--config", str(cfg_path)]
                    + ["serve", "--stage", "fuse"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    def finished() -> bool:
        with engine.connect() as conn:
            n = conn.scalar(select(func.count()).select_from(Job).where(Job.state.in_(("done", "failed"))))
        return int(n or 0) >= jobs

    try:
        if not wait_until(finished, None, timeout=7200, interval=0.5):
            raise RuntimeError("the jobs did not finish")
    finally:
        for p in procs:
            stop_process(p, timeout=60)
    with engine.connect() as conn:
        # from the first claim to the last finish: the workers' start (torch, the model) is left out
        first, last = conn.execute(select(func.min(Job.started_at), func.max(Job.finished_at))).one()
        seconds = (last - first).total_seconds()
        states = dict(conn.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        attempts = conn.scalar(select(func.max(Job.attempts)))
        claims = conn.execute(
            select(Event.entity_id, func.count())
            .where(Event.entity == "job", Event.old_state == "pending", Event.new_state == "running")
            .group_by(Event.entity_id)
        ).all()
        workers_used = conn.scalar(select(func.count(func.distinct(Job.worker))))
    engine.dispose()
    twice = sum(1 for _, n in claims if n > 1)
    summary = f"{states.get('done', 0)} done, {states.get('failed', 0)} failed, max attempts {attempts}, "
    summary += f"claimed twice {twice}, by {workers_used} workers"
    return seconds, summary


def clone(backend: str, work: Path, source_url: str, pg: PostgresServer | None, name: str) -> str:
    """A copy of the prepared database for one round."""
    if backend == "sqlite":
        target = work / f"{name}.db"
        target.unlink(missing_ok=True)
        src = sqlite3.connect(source_url.removeprefix("sqlite:///"))
        dst = sqlite3.connect(target)
        src.backup(dst)
        src.close()
        dst.close()
        return f"sqlite:///{target}"
    assert pg is not None
    pg.drop_database(name)
    return pg.create_database(name, template=source_url.rsplit("/", 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patients", type=int, default=12, help="jobs (one MR+CT patient each)")
    parser.add_argument("--workers", default="1,2,3", help="worker counts to compare")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--scale", type=float, default=0.25, help="study size (1.0 = realistic grids)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="fusion.device of the workers (cpu, cuda, ...)")
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally blocks stop everything
    counts = [int(w) for w in args.workers.split(",")]
    backends = [b for b in args.backends.split(",") if b == "sqlite" or have_postgres()]
    cores = os.cpu_count() or 1
    rows: list[tuple[str, str, list[float], str]] = []
    with tempfile.TemporaryDirectory(prefix="dicomnode-scale-") as tmp:
        work = Path(tmp)
        pg = PostgresServer(durable=True).start() if "postgresql" in backends else None
        try:
            make_studies(work / "studies", args.patients, args.scale)
            for backend in backends:
                bwork = work / backend
                bwork.mkdir()
                if backend == "sqlite":
                    source = f"sqlite:///{bwork}/prepared.db"
                else:
                    assert pg is not None
                    source = pg.create_database("prepared")
                jobs = make_jobs(bwork, work / "studies", source, args.patients)
                print(f"{backend}: {jobs} jobs prepared", flush=True)
                plan = [(w, args.threads) for w in counts] + [(1, cores)]
                results: dict[tuple[int, int], list[float]] = {p: [] for p in plan}
                notes: dict[tuple[int, int], str] = {}
                for rnd in range(args.rounds):
                    for w, threads in plan:
                        url = clone(backend, bwork, source, pg, f"round_{rnd}_{w}_{threads}")
                        cfg = {
                            "storage": {"spool_dir": str(bwork / "spool"), "database_url": url},
                            "fusion": {"device": args.device, "poll_seconds": 0.2, "batch_size": 8},
                            "rules": [{"name": "mr-ct", "reference": "MR", "moving": "CT"}],
                        }
                        cfg_path = bwork / "fuse.yaml"
                        cfg_path.write_text(yaml.safe_dump(cfg))
                        shutil.rmtree(bwork / "spool" / "outgoing", ignore_errors=True)
                        seconds, notes[(w, threads)] = run_workers(cfg_path, url, jobs, w, threads, bwork)
                        results[(w, threads)].append(jobs * 60 / seconds)
                        rate = jobs * 60 / seconds
                        print(f"  {backend} {w} workers x {threads} threads: {rate:.1f} jobs/min", flush=True)
                base = statistics.median(results[(1, args.threads)])
                for (w, threads), values in results.items():
                    note = f"{statistics.median(values) / base:.2f}x; {notes[(w, threads)]}"
                    rows.append((backend, f"{w} x {threads} threads", values, note))
        finally:
            if pg is not None:
                pg.stop()
    print()
    print(
        f"fuse workers: {args.patients} MR+CT jobs (scale {args.scale}), device {args.device}, "
        f"{cores} cores, median of {args.rounds} rounds"
    )
    print(f"{'backend':<12}{'workers':<20}{'jobs/min':>10}  vs 1 worker; claims")
    for backend, label, values, note in rows:
        print(f"{backend:<12}{label:<20}{statistics.median(values):>10.1f}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
