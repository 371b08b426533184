"""Does the colour image the node sends keep the fused luma? Clipped RGB against in-gamut chroma.

PET/SPECT are fused on their luma; the node then puts the source's chroma back (YCbCr) and
sends RGB. Where the fused luma with the full chroma lies outside the RGB cube, clipping R, G or
B changes the luma (a bright fused pixel on a saturated hot spot loses its detail);
``dicomnode.fusion.colour.ycbcr_to_rgb_in_gamut`` scales the chroma down instead. On the ``val``
rows of ``harvard/<MRI-PET|MRI-SPECT>`` (never a benchmark row) this prints, per pair type, how
many pixels of the sent image lose luma each way and the nine metrics of the fused luma and of
each sent image's luma.

    .venv/bin/python benchmarks/fusion_colour.py [--eval-root ../shared/eval] [--method default]
                                                 [--time]

``--time`` also times the two conversions (YCbCr -> 8-bit RGB) on a batch of 16 Hot Iron
slices at 256x256 and 512x512, side by side in alternating rounds, and prints the medians.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from dicomnode.fusion.colour import (
    apply_hot_iron,
    rgb_to_ycbcr,
    to_uint8,
    ycbcr_to_rgb,
    ycbcr_to_rgb_in_gamut,
)
from dicomnode.fusion.metrics import METRIC_NAMES, evaluate
from dicomnode.fusion.registry import get_fuser
from dicomnode.fusion.training.data import load_pairs, luma_u8

COLOUR_TYPES = {"MRI-PET": "PT", "MRI-SPECT": "NM"}


def run(eval_root: Path, method: str = "default", types: tuple[str, ...] = tuple(COLOUR_TYPES)) -> dict:
    """Print the table per pair type; return {type: {row: {metric: mean}}} (rows as printed)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for t in types:
        ps = load_pairs(eval_root / "harvard" / t, t, ("val",))
        if ps.b_rgb is None:
            raise SystemExit(f"{t}: the val rows have no RGB moving image")
        fuser = get_fuser(method).for_modality(COLOUR_TYPES[t])
        y = np.clip(np.rint(np.asarray(fuser.fuse(ps.a / 255.0, ps.b / 255.0)) * 255.0), 0, 255)
        ycc = rgb_to_ycbcr(ps.b_rgb)
        ycc[..., 0] = y
        sent = {
            "fused luma": y.astype(np.uint8),
            "sent, RGB clipped": luma_u8(to_uint8(ycbcr_to_rgb(ycc))),
            "sent, chroma in gamut": luma_u8(to_uint8(ycbcr_to_rgb_in_gamut(ycc))),
        }
        rows = {k: {m: float(v.mean()) for m, v in evaluate(f, ps.a, ps.b).items()} for k, f in sent.items()}
        out[t] = rows
        print(f"\n{t} ({len(ps.names)} val pairs, {method}): sent colour image vs fused luma")
        print(f"{'image':<24}{'|dY|>=2 px %':>13}{'max |dY|':>9}" + "".join(f"{m:>8}" for m in METRIC_NAMES))
        for k, f in sent.items():
            d = np.abs(f.astype(np.int16) - sent["fused luma"].astype(np.int16))
            cells = "".join(f"{rows[k][m]:>8.3f}" for m in METRIC_NAMES)
            print(f"{k:<24}{100 * (d >= 2).mean():>13.2f}{int(d.max()):>9d}{cells}")
    return out


def time_conversions(sizes: tuple[int, ...] = (256, 512), rounds: int = 7) -> dict[int, dict[str, float]]:
    """Median ms per batch of 16 slices for each conversion, alternating which runs first."""
    rng = np.random.default_rng(0)
    convs = {"RGB clipped": ycbcr_to_rgb, "chroma in gamut": ycbcr_to_rgb_in_gamut}
    out: dict[int, dict[str, float]] = {}
    print("\nYCbCr -> 8-bit RGB, batch of 16 Hot Iron slices (median ms of alternating rounds)")
    for size in sizes:
        ycc = rgb_to_ycbcr(apply_hot_iron(rng.random((16, size, size), dtype=np.float32)))
        ycc[..., 0] = rng.random((16, size, size), dtype=np.float32) * 255.0
        times: dict[str, list[float]] = {k: [] for k in convs}
        for r in range(rounds):
            for k in list(convs)[:: 1 if r % 2 else -1]:
                t0 = time.perf_counter()
                to_uint8(convs[k](ycc))
                times[k].append(1000 * (time.perf_counter() - t0))
        out[size] = {k: float(np.median(v)) for k, v in times.items()}
        print(f"{size}x{size}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in out[size].items()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "eval")
    ap.add_argument("--method", default="default", help="the fuser (default: the shipped model)")
    ap.add_argument("--types", nargs="+", default=list(COLOUR_TYPES), choices=list(COLOUR_TYPES))
    ap.add_argument("--time", action="store_true", help="also time the two conversions")
    args = ap.parse_args(argv)
    run(args.eval_root.resolve(), args.method, tuple(args.types))
    if args.time:
        time_conversions()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
