"""``python -m dicomnode.testing OUT_DIR``: write a generated head study and say what was written."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dicomnode.testing.generator import MODALITIES, generate_study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dicomnode.testing", description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--modalities", default=",".join(MODALITIES), help="comma-separated, e.g. MR,CT")
    parser.add_argument("--scale", type=float, default=1.0, help="1.0 realistic, 0.25 small and fast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-noise", action="store_true", help="noise-free images")
    args = parser.parse_args(argv)
    modalities = [m.strip().upper() for m in args.modalities.split(",") if m.strip()]
    t0 = time.perf_counter()
    try:
        study = generate_study(
            args.out_dir, modalities, scale=args.scale, seed=args.seed, noise=not args.no_noise
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    took = time.perf_counter() - t0
    print(f"study {study.study_instance_uid} (frame of reference {study.frame_of_reference_uid})")
    for modality, s in study.series.items():
        g = s.grid
        geom = (
            (
                f"{g.columns}x{g.rows}x{g.n_slices} @ {g.pixel_spacing[1]:.3g}x{g.pixel_spacing[0]:.3g}"
                f"x{g.slice_spacing:.3g} mm"
            )
            if g
            else ""
        )
        print(f"{modality:3s} {len(s.paths):4d} files  {geom:32s} {s.directory}")
    c, r = study.phantom.lesion_center_mm, study.phantom.lesion_radius_mm
    print(f"lesion at ({c[0]:.1f}, {c[1]:.1f}, {c[2]:.1f}) mm, radius {r:.1f} mm")
    print(f"written in {took:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
