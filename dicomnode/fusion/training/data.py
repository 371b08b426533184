"""Reading the Harvard PNG pairs: manifests, splits, luma, and content hashes for leak checks."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicomnode.fusion.png import read_gray_or_rgb

PAIR_TYPES: tuple[str, ...] = ("MRI-CT", "MRI-PET", "MRI-SPECT")


@dataclass
class PairSet:
    """Co-registered pairs of one type: MRI ``a`` (N,H,W) uint8, luma ``b`` (N,H,W) uint8, names."""

    pair_type: str
    names: list[str]
    splits: list[str]
    a: np.ndarray
    b: np.ndarray
    b_rgb: np.ndarray | None  # (N,H,W,3) when the source is pseudo-colour


def luma_u8(rgb: np.ndarray) -> np.ndarray:
    """Y = 0.299R + 0.587G + 0.114B rounded to 8 bits (what the benchmark's evaluator reads)."""
    x = np.asarray(rgb, dtype=np.float64)
    y = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def pixel_hash(img: np.ndarray) -> str:
    """Content hash of an image's pixels (shape + bytes), independent of file name and format."""
    arr = np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    h = hashlib.sha256(str(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def read_manifest(folder: Path) -> list[dict[str, str]]:
    """Rows of ``manifest.csv`` in a pair folder."""
    path = folder / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest.csv in {folder}")
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def load_pairs(folder: Path, pair_type: str, splits: tuple[str, ...] | None = None) -> PairSet:
    """Load ``NNNN_a.png``/``NNNN_b.png`` of a pair folder, keeping rows whose ``split`` is in ``splits``.

    ``splits=None`` loads every pair listed in the manifest (or every pair file when there is none).
    """
    folder = Path(folder)
    if (folder / "manifest.csv").is_file():
        rows = read_manifest(folder)
        if splits is not None:
            rows = [r for r in rows if r.get("split") in splits]
        names = [r["name"] for r in rows]
        split_of = [r.get("split", "") for r in rows]
    else:
        names = sorted(p.name[:-6] for p in folder.glob("*_a.png"))
        split_of = [""] * len(names)
    a_list, b_list, rgb_list = [], [], []
    for n in names:
        a = read_gray_or_rgb(folder / f"{n}_a.png")
        b = read_gray_or_rgb(folder / f"{n}_b.png")
        a_list.append(a if a.ndim == 2 else luma_u8(a))
        if b.ndim == 3:
            rgb_list.append(b)
            b_list.append(luma_u8(b))
        else:
            b_list.append(b)
    if not names:
        empty = np.zeros((0, 0, 0), np.uint8)
        return PairSet(pair_type, [], [], empty, empty, None)
    b_rgb = np.stack(rgb_list) if len(rgb_list) == len(names) else None
    return PairSet(pair_type, names, split_of, np.stack(a_list), np.stack(b_list), b_rgb)
