"""Parallel ingest (``ingest.py --parallel N``): N storescu associations at once, each its own CT series.

Receivers, alternating round by round, each in its own processes on a free loopback port:
dcmtk storescp (``--fork``: a process per association), Orthanc (its SQLite index; with
``--orthanc-pg`` also Orthanc with the PostgreSQL index plugin), and dicomnode with 1 and 2
receive processes (``node.receive_processes``) on SQLite and on PostgreSQL (a durable local
cluster: fsync and synchronous commit on, as SQLite's FULL sync). The table shows the aggregate
instances/s (all instances / wall time from the first association's start to the last one's end),
median over rounds, and the ratios to storescp and Orthanc. ``--baseline DIR`` adds the same
dicomnode rows for another checkout (e.g. one of main), in the same rounds. ``--diagnose`` adds
Orthanc and dicomnode with all their files on tmpfs (no flush costs anything there): against the
rows on disk it shows how much of each receiver's rate the disk's flushes take. Nothing is asserted.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import yaml
from receivers import OrthancReceiver, StoreScp, fresh_dir
from sqlalchemy import create_engine, func, select

from dicomnode.db import Instance
from dicomnode.testing import generate_ct_series
from dicomnode.testing.peers import Orthanc, port_open, start_storescp, stop_process, storescu, wait_until
from dicomnode.testing.postgres import PostgresServer, have_postgres

POSTGRES_INDEX_PLUGIN = "/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so"


class Receiver(Protocol):
    aet: str
    port: int

    def start(self) -> Receiver: ...
    def count(self) -> int: ...
    def stop(self) -> None: ...


def ensure_series(cache: Path, n: int, senders: int) -> list[Path]:
    """``senders`` CT series of ``n`` 512x512 instances, each its own patient (made once, reused)."""
    folders = []
    for k in range(1, senders + 1):
        folder = cache / f"ct{n}-scanner{k}" / "CT"
        if not (folder.is_dir() and len(list(folder.glob("*.dcm"))) == n):
            print(f"generating {n} CT instances for scanner {k} in {folder.parent} ...", flush=True)
            fresh_dir(folder.parent)
            generate_ct_series(
                folder.parent, n_slices=n, rows=512, columns=512, seed=100 + k, patient_id=f"BENCH-{k}"
            )
        folders.append(folder)
    return folders


class ForkingStorescp(StoreScp):
    """dcmtk storescp with ``--fork`` (one process per association), no fsync."""

    def start(self) -> ForkingStorescp:
        self.scp = start_storescp(self.workdir, aet=self.aet, args=("--fork",))
        self.port = self.scp.port
        return self


class OrthancPostgres(OrthancReceiver):
    """Orthanc with its index in PostgreSQL (the orthanc-postgresql plugin), files on disk."""

    def __init__(self, workdir: Path, pg: PostgresServer) -> None:
        database = f"orthanc_{workdir.name.replace('-', '_')}"[:60]
        pg.create_database(database)
        self.workdir = workdir
        self.port = 0
        self.orthanc = Orthanc(
            workdir,
            aet=self.aet,
            extra_config={
                "Plugins": [POSTGRES_INDEX_PLUGIN],
                "PostgreSQL": {
                    "EnableIndex": True,
                    "EnableStorage": False,
                    "Host": "127.0.0.1",
                    "Port": pg.port,
                    "Database": database,
                    "Username": "postgres",
                    "Password": "",
                    "Lock": False,
                },
            },
        )


class DicomnodeServe:
    """``dicomnode serve --stage receive`` with ``processes`` receive processes on one port."""

    aet = "DICOMNODE"

    def __init__(self, workdir: Path, processes: int, database_url: str, code: Path | None = None) -> None:
        self.workdir = workdir
        self.processes = processes
        self.database_url = database_url
        self.code = code  # another checkout of dicomnode to run instead of the installed one
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DicomnodeServe:
        from dicomnode.testing.peers import free_port, peer_env  # noqa: PLC0415

        self.port = free_port()
        cfg = {
            "node": {
                "ae_title": self.aet,
                "host": "127.0.0.1",
                "port": self.port,
                "receive_processes": self.processes,
                "reuse_port": True,
            },
            "storage": {"spool_dir": str(self.workdir / "spool"), "database_url": self.database_url},
        }
        (self.workdir / "config.yaml").write_text(yaml.safe_dump(cfg))
        env = peer_env()
        if self.code is not None:
            env["PYTHONPATH"] = str(self.code.resolve())
        with open(self.workdir / "receive.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicomnode.cli", "--config", str(self.workdir / "config.yaml")]
                + ["serve", "--stage", "receive"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,  # not a source tree: ``-m`` puts the working directory first on sys.path
            )
        if not wait_until(lambda: port_open(self.port), self.proc, timeout=120):
            self.stop()
            raise RuntimeError(f"dicomnode did not start; see {self.workdir / 'receive.log'}")
        time.sleep(1.0 if self.processes > 1 else 0.0)  # the other processes bind a moment later
        return self

    def count(self) -> int:
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as conn:
                return int(conn.scalar(select(func.count()).select_from(Instance)) or 0)
        finally:
            engine.dispose()

    def stop(self) -> None:
        stop_process(self.proc, timeout=60)


def tree_cpu_seconds(roots: list[int]) -> float:
    """CPU time (user + system) of processes, their live descendants and their reaped children."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    ticks, todo, seen = 0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in stats and pid not in seen:
            seen.add(pid)
            ticks += stats[pid][1]
            todo += children.get(pid, [])
    return ticks / os.sysconf("SC_CLK_TCK")


def root_pids(receiver: Any, pg: PostgresServer | None) -> list[int]:
    """The processes doing a receiver's work: its own, and the PostgreSQL cluster's when it uses it."""
    handle = getattr(receiver, "scp", None) or getattr(receiver, "orthanc", None) or receiver
    pids = [handle.proc.pid]
    uses_pg = isinstance(receiver, OrthancPostgres) or "postgresql" in getattr(receiver, "database_url", "")
    if pg is not None and uses_pg:
        pids.append(int((pg.data_dir / "postmaster.pid").read_text().split()[0]))
    return pids


def send_parallel(folders: list[Path], port: int, called_aet: str) -> float:
    """One storescu association per folder, all at once; wall time until the last one ended."""

    def send(folder: Path) -> subprocess.CompletedProcess[str]:
        return storescu([folder], port, called_aet=called_aet, timeout=3600)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(folders)) as pool:
        results = list(pool.map(send, folders))
    elapsed = time.perf_counter() - t0
    failed = [r for r in results if r.returncode != 0]
    if failed:
        raise RuntimeError(f"storescu failed ({failed[0].returncode}): {failed[0].stderr.strip()[-500:]}")
    return elapsed


def run(
    n: int,
    senders: int,
    rounds: int,
    cache: Path,
    orthanc_pg: bool,
    tmp: Path,
    baselines: list[Path] | None = None,
    diagnose: bool = False,
) -> int:
    """Run the rounds and print the table; ``baselines``: other dicomnode checkouts run beside this one;
    ``diagnose``: Orthanc and dicomnode (SQLite, one process) again with all their files on tmpfs,
    where a flush costs nothing: what is left is the software's own cost."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally blocks stop the peers
    folders = ensure_series(cache, n, senders)
    total = n * senders
    size_mb = sum(p.stat().st_size for f in folders for p in f.iterdir()) / 1e6
    pg: PostgresServer | None = PostgresServer(durable=True).start() if have_postgres() else None
    counter = iter(range(1, 1_000_000))

    def pg_url() -> str:
        assert pg is not None
        return pg.create_database(f"bench_{next(counter)}")

    makers: list[tuple[str, Any]] = [
        ("storescp --fork", ForkingStorescp),
        ("orthanc (sqlite)", OrthancReceiver),
    ]
    if orthanc_pg and pg is not None:
        makers.append(("orthanc (postgresql)", lambda d: OrthancPostgres(d, pg)))
    for code in [None, *(baselines or [])]:
        label = "dicomnode" if code is None else f"dicomnode@{code.name}"
        for procs in (1, 2):
            makers.append(
                (
                    f"{label} sqlite x{procs}",
                    lambda d, p=procs, c=code: DicomnodeServe(d, p, f"sqlite:///{d}/dicomnode.db", c),
                )
            )
            if pg is not None:
                makers.append(
                    (
                        f"{label} postgresql x{procs}",
                        lambda d, p=procs, c=code: DicomnodeServe(d, p, pg_url(), c),
                    )
                )
    shm = Path("/dev/shm")
    on_tmpfs: set[str] = set()
    if diagnose and shm.is_dir():
        makers.append(("orthanc (sqlite, tmpfs)", OrthancReceiver))
        makers.append(
            (
                "dicomnode sqlite x1 (tmpfs)",
                lambda d: DicomnodeServe(d, 1, f"sqlite:///{d}/dicomnode.db"),
            )
        )
        on_tmpfs = {"orthanc (sqlite, tmpfs)", "dicomnode sqlite x1 (tmpfs)"}
    rates: dict[str, list[float]] = {name: [] for name, _ in makers}
    cpu: dict[str, list[float]] = {name: [] for name, _ in makers}
    try:
        for rnd in range(1, rounds + 1):
            for name, make in makers:
                base = shm / f"{tmp.name}-tmpfs" if name in on_tmpfs else tmp
                workdir = fresh_dir(base / f"{name.split()[0]}-{rnd}-{len(rates[name])}")
                receiver: Receiver = make(workdir).start()
                try:
                    roots = root_pids(receiver, pg)
                    cpu0 = tree_cpu_seconds(roots)
                    seconds = send_parallel(folders, receiver.port, receiver.aet)
                    cpu[name].append((tree_cpu_seconds(roots) - cpu0) * 1000 / total)
                    stored = receiver.count()
                finally:
                    receiver.stop()
                shutil.rmtree(workdir, ignore_errors=True)
                if stored != total:
                    print(f"  round {rnd} {name}: stored {stored} of {total} instances!", flush=True)
                rates[name].append(total / seconds)
                print(
                    f"  round {rnd} {name:<30} {total / seconds:8.1f} inst/s  ({seconds:.2f} s, "
                    f"{cpu[name][-1]:.1f} ms CPU per instance)",
                    flush=True,
                )
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(shm / f"{tmp.name}-tmpfs", ignore_errors=True)

    base = statistics.median(rates["storescp --fork"])
    orthanc = statistics.median(rates["orthanc (sqlite)"])
    print()
    print(
        f"parallel ingest: {senders} storescu associations at once, {n} CT instances each "
        f"(512x512, 16 bit; {total} instances, {size_mb:.0f} MB), median of {rounds} rounds"
    )
    head = f"{'receiver':<32}{'inst/s':>9}{'MB/s':>8}{'min':>9}{'max':>9}"
    print(f"{head}{'vs storescp':>13}{'vs orthanc':>12}{'CPU ms/inst':>13}")
    for name, values in rates.items():
        med = statistics.median(values)
        print(
            f"{name:<32}{med:>9.1f}{med * size_mb / total:>8.1f}{min(values):>9.1f}{max(values):>9.1f}"
            f"{med / base:>12.2f}x{med / orthanc:>11.2f}x{statistics.median(cpu[name]):>13.1f}"
        )
    print(
        "CPU ms/inst: CPU time of the receiver's processes (with the PostgreSQL cluster's where it is"
        " used) per instance; the cores divided by it bound inst/s on an otherwise idle machine"
    )
    return 0
