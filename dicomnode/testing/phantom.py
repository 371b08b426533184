"""An analytic head phantom in patient coordinates (mm, DICOM LPS) that every modality samples.

Shapes are nested ellipsoids, a midline fissure and one lesion sphere, painted in order; each
shape gives an approximate signed distance so a grid can compute partial-volume fractions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AIR, SCALP, SKULL, GRAY, WHITE, CSF, LESION = 0, 1, 2, 3, 4, 5, 6
LABEL_NAMES = {
    AIR: "air",
    SCALP: "scalp",
    SKULL: "skull",
    GRAY: "gray",
    WHITE: "white",
    CSF: "csf",
    LESION: "lesion",
}


@dataclass(frozen=True)
class SlicePlane:
    """Pixel centres of one slice: ``origin + i * du + j * dv`` for column i and row j (mm, float64)."""

    origin: np.ndarray
    du: np.ndarray
    dv: np.ndarray
    rows: int
    columns: int

    def _ij(self) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(self.columns, dtype=np.float64), np.arange(self.rows, dtype=np.float64)

    def quadratic(self, qa: np.ndarray, qi: np.ndarray, qj: np.ndarray) -> np.ndarray:
        """|qa + i qi + j qj|^2 on the slice, (rows, columns) float32, from separable terms."""
        i, j = self._ij()
        u = (2.0 * float(qa @ qi)) * i + float(qi @ qi) * i * i
        v = float(qa @ qa) + (2.0 * float(qa @ qj)) * j + float(qj @ qj) * j * j
        out = v.astype(np.float32)[:, None] + u.astype(np.float32)[None, :]
        cross = 2.0 * float(qi @ qj)
        if abs(cross) > 1e-12:
            out += np.float32(cross) * np.outer(j, i).astype(np.float32)
        return out

    def linear(self, a0: float, ai: float, aj: float) -> np.ndarray:
        """a0 + ai i + aj j on the slice, (rows, columns) float32."""
        i, j = self._ij()
        return (a0 + aj * j).astype(np.float32)[:, None] + (ai * i).astype(np.float32)[None, :]

    def points(self, sel: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Patient coordinates (n, 3) float64 of the pixels ``sel`` = (row indices, column indices)."""
        return self.origin + sel[1][:, None] * self.du + sel[0][:, None] * self.dv


class Ellipsoid:
    """Axis-aligned ellipsoid; distances are first-order (exact on spheres, close near surfaces)."""

    def __init__(self, center: np.ndarray, semi_axes: np.ndarray) -> None:
        self.center = np.asarray(center, dtype=np.float64)
        self.semi_axes = np.asarray(semi_axes, dtype=np.float64)

    def inside(self, p: np.ndarray) -> np.ndarray:
        q = (p - self.center.astype(p.dtype)) / self.semi_axes.astype(p.dtype)
        return np.einsum("...i,...i->...", q, q) < 1.0

    def coverage(self, plane: SlicePlane, voxel_axes: np.ndarray) -> np.ndarray:
        """Fraction of each box voxel of a slice (edges ``voxel_axes``, rows in mm) inside the shape."""
        a = self.semi_axes
        qa, qi, qj = (plane.origin - self.center) / a, plane.du / a, plane.dv / a
        f2 = plane.quadratic(qa, qi, qj)
        extent = float(np.abs(voxel_axes).sum(axis=0).max())
        band = extent / float(a.min())
        lo, hi = max(0.0, 1.0 - band) ** 2, (1.0 + band) ** 2
        out = (f2 < 1.0).astype(np.float32)
        sel = np.nonzero((f2 > lo) & (f2 < hi))
        if sel[0].size:
            q = plane.points(sel) - self.center
            q /= a
            f = np.sqrt(np.einsum("...i,...i->...", q, q))
            grad = q / a / np.maximum(f, 1e-9)[:, None]
            gnorm = np.maximum(np.linalg.norm(grad, axis=1), 1e-12)
            d = (f - 1.0) / gnorm
            out[sel] = _box_fraction(d, grad / gnorm[:, None], voxel_axes)
        return out

    def may_touch(self, plane: SlicePlane, margin: float) -> bool:
        """False when the slice plane passes farther than ``margin`` mm from the ellipsoid."""
        n = np.cross(plane.du, plane.dv)
        n /= np.linalg.norm(n)
        reach = float(np.linalg.norm(n * self.semi_axes)) + margin  # support function of the ellipsoid
        return abs(float((self.center - plane.origin) @ n)) <= reach


class Slab:
    """Points with ``|normal . (p - center)| < half_width`` and inside every shape in ``within``."""

    def __init__(
        self, center: np.ndarray, normal: np.ndarray, half_width: float, within: list[Ellipsoid]
    ) -> None:
        self.center = np.asarray(center, dtype=np.float64)
        self.normal = np.asarray(normal, dtype=np.float64) / np.linalg.norm(normal)
        self.half_width = float(half_width)
        self.within = within

    def _signed(self, p: np.ndarray) -> np.ndarray:
        return (p - self.center.astype(p.dtype)) @ self.normal.astype(p.dtype)

    def inside(self, p: np.ndarray) -> np.ndarray:
        ok = np.abs(self._signed(p)) < self.half_width
        for shape in self.within:
            ok &= shape.inside(p)
        return ok

    def coverage(self, plane: SlicePlane, voxel_axes: np.ndarray) -> np.ndarray:
        n = self.normal
        s = plane.linear(float((plane.origin - self.center) @ n), float(plane.du @ n), float(plane.dv @ n))
        dist = np.abs(s) - np.float32(self.half_width)
        width = float(np.abs(np.asarray(voxel_axes) @ n).sum())
        frac = np.clip(np.float32(0.5) - dist / np.float32(width), 0.0, 1.0)
        for shape in self.within:
            if not frac.any():
                break
            frac = np.minimum(frac, shape.coverage(plane, voxel_axes))
        return frac

    def may_touch(self, plane: SlicePlane, margin: float) -> bool:
        return all(shape.may_touch(plane, margin) for shape in self.within)


def _box_fraction(d: np.ndarray, normal: np.ndarray, voxel_axes: np.ndarray) -> np.ndarray:
    """Share of a box voxel inside a locally planar surface at signed distance ``d`` (negative inside)."""
    width = np.abs(normal @ np.asarray(voxel_axes, dtype=np.float64).T).sum(axis=-1)
    return np.clip(0.5 - d / np.maximum(width, 1e-6), 0.0, 1.0)


@dataclass(frozen=True)
class _Layer:
    label: int
    shape: Ellipsoid | Slab


class HeadPhantom:
    """Scalp, skull shell, gray/white brain, two lateral ventricles, a midline fissure and a lesion.

    ``seed`` varies head size by a few percent and places the lesion in one hemisphere.
    """

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4EAD]))
        self.seed = seed
        self.center = np.array([0.0, 0.0, 0.0]) + rng.uniform(-2.0, 2.0, 3)
        size = rng.uniform(0.96, 1.04)
        head = np.array([74.0, 94.0, 88.0]) * size
        self.scalp_thickness_mm = 5.0
        self.skull_thickness_mm = 7.0
        skull_outer = head - self.scalp_thickness_mm
        brain = skull_outer - self.skull_thickness_mm
        white = brain - np.array([11.0, 12.0, 12.0])
        c = self.center
        self.head = Ellipsoid(c, head)
        self.skull_outer = Ellipsoid(c, skull_outer)
        self.brain = Ellipsoid(c, brain)
        self.white = Ellipsoid(c + [0, 2, 4], white)
        # lateral ventricles: left (+x) and right (-x), anterior horns at -y (LPS)
        self.ventricles = [Ellipsoid(c + [sx * 11.0, -4.0, 12.0], [5.5, 24.0, 9.0]) for sx in (-1.0, 1.0)]
        # interhemispheric fissure: a thin CSF sheet in the midline, above the ventricles
        above = Ellipsoid(c + [0.0, 0.0, 22.0 + brain[2]], brain * [1.0, 1.3, 1.0])
        self.fissure = Slab(c, [1.0, 0.0, 0.0], 1.2, [self.brain, above])
        self.lesion_radius_mm = float(rng.uniform(9.0, 12.0))
        self.lesion_center_mm = self._place_lesion(rng)
        lesion = Ellipsoid(self.lesion_center_mm, [self.lesion_radius_mm] * 3)
        self.layers: list[_Layer] = [
            _Layer(SCALP, self.head),
            _Layer(SKULL, self.skull_outer),
            _Layer(GRAY, self.brain),
            _Layer(WHITE, self.white),
            *(_Layer(CSF, v) for v in self.ventricles),
            _Layer(CSF, self.fissure),
            _Layer(LESION, lesion),
        ]
        self._lesion = lesion

    def _place_lesion(self, rng: np.random.Generator) -> np.ndarray:
        """A lesion point well inside the brain, clear of the ventricles and the midline."""
        r = self.lesion_radius_mm
        side = rng.choice([-1.0, 1.0])
        for _ in range(1000):
            p = self.center + np.array(
                [side * rng.uniform(22.0, 42.0), rng.uniform(-35.0, 35.0), rng.uniform(0.0, 35.0)]
            )
            inner = Ellipsoid(self.center, self.brain.semi_axes - r - 4.0)
            clear = all(
                np.linalg.norm((p - v.center) / (v.semi_axes + r + 3.0)) > 1.0 for v in self.ventricles
            )
            if inner.inside(p[None])[0] and clear:
                return p
        raise RuntimeError("could not place the lesion")  # pragma: no cover - geometry always allows it

    def labels(self, points_mm: np.ndarray) -> np.ndarray:
        """Tissue label (0 air .. 6 lesion) at each point of a (..., 3) array of patient coordinates."""
        p = np.asarray(points_mm, dtype=np.float64)
        out = np.zeros(p.shape[:-1], dtype=np.uint8)
        for layer in self.layers:
            out[layer.shape.inside(p)] = layer.label
        return out

    def skull_mask(self, points_mm: np.ndarray) -> np.ndarray:
        return self.labels(points_mm) == SKULL

    def lesion_mask(self, points_mm: np.ndarray) -> np.ndarray:
        return self._lesion.inside(np.asarray(points_mm, dtype=np.float64))

    def render(self, plane: SlicePlane, values: dict[int, float], voxel_axes: np.ndarray) -> np.ndarray:
        """Partial-volume slice image: each layer's value blended in by the share of the voxel it covers."""
        img = np.full((plane.rows, plane.columns), values.get(AIR, 0.0), dtype=np.float32)
        margin = float(np.abs(voxel_axes).sum(axis=0).max())
        for layer in self.layers:
            if not layer.shape.may_touch(plane, margin):
                continue
            alpha = layer.shape.coverage(plane, voxel_axes)
            img += alpha * (np.float32(values[layer.label]) - img)
        return img
