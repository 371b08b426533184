"""Volumes from DICOM series: slices sorted along the slice normal, rescaled, with a patient affine.

The affine maps voxel index ``(i, j, k, 1)`` (column, row, slice) to patient coordinates in mm
(DICOM LPS). ``array`` is indexed ``[k, j, i]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset


class VolumeError(ValueError):
    """The series cannot be made into a volume; the message says why."""


@dataclass
class Volume:
    array: np.ndarray  # (nz, ny, nx) float32, physical values (rescale applied)
    affine: np.ndarray  # (4, 4) float64: index (i, j, k, 1) -> patient mm
    modality: str = ""
    frame_of_reference_uid: str = ""
    sop_instance_uids: list[str] = field(default_factory=list)  # per slice k
    series_instance_uid: str = ""
    datasets: list[Dataset] = field(default_factory=list, repr=False)  # headers per slice k

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size (i, j, k) in mm."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def slice_affine(self, k: int) -> np.ndarray:
        a = self.affine.copy()
        a[:3, 3] = self.affine[:3, :3] @ np.array([0.0, 0.0, float(k)]) + self.affine[:3, 3]
        return a

    def center(self) -> np.ndarray:
        """Patient coordinates of the volume's centre."""
        nz, ny, nx = self.array.shape
        return (self.affine @ np.array([(nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2, 1.0]))[:3]


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


def _pixels(ds: Dataset) -> np.ndarray:
    try:
        px = ds.pixel_array
    except Exception as exc:  # decoder missing, corrupt data: a value the job can report
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise VolumeError(f"cannot decode pixel data (transfer syntax {ts}): {exc}") from exc
    arr = np.asarray(px, dtype=np.float32)
    if arr.ndim != 2:
        raise VolumeError(f"expected single-frame grayscale slices, got pixel array shape {arr.shape}")
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    if getattr(ds, "PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        arr = arr.max() - arr
    return arr * slope + intercept


def volume_from_datasets(datasets: Sequence[Dataset]) -> Volume:
    """Sort slices by position along the normal, check they form one stack, build the volume."""
    if not datasets:
        raise VolumeError("series has no images")
    geo = [slice_geometry(ds) for ds in datasets]
    _, row0, col0, sp0 = geo[0]
    normal = np.cross(row0, col0)
    for _, r, c, sp in geo[1:]:
        if np.abs(r - row0).max() > 1e-3 or np.abs(c - col0).max() > 1e-3:
            raise VolumeError("slices of the series have different orientations")
        if np.abs(sp - sp0).max() > 1e-4:
            raise VolumeError("slices of the series have different pixel spacings")
    dims = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(dims) != 1:
        raise VolumeError("slices of the series have different sizes")
    order = sorted(range(len(datasets)), key=lambda n: float(geo[n][0] @ normal))
    dists = np.array([float(geo[n][0] @ normal) for n in order])
    if len(order) > 1:
        steps = np.diff(dists)
        if np.any(steps < 1e-4):
            raise VolumeError("two slices share one position (several stacks in one series?)")
        step = float(np.median(steps))
    else:
        step = float(getattr(datasets[0], "SliceThickness", 1.0) or 1.0)
    first_pos = geo[order[0]][0]
    affine = np.eye(4)
    affine[:3, 0] = row0 * sp0[1]  # i (column index) runs along the row direction
    affine[:3, 1] = col0 * sp0[0]  # j (row index) runs along the column direction
    affine[:3, 2] = normal * step
    affine[:3, 3] = first_pos
    array = np.stack([_pixels(datasets[n]) for n in order]).astype(np.float32, copy=False)
    ds0 = datasets[order[0]]
    return Volume(
        array=array,
        affine=affine,
        modality=str(getattr(ds0, "Modality", "")),
        frame_of_reference_uid=str(getattr(ds0, "FrameOfReferenceUID", "")),
        sop_instance_uids=[str(datasets[n].SOPInstanceUID) for n in order],
        series_instance_uid=str(getattr(ds0, "SeriesInstanceUID", "")),
        datasets=[datasets[n] for n in order],
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
