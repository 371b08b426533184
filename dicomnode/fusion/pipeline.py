"""Fuse one (reference, moving) volume pair: resample onto the reference grid, window, fuse in batches.

Pure computation shared by the node's fuse stage and ``dicomnode fuse``: volumes in, uint8 slices
(MONOCHROME2 for MR+CT, RGB for MR+PET / MR+SPECT) and a details dict out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dicomnode.fusion.base import Fuser
from dicomnode.fusion.resample import resample_to, resolve_device
from dicomnode.fusion.volume import Volume

FUNCTIONAL_MODALITIES = {"PT", "NM"}
# CT window for fusion (HU): the brain window (W 80, L 40) of the Harvard atlas CT slices the
# model was trained on: brain mid-gray, CSF dark, bone saturated white.
CT_WINDOW = (0.0, 80.0)
AIR_HU = -1000.0
MR_BRAIN_LEVEL = 0.6  # MR window: the head's 75th percentile (mostly brain) maps to this gray level


class FusionError(ValueError):
    """The pair cannot be fused; the message says why (it becomes the job's failure reason)."""


@dataclass
class FusionResult:
    pixels: np.ndarray  # uint8 (N,H,W) or (N,H,W,3)
    photometric: str  # MONOCHROME2 | RGB
    method_name: str
    method_version: str
    registered: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    # the windowed inputs in [0, 1] of the slices asked for with ``keep`` (quality metrics, thumbnails)
    kept_slices: list[int] = field(default_factory=list)
    kept_reference: np.ndarray | None = None
    kept_moving: np.ndarray | None = None


def input_notes(reference: Volume, moving: Volume) -> list[str]:
    """What loading changed or could not do (units, conversions, exclusions), per source."""
    notes = []
    for role, vol in (("reference", reference), ("moving", moving)):
        units = getattr(vol, "units", "")
        if units:
            notes.append(f"{role} {vol.modality} values in {units}")
        notes += [f"{role} {vol.modality}: {n}" for n in getattr(vol, "notes", [])]
    return notes


def window(array: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of [lo, hi] to [0, 1], clipped; float32."""
    if hi <= lo:
        hi = lo + 1.0
    out = (array.astype(np.float32, copy=False) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def intensity_window(array: np.ndarray, modality: str) -> tuple[float, float]:
    """The display window used to bring a modality to [0, 1] before fusion."""
    if modality == "CT":
        return CT_WINDOW
    sample = array[:: max(1, array.shape[0] // 32)]
    positive = sample[sample > 0]
    if positive.size == 0:
        return 0.0, 1.0
    if modality in FUNCTIONAL_MODALITIES:
        return 0.0, float(np.percentile(positive, 99.9))
    # Anatomy (MR): put the brain (upper quartile of the head) at mid-gray, as in the training data,
    # so bright fat and dark bone/CSF keep their contrast (the window may reach past the maximum).
    top = float(np.percentile(positive, 99.9))
    head = positive[positive > 0.05 * top]
    hi = float(np.percentile(head, 75)) / MR_BRAIN_LEVEL if head.size else top
    return 0.0, max(hi, 1e-6)


def fuse_pair(
    reference: Volume,
    moving: Volume,
    fuser: Fuser,
    *,
    batch_size: int = 16,
    device: str = "auto",
    transform: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
    keep: Sequence[int] = (),
) -> FusionResult:
    """Resample ``moving`` onto ``reference`` (``transform``: reference -> moving patient mm) and fuse.

    ``keep``: slice indices whose windowed inputs the result carries (copies of a few slices).
    """
    if reference.array.ndim != 3 or moving.array.ndim != 3:
        raise FusionError("volumes must be 3-D")
    dev = resolve_device(device)
    t0 = time.perf_counter()
    fill = AIR_HU if moving.modality == "CT" else 0.0
    on_ref = resample_to(moving, reference, transform=transform, device=dev, fill=fill)
    t_resample = time.perf_counter() - t0
    a_lo, a_hi = intensity_window(reference.array, reference.modality)
    b_lo, b_hi = intensity_window(moving.array, moving.modality)
    a = window(reference.array, a_lo, a_hi)
    b = window(on_ref, b_lo, b_hi)
    covered = float((on_ref != fill).mean()) if on_ref.size else 0.0
    if covered == 0.0:
        raise FusionError(
            f"the {moving.modality} series does not overlap the {reference.modality} series in patient space"
        )
    functional = moving.modality in FUNCTIONAL_MODALITIES
    fuser = fuser.for_modality(moving.modality)
    n = a.shape[0]
    out = np.empty(a.shape + ((3,) if functional else ()), dtype=np.uint8)
    t1 = time.perf_counter()
    if functional:
        from dicomnode.fusion.colour import fuse_hot_iron  # noqa: PLC0415

    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        if functional:
            out[s:e] = fuse_hot_iron(fuser, a[s:e], b[s:e])  # Hot Iron, luma fused, chroma back
        else:
            f = fuser.fuse(a[s:e], b[s:e])
            out[s:e] = np.clip(np.rint(np.asarray(f) * 255.0), 0, 255).astype(np.uint8)
        if progress is not None:
            progress(e, n)
    t_fuse = time.perf_counter() - t1
    kept = sorted({i for i in keep if 0 <= i < n})
    return FusionResult(
        pixels=out,
        photometric="RGB" if functional else "MONOCHROME2",
        method_name=fuser.name,
        method_version=fuser.version,
        registered=transform is not None,
        details={
            "device": str(dev),
            "slices": n,
            "batch_size": batch_size,
            "reference_window": [a_lo, a_hi],
            "moving_window": [b_lo, b_hi],
            "moving_coverage": round(covered, 4),
            "seconds_resample": round(t_resample, 3),
            "seconds_fuse": round(t_fuse, 3),
        },
        kept_slices=kept,
        kept_reference=a[kept].copy() if kept else None,
        kept_moving=b[kept].copy() if kept else None,
    )
