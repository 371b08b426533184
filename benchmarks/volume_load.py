"""Load time of one series per encoding (and as one Enhanced multi-frame instance): read + decode + volume.

    .venv/bin/python benchmarks/volume_load.py [--slices 300] [--matrix 256] [--rounds 3]

Generates a CT series with the project's generator, re-encodes it into every transfer syntax of
``dicomnode.testing.variants.ENCODINGS``, and prints the median time of ``load_volume`` per encoding.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dicomnode.fusion.volume import load_volume
from dicomnode.testing import generate_ct_series
from dicomnode.testing import variants as V


def _time_load(paths: list[Path], rounds: int) -> tuple[float, np.ndarray]:
    times, array = [], np.empty(0)
    for _ in range(rounds):
        t0 = time.perf_counter()
        vol = load_volume(paths)
        times.append(time.perf_counter() - t0)
        array = vol.array
    return statistics.median(times), array


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--matrix", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--encodings", default=",".join(V.ENCODINGS), help="comma-separated names")
    ap.add_argument("--workdir", type=Path, default=None, help="keep files here (default: a temp dir)")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dicomnode-volload-"))
    try:
        n, m = args.slices, args.matrix
        series = generate_ct_series(work / "plain", n_slices=n, rows=m, columns=m)
        base_time, ref = _time_load(series.paths, args.rounds)
        print(f"CT series: {n} slices of {m}x{m}, 16-bit; median of {args.rounds} rounds; {sys.platform}")
        header = f"{'encoding':<20} {'transfer syntax UID':<24} {'MB':>7} {'load s':>8} {'slices/s':>9}"
        header += f" {'max |err|':>10}"
        print(header)
        print("-" * len(header))
        rows: list[tuple[str, str, list[Path]]] = []
        for name in args.encodings.split(","):
            enc = V.ENCODINGS[name]
            if enc.tool == "dcmcjpeg" and shutil.which("dcmcjpeg") is None:
                print(f"{name:<20} skipped: dcmcjpeg not installed")
                continue
            rows.append((name, str(enc.uid), V.reencode(series.paths, work / name, name)))
        rows.append(
            (
                "enhanced-ct (1 file)",
                "1.2.840.10008.1.2.1",
                [V.to_enhanced(series.paths, work / "enhanced" / "enhanced.dcm")],
            )
        )
        for name, uid, paths in rows:
            mb = sum(p.stat().st_size for p in paths) / 1e6
            t, arr = (base_time, ref) if name == "explicit-le" else _time_load(paths, args.rounds)
            err = float(np.abs(arr - ref).max())
            print(f"{name:<20} {uid:<24} {mb:>7.1f} {t:>8.2f} {args.slices / t:>9.0f} {err:>10.1f}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
