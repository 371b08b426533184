"""Fusion quality on the Harvard benchmark (136 pairs): ours vs classical baselines vs published peers.

One run, one metric code (dicomnode.fusion.metrics) for every method. Per pair type it prints the
table of means, who ranks first per column, and whether ours meets the target (first on >= 6 of 9,
last on none), then, unranked, how much of the MRI's structure each method keeps where both
sources have signal (``overlap_detail``) and the highest EN a method can reach while it leaves
the air (both sources 0) one grey level (``en_black_air_bound``). It also writes a contact sheet
PNG (sources, max, best peer, ours).

    .venv/bin/python benchmarks/fusion_quality.py [--eval-root ../shared/eval] [--method default]
                                                  [--weights FILE] [--regions]

``--regions`` also prints, per method, VIF(MRI, F), VIF(other, F) and Qabf split by where their
terms sit (``vif_regions``, ``qabf_regions``, ``ssim_regions``): where each method wins or loses them.

``--weights`` scores a weights file other than the shipped one as "ours" (a candidate packed with
``dicomnode train pack``), without touching the package.

For MRI-PET and MRI-SPECT, ours and the classical baselines are scored on the luma of the colour
image the node delivers (the fused luma with the source's chroma put back, inside the RGB gamut:
``dicomnode.fusion.colour``), as the peers' RGB outputs are: the table describes what is sent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dicomnode.fusion.base import Fuser
from dicomnode.fusion.colour import rgb_to_ycbcr, to_uint8, ycbcr_to_rgb_in_gamut
from dicomnode.fusion.metrics import (
    METRIC_NAMES,
    SIGNAL_REGIONS,
    en_black_air_bound,
    evaluate,
    overlap_detail,
    qabf_regions,
    ssim_regions,
    vif_regions,
)
from dicomnode.fusion.model import CNNFuser
from dicomnode.fusion.png import read_gray_or_rgb
from dicomnode.fusion.registry import get_fuser
from dicomnode.fusion.training.data import PAIR_TYPES, load_pairs, luma_u8

PEERS = ("IFCNN", "MATR", "U2Fusion", "EMFusion", "MUFusion", "ReFusion", "GIFNet")
BASELINES = ("average", "max", "laplacian-pyramid")


MODALITY = {"MRI-CT": "CT", "MRI-PET": "PT", "MRI-SPECT": "NM"}  # moving modality of each pair type


def _fuse8(method: str | Fuser, a8: np.ndarray, b8: np.ndarray, device: str, modality: str) -> np.ndarray:
    base = get_fuser(method, device=device) if isinstance(method, str) else method
    fuser = base.for_modality(modality)
    out = fuser.fuse(a8.astype(np.float32) / 255.0, b8.astype(np.float32) / 255.0)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _colourise(y8: np.ndarray, rgb: np.ndarray | None) -> np.ndarray:
    """Fused luma (...,H,W) + the source's chroma (RGB (...,H,W,3)) as the node sends it; gray as RGB."""
    if rgb is None:
        return np.repeat(y8[..., None], 3, axis=-1)
    ycc = rgb_to_ycbcr(rgb)
    ycc[..., 0] = y8
    return to_uint8(ycbcr_to_rgb_in_gamut(ycc))


def _label(img: np.ndarray, text: str) -> np.ndarray:
    im = Image.fromarray(img)
    ImageDraw.Draw(im).text((4, 4), text, fill=(255, 255, 0))
    return np.asarray(im)


def run(
    eval_root: Path,
    method: str,
    device: str,
    sheet: Path | None,
    per_type_sheet: int = 2,
    weights: Path | None = None,
    regions: bool = False,
) -> dict:
    """Score everything; print tables; return {pair_type: {method: {metric: mean}}}."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    rows_for_sheet = []
    ours: str | Fuser = method if weights is None else CNNFuser(device=device, weights=weights)
    ours_name = get_fuser(method, device=device).name if isinstance(ours, str) else f"{ours.name} {weights}"
    for t in PAIR_TYPES:
        folder = eval_root / "harvard-cddfuse" / t
        ps = load_pairs(folder, t)
        fused: dict[str, np.ndarray] = {}
        t0 = time.perf_counter()
        fused[f"ours ({ours_name})"] = _fuse8(ours, ps.a, ps.b, device, MODALITY[t])
        ours_s = time.perf_counter() - t0
        for m in BASELINES:
            fused[m] = _fuse8(m, ps.a, ps.b, device, MODALITY[t])
        if ps.b_rgb is not None:  # score the delivered colour image, as the peers' outputs are
            fused = {k: luma_u8(_colourise(f, ps.b_rgb)) for k, f in fused.items()}
        for p in PEERS:
            d = eval_root / "peers" / p / "harvard-cddfuse" / t
            if d.is_dir():
                imgs = [read_gray_or_rgb(d / f"{n}.png") for n in ps.names]
                fused[p] = np.stack([x if x.ndim == 2 else luma_u8(x) for x in imgs])
        table = {}
        for k, f in fused.items():
            table[k] = {m: float(v.mean()) for m, v in evaluate(f, ps.a, ps.b).items()}
        results[t] = table
        _print_table(t, len(ps.names), table, ours_s)
        # not ranked, not one of the nine: how much MRI structure each keeps where both sources
        # have signal (VIF, Qabf and SSIM(F,B) all rise when F shows the other source there)
        detail = {k: float(np.mean(overlap_detail(f, ps.a, ps.b))) for k, f in fused.items()}
        print(
            "MRI kept where both have signal (overlap_detail, not ranked): "
            + ", ".join(f"{k.split(' (')[0]} {v:.3f}" for k, v in detail.items())
        )
        # EN's ceiling for a method that leaves the air (both sources 0) one grey level
        cap = float(np.mean(en_black_air_bound(ps.a, ps.b)))
        first_en = _rank(table, "EN")[0]
        print(
            f"EN ceiling with the air kept one level (en_black_air_bound, mean): {cap:.3f}; "
            f"first on EN: {first_en.split(' (')[0]} {table[first_en]['EN']:.3f}"
            + (
                " (above the ceiling: varying values where neither source has signal)"
                if table[first_en]["EN"] > cap
                else ""
            )
        )
        if regions:
            _print_regions(t, fused, ps.a, ps.b)
        peer_names = [k for k in fused if k in PEERS]
        best_peer = (  # without peers' outputs the sheet shows the Laplacian pyramid in their column
            max(peer_names, key=lambda p: sum(_rank(table, m)[0] == p for m in METRIC_NAMES))
            if peer_names
            else "laplacian-pyramid"
        )
        for i in np.linspace(0, len(ps.names) - 1, per_type_sheet).round().astype(int):
            rgb = ps.b_rgb[i] if ps.b_rgb is not None else None
            ours_key = next(iter(fused))
            row = [
                _label(np.repeat(ps.a[i][..., None], 3, -1), f"{t} {ps.names[i]} MRI"),
                _label(rgb if rgb is not None else np.repeat(ps.b[i][..., None], 3, -1), t.split("-")[1]),
                _label(_colourise(fused["max"][i], rgb), "max"),
                _label(_colourise(fused[best_peer][i], rgb), best_peer),
                _label(_colourise(fused[ours_key][i], rgb), "ours"),
            ]
            rows_for_sheet.append(np.concatenate(row, axis=1))
    if sheet is not None and rows_for_sheet:
        sheet.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(rows_for_sheet, axis=0)).save(sheet)
        print(f"\ncontact sheet: {sheet}")
    return results


def _print_regions(t: str, fused: dict[str, np.ndarray], a: np.ndarray, b: np.ndarray) -> None:
    """VIF and SSIM per source and Qabf, each split by where its terms sit (A = MRI, B = the other)."""
    what = "VIF(A,F), VIF(B,F), Qabf, SSIM(F,A), SSIM(F,B)"
    print(f"\n{t}: {what} split by region (means; each row's parts add up to it)")
    print(f"{'method':<22}{'part':>6}" + "".join(f"{r:>18}" for r in SIGNAL_REGIONS) + f"{'sum':>8}")
    for k, f in fused.items():
        vr = vif_regions(f, a, b)
        qr = qabf_regions(f, a, b)
        sr = ssim_regions(f, a, b)
        parts = (
            ("VIF A", vr["A"]),
            ("VIF B", vr["B"]),
            ("Qabf", qr),
            ("SSIM A", sr["A"]),
            ("SSIM B", sr["B"]),
        )
        for label, part in parts:
            means = {r: float(np.mean(part[r])) for r in SIGNAL_REGIONS}
            cells = "".join(f"{means[r]:>18.4f}" for r in SIGNAL_REGIONS)
            print(f"{k.split(' (')[0]:<22}{label:>6}{cells}{sum(means.values()):>8.4f}")


def _rank(table: dict[str, dict[str, float]], metric: str) -> list[str]:
    return sorted(table, key=lambda k: -table[k][metric])


def _print_table(t: str, n: int, table: dict[str, dict[str, float]], ours_s: float) -> None:
    print(f"\n{t}  ({n} pairs; ours fused them in {ours_s:.2f} s)")
    header = f"{'method':<28}" + "".join(f"{m:>8}" for m in METRIC_NAMES)
    print(header)
    print("-" * len(header))
    firsts = {m: _rank(table, m)[0] for m in METRIC_NAMES}
    lasts = {m: _rank(table, m)[-1] for m in METRIC_NAMES}
    for k, vals in table.items():
        cells = "".join(f"{vals[m]:>7.3f}" + ("*" if firsts[m] == k else " ") for m in METRIC_NAMES)
        print(f"{k:<28}{cells}")
    print(f"{'first':<28}" + "".join(f"{firsts[m][:7]:>8}" for m in METRIC_NAMES))
    ours = next(iter(table))
    n_first = sum(firsts[m] == ours for m in METRIC_NAMES)
    last_on = [m for m in METRIC_NAMES if lasts[m] == ours]
    ok = n_first >= 6 and not last_on
    print(f"ours first on {n_first}/9, last on {last_on or 'none'} -> target {'MET' if ok else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "eval")
    ap.add_argument("--method", default="default", help="our fuser (default: the shipped model)")
    ap.add_argument("--weights", type=Path, default=None, help="score this weights file as ours instead")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sheet", type=Path, default=Path("bench-out/fusion_contact_sheet.png"))
    ap.add_argument(
        "--regions", action="store_true", help="also split VIF and Qabf by region (MRI only, both, ...)"
    )
    args = ap.parse_args(argv)
    if not (args.eval_root / "harvard-cddfuse").is_dir():
        print(f"no benchmark under {args.eval_root}", file=sys.stderr)
        return 2
    if args.weights is not None and not args.weights.is_file():
        print(f"no weights file at {args.weights}", file=sys.stderr)
        return 2
    run(args.eval_root, args.method, args.device, args.sheet, weights=args.weights, regions=args.regions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
