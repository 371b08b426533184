"""Edge transfer inside the PET uptake: what keeping the MRI's stronger edges buys and costs.

Research script of ``docs/research/pet-edge-step.md`` (not a product benchmark).

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

    .venv/bin/python benchmarks/research/fusion_edge_transfer.py [--eval-root ../shared/eval] [--quick]
        [--weights build/run/step-0300.pt ...] [--proxy-cases 4 11 18 ...] [--predict] [--edge-step]
        [--calibrated]

``--edge-step`` scores, instead of the graft variants, the sweep of the fixed edge step
(FusionNet ``edge_select`` / ``lone_rim``: :data:`EDGE_STEPS`). ``--predict`` adds the benchmark
change predicted as the mean over the three sets and each row's slack against what MRI-PET needs
to be first (:data:`REQUIRED`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from dicomnode.fusion.classical import (
    _sep_blur,
    box_filter,
    gaussian_kernel1d,
    graft_stronger_edges,
    select_edges_in_overlap,
    stronger_edge_image,
)
from dicomnode.fusion.metrics import METRIC_NAMES, overlap_detail
from dicomnode.fusion.model import WEIGHTS_FILE, CNNFuser, build_net, keep_lone_rim, load_checkpoint
from dicomnode.fusion.registry import get_fuser
from dicomnode.fusion.training.refine import apply_condition, load_split, mean_metrics
from dicomnode.fusion.training.specialise import to_u8

SETS = (("MRI-PET", "stored"), ("MRI-PET", "mri-x0.7"), ("MRI-SPECT", "moving-x1.7"))
# ``--calibrated``: the MRI-PET val pairs as stored and with the MRI's mid-tones darkened
# (``mri-gamma2``: the benchmark's MRI level and texture under the uptake), and the offsets that
# make their mean change reproduce the benchmark change of the three edge-step looks (the
# gradient-domain fuser, P, r7@225; docs/research/pet-edge-step.md): Qabf is over-predicted by ~0.45 points,
# SSIM by ~0.25
CALIBRATED_SETS = (("MRI-PET", "stored"), ("MRI-PET", "mri-gamma2"))
CALIBRATION: dict[str, float] = {"Qabf": -0.45, "SSIM": -0.25}
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


# the edge-step sweep (``--edge-step``): (amount, gain, rim, where, highpass sigma) of
# "stage 1 + step": stage 1 moved by ``amount`` towards the stronger-edge image (gradient x
# ``gain``) where both sources have signal (``where`` "overlap") or where the moving image is also
# the brighter ("brighter"), faded over 5 px; ``highpass``: only the part of the step finer than a
# Gaussian of that sigma (keeps stage 1's brightness); ``rim``: FusionNet's ``lone_rim``; amount 0:
# the rim alone
EDGE_STEPS: tuple[tuple[float, float, int, str, float | None], ...] = (
    (0.0, 1.0, 1, "overlap", None),
    (0.0, 1.0, 2, "overlap", None),
    (0.0, 1.0, 8, "overlap", None),
    (0.7, 1.1, 0, "overlap", None),
    *((amount, gain, 1, "overlap", None) for amount in (0.5, 0.7, 0.8, 1.0) for gain in (1.0, 1.1, 1.15)),
    (0.8, 1.1, 1, "brighter", None),
    (0.9, 1.05, 1, "brighter", None),
    (1.0, 1.05, 1, "brighter", None),
    (0.7, 1.1, 1, "overlap", 4.0),
    (0.7, 1.1, 1, "overlap", 8.0),
    (1.0, 1.1, 1, "overlap", 4.0),
)


def stage1_with_step(
    a: torch.Tensor,
    b: torch.Tensor,
    s: torch.Tensor,
    amount: float,
    gain: float,
    rim: int,
    where: str = "overlap",
    highpass: float | None = None,
    soft: int = 5,
) -> torch.Tensor:
    """Stage-1 image ``s`` with the edge step of :data:`EDGE_STEPS` (``where`` "overlap": exactly
    ``classical.select_edges_in_overlap``) and the lone rim, clipped to [0, 1]."""
    out = s.clamp(0, 1)
    if amount > 0:
        if where == "overlap" and highpass is None:
            out = select_edges_in_overlap(a, b, out, amount, gain, soft)
        else:
            region = (a > 0) & (b > 0)
            if where == "brighter":
                region = region & (b > a)
            m = box_filter(region.to(s.dtype), soft)
            d = stronger_edge_image(a, b, gain) - out
            if highpass is not None:
                d = d - _sep_blur(d, gaussian_kernel1d(highpass))
            out = out + amount * m * d
    if rim > 0:
        out = keep_lone_rim(a, b, out, rim)
    return torch.where((a <= 0) & (b <= 0), torch.zeros_like(out), out).clamp(0, 1)


def _step_name(amount: float, gain: float, rim: int, where: str, highpass: float | None) -> str:
    if amount == 0:
        return f"stage 1 + rim {rim}"
    extra = ("" if where == "overlap" else f" {where}") + ("" if highpass is None else f" hp{highpass:g}")
    return f"stage 1 + step a{amount:g} g{gain:g}{extra}" + (f" rim {rim}" if rim else "")


def split_amount(spec: str | Path) -> tuple[Path, float | None]:
    """``PATH`` or ``PATH@AMOUNT`` (a checkpoint with its edge step's amount replaced) -> (path, amount)."""
    text = str(spec)
    path, sep, amount = text.rpartition("@")
    if not sep:
        return Path(text), None
    try:
        value = float(amount)
    except ValueError:
        raise ValueError(f"{text!r}: the edge-step amount after '@' must be a number") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{text!r}: the edge-step amount must be in [0, 1]")
    return Path(path), value


def _load_nets(paths: list[Path] | list[str]) -> dict[str, torch.nn.Module]:
    """Checkpoints / refined weights files by a short unique name (``run/step-0300.pt``).

    ``PATH@AMOUNT``: the checkpoint with its fixed edge step (``edge_select``) at another amount
    (``run/step-0225.pt@0.55``); the checkpoint must have the step.
    """
    out: dict[str, torch.nn.Module] = {}
    parsed = [split_amount(spec) for spec in paths]
    names = [p.name for p, _ in parsed]
    shared = {n for n in names if names.count(n) > 1}  # step-0225.pt of two runs: run/step-0225.pt
    for path, amount in parsed:
        ck = load_checkpoint(path)
        net = build_net(ck.get("config"))
        net.load_state_dict(ck["state_dict"])
        suffix = ""
        if amount is not None:
            if net.edge_select is None:
                raise ValueError(f"{path}: no edge step (edge_select) to set the amount of")
            _, gain, soft = net.edge_select
            net.edge_select = (amount, gain, soft)
            suffix = f"@{amount:g}"
        name = (f"{path.parent.name}/{path.name}" if path.name in shared else path.name) + suffix
        out[name if name not in out else str(path) + suffix] = net.eval()
    return out


def run(
    eval_root: Path,
    quick: bool = False,
    weights: list[Path] | list[str] | None = None,
    proxy_cases: set[str] | None = None,
    edge_step: bool = False,
    sets: tuple[tuple[str, str], ...] = SETS,
) -> dict[str, dict[str, dict[str, float]]]:
    """Print one table per set; return {set: {method: {metric: % change over stage 1, 'od': ...}}}.

    ``weights``: refined checkpoints (e.g. a PET entry kept by ``train refine --keep-checkpoints``)
    scored as more rows, on every set (the MRI-SPECT set is the PET-like one). ``proxy_cases``:
    only the MRI-SPECT val rows of these atlas cases (those a checkpoint was not trained on).
    ``edge_step``: the rows of :data:`EDGE_STEPS` instead of the graft / lone variants. ``sets``:
    (pair type, condition) of the val sets (:data:`SETS`, or :data:`CALIBRATED_SETS`).
    """
    net = CNNFuser(weights=WEIGHTS_FILE).net
    extra = _load_nets(list(weights or []))
    gd = get_fuser("gradient-domain")
    variants = VARIANTS[:3] if quick else VARIANTS
    results: dict[str, dict[str, dict[str, float]]] = {}
    for pair_type, cond in sets:
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
        for step in EDGE_STEPS if edge_step else ():
            fused[_step_name(*step)] = stage1_with_step(a, b, s, *step)
        for lone, lam, gain in () if edge_step else variants:
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


# what a change over stage 1 must reach on the benchmark for MRI-PET to be first in the column:
# stage 1's margins over the best other method in the benchmark table of 2026-12-01
# (docs/research/README.md, four peers): Qabf 0.692 vs max 0.714, SSIM 1.515 vs 1.510, AG 7.929 vs
# IFCNN 7.883, SF 30.10 vs 29.54, SD 79.80 vs 75.49, SCD 1.810 vs 1.705
REQUIRED: dict[str, float] = {"Qabf": 3.2, "SSIM": -0.3, "AG": -0.6, "SF": -1.9, "SD": -5.4, "SCD": -5.8}


def predict(
    results: dict[str, dict[str, dict[str, float]]],
    required: dict[str, float] | None = None,
    slack: float = 0.3,
    od_floor: float | None = None,
    offsets: dict[str, float] | None = None,
) -> dict[str, dict[str, float | bool]]:
    """The benchmark change predicted as the mean over the sets; print it with each row's slack.

    A row is ``eligible`` when the predicted change minus ``required`` is at least ``slack`` points
    in every required column, its Qabf rises on every set, and it keeps at least ``od_floor`` of
    the MRI inside the uptake on the darkened-MRI set (``mri-x0.7``, else ``mri-gamma2``, else the
    last); ``od_floor`` None: stage 1's ``overlap_detail`` there. ``offsets``: points added to a
    column's mean (``--calibrated``: :data:`CALIBRATION`). Calibration against the benchmark looks:
    docs/research/pet-edge-step.md.
    """
    req = dict(REQUIRED if required is None else required)
    shift = dict(offsets or {})
    sets = list(results)
    names = [n for n in results[sets[0]] if n != "stage 1"]
    od_key = next((k for k in sets if k.endswith("mri-x0.7")), None)
    od_key = od_key or next((k for k in sets if k.endswith("mri-gamma2")), sets[-1])
    floor = float(results[od_key]["stage 1"]["od"]) if od_floor is None else od_floor
    out: dict[str, dict[str, float | bool]] = {}
    width = max(len(n) for n in names) + 2
    print(
        f"\npredicted benchmark change over stage 1 (mean of the {len(sets)} sets"
        + ("" if not shift else "; " + ", ".join(f"{k} {v:+g}" for k, v in shift.items()))
        + "), %; required: "
        + ", ".join(f"{k} {v:+.1f}" for k, v in req.items())
    )
    head = "".join(f"{k:>7}" for k in req)
    print(f"{'method':<{width}}{head}{'slack':>7}  Qabf up on all  eligible")
    for n in names:
        mean = {k: float(np.mean([results[s][n][k] for s in sets])) + shift.get(k, 0.0) for k in req}
        low = min(mean[k] - req[k] for k in req)
        up = all(results[s][n]["Qabf"] > 0 for s in sets)
        ok = low >= slack and up and results[od_key][n]["od"] >= floor
        out[n] = {**mean, "slack": low, "qabf_up_everywhere": up, "eligible": ok}
        cells = "".join(f"{mean[k]:>+7.1f}" for k in req)
        print(f"{n:<{width}}{cells}{low:>+7.2f}  {'yes' if up else 'no':<14}  {'ELIGIBLE' if ok else '-'}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "eval")
    ap.add_argument("--quick", action="store_true", help="only the first three variants")
    ap.add_argument(
        "--weights",
        nargs="*",
        default=[],
        help="refined checkpoints to score too; PATH@AMOUNT: with its edge step at that amount",
    )
    ap.add_argument(
        "--proxy-cases",
        nargs="+",
        default=None,
        metavar="CASE",
        help="MRI-SPECT val rows of these atlas cases only",
    )
    ap.add_argument(
        "--edge-step",
        action="store_true",
        help="score the edge-step sweep (EDGE_STEPS: stage 1 + the fixed edge step / lone rim) "
        "instead of the graft and lone variants",
    )
    ap.add_argument(
        "--predict",
        action="store_true",
        help="also print the benchmark change predicted as the mean over the three sets, with each "
        "row's slack against stage 1's MRI-PET margins (REQUIRED)",
    )
    ap.add_argument(
        "--calibrated",
        action="store_true",
        help="the sets are the MRI-PET val pairs as stored and at mri-gamma2 (CALIBRATED_SETS) and "
        "the prediction carries the fitted offsets (CALIBRATION); implies --predict",
    )
    args = ap.parse_args(argv)
    try:
        specs = [split_amount(w) for w in args.weights]
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    missing = [str(p) for p, _ in specs if not p.is_file()]
    if missing:
        print(f"no weights file at {', '.join(missing)}", file=sys.stderr)
        return 2
    torch.set_flush_denormal(True)
    results = run(
        args.eval_root.resolve(),
        args.quick,
        [str(w) for w in args.weights],
        set(args.proxy_cases) if args.proxy_cases else None,
        args.edge_step,
        CALIBRATED_SETS if args.calibrated else SETS,
    )
    if args.predict or args.calibrated:
        predict(results, offsets=CALIBRATION if args.calibrated else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
