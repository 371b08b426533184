"""Edge transfer inside the PET uptake: what keeping the MRI's stronger edges buys and costs.

Qabf scores, per pixel, how well the fused image keeps each source's Sobel edge (strength and
orientation), weighted by that edge's strength. Pixel max keeps the PET's edges wherever the PET
is brighter; the gradient-domain fuser (``dicomnode.fusion.classical.GradientDomainFuser``) keeps,
per pixel, the edge of the source whose edge is stronger, so it keeps the MRI's anatomy where the
MRI's edges are the stronger ones. This benchmark scores, on ``val`` rows only (never a benchmark
row), the change over the stage-1 model of:

- pixel max and the gradient-domain fuser;
- ``stage 1 + edges``: the stage-1 image whose gradient, where both sources have signal and the
  MRI's Sobel edge is the stronger, is replaced by the MRI's gradient times ``gain``
  (screened-Poisson, held to the stage-1 image with weight ``lam``; air kept black);
- with ``lone``: pixels where only the MRI has signal show the MRI times ``lone`` (no detail
  enhancement there; SSIM(F, MRI) gains, SF and AG pay unless ``lone`` > 1).

Conditions: the MRI-PET ``val`` pairs as stored and with the MRI at 70 % (``mri-x0.7``), and the
MRI-SPECT ``val`` pairs with the SPECT luma x1.7 (``moving-x1.7``: a PET-like set with axial T1/T2
MRIs, the benchmark's kind). The last column is ``overlap_detail`` (MRI kept inside the uptake).

    .venv/bin/python benchmarks/fusion_edge_transfer.py [--eval-root ../shared/eval] [--quick]
                                                        [--weights build/run/step-0300.pt ...]
                                                        [--proxy-cases 4 11 18 ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from dicomnode.fusion.base import get_fuser
from dicomnode.fusion.classical import graft_stronger_edges
from dicomnode.fusion.metrics import METRIC_NAMES, overlap_detail
from dicomnode.fusion.model import WEIGHTS_FILE, CNNFuser, build_net, load_checkpoint
from dicomnode.fusion.training.refine import apply_condition, load_split, mean_metrics
from dicomnode.fusion.training.specialise import to_u8

SETS = (("MRI-PET", "stored"), ("MRI-PET", "mri-x0.7"), ("MRI-SPECT", "moving-x1.7"))
# (lone, lam, gain) of the "stage 1 + ..." variants; lone None: stage 1 where only the MRI has
# signal; lam None: no edge replacement
VARIANTS: tuple[tuple[float | None, float | None, float | None], ...] = (
    (1.0, None, None),
    (None, 0.05, 1.0),
    (None, 0.5, 1.1),
    (1.05, None, None),
    (1.0, 0.5, 1.1),
    (1.0, 1.0, 1.1),
    (1.05, 0.5, 1.1),
    (1.05, 1.0, 1.1),
    (1.1, 0.5, 1.1),
)


def stage1_with_edges(
    a: torch.Tensor,
    b: torch.Tensor,
    s: torch.Tensor,
    lone: float | None,
    lam: float | None,
    gain: float | None,
) -> torch.Tensor:
    """Stage-1 image ``s`` (N,1,H,W) with the MRI's stronger edges in the overlap and/or a lone-MRI gain."""
    out = s
    if lam is not None and gain is not None:
        out = graft_stronger_edges(a, b, s, lam, gain)
    if lone is not None:
        out = torch.where((a > 0) & (b <= 0), a * lone, out)
    return out.clamp(0, 1)


def _load_nets(paths: list[Path]) -> dict[str, torch.nn.Module]:
    """Checkpoints / refined weights files by a short unique name (``run/step-0300.pt``)."""
    out: dict[str, torch.nn.Module] = {}
    for path in paths:
        ck = load_checkpoint(path)
        net = build_net(ck.get("config"))
        net.load_state_dict(ck["state_dict"])
        name = path.name if path.name not in out else f"{path.parent.name}/{path.name}"
        out[name if name not in out else str(path)] = net.eval()
    return out


def run(
    eval_root: Path,
    quick: bool = False,
    weights: list[Path] | None = None,
    proxy_cases: set[str] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Print one table per set; return {set: {method: {metric: % change over stage 1, 'od': ...}}}.

    ``weights``: refined checkpoints (e.g. a PET entry kept by ``train refine --keep-checkpoints``)
    scored as more rows, on every set (the MRI-SPECT set is the PET-like one). ``proxy_cases``:
    only the MRI-SPECT val rows of these atlas cases (those a checkpoint was not trained on).
    """
    net = CNNFuser(weights=WEIGHTS_FILE).net
    extra = _load_nets(list(weights or []))
    gd = get_fuser("gradient-domain")
    variants = VARIANTS[:3] if quick else VARIANTS
    results: dict[str, dict[str, dict[str, float]]] = {}
    for pair_type, cond in SETS:
        cases_in = proxy_cases if pair_type == "MRI-SPECT" else None
        a0, b0, _ = load_split(eval_root, pair_type, "val", case_in=cases_in)
        a, b = apply_condition(a0, b0, cond)
        a8, b8 = to_u8(a), to_u8(b)

        def fuse(model: torch.nn.Module, a: torch.Tensor = a, b: torch.Tensor = b) -> torch.Tensor:
            with torch.inference_mode():
                return torch.cat(
                    [model(a[i : i + 16], b[i : i + 16]).clamp(0, 1) for i in range(0, len(a), 16)]
                )

        s = fuse(net)
        fused = {
            "stage 1": s,
            "max": torch.maximum(a, b),
            "gradient-domain": torch.from_numpy(gd.fuse(a[:, 0].numpy(), b[:, 0].numpy()))[:, None],
        }
        for lone, lam, gain in variants:
            parts = ([] if lam is None else [f"edges l{lam} g{gain}"]) + (
                [] if lone is None else [f"lone x{lone}"]
            )
            name = "stage 1 + " + ", ".join(parts)
            fused[name] = stage1_with_edges(a, b, s, lone, lam, gain)
        for name, model in extra.items():
            fused[name] = fuse(model)
        base = mean_metrics(s, a8, b8)
        rows = {}
        for name, f in fused.items():
            m = mean_metrics(f, a8, b8)
            rows[name] = {k: 100 * (m[k] / base[k] - 1) for k in METRIC_NAMES}
            rows[name]["od"] = float(np.mean(overlap_detail(to_u8(f), a8, b8)))
        key = f"{pair_type} {cond}"
        results[key] = rows
        width = max(len(n) for n in rows) + 2
        print(f"\n{key} ({len(a)} val pairs): change over stage 1, % (last column: overlap_detail)")
        print(f"{'method':<{width}}" + "".join(f"{k:>7}" for k in METRIC_NAMES) + f"{'od':>7}")
        for name, r in rows.items():
            print(f"{name:<{width}}" + "".join(f"{r[k]:>+7.1f}" for k in METRIC_NAMES) + f"{r['od']:>7.3f}")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "eval")
    ap.add_argument("--quick", action="store_true", help="only the first three variants")
    ap.add_argument("--weights", nargs="*", type=Path, default=[], help="refined checkpoints to score too")
    ap.add_argument(
        "--proxy-cases",
        nargs="+",
        default=None,
        metavar="CASE",
        help="MRI-SPECT val rows of these atlas cases only",
    )
    args = ap.parse_args(argv)
    missing = [p for p in args.weights if not p.is_file()]
    if missing:
        print(f"no weights file at {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    torch.set_flush_denormal(True)
    run(
        args.eval_root.resolve(),
        args.quick,
        args.weights,
        set(args.proxy_cases) if args.proxy_cases else None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
