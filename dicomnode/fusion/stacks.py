"""Split a series' image headers into stacks (one geometry, one image per position); drop localizers.

A stack is a set of parallel slices of one size and pixel spacing with no two at the same position.
Images marked LOCALIZER/SCOUT in Image Type, and small groups (fewer than ``MIN_STACK`` images) whose
orientation differs from the series' main stack, are localizers and never enter a volume.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from dicomnode.fusion.decode import VolumeError

MIN_STACK = 3
LOCALIZER_TYPES = {"LOCALIZER", "SCOUT", "SURVEY", "SCANOGRAM", "TOPOGRAM"}
# Tags that tell stacks sharing positions apart, in the order they are tried.
SPLIT_KEYS = (
    "StackID",
    "EchoNumbers",
    "TemporalPositionIndex",
    "TemporalPositionIdentifier",
    "AcquisitionNumber",
    "DiffusionBValue",
    "TriggerTime",
    "ImageType",
    "SeriesNumber",
)


def _floats(ds: Dataset, keyword: str, n: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise VolumeError(f"an image has no {keyword}")
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{keyword} is not numeric") from exc
    if arr.shape != (n,):
        raise VolumeError(f"{keyword} must have {n} values")
    return arr


def geometry_key(ds: Dataset) -> tuple:
    """Orientation, pixel spacing and matrix of one image (compare with ``same_geometry``)."""
    return (
        _floats(ds, "ImageOrientationPatient", 6),
        _floats(ds, "PixelSpacing", 2),
        int(ds.get("Rows", 0) or 0),
        int(ds.get("Columns", 0) or 0),
    )


def same_geometry(a: tuple, b: tuple) -> bool:
    """Same orientation (within 1e-3), pixel spacing (within 1e-4 relative) and matrix."""
    return (
        a[2:] == b[2:]
        and float(np.abs(a[0] - b[0]).max()) < 1e-3
        and float(np.abs(a[1] - b[1]).max()) < 1e-4 * float(np.abs(b[1]).max())
    )


def _has_duplicates(group: Sequence[Dataset]) -> bool:
    """True when two images of one geometry sit at the same position (within 0.01 mm)."""
    if len(group) < 2:
        return False
    pos = np.array([_floats(ds, "ImagePositionPatient", 3) for ds in group])
    iop = _floats(group[0], "ImageOrientationPatient", 6)
    order = np.argsort(pos @ np.cross(iop[:3], iop[3:]), kind="stable")
    gaps = np.linalg.norm(np.diff(pos[order], axis=0), axis=1)
    return bool(np.any(gaps < 0.01))


def is_localizer(ds: Dataset) -> bool:
    """Image Type names it a localizer/scout."""
    image_type = ds.get("ImageType") or []
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    return any(str(v).upper() in LOCALIZER_TYPES for v in image_type)


def _value_key(ds: Dataset, keyword: str) -> object:
    value = ds.get(keyword)
    if value is None:
        return None
    if isinstance(value, list | tuple) or hasattr(value, "append"):
        return tuple(str(v) for v in value)
    return str(value)


def _split_duplicates(group: list[Dataset]) -> list[list[Dataset]]:
    """Split one geometry group whose positions repeat by the first tag that separates them."""
    if not _has_duplicates(group):
        return [group]
    for keyword in SPLIT_KEYS:
        parts: dict[object, list[Dataset]] = defaultdict(list)
        for ds in group:
            parts[_value_key(ds, keyword)].append(ds)
        if len(parts) < 2:
            continue
        if not any(_has_duplicates(p) for p in parts.values()):
            return list(parts.values())
    raise VolumeError(
        f"images of one orientation share positions ({len(group)} images) and no tag"
        f" ({', '.join(SPLIT_KEYS)}) tells the stacks apart"
    )


def split_stacks(datasets: Sequence[Dataset]) -> list[list[Dataset]]:
    """The series' stacks, largest first (ties: the one with the earliest Instance Number first)."""
    groups: list[tuple[tuple, list[Dataset]]] = []
    for ds in datasets:
        key = geometry_key(ds)
        for gkey, members in groups:
            if same_geometry(key, gkey):
                members.append(ds)
                break
        else:
            groups.append((key, [ds]))
    stacks = [s for _, g in groups for s in _split_duplicates(g)]

    def first_instance(stack: list[Dataset]) -> int:
        return min(int(ds.get("InstanceNumber", 0) or 0) for ds in stack)

    return sorted(stacks, key=lambda s: (-len(s), first_instance(s)))


def select_stack(datasets: Sequence[Dataset]) -> tuple[list[Dataset], list[str]]:
    """The stack a volume is built from, and notes saying what was left out and why."""
    notes: list[str] = []
    localizers = [ds for ds in datasets if is_localizer(ds)]
    images = [ds for ds in datasets if not is_localizer(ds)]
    if localizers:
        notes.append(f"{len(localizers)} localizer/scout image(s) excluded (Image Type)")
    if not images:
        raise VolumeError("series holds only localizer/scout images")
    stacks = split_stacks(images)
    chosen = stacks[0]
    others = stacks[1:]
    if not others:
        return chosen, notes
    if len(chosen) < MIN_STACK:
        raise VolumeError(
            f"series holds {len(stacks)} groups of images with different geometry and none has"
            f" {MIN_STACK} or more slices"
        )
    small = [s for s in others if len(s) < MIN_STACK]
    big = [s for s in others if len(s) >= MIN_STACK]
    if small:
        n_small = sum(len(s) for s in small)
        notes.append(f"{n_small} image(s) with another geometry than the main stack excluded as localizers")
    if big:
        sizes = ", ".join(str(len(s)) for s in big)
        why = "the largest" if len(big[0]) < len(chosen) else "the first by Instance Number (equal sizes)"
        notes.append(
            f"series holds {len(big) + 1} stacks ({len(chosen)}, {sizes} slices); using {why}"
            f" ({len(chosen)} slices)"
        )
    return chosen, notes
