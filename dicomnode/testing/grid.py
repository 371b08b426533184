"""Sampling grids of generated series: matrix, spacing, orientation and position in patient space."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from dicomnode.testing.phantom import SlicePlane


@dataclass
class Grid:
    """One series' sampling grid; ``pixel_spacing`` is DICOM order (between rows, between columns)."""

    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    n_slices: int
    origin_mm: tuple[float, float, float] | None = None  # IPP of the first slice; None = centred on the head
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # Image Orientation (Patient)
    slice_thickness: float | None = None  # None = slice_spacing

    def __post_init__(self) -> None:
        if self.rows < 1 or self.columns < 1 or self.n_slices < 1:
            raise ValueError(f"grid needs at least one row, column and slice, got {self}")
        if min(self.pixel_spacing) <= 0 or self.slice_spacing <= 0:
            raise ValueError(f"grid spacings must be positive, got {self}")
        row, col = np.asarray(self.orientation[:3], float), np.asarray(self.orientation[3:], float)
        unit = abs(np.linalg.norm(row) - 1) < 1e-4 and abs(np.linalg.norm(col) - 1) < 1e-4
        if len(self.orientation) != 6 or not unit or abs(float(row @ col)) > 1e-4:
            raise ValueError(f"orientation must be two orthogonal unit vectors, got {self.orientation}")

    @property
    def thickness(self) -> float:
        return float(self.slice_thickness if self.slice_thickness is not None else self.slice_spacing)

    def directions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row direction, column direction, slice normal) as unit vectors."""
        row = np.asarray(self.orientation[:3], dtype=np.float64)
        col = np.asarray(self.orientation[3:], dtype=np.float64)
        return row, col, np.cross(row, col)

    def affine(self) -> np.ndarray:
        """4x4 map from voxel index (i column, j row, k slice, 1) to patient mm; needs an origin."""
        if self.origin_mm is None:
            raise ValueError("grid has no origin yet; call centred_on() first")
        row, col, normal = self.directions()
        a = np.eye(4)
        a[:3, 0] = row * self.pixel_spacing[1]
        a[:3, 1] = col * self.pixel_spacing[0]
        a[:3, 2] = normal * self.slice_spacing
        a[:3, 3] = self.origin_mm
        return a

    def centred_on(self, center_mm: np.ndarray) -> Grid:
        """The same grid with its origin placed so that its centre lands on ``center_mm``."""
        row, col, normal = self.directions()
        half = (
            (self.columns - 1) / 2 * self.pixel_spacing[1] * row
            + (self.rows - 1) / 2 * self.pixel_spacing[0] * col
            + (self.n_slices - 1) / 2 * self.slice_spacing * normal
        )
        origin = np.asarray(center_mm, dtype=np.float64) - half
        return replace(self, origin_mm=tuple(round(float(v), 4) for v in origin))

    def slice_origin(self, k: int) -> np.ndarray:
        """Image Position (Patient) of slice ``k``."""
        return self.affine()[:3] @ np.array([0.0, 0.0, float(k), 1.0])

    def slice_points(self, k: int) -> np.ndarray:
        """Patient coordinates (rows, columns, 3) of the pixel centres of slice ``k``, float32."""
        row, col, _ = self.directions()
        origin = self.slice_origin(k)
        i = np.arange(self.columns, dtype=np.float64) * self.pixel_spacing[1]
        j = np.arange(self.rows, dtype=np.float64) * self.pixel_spacing[0]
        pts = origin + j[:, None, None] * col + i[None, :, None] * row
        return pts.astype(np.float32)

    def plane(self, k: int) -> SlicePlane:
        """Slice ``k`` as a parametric plane, for fast separable evaluation of the phantom."""
        row, col, _ = self.directions()
        return SlicePlane(
            self.slice_origin(k),
            row * self.pixel_spacing[1],
            col * self.pixel_spacing[0],
            self.rows,
            self.columns,
        )

    def voxel_axes(self) -> np.ndarray:
        """Voxel edge vectors (3, 3) in mm: along rows, along columns, through the slice."""
        row, col, normal = self.directions()
        return np.stack([row * self.pixel_spacing[1], col * self.pixel_spacing[0], normal * self.thickness])


# (rows, columns, pixel spacing, slice spacing, slices, centre offset or None, minimum matrix, minimum slices)
_BASE: dict[str, tuple[int, int, float, float, int, tuple[float, float, float] | None, int, int]] = {
    "MR": (256, 256, 1.0, 3.0, 60, None, 16, 8),
    "CT": (512, 512, 0.5, 1.25, 168, (3.0, 10.0, -10.0), 16, 8),
    "PT": (64, 64, 4.0, 4.0, 50, None, 32, 24),
    "NM": (64, 64, 4.4, 4.4, 46, None, 32, 24),
}


def default_grids(scale: float = 1.0) -> dict[str, Grid]:
    """Realistic grids per modality; ``scale`` < 1 shrinks matrices and enlarges voxels over the same FOV.

    PET and SPECT keep at least 32x32x24 voxels (about 8 mm) so the lesion stays visible at small scales.
    CT has its own FOV centre (table offset), so its origin differs from the MR's.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    grids = {}
    for modality, (rows, cols, ps, ss, ns, centre, min_n, min_s) in _BASE.items():
        r = max(min_n, round(rows * scale))
        c = max(min_n, round(cols * scale))
        s = max(min_s, round(ns * scale))
        grid = Grid(
            rows=r,
            columns=c,
            pixel_spacing=(rows * ps / r, cols * ps / c),
            slice_spacing=ns * ss / s,
            n_slices=s,
        )
        grids[modality] = grid.centred_on(np.array(centre)) if centre is not None else grid
    return grids
