"""`train build-db`: the supervised training database of "successful fusion results".

For every ``train``/``val`` pair of ``<eval>/harvard/<type>/manifest.csv`` run every candidate
fuser, score each result with the nine metrics, and keep the best one as the pair's target.

Selection rule (documented in the model card, MODEL.md): within one pair, the candidate that beats
pixel max on the most of the nine metrics wins -- a "successful" result must improve on the trivial
baseline; ties go to the largest sum of per-metric min-max normalised values (best = 1, worst = 0, equal
weights), then to the earlier candidate of :func:`candidate_set`.

Output folder: ``pairs/<type>/<name>_a.png`` (MRI), ``_b.png`` (CT or luma), ``targets/<type>/<name>.png``,
``scores.csv`` (every candidate's nine metrics, ``selected`` flag) and ``manifest.json`` (splits,
candidate set, rule, pixel hashes of every source image). Deterministic: no randomness anywhere.

Leak guard: a pair whose MRI or CT/PET/SPECT image has the pixels (content hash) of any benchmark
image -- ``harvard-cddfuse/*/*`` or a ``benchmark`` row of ``harvard/`` of any pair type -- is left
out and listed under ``excluded`` in the manifest (the shared ``harvard/`` reuses some benchmark
slices in train/val rows, e.g. MRI-SPECT SPECT images and MRI slices shared with MRI-CT).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dicomnode.fusion.metrics import METRIC_NAMES, evaluate
from dicomnode.fusion.png import read_gray_or_rgb
from dicomnode.fusion.training.candidates import candidate_set
from dicomnode.fusion.training.data import PAIR_TYPES, load_pairs, pixel_hash

log = logging.getLogger(__name__)

DB_VERSION = 1
SCORE_FIELDS = ["pair_type", "name", "split", "candidate", *METRIC_NAMES, "selected"]
SELECTION_RULE = (
    "most of the 9 metrics better than pixel max on the pair; ties: largest sum of per-pair min-max "
    "normalised metrics; then candidate order"
)


class LeakError(RuntimeError):
    """A benchmark slice would enter the training database."""


def benchmark_hashes(eval_root: Path) -> set[str]:
    """Pixel hashes of every benchmark image: harvard-cddfuse/*/* and harvard rows with split=benchmark."""
    eval_root = Path(eval_root)
    hashes: set[str] = set()
    bench = eval_root / "harvard-cddfuse"
    if bench.is_dir():
        for p in sorted(bench.glob("*/*.png")):
            hashes.add(pixel_hash(read_gray_or_rgb(p)))
    for t in PAIR_TYPES:
        folder = eval_root / "harvard" / t
        if not (folder / "manifest.csv").is_file():
            continue
        ps = load_pairs(folder, t, ("benchmark",))
        for n in ps.names:
            for side in ("a", "b"):
                hashes.add(pixel_hash(read_gray_or_rgb(folder / f"{n}_{side}.png")))
    return hashes


def select_best(
    scores: dict[str, dict[str, float]], baseline: str = "max", prefer: tuple[str, ...] = ()
) -> str:
    """Apply the selection rule to ``{candidate: {metric: value}}`` of one pair.

    A successful fusion result must improve on the trivial baseline (pixel max): the winner beats
    ``baseline`` on the most of the nine metrics; ties go to the largest sum of per-metric min-max
    normalised values, then to the earlier candidate. Without the baseline only the sum counts.
    ``prefer`` (a per-pair-type rule) ranks first by how many of those metrics beat the baseline.
    """
    names = list(scores)
    mat = np.array([[scores[c][m] for m in METRIC_NAMES] for c in names], dtype=np.float64)
    lo, hi = mat.min(0), mat.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    total = ((mat - lo) / span).sum(1)
    if baseline in scores:
        ref = np.array([scores[baseline][m] for m in METRIC_NAMES])
        beats = mat > ref[None]
        wins = beats.sum(1)
        pref = beats[:, [METRIC_NAMES.index(m) for m in prefer]].sum(1)
    else:
        wins = np.zeros(len(names), dtype=np.int64)
        pref = wins
    order = sorted(range(len(names)), key=lambda k: (-pref[k], -wins[k], -total[k], k))
    return names[order[0]]


def _save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path, optimize=False, compress_level=6)


def build_db(
    eval_root: Path,
    out_dir: Path,
    pair_types: tuple[str, ...] = PAIR_TYPES,
    splits: tuple[str, ...] = ("train", "val"),
    limit: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    chunk: int = 16,
    train_every: int = 1,
) -> dict:
    """Build the database; returns the manifest dict (also written to ``out_dir/manifest.json``).

    Each pair type is written as a part (``parts/<type>.json``/``.csv``); the manifest and
    ``scores.csv`` are assembled from every part in ``out_dir``, so types can be built by separate
    runs. ``train_every=k`` keeps every k-th ``train`` row (all ``val`` rows), deterministically.
    """
    eval_root, out_dir = Path(eval_root), Path(out_dir)
    if "benchmark" in splits:
        raise LeakError("the benchmark split can never be part of the training database")
    forbidden = benchmark_hashes(eval_root)
    cands = candidate_set()
    dev = torch.device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    for t in pair_types:
        entries: list[dict] = []
        rows: list[dict] = []
        folder = eval_root / "harvard" / t
        ps = load_pairs(folder, t, splits)
        keep, n_train = [], 0
        for i, s in enumerate(ps.splits):
            if s == "train":
                n_train += 1
                if (n_train - 1) % max(1, train_every):
                    continue
            keep.append(i)
        if limit is not None:
            keep = keep[:limit]
        bar = tqdm(total=len(keep), desc=f"build-db {t}", disable=not progress, unit="pair")
        excluded: list[dict] = []
        for i0 in range(0, len(keep), chunk):
            idx, hashes = [], []
            for i in keep[i0 : i0 + chunk]:
                h_a = pixel_hash(read_gray_or_rgb(folder / f"{ps.names[i]}_a.png"))
                h_b = pixel_hash(read_gray_or_rgb(folder / f"{ps.names[i]}_b.png"))
                if h_a in forbidden or h_b in forbidden:
                    # the same slice is a benchmark image (here or in another pair type): never train on it
                    side = "a" if h_a in forbidden else "b"
                    log.warning(
                        "%s/%s (%s): %s image is a benchmark slice; excluded",
                        t,
                        ps.names[i],
                        ps.splits[i],
                        side,
                    )
                    excluded.append(
                        {
                            "pair_type": t,
                            "name": ps.names[i],
                            "split": ps.splits[i],
                            "reason": f"{side} image has the pixels of a benchmark slice",
                        }
                    )
                    bar.update(1)
                    continue
                idx.append(i)
                hashes.append((h_a, h_b))
            if not idx:
                continue
            a8, b8 = ps.a[idx], ps.b[idx]
            ta = torch.as_tensor(a8, dtype=torch.float32, device=dev)[:, None] / 255.0
            tb = torch.as_tensor(b8, dtype=torch.float32, device=dev)[:, None] / 255.0
            outs = {}
            with torch.inference_mode():
                for cname, fn in cands.items():
                    f = fn(ta, tb).clamp(0.0, 1.0)[:, 0].cpu().numpy()
                    outs[cname] = np.clip(np.rint(f * 255.0), 0, 255).astype(np.uint8)
            k = len(outs)
            stack = np.concatenate(list(outs.values()))  # candidate-major: (k * len(idx), H, W)
            res = evaluate(stack, np.concatenate([a8] * k), np.concatenate([b8] * k))
            for j, i in enumerate(idx):
                name = ps.names[i]
                scores = {
                    c: {m: float(res[m][ci * len(idx) + j]) for m in METRIC_NAMES}
                    for ci, c in enumerate(outs)
                }
                best = select_best(scores)
                _save_png(out_dir / "pairs" / t / f"{name}_a.png", a8[j])
                _save_png(out_dir / "pairs" / t / f"{name}_b.png", b8[j])
                _save_png(out_dir / "targets" / t / f"{name}.png", outs[best][j])
                for c in outs:
                    vals = {m: f"{scores[c][m]:.6f}" for m in METRIC_NAMES}
                    rows.append(
                        {
                            "pair_type": t,
                            "name": name,
                            "split": ps.splits[i],
                            "candidate": c,
                            **vals,
                            "selected": int(c == best),
                        }
                    )
                entries.append(
                    {
                        "pair_type": t,
                        "name": name,
                        "split": ps.splits[i],
                        "target": best,
                        "hash_a": hashes[j][0],
                        "hash_b": hashes[j][1],
                        "hash_pair_a": pixel_hash(a8[j]),
                        "hash_pair_b": pixel_hash(b8[j]),
                        "hash_target": pixel_hash(outs[best][j]),
                    }
                )
            bar.update(len(idx))
        bar.close()
        parts = out_dir / "parts"
        parts.mkdir(exist_ok=True)
        (parts / f"{t}.json").write_text(json.dumps({"pairs": entries, "excluded": excluded}, indent=1))
        with (parts / f"{t}.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=SCORE_FIELDS)
            w.writeheader()
            w.writerows(rows)
    return _assemble(out_dir, eval_root, splits, list(cands), train_every)


def _assemble(
    out_dir: Path, eval_root: Path, splits: tuple[str, ...], candidates: list[str], train_every: int
) -> dict:
    """Merge every part in ``out_dir/parts`` into ``manifest.json`` and ``scores.csv``."""
    entries: list[dict] = []
    excluded: list[dict] = []
    types = []
    with (out_dir / "scores.csv").open("w", newline="") as out:
        w = csv.DictWriter(out, fieldnames=SCORE_FIELDS)
        w.writeheader()
        for t in PAIR_TYPES:
            part = out_dir / "parts" / f"{t}.json"
            if not part.is_file():
                continue
            types.append(t)
            part_data = json.loads(part.read_text())
            entries.extend(part_data["pairs"])
            excluded.extend(part_data["excluded"])
            with (out_dir / "parts" / f"{t}.csv").open(newline="") as fh:
                w.writerows(csv.DictReader(fh))
    manifest = {
        "version": DB_VERSION,
        "source": str(eval_root / "harvard"),
        "splits": list(splits),
        "pair_types": types,
        "candidates": candidates,
        "train_every": train_every,
        "rule": SELECTION_RULE,
        "metrics": list(METRIC_NAMES),
        "pairs": entries,
        "excluded": excluded,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    picked: dict[str, int] = {}
    for e in entries:
        picked[e["target"]] = picked.get(e["target"], 0) + 1
    log.info("training database: %d pairs in %s; targets by candidate: %s", len(entries), out_dir, picked)
    return manifest
