"""Training database, fit and CLI glue on a tiny synthetic eval tree; the benchmark-leak guards."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dicomnode.fusion import model as M
from dicomnode.fusion.png import read_gray_or_rgb
from dicomnode.fusion.training import build_db as B
from dicomnode.fusion.training.cli import add_train_parser
from dicomnode.fusion.training.data import PAIR_TYPES, load_pairs, pixel_hash
from dicomnode.fusion.training.fit import fit

SHARED_EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "eval"


def _blob(seed: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.float64)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(3):
        cy, cx, r = rng.integers(6, size - 6, 2).tolist() + [int(rng.integers(3, 8))]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += rng.integers(60, 160)
    return np.clip(img, 0, 255).astype(np.uint8)


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _make_eval(root: Path, leak: bool = False) -> Path:
    """harvard/MRI-PET with 3 train, 2 val, 1 benchmark rows (RGB b), and its benchmark twin."""
    folder = root / "harvard" / "MRI-PET"
    rows = []
    splits = ["train", "train", "train", "val", "val", "benchmark"]
    case_of_row = ["7", "7", "8", "7", "8", "9"]  # atlas case (aanlib_id = case + 3-digit slice)
    for k, split in enumerate(splits, start=1):
        name = f"{k:04d}"
        a = _blob(10 * k)
        g = _blob(10 * k + 1)
        rgb = np.stack([g, (g * 0.6).astype(np.uint8), (g * 0.2).astype(np.uint8)], axis=-1)
        _save(folder / f"{name}_a.png", a)
        _save(folder / f"{name}_b.png", rgb)
        rows.append({"name": name, "split": split, "aanlib_id": f"{case_of_row[k - 1]}{k:03d}"})
    bench = root / "harvard-cddfuse" / "MRI-PET"
    _save(bench / "0001_a.png", read_gray_or_rgb(folder / "0006_a.png"))
    _save(bench / "0001_b.png", read_gray_or_rgb(folder / "0006_b.png"))
    if leak:  # a benchmark slice hiding under a train row's name
        _save(folder / "0002_a.png", read_gray_or_rgb(bench / "0001_a.png"))
    with (folder / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["name", "split", "aanlib_id"])
        w.writeheader()
        w.writerows(rows)
    return root


def test_select_best_rule() -> None:
    scores = {
        "x": {m: 1.0 for m in B.METRIC_NAMES},
        "y": {m: 0.0 for m in B.METRIC_NAMES},
        "z": {**{m: 0.0 for m in B.METRIC_NAMES}, "MI": 5.0},
    }
    assert B.select_best(scores) == "x"
    scores["y"]["SD"] = 2.0
    scores["y"]["SF"] = 2.0
    assert B.select_best(scores) == "x"  # 7 wins beat 2
    tie = {"p": {m: 1.0 for m in B.METRIC_NAMES}, "q": {m: 1.0 for m in B.METRIC_NAMES}}
    assert B.select_best(tie) == "p"


def test_select_best_prefers_beating_pixel_max() -> None:
    base = {m: 1.0 for m in B.METRIC_NAMES}
    scores = {
        "max": dict(base),
        "huge_on_two": {**base, "SD": 9.0, "SF": 9.0},  # larger normalised sum, beats max twice
        "better_on_five": {**base, **{m: 1.1 for m in ("EN", "AG", "SCD", "VIF", "Qabf")}},
        "worse": {m: 0.5 for m in B.METRIC_NAMES},
    }
    assert B.select_best(scores) == "better_on_five"
    assert B.select_best({"max": dict(base), "worse": {m: 0.5 for m in B.METRIC_NAMES}}) == "max"


def test_build_db_deterministic_and_complete(tmp_path: Path) -> None:
    root = _make_eval(tmp_path / "eval")
    m1 = B.build_db(root, tmp_path / "db1", ("MRI-PET",), progress=False)
    m2 = B.build_db(root, tmp_path / "db2", ("MRI-PET",), progress=False)
    assert [e["split"] for e in m1["pairs"]] == ["train", "train", "train", "val", "val"]
    assert json.dumps(m1["pairs"]) == json.dumps(m2["pairs"])
    for e in m1["pairs"]:
        t1 = np.asarray(Image.open(tmp_path / "db1" / "targets" / "MRI-PET" / f"{e['name']}.png"))
        t2 = np.asarray(Image.open(tmp_path / "db2" / "targets" / "MRI-PET" / f"{e['name']}.png"))
        np.testing.assert_array_equal(t1, t2)
        assert pixel_hash(t1) == e["hash_target"]
        assert e["target"] in m1["candidates"]
    with (tmp_path / "db1" / "scores.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5 * len(m1["candidates"])
    assert sum(int(r["selected"]) for r in rows) == 5


def test_build_db_leaves_out_benchmark_pixels(tmp_path: Path) -> None:
    root = _make_eval(tmp_path / "eval", leak=True)
    m = B.build_db(root, tmp_path / "db", ("MRI-PET",), progress=False)
    assert "0002" not in [e["name"] for e in m["pairs"]]
    assert [e["name"] for e in m["excluded"]] == ["0002"]
    assert not (tmp_path / "db" / "pairs" / "MRI-PET" / "0002_a.png").exists()
    with pytest.raises(B.LeakError):
        B.build_db(root, tmp_path / "db", ("MRI-PET",), splits=("train", "benchmark"), progress=False)


def test_fit_is_seed_deterministic_and_loadable(tmp_path: Path) -> None:
    root = _make_eval(tmp_path / "eval")
    B.build_db(root, tmp_path / "db", ("MRI-PET",), progress=False)
    kw = dict(steps=4, batch_size=2, crop=24, val_every=2, width=8, progress=False, device="cpu")
    m1 = fit(tmp_path / "db", tmp_path / "w1.pt", seed=3, **kw)
    fit(tmp_path / "db", tmp_path / "w2.pt", seed=3, **kw)
    s1 = torch.load(tmp_path / "w1.pt", weights_only=True)["state_dict"]
    s2 = torch.load(tmp_path / "w2.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert m1["n_train"] == 3 and m1["n_val"] == 2 and m1["train_hashes"]
    f = M.CNNFuser(weights=tmp_path / "w1.pt")
    out = f.fuse(np.zeros((1, 32, 32), np.float32), np.ones((1, 32, 32), np.float32) * 0.5)
    assert out.shape == (1, 32, 32)


def test_train_parser_builds_the_train_commands(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="dicomnode")
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "build-db", "--limit", "2", "--out", str(tmp_path / "db")])
    assert args.train_command == "build-db" and args.limit == 2 and callable(args.func)
    args = parser.parse_args(["train", "fit", "--steps", "7", "--device", "cpu"])
    assert args.steps == 7 and args.device == "cpu"


def _benchmark_hashes_or_skip() -> set[str]:
    if not (SHARED_EVAL / "harvard-cddfuse").is_dir():
        pytest.skip("benchmark data (../shared/eval) not present")
    return B.benchmark_hashes(SHARED_EVAL)


def test_shipped_weights_never_saw_a_benchmark_slice() -> None:
    """Fails if any image the shipped model was trained or validated on is a benchmark slice."""
    if not M.weights_available():
        pytest.skip("no weights shipped")
    meta = torch.load(M.WEIGHTS_FILE, weights_only=True)["meta"]
    seen = set(meta["train_hashes"])
    assert len(seen) > 100
    leaked = seen & _benchmark_hashes_or_skip()
    assert not leaked, f"{len(leaked)} benchmark slice(s) are in the training data of the shipped model"


def test_built_database_holds_no_benchmark_slice(tmp_path: Path) -> None:
    """Fails if a built database holds benchmark pixels, by re-hashing its files.

    The database is build/fusion-db where one was built here; otherwise (CI) one is built from the
    real shared data: the MRI-SPECT ``val`` rows, two of which are benchmark slices under another
    name and must be left out.
    """
    forbidden = _benchmark_hashes_or_skip()
    db = Path(__file__).resolve().parents[1] / "build" / "fusion-db"
    if not (db / "manifest.json").is_file():
        db = tmp_path / "db"
        B.build_db(SHARED_EVAL, db, pair_types=("MRI-SPECT",), train_every=10**6, progress=False)
        excluded = json.loads((db / "manifest.json").read_text())["excluded"]
        assert excluded and all("benchmark slice" in e["reason"] for e in excluded)
    manifest = json.loads((db / "manifest.json").read_text())
    for e in manifest["pairs"]:
        assert e["split"] in ("train", "val")
        for side in ("a", "b"):
            h = pixel_hash(read_gray_or_rgb(db / "pairs" / e["pair_type"] / f"{e['name']}_{side}.png"))
            assert h not in forbidden, f"{e['pair_type']}/{e['name']}_{side} is a benchmark slice"
        assert e["hash_a"] not in forbidden and e["hash_b"] not in forbidden


def test_harvard_benchmark_rows_are_excluded_by_split() -> None:
    if not (SHARED_EVAL / "harvard").is_dir():
        pytest.skip("../shared/eval not present")
    for t in PAIR_TYPES:
        ps = load_pairs(SHARED_EVAL / "harvard" / t, t, ("train", "val"))
        assert "benchmark" not in ps.splits


def test_select_best_prefer_ranks_first() -> None:
    """A per-type rule: the candidate beating max on the preferred metric wins over more overall wins."""
    base = {m: 1.0 for m in B.METRIC_NAMES}
    scores = {
        "max": dict(base),
        "many": {**base, **{m: 1.1 for m in ("EN", "SD", "SF", "AG")}},
        "qabf": {**base, "Qabf": 1.1},
    }
    assert B.select_best(scores) == "many"
    assert B.select_best(scores, prefer=("Qabf",)) == "qabf"
