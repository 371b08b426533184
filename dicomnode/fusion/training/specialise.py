"""Per-modality specialisation of the fuser: per-pair-type targets, fine-tuning, a val-picked max blend.

The general model is trained on every pair type with one target rule. A CT pair and a PET pair do
not want the same thing (CT: fine bone detail and edge fidelity, SF/AG/Qabf; PET: edge and
information fidelity, Qabf/VIF), so for each type: re-select that type's targets with a preferred
metric set (scores already in the database), fine-tune the general model on that type's ``train``
rows (checkpoint picked on its ``val`` loss), then pick a blend with pixel max on its ``val`` rows.
Nothing here reads a benchmark row.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dicomnode.fusion.metrics import METRIC_NAMES, evaluate
from dicomnode.fusion.model import MODALITY_OF_TYPE, build_net, load_checkpoint, mix_with_max
from dicomnode.fusion.training.build_db import select_best
from dicomnode.fusion.training.candidates import candidate_set
from dicomnode.fusion.training.fit import load_db

log = logging.getLogger(__name__)

# per pair type: metrics a target must first beat pixel max on (then the general rule)
PREFER_BY_TYPE: dict[str, tuple[str, ...]] = {
    "MRI-CT": ("SF", "AG", "Qabf"),
    "MRI-PET": ("Qabf", "VIF"),
    "MRI-SPECT": (),
}
ALPHAS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def retarget(db_dir: Path, out_dir: Path, pair_type: str, prefer: tuple[str, ...]) -> dict[str, Any]:
    """Write a one-type database to ``out_dir`` whose targets follow ``prefer`` (see :func:`select_best`)."""
    db_dir, out_dir = Path(db_dir), Path(out_dir)
    manifest = json.loads((db_dir / "manifest.json").read_text())
    scores: dict[str, dict[str, dict[str, float]]] = {}
    with (db_dir / "scores.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            if r["pair_type"] == pair_type:
                scores.setdefault(r["name"], {})[r["candidate"]] = {m: float(r[m]) for m in METRIC_NAMES}
    cands = candidate_set()
    entries = []
    src = db_dir / "pairs" / pair_type
    (out_dir / "pairs" / pair_type).mkdir(parents=True, exist_ok=True)
    (out_dir / "targets" / pair_type).mkdir(parents=True, exist_ok=True)
    a_all, b_all, t_all, e_all = [], [], [], []
    for split in ("train", "val"):
        try:
            a, b, _, es = load_db(db_dir, split)
        except ValueError:
            continue
        keep = [i for i, e in enumerate(es) if e["pair_type"] == pair_type]
        for i in keep:
            e = dict(es[i])
            e["target"] = select_best(scores[e["name"]], prefer=prefer)
            a_all.append(a[i : i + 1])
            b_all.append(b[i : i + 1])
            e_all.append(e)
    with torch.inference_mode():
        for a, b, e in zip(a_all, b_all, e_all, strict=True):
            t = cands[e["target"]](a, b).clamp(0.0, 1.0)[0, 0].numpy()
            t8 = np.clip(np.rint(t * 255.0), 0, 255).astype(np.uint8)
            Image.fromarray(t8).save(out_dir / "targets" / pair_type / f"{e['name']}.png")
            for side in ("a", "b"):
                name = f"{e['name']}_{side}.png"
                shutil.copyfile(src / name, out_dir / "pairs" / pair_type / name)
            t_all.append(t8)
            entries.append(e)
    picked: dict[str, int] = {}
    for e in entries:
        picked[e["target"]] = picked.get(e["target"], 0) + 1
    out = dict(manifest)
    out.update(
        pair_types=[pair_type],
        pairs=entries,
        rule=f"prefer {list(prefer)}; then " + manifest.get("rule", ""),
        excluded=[x for x in manifest.get("excluded", []) if x["pair_type"] == pair_type],
    )
    (out_dir / "manifest.json").write_text(json.dumps(out, indent=1))
    log.info("%s: %d pairs, targets %s", pair_type, len(entries), picked)
    return out


def to_u8(x: torch.Tensor) -> np.ndarray:
    """(N,1,H,W) tensor in [0,1] -> (N,H,W) uint8, rounded and clipped as the fused image is stored."""
    return np.clip(np.rint(x[:, 0].detach().cpu().numpy() * 255.0), 0, 255).astype(np.uint8)


def pick_alpha(weights: Path, db_dir: Path, alphas: tuple[float, ...] = ALPHAS) -> tuple[float, dict]:
    """On ``val`` rows: the blend with max first (vs max, average, Laplacian pyramid) on most metrics.

    Ties go to the larger alpha (closer to the trained model).
    """
    from dicomnode.fusion.registry import get_fuser  # noqa: PLC0415

    a, b, _, _ = load_db(db_dir, "val")
    a8 = to_u8(a)
    b8 = to_u8(b)
    ref = {}
    for m in ("max", "average", "laplacian-pyramid"):
        f = get_fuser(m).fuse(a[:, 0].numpy(), b[:, 0].numpy())
        f8 = np.clip(np.rint(f * 255), 0, 255).astype(np.uint8)
        ref[m] = {k: float(v.mean()) for k, v in evaluate(f8, a8, b8).items()}
    ck = load_checkpoint(weights)
    best: tuple[int, float, dict] = (-1, 1.0, {})
    report = {}
    for al in alphas:
        net = build_net(ck.get("config"))
        net.load_state_dict(ck["state_dict"])
        mix_with_max(net.eval(), al)
        with torch.inference_mode():
            f8 = to_u8(net(a, b).clamp(0, 1))
        ours = {k: float(v.mean()) for k, v in evaluate(f8, a8, b8).items()}
        firsts = sum(all(ours[m] > r[m] for r in ref.values()) for m in METRIC_NAMES)
        report[al] = {"firsts": firsts, **ours}
        log.info("alpha %.2f: first on %d/9 on val %s", al, firsts, {k: round(v, 3) for k, v in ours.items()})
        if firsts > best[0]:
            best = (firsts, al, ours)
    return best[1], {"val_by_alpha": report, "val_reference": ref}


def pack(
    base: Path, specialised: dict[str, tuple[Path, float, dict]], out: Path, keep: bool = False
) -> list[str]:
    """Write ``out``: the general model plus ``per_modality`` entries (max blend baked into the head).

    ``keep``: the ``per_modality`` entries of ``base`` that ``specialised`` does not name stay
    (adding a PT entry to a file that holds a CT entry); otherwise only ``specialised`` is written.
    Returns the modalities with an entry in ``out``.
    """
    ck = load_checkpoint(base)
    per: dict[str, Any] = dict(ck.get("per_modality") or {}) if keep else {}
    hashes = set(ck["meta"].get("train_hashes", []))
    for modality, (path, alpha, info) in specialised.items():
        sk = load_checkpoint(path)
        net = build_net(sk.get("config"))
        net.load_state_dict(sk["state_dict"])
        mix_with_max(net, alpha)
        meta = {k: v for k, v in sk["meta"].items() if k != "train_hashes"}
        firsts = info.get("val_by_alpha", {}).get(alpha, {}).get("firsts")
        meta["alpha_max_blend"] = alpha
        if firsts is not None:
            meta["val_firsts"] = firsts
        hashes |= set(sk["meta"].get("train_hashes", []))
        per[modality] = {"state_dict": net.state_dict(), "config": sk.get("config"), "meta": meta}
    ck["per_modality"] = per
    ck["meta"]["train_hashes"] = sorted(hashes)
    torch.save(ck, out)
    return sorted(per)


__all__ = ["MODALITY_OF_TYPE", "PREFER_BY_TYPE", "pack", "pick_alpha", "retarget"]
