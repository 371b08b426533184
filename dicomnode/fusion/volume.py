"""Volumes from DICOM series: slices sorted along the stack axis, rescaled, with a patient affine.

The affine maps voxel index ``(i, j, k, 1)`` (column, row, slice) to patient coordinates in mm
(DICOM LPS). ``array`` is indexed ``[k, j, i]``.

What real series bring, and how it is handled:
- any transfer syntax pydicom's plugins decode (``decode.py``); otherwise ``VolumeError`` naming it;
- multi-frame Enhanced MR/CT/PET and NM reconstructions: one header per frame (``multiframe.py``);
- localizers, scouts and several stacks in one series: the main stack is chosen (``stacks.py``),
  the rest noted in ``Volume.notes``;
- CT gantry tilt: slices step off their normal; the affine's third column is the real step vector
  (a sheared affine), so resampling by the affine puts every pixel at its patient position;
- non-uniform spacing and gaps: every slice keeps its own position. ``slice_k`` holds each slice's
  fractional index along the stack axis (affine step = median spacing); a reference volume is
  sampled at those positions and a moving one is first interpolated onto a uniform grid (``uniform``);
- MONOCHROME1: stored values are inverted over the stored range before rescale (brighter = higher);
- per-slice/per-frame Rescale Slope/Intercept (non-finite, zero or absurd values refuse the series);
  PET converted to SUVbw when the header allows it
  (``suv.py``), else kept and noted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicomnode.fusion.decode import VolumeError, decode_frames, stored_range
from dicomnode.fusion.multiframe import expand_frames, frame_number, pixel_source
from dicomnode.fusion.stacks import select_stack
from dicomnode.fusion.suv import suv_factor

__all__ = ["Volume", "VolumeError", "load_volume", "slice_geometry", "volume_from_datasets"]

MAX_TILT_DEG = 45.0
POSITION_TOLERANCE_MM = 0.05
# Wide enough for every real CT/MR/PET/NM (PET slopes reach the thousands, CT intercepts -32768);
# beyond them the header is broken.
MAX_ABS_SLOPE = 1e6
MAX_ABS_INTERCEPT = 1e7


@dataclass
class Volume:
    array: np.ndarray  # (nz, ny, nx) float32, physical values (rescale applied)
    affine: np.ndarray  # (4, 4) float64: index (i, j, k, 1) -> patient mm
    modality: str = ""
    frame_of_reference_uid: str = ""
    sop_instance_uids: list[str] = field(default_factory=list)  # per slice k (repeats for multi-frame)
    series_instance_uid: str = ""
    datasets: list[Dataset] = field(default_factory=list, repr=False)  # headers per slice k
    units: str = ""  # e.g. HU, SUVbw g/ml, BQML; "" when the modality has none
    notes: list[str] = field(default_factory=list)  # what was excluded/converted/kept and why
    slice_k: np.ndarray | None = None  # fractional k per slice when spacing is non-uniform; None = 0..n-1

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size (i, j, k) in mm (k: median step for non-uniform stacks)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def frame_numbers(self) -> list[int | None]:
        """Per slice k: 1-based frame number in its multi-frame instance (for Referenced Frame Number)."""
        return [frame_number(ds) for ds in self.datasets]

    @property
    def is_uniform(self) -> bool:
        return self.slice_k is None

    def k_coords(self) -> np.ndarray:
        """Fractional index along the stack axis of every slice (0..n-1 when uniform)."""
        if self.slice_k is None:
            return np.arange(self.array.shape[0], dtype=np.float64)
        return np.asarray(self.slice_k, dtype=np.float64)

    def slice_affine(self, k: int) -> np.ndarray:
        a = self.affine.copy()
        a[:3, 3] = self.affine[:3, :3] @ np.array([0.0, 0.0, float(self.k_coords()[k])]) + self.affine[:3, 3]
        return a

    def center(self) -> np.ndarray:
        """Patient coordinates of the volume's centre."""
        nz, ny, nx = self.array.shape
        kc = self.k_coords()
        kmid = (kc[0] + kc[-1]) / 2 if nz else 0.0
        return (self.affine @ np.array([(nx - 1) / 2, (ny - 1) / 2, kmid, 1.0]))[:3]

    def uniform(self) -> Volume:
        """This volume linearly interpolated onto uniform slices along its stack axis (self if uniform)."""
        if self.slice_k is None:
            return self
        kc = self.k_coords()
        n = int(np.floor(kc[-1] + 1e-6)) + 1
        targets = np.arange(n, dtype=np.float64)
        hi = np.clip(np.searchsorted(kc, targets, side="right"), 1, len(kc) - 1)
        lo = hi - 1
        w = np.clip((targets - kc[lo]) / (kc[hi] - kc[lo]), 0.0, 1.0).astype(np.float32)[:, None, None]
        array = (self.array[lo] * (1 - w) + self.array[hi] * w).astype(np.float32)
        return Volume(
            array=array,
            affine=self.affine.copy(),
            modality=self.modality,
            frame_of_reference_uid=self.frame_of_reference_uid,
            series_instance_uid=self.series_instance_uid,
            units=self.units,
            notes=[*self.notes, "interpolated onto uniform slices along the stack axis"],
        )


def _floats(value: object, n: int, name: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{name} is not numeric") from exc
    if arr.shape != (n,):
        raise VolumeError(f"{name} must have {n} values")
    return arr


def slice_geometry(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(position, row direction, column direction, (row spacing, column spacing)) of one slice."""
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        raise VolumeError("slice has no Image Position/Orientation (Patient)")
    if "PixelSpacing" not in ds:
        raise VolumeError("slice has no Pixel Spacing")
    pos = _floats(ds.ImagePositionPatient, 3, "Image Position (Patient)")
    iop = _floats(ds.ImageOrientationPatient, 6, "Image Orientation (Patient)")
    spacing = _floats(ds.PixelSpacing, 2, "Pixel Spacing")
    row_dir, col_dir = iop[:3], iop[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3:
        raise VolumeError("Image Orientation (Patient) is not made of unit vectors")
    if abs(float(row_dir @ col_dir)) > 1e-3:
        raise VolumeError("Image Orientation (Patient) row and column are not orthogonal")
    if np.any(spacing <= 0):
        raise VolumeError("Pixel Spacing must be positive")
    return pos, row_dir, col_dir, spacing


class _FrameCache:
    """Decodes each source instance once while its frames are gathered."""

    def __init__(self) -> None:
        self._frames: dict[int, np.ndarray] = {}

    def get(self, header: Dataset) -> tuple[np.ndarray, Dataset]:
        src, index = pixel_source(header)
        key = id(src)
        if key not in self._frames:
            self._frames[key] = decode_frames(src)
        return self._frames[key][index], src


def _physical(raw: np.ndarray, header: Dataset, src: Dataset) -> np.ndarray:
    arr = raw.astype(np.float32)
    if str(getattr(src, "PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        lo, hi = stored_range(src)
        arr = np.float32(lo + hi) - arr
    slope, intercept = rescale(header)
    if slope != 1.0:
        arr *= np.float32(slope)
    if intercept != 0.0:
        arr += np.float32(intercept)
    if not np.isfinite(arr).all():
        raise VolumeError(
            f"Rescale Slope {slope:g} and Intercept {intercept:g} overflow the pixel values of instance "
            f"{_instance_label(header)}"
        )
    return arr


def _instance_label(header: Dataset) -> str:
    number = header.get("InstanceNumber", None)
    return f"number {number}" if number not in (None, "") else str(header.get("SOPInstanceUID", "?"))[-16:]


def rescale(header: Dataset) -> tuple[float, float]:
    """(Rescale Slope, Rescale Intercept) of a slice; VolumeError for non-finite or absurd values."""
    where = f"of instance {_instance_label(header)}"
    try:
        slope = float(header.get("RescaleSlope", 1) or 1)
        intercept = float(header.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError, OverflowError) as exc:
        raise VolumeError(f"Rescale Slope/Intercept {where} is not a number") from exc
    if not np.isfinite(slope) or not np.isfinite(intercept):
        raise VolumeError(f"Rescale Slope {slope} / Intercept {intercept} {where} is not a finite number")
    if slope == 0.0 or abs(slope) > MAX_ABS_SLOPE:
        raise VolumeError(f"Rescale Slope {slope:g} {where} is absurd (0 or beyond {MAX_ABS_SLOPE:g})")
    if abs(intercept) > MAX_ABS_INTERCEPT:
        raise VolumeError(f"Rescale Intercept {intercept:g} {where} is absurd (beyond {MAX_ABS_INTERCEPT:g})")
    return slope, intercept


def _stack_axis(
    positions: np.ndarray, normal: np.ndarray, default_step: float
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(step vector of the affine's third column, fractional k per slice or None, notes)."""
    n = len(positions)
    if n == 1:
        return normal * default_step, None, []
    span = positions[-1] - positions[0]
    length = float(np.linalg.norm(span))
    u = span / length
    offsets = positions - positions[0]
    t = offsets @ u
    off_line = np.linalg.norm(offsets - t[:, None] * u[None], axis=1)
    if off_line.max() > POSITION_TOLERANCE_MM + 1e-3 * length:
        raise VolumeError(
            f"slice positions do not lie on one line (a slice is {off_line.max():.2f} mm off the stack"
            " axis, e.g. a varying gantry tilt): cannot place the slices as one volume"
        )
    notes = []
    tilt = float(np.degrees(np.arccos(np.clip(abs(float(u @ normal)), 0.0, 1.0))))
    if tilt > MAX_TILT_DEG:
        raise VolumeError(f"slices step {tilt:.1f} degrees off their normal; refusing to build a volume")
    if tilt > 0.01:
        notes.append(
            f"sheared stack: slices step {tilt:.2f} degrees off their normal (gantry tilt);"
            " the affine carries the shear so each pixel is placed at its patient position"
        )
    steps = np.diff(t)
    if np.any(steps < 1e-3):
        raise VolumeError("two slices share one position (several stacks in one series?)")
    step = float(np.median(steps))
    slice_k = None
    if np.abs(steps - step).max() > max(0.01, 0.01 * step):
        slice_k = t / step
        notes.append(
            f"non-uniform slice spacing ({steps.min():.3g} to {steps.max():.3g} mm, median {step:.3g} mm):"
            " slices kept at their own positions"
        )
    return u * step, slice_k, notes


def _check_tilt_tag(ds: Dataset, normal: np.ndarray, step_vec: np.ndarray) -> None:
    """Refuse an original axial-looking stack whose Gantry/Detector Tilt says it was tilted.

    Such headers (IOP pure axial, positions along z, tilt only in the tag) cannot say where the pixels
    are; fusing them would misplace every slice by the tilt.
    """
    try:
        tag = abs(float(ds.get("GantryDetectorTilt", 0) or 0))
    except (TypeError, ValueError):
        return
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if tag < 0.5 or (image_type and image_type[0] != "ORIGINAL"):
        return
    axial = abs(float(normal[2])) > np.cos(np.radians(1.0))
    step = step_vec / np.linalg.norm(step_vec)
    shear = float(np.degrees(np.arccos(np.clip(abs(float(step @ normal)), 0.0, 1.0))))
    if axial and shear < 0.1:
        raise VolumeError(
            f"Gantry/Detector Tilt is {tag:g} degrees but Image Orientation/Position describe an untilted"
            " axial stack: the geometry is inconsistent, refusing to place the slices"
        )


def _units(modality: str, header: Dataset) -> str:
    if modality == "CT":
        return "HU"
    rescale_type = str(header.get("RescaleType", "") or "")
    return "" if rescale_type in ("", "US") else rescale_type


def volume_from_datasets(datasets: Sequence[Dataset]) -> Volume:
    """Build the series' volume: per-frame headers, main stack, sorted slices, decoded and rescaled pixels."""
    if not datasets:
        raise VolumeError("series has no images")
    headers = [h for ds in datasets for h in expand_frames(ds)]
    stack, notes = select_stack(headers)
    geo = [slice_geometry(ds) for ds in stack]
    _, row0, col0, sp0 = geo[0]
    normal = np.cross(row0, col0)
    for _, r, c, sp in geo[1:]:
        if np.abs(r - row0).max() > 1e-3 or np.abs(c - col0).max() > 1e-3:
            raise VolumeError("slices of the series have different orientations")
        if np.abs(sp - sp0).max() > 1e-4:
            raise VolumeError("slices of the series have different pixel spacings")
    order = sorted(range(len(stack)), key=lambda n: float(geo[n][0] @ normal))
    headers_sorted = [stack[n] for n in order]
    positions = np.array([geo[n][0] for n in order])
    ds0 = headers_sorted[0]
    default_step = float(ds0.get("SpacingBetweenSlices", 0) or 0) or float(ds0.get("SliceThickness", 1) or 1)
    step_vec, slice_k, axis_notes = _stack_axis(positions, normal, abs(default_step))
    _check_tilt_tag(ds0, normal, step_vec)
    notes.extend(axis_notes)
    affine = np.eye(4)
    affine[:3, 0] = row0 * sp0[1]  # i (column index) runs along the row direction
    affine[:3, 1] = col0 * sp0[0]  # j (row index) runs along the column direction
    affine[:3, 2] = step_vec
    affine[:3, 3] = positions[0]

    modality = str(ds0.get("Modality", ""))
    cache = _FrameCache()
    slices = []
    for h in headers_sorted:
        raw, src = cache.get(h)
        slices.append(_physical(raw, h, src))
    array = np.stack(slices).astype(np.float32, copy=False)
    if str(getattr(pixel_source(ds0)[0], "PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        notes.append("MONOCHROME1: stored values inverted over the stored range (brighter = higher)")
    units = _units(modality, ds0)
    if modality == "PT":
        results = [suv_factor(h) for h in headers_sorted]
        failed = next((r for r in results if r.factor is None), None)
        if failed is None:
            factors = np.array([r.factor for r in results], dtype=np.float32)
            if np.any(factors != 1.0):
                array *= factors[:, None, None]
                notes.append(f"PET converted from {ds0.get('Units', '')} to SUVbw")
            units = "SUVbw g/ml"
        else:
            units = failed.units
            notes.append(f"PET values kept in {failed.units}, not SUVbw: {failed.reason}")
    return Volume(
        array=array,
        affine=affine,
        modality=modality,
        frame_of_reference_uid=str(ds0.get("FrameOfReferenceUID", "")),
        sop_instance_uids=[str(h.SOPInstanceUID) for h in headers_sorted],
        series_instance_uid=str(ds0.get("SeriesInstanceUID", "")),
        datasets=headers_sorted,
        units=units,
        notes=notes,
        slice_k=slice_k,
    )


def load_volume(paths: Iterable[str | Path]) -> Volume:
    """Read DICOM files (one series) and build its volume."""
    datasets = []
    for p in paths:
        try:
            datasets.append(pydicom.dcmread(str(p)))
        except Exception as exc:
            raise VolumeError(f"cannot read DICOM file {Path(p).name}: {exc}") from exc
    return volume_from_datasets(datasets)
