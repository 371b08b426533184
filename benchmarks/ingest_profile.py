"""Where the receive stage's CPU goes: N storescu associations into one receive process.

Run by hand:  .venv/bin/python benchmarks/ingest_profile.py [--senders 4] [--n 500] [--rounds 3]
              [--baseline DIR] [--py-spy OUT.txt]
The receive stage (``python -m dicomnode.receive``, SQLite, fsync on) takes N CT series at once
from N storescu processes; checkouts alternate round by round. The table shows, per instance, the
receiver's user and system CPU (from /proc) and the storescu senders' (they share the machine's
cores with it), medians over rounds. ``--py-spy OUT`` also samples the last round of this
checkout with py-spy (only threads holding the GIL: Python's CPU, not its waits) and prints the
functions with the largest inclusive share. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest_parallel import ensure_series  # noqa: E402

from dicomnode.testing.peers import storescu  # noqa: E402
from dicomnode.testing.receiver import start_receive_process  # noqa: E402


def _cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def one_round(
    folders: list[Path], workdir: Path, code: Path | None, spy_out: Path | None
) -> tuple[float, float, float, float, float]:
    """inst/s and receiver user, receiver sys, senders user, senders sys (ms per instance)."""
    receiver = start_receive_process(workdir, code=code, log_level="WARNING")
    spy = None
    try:
        if spy_out is not None:
            py_spy = Path(sys.executable).with_name("py-spy")
            cmd = [str(py_spy), "record", "--pid", str(receiver.proc.pid), "--rate", "200"]
            cmd += ["--format", "raw", "--gil", "--nonblocking", "-o", str(spy_out)]
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        u0, s0 = _cpu(receiver.proc.pid)
        c0 = os.times()
        t0 = time.perf_counter()

        def send(folder: Path) -> subprocess.CompletedProcess[str]:
            return storescu([folder], receiver.port, called_aet="DICOMNODE", timeout=3600)

        with ThreadPoolExecutor(len(folders)) as pool:
            results = list(pool.map(send, folders))
        elapsed = time.perf_counter() - t0
        u1, s1 = _cpu(receiver.proc.pid)
        c1 = os.times()
    finally:
        if spy is not None:
            spy.send_signal(2)
            spy.wait(60)
        receiver.stop()
    failed = [r for r in results if r.returncode != 0]
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0].stderr.strip()[-300:]}")
    total = sum(len(list(f.glob("*.dcm"))) for f in folders)
    per = 1000.0 / total
    return (
        total / elapsed,
        (u1 - u0) * per,
        (s1 - s0) * per,
        (c1.children_user - c0.children_user) * per,
        (c1.children_system - c0.children_system) * per,
    )


def summarise(raw: Path, top: int) -> None:
    """Inclusive share of the functions in py-spy's raw (collapsed) stacks."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        for frame in {re.sub(r":\d+\)", ")", f) for f in stack.split(";")}:
            inclusive[frame] += n
    print(f"\npy-spy (GIL held), {total} samples: inclusive share by function")
    for frame, n in inclusive.most_common(top):
        print(f"{100 * n / max(total, 1):6.1f}%  {frame}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--n", type=int, default=500, help="instances per sender (default 500)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dicomnode-bench")
    parser.add_argument("--baseline", type=Path, action="append", default=[])
    parser.add_argument("--py-spy", type=Path, default=None, help="write py-spy's raw stacks here")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    folders = ensure_series(args.cache, args.n, args.senders)
    checkouts: list[tuple[str, Path | None]] = [("dicomnode", None)]
    checkouts += [(f"dicomnode@{code.name}", code) for code in args.baseline]
    rows: dict[str, list[tuple[float, ...]]] = {name: [] for name, _ in checkouts}
    with tempfile.TemporaryDirectory(prefix="dicomnode-profile-") as tmp:
        for rnd in range(1, args.rounds + 1):
            for name, code in checkouts:
                workdir = Path(tmp) / f"{rnd}-{len(rows[name])}-{code.name if code else 'this'}"
                spy = args.py_spy if (code is None and rnd == args.rounds) else None
                row = one_round(folders, workdir, code, spy)
                shutil.rmtree(workdir, ignore_errors=True)
                rows[name].append(row)
                print(
                    f"  round {rnd} {name:<22} {row[0]:7.1f} inst/s  receiver {row[1]:.2f} user "
                    f"+ {row[2]:.2f} sys ms/inst, senders {row[3]:.2f} + {row[4]:.2f}",
                    flush=True,
                )
    print(
        f"\n{args.senders} storescu associations into one receive process, {args.n} CT instances each "
        f"(512x512, 16 bit), median of {args.rounds} rounds; CPU in ms per instance"
    )
    head = f"{'receiver':<24}{'inst/s':>8}{'recv user':>11}{'recv sys':>10}{'recv total':>12}"
    print(head + f"{'storescu user':>15}{'storescu sys':>14}")
    for name, values in rows.items():
        med = [statistics.median(v[i] for v in values) for i in range(5)]
        total = statistics.median(v[1] + v[2] for v in values)
        print(
            f"{name:<24}{med[0]:>8.1f}{med[1]:>11.2f}{med[2]:>10.2f}{total:>12.2f}"
            f"{med[3]:>15.2f}{med[4]:>14.2f}"
        )
    if args.py_spy is not None and args.py_spy.exists():
        summarise(args.py_spy, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
