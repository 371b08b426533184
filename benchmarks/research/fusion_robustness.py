"""Fusion quality under other intensities: the model against classical fusers when the sources are re-lit.

Research script of ``docs/research/pet-refinement.md`` and ``pet-mri-kept.md`` (not a product benchmark).

A DICOM series reaches the node under another window, gain or display curve than the atlas PNGs
the model was trained on. This benchmark takes the ``val`` rows of ``harvard/<type>`` (never a
benchmark row), applies each intensity condition of
:data:`dicomnode.fusion.training.refine.INTENSITY_CONDITIONS` (MRI or moving image at 70 % of its
level, or through gamma 1.5; requantised to 8 bits) and counts, per condition, the metrics (of
nine) on which each model beats every classical fuser (max, average, Laplacian pyramid, guided
filter). Models: the general (stage-1) network and, where the weights file has one, the
per-modality refinement, plus any extra weights files given with ``--weights``.

A second table per type gives, per condition, how much of the MRI's structure each model (and
pixel max) keeps where both sources have signal (``overlap_detail``, not one of the nine); with
``--changes`` a third gives each model's change over the stage-1 model on the nine metrics, and
with ``--qabf-regions`` a fourth splits each model's (and pixel max's) Qabf by where its terms
sit (``qabf_regions``: MRI only, moving image only, both with either brighter, neither); with
``--vif-regions`` a fifth splits VIF(MRI, F) and VIF(moving, F) the same way (``vif_regions``).
``--classical NAME`` scores other registered fusers (e.g. ``gradient-domain``) beside the models.

    .venv/bin/python benchmarks/research/fusion_robustness.py [--types MRI-CT MRI-PET] [--weights build/x.pt]
        [--conditions stored mri-x0.7] [--changes] [--qabf-regions] [--vif-regions]
        [--classical gradient-domain]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dicomnode.fusion.metrics import (
    METRIC_NAMES,
    SIGNAL_REGIONS,
    overlap_detail,
    qabf_regions,
    vif_regions,
)
from dicomnode.fusion.model import MODALITY_OF_TYPE, WEIGHTS_FILE, CNNFuser, build_net, load_checkpoint
from dicomnode.fusion.registry import available_fusers, get_fuser
from dicomnode.fusion.training.data import PAIR_TYPES
from dicomnode.fusion.training.refine import (
    DIAGNOSTIC_CONDITIONS,
    INTENSITY_CONDITIONS,
    VAL_REFERENCES,
    apply_condition,
    load_split,
    mean_metrics,
    reference_means,
    val_score,
)
from dicomnode.fusion.training.specialise import to_u8


def _vif_split(f: np.ndarray, a8: np.ndarray, b8: np.ndarray) -> dict[str, dict[str, float]]:
    """Mean over the pairs of :func:`vif_regions`: {source: {region: part}}."""
    return {
        src: {k: float(np.mean(v)) for k, v in per.items()} for src, per in vif_regions(f, a8, b8).items()
    }


class _Classical(torch.nn.Module):
    """A registered classical fuser called like a network: (N,1,H,W) pairs in, fused out."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.fuser = get_fuser(name)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.fuser.fuse(a[:, 0].numpy(), b[:, 0].numpy()))[:, None]


def models(
    pair_type: str, extra: list[Path], classical: list[str] | None = None
) -> dict[str, torch.nn.Module]:
    general = CNNFuser(weights=WEIGHTS_FILE)
    out: dict[str, torch.nn.Module] = {"general (stage 1)": general.net}
    spec = general.for_modality(MODALITY_OF_TYPE[pair_type])
    if spec is not general:
        out[f"shipped {spec.modality} refinement"] = spec.net
    for path in extra:
        ck = load_checkpoint(path)
        if ck.get("meta", {}).get("pair_type", pair_type) != pair_type:
            continue
        net = build_net(ck.get("config"))
        net.load_state_dict(ck["state_dict"])
        name = path.name if path.name not in out else f"{path.parent.name}/{path.name}"
        out[name if name not in out else str(path)] = net.eval()
    for name in classical or []:
        out[name] = _Classical(name)
    return out


def run(
    eval_root: Path,
    types: list[str],
    extra: list[Path],
    conditions: list[str] | None = None,
    changes: bool = False,
    regions: bool = False,
    vif_split: bool = False,
    classical: list[str] | None = None,
) -> dict[str, dict[str, dict[str, int]]]:
    """Print the tables per pair type; return {type: {model: {condition: firsts}}}."""
    results: dict[str, dict[str, dict[str, int]]] = {}
    conds = list(conditions or INTENSITY_CONDITIONS)
    for t in types:
        a, b, _ = load_split(eval_root, t, "val")
        nets = models(t, extra, classical)
        table: dict[str, dict[str, int]] = {name: {} for name in nets}
        detail: dict[str, dict[str, float]] = {name: {} for name in ["max", *nets]}
        change: dict[str, dict[str, dict[str, float]]] = {name: {} for name in nets}
        parts: dict[str, dict[str, dict[str, float]]] = {name: {} for name in ["max", *nets]}
        vparts: dict[str, dict[str, dict[str, dict[str, float]]]] = {name: {} for name in ["max", *nets]}
        for c in conds:
            ac, bc = apply_condition(a, b, c)
            a8, b8 = to_u8(ac), to_u8(bc)
            refs = reference_means(ac, bc, a8, b8)
            mx = to_u8(torch.maximum(ac, bc))
            detail["max"][c] = float(np.mean(overlap_detail(mx, a8, b8)))
            if regions:
                parts["max"][c] = {k: float(np.mean(v)) for k, v in qabf_regions(mx, a8, b8).items()}
            if vif_split:
                vparts["max"][c] = _vif_split(mx, a8, b8)
            means = {}
            for name, net in nets.items():
                with torch.inference_mode():
                    f = torch.cat(
                        [net(ac[i : i + 16], bc[i : i + 16]).clamp(0, 1) for i in range(0, len(ac), 16)]
                    )
                means[name] = mean_metrics(f, a8, b8)
                table[name][c] = val_score(means[name], refs)[0]
                detail[name][c] = float(np.mean(overlap_detail(to_u8(f), a8, b8)))
                if regions:
                    parts[name][c] = {k: float(np.mean(v)) for k, v in qabf_regions(to_u8(f), a8, b8).items()}
                if vif_split:
                    vparts[name][c] = _vif_split(to_u8(f), a8, b8)
            s1 = means["general (stage 1)"]
            for name in nets:
                change[name][c] = {k: 100 * (means[name][k] / s1[k] - 1) for k in METRIC_NAMES}
        results[t] = table
        print(
            f"\n{t} ({a.shape[0]} val pairs): metrics (of 9) on which the model beats every classical fuser"
        )
        width = max(len(n) for n in table) + 2
        print(" " * width + "".join(f"{c:>17}" for c in conds) + f"{'total':>8}")
        for name, row in table.items():
            print(f"{name:<{width}}" + "".join(f"{row[c]:>17d}" for c in conds) + f"{sum(row.values()):>8d}")
        print(f"\n{t}: MRI structure kept where both sources have signal (overlap_detail, not ranked)")
        for name, row in detail.items():
            print(f"{name:<{width}}" + "".join(f"{row[c]:>17.3f}" for c in conds))
        if changes:
            print(f"\n{t}: change over the stage-1 model, % ({', '.join(METRIC_NAMES)})")
            for name, per in change.items():
                for c in conds:
                    cells = " ".join(f"{per[c][k]:+6.1f}" for k in METRIC_NAMES)
                    print(f"{name:<{width}}{c:<17}{cells}")
        if regions:
            print(f"\n{t}: Qabf by region (A = MRI, B = moving image; parts add up to Qabf)")
            print(" " * (width + 17) + "".join(f"{r:>18}" for r in SIGNAL_REGIONS) + f"{'Qabf':>8}")
            for name, per_c in parts.items():
                for c, part in per_c.items():
                    cells = "".join(f"{part[r]:>18.4f}" for r in SIGNAL_REGIONS)
                    print(f"{name:<{width}}{c:<17}{cells}{sum(part.values()):>8.4f}")
        if vif_split:
            print(f"\n{t}: VIF by source and region (A = MRI, B = moving image; parts add up to VIF)")
            head = "".join(f"{r:>18}" for r in SIGNAL_REGIONS)
            print(" " * (width + 17) + f"{'src':>4}" + head + f"{'sum':>8}{'VIF':>8}")
            for name, per_c in vparts.items():
                for c, per_src in per_c.items():
                    total = sum(sum(v.values()) for v in per_src.values())
                    for src, part in per_src.items():
                        cells = "".join(f"{part[r]:>18.4f}" for r in SIGNAL_REGIONS)
                        tail = f"{total:>8.4f}" if src == "B" else ""
                        print(f"{name:<{width}}{c:<17}{src:>4}{cells}{sum(part.values()):>8.4f}{tail}")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "eval")
    ap.add_argument("--types", nargs="+", default=list(PAIR_TYPES), choices=list(PAIR_TYPES))
    ap.add_argument(
        "--weights", nargs="*", type=Path, default=[], help="more refined weights files to compare"
    )
    ap.add_argument(
        "--conditions",
        nargs="+",
        default=None,
        choices=[*INTENSITY_CONDITIONS, *DIAGNOSTIC_CONDITIONS],
        help="intensity conditions to score (default: all of INTENSITY_CONDITIONS)",
    )
    ap.add_argument("--changes", action="store_true", help="also print each model's change over stage 1")
    ap.add_argument(
        "--qabf-regions", action="store_true", help="also split Qabf by region (MRI only, both, ...)"
    )
    ap.add_argument(
        "--classical",
        nargs="*",
        default=[],
        choices=sorted(set(available_fusers()) - set(VAL_REFERENCES) - {"li2021-cnn"}),
        help="also score these classical fusers beside the models (as models, not as references)",
    )
    ap.add_argument(
        "--vif-regions", action="store_true", help="also split VIF by source and region (MRI only, both, ...)"
    )
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    run(
        args.eval_root.resolve(),
        args.types,
        args.weights,
        args.conditions,
        args.changes,
        args.qabf_regions,
        args.vif_regions,
        args.classical,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
