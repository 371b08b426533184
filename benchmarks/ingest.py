"""Ingest benchmark: one storescu association of N CT instances into storescp, Orthanc and dicomnode.

Run by hand:  .venv/bin/python benchmarks/ingest.py [--n 500] [--rounds 3] [--diagnose] [--baseline DIR]
Receivers run in their own processes on free loopback ports, alternating round by round; the
table shows instances/s (median over rounds), the ratio to storescp and the receiver's CPU time
per instance (from /proc; less sensitive than the rate to what else runs on the machine).
``--baseline DIR`` adds the receive stage of another checkout (e.g. a worktree of main) to the
same rounds, so a change can be compared with what it changes, side by side. Nothing is asserted.
``--parallel N [--orthanc-pg] [--baseline DIR]``: N associations at once instead (see ingest_parallel.py).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from receivers import DicomnodeReceiver, OrthancReceiver, StoreScp, fresh_dir, send_folder  # noqa: E402

from dicomnode.testing import generate_ct_series  # noqa: E402


def ensure_series(cache: Path, n: int) -> Path:
    """The N-slice 512x512 16-bit CT series, generated once and reused (same files every run)."""
    folder = cache / f"ct{n}" / "CT"
    if folder.is_dir() and len(list(folder.glob("*.dcm"))) == n:
        return folder
    print(f"generating {n} CT instances (512x512, 16 bit) in {folder.parent} ...", flush=True)
    fresh_dir(folder.parent)
    generate_ct_series(folder.parent, n_slices=n, rows=512, columns=512)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=500, help="instances (default 500)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per receiver (default 3)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dicomnode-bench")
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="add rows without flushes (shows what durability costs; with --parallel: Orthanc and "
        "dicomnode with all their files on tmpfs)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        action="append",
        default=[],
        help="another dicomnode checkout to run beside this one (repeatable)",
    )
    parser.add_argument(
        "--only-dicomnode", action="store_true", help="leave out storescp and Orthanc (baseline comparisons)"
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="N storescu associations at once, N series (ingest_parallel.py)",
    )
    parser.add_argument(
        "--orthanc-pg", action="store_true", help="with --parallel: Orthanc on PostgreSQL too"
    )
    args = parser.parse_args(argv)
    if args.parallel > 1:
        from ingest_parallel import run as run_parallel  # noqa: PLC0415

        with tempfile.TemporaryDirectory(prefix="dicomnode-ingest-") as tmp:
            return run_parallel(
                args.n,
                args.parallel,
                args.rounds,
                args.cache,
                args.orthanc_pg,
                Path(tmp),
                args.baseline,
                diagnose=args.diagnose,
            )

    folder = ensure_series(args.cache, args.n)
    size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    makers = [
        ("storescp", lambda d: StoreScp(d)),
        ("orthanc", lambda d: OrthancReceiver(d)),
        ("dicomnode", lambda d: DicomnodeReceiver(d)),
    ]
    if args.only_dicomnode:
        makers = makers[2:]
    for code in args.baseline:
        makers.append((f"dicomnode@{code.name}", lambda d, code=code: DicomnodeReceiver(d, code=code)))
    if args.diagnose:
        makers.append(("dicomnode (spool fsync off)", lambda d: DicomnodeReceiver(d, fsync=False)))
        shm = Path("/dev/shm")
        if shm.is_dir():  # spool and SQLite on tmpfs: fsync is free, only the software path is left
            makers.append(
                (
                    "dicomnode (all on tmpfs)",
                    lambda d: DicomnodeReceiver(fresh_dir(shm / f"dicomnode-bench-{d.name}")),
                )
            )
    rates: dict[str, list[float]] = {name: [] for name, _ in makers}
    cpu: dict[str, list[float]] = {name: [] for name, _ in makers}  # receiver CPU s per instance
    with tempfile.TemporaryDirectory(prefix="dicomnode-ingest-") as tmp:
        for rnd in range(1, args.rounds + 1):
            for name, make in makers:
                workdir = fresh_dir(Path(tmp) / f"{name.split()[0]}-{rnd}-{len(rates[name])}")
                receiver = make(workdir).start()
                try:
                    cpu_before = receiver.cpu_seconds()
                    seconds = send_folder(folder, receiver.port, receiver.aet)
                    cpu[name].append((receiver.cpu_seconds() - cpu_before) / args.n)
                    stored = receiver.count()
                finally:
                    receiver.stop()
                for used in {workdir, getattr(receiver, "workdir", workdir)}:
                    shutil.rmtree(used, ignore_errors=True)  # free the disk before the next receiver
                if stored != args.n:
                    print(f"  round {rnd} {name}: stored {stored} of {args.n} instances!", flush=True)
                rate = args.n / seconds
                rates[name].append(rate)
                print(f"  round {rnd} {name:<28} {rate:8.1f} inst/s  ({seconds:.2f} s)", flush=True)

    base = statistics.median(rates["storescp" if "storescp" in rates else "dicomnode"])
    base_name = "storescp" if "storescp" in rates else "dicomnode"
    print()
    print(
        f"ingest: {args.n} CT instances (512x512, 16 bit, {size_mb:.0f} MB), one storescu association, "
        f"median of {args.rounds} rounds"
    )
    head = f"{'receiver':<30}{'inst/s':>10}{'MB/s':>9}{'min':>9}{'max':>9}{'vs ' + base_name:>15}"
    print(head + f"{'CPU ms/inst':>13}")
    for name, values in rates.items():
        med = statistics.median(values)
        mbs = med * size_mb / args.n
        ms = f"{statistics.median(cpu[name]) * 1000:.2f}" if all(c == c for c in cpu[name]) else "-"
        row = f"{name:<30}{med:>10.1f}{mbs:>9.1f}{min(values):>9.1f}{max(values):>9.1f}{med / base:>14.2f}x"
        print(row + f"{ms:>13}")
    if "orthanc" not in rates:
        return 0
    orthanc = statistics.median(rates["orthanc"])
    node = statistics.median(rates["dicomnode"])
    print(
        f"\ndicomnode / orthanc = {node / orthanc:.2f}x (target >= 3x); "
        f"dicomnode / storescp = {node / base:.2f}x (target >= 1.0x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
