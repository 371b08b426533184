"""Fusion speed: slices per second of a fuser at 256x256 and 512x512, batch sizes 1..64, and peak memory.

    .venv/bin/python benchmarks/fusion_speed.py [--method default] [--device cpu|cuda|auto] [--threads N]
        [--modalities general CT PT NM] [--rounds 3] [--weights FILE]

With several ``--modalities`` (the model's entry per moving modality; ``general`` = the general
model) each cell is measured for every entry in turn, ``--rounds`` times, alternating, and the
median is printed: side by side on a shared, noisy machine. ``PT+colour`` / ``NM+colour`` time
the whole colour path a grayscale PET/SPECT series takes in the pipeline (Hot Iron, the model on
the luma, the chroma put back: ``dicomnode.fusion.colour.fuse_hot_iron``); ``PT+rgb`` /
``NM+rgb`` the path of an RGB pseudo-colour input (PNG mode: ``fuse_colour`` on a Hot Iron RGB
image made beforehand, not timed).

CPU peak memory is the process's peak resident set (ru_maxrss) after each size; on CUDA it is
``torch.cuda.max_memory_allocated``. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicomnode.fusion.base import Fuser
from dicomnode.fusion.colour import apply_hot_iron, fuse_colour, fuse_hot_iron
from dicomnode.fusion.model import CNNFuser
from dicomnode.fusion.registry import get_fuser
from dicomnode.fusion.resample import resolve_device


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class ColourPath:
    """A PET/SPECT image fused in colour: as the pipeline does (``rgb`` False) or from RGB."""

    def __init__(self, fuser: Fuser, rgb: bool = False) -> None:
        self.fuser = fuser
        self.rgb = rgb
        self._rgb_of: tuple[int, np.ndarray] | None = None

    @property
    def batch_size(self) -> int:
        return int(getattr(self.fuser, "batch_size", 16))

    @batch_size.setter
    def batch_size(self, bs: int) -> None:
        self.fuser.batch_size = bs

    def fuse(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if not self.rgb:
            return fuse_hot_iron(self.fuser, a, b)
        if self._rgb_of is None or self._rgb_of[0] != id(b):  # the RGB input exists before fusion
            self._rgb_of = (id(b), apply_hot_iron(b))
        return fuse_colour(self.fuser, a, self._rgb_of[1])


def _entry(base: Fuser, name: str) -> Any:
    """``general``, a moving modality's entry (CT, PT, NM), or one of them ``+colour`` / ``+rgb``."""
    if name == "general":
        return base
    modality, _, path = name.partition("+")
    if path not in ("", "colour", "rgb"):
        raise SystemExit(f"unknown entry {name!r}: use general, CT, PT, NM, or PT/NM with +colour or +rgb")
    fuser = base.for_modality(modality)
    return ColourPath(fuser, rgb=path == "rgb") if path else fuser


def _rate(fuser: Any, a: np.ndarray, b: np.ndarray, dev: torch.device, min_seconds: float) -> float:
    """Slices per second of ``fuser`` on the batch (a, b), after one warm-up call."""
    bs = a.shape[0]
    fuser.batch_size = bs
    fuser.fuse(a, b)  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        fuser.fuse(a, b)
        n += bs
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        el = time.perf_counter() - t0
        if el >= min_seconds and n >= 2 * bs:
            return n / el


def bench(
    method: str,
    device: str,
    sizes: list[int],
    batches: list[int],
    min_seconds: float,
    modalities: list[str] | None = None,
    rounds: int = 1,
    weights: Path | None = None,
) -> None:
    dev = resolve_device(device)
    base = get_fuser(method, device=str(dev)) if weights is None else CNNFuser(str(dev), weights=weights)
    entries = modalities or ["general"]
    fusers = {m: _entry(base, m) for m in entries}
    print(
        f"fuser {base.name} v{base.version} on {dev} ({torch.get_num_threads()} threads); "
        f"CPU: {torch.backends.cpu.get_cpu_capability()}; entries {', '.join(entries)}; "
        f"median of {rounds} alternating round(s)"
    )
    if dev.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(dev)}")
    print(f"{'entry':>10}{'size':>6}{'batch':>7}{'slices/s':>11}{'ms/slice':>10}{'peak MiB':>10}")
    rng = np.random.default_rng(0)
    for size in sizes:
        for bs in batches:
            a = rng.random((bs, size, size), dtype=np.float32)
            b = rng.random((bs, size, size), dtype=np.float32)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            rates: dict[str, list[float]] = {m: [] for m in entries}
            for _ in range(max(1, rounds)):
                for m in entries:
                    rates[m].append(_rate(fusers[m], a, b, dev, min_seconds))
            peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _rss_mib()
            for m in entries:
                r = float(np.median(rates[m]))
                print(f"{m:>10}{size:>6}{bs:>7}{r:>11.1f}{1000 / r:>10.2f}{peak:>10.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument(
        "--modalities",
        nargs="+",
        default=None,
        help="entries to time side by side: general, CT, PT, NM, PT+colour, PT+rgb, ... (default: general)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds per cell (median printed)")
    ap.add_argument("--weights", type=Path, default=None, help="time this weights file (its entries) instead")
    args = ap.parse_args(argv)
    if args.weights is not None and not args.weights.is_file():
        print(f"no weights file at {args.weights}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    bench(
        args.method,
        args.device,
        args.sizes,
        args.batches,
        args.min_seconds,
        args.modalities,
        args.rounds,
        args.weights,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
