"""How each modality sees the phantom: tissue values, resolution, noise and stored pixel encoding."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy.ndimage import gaussian_filter

from dicomnode.testing.grid import Grid
from dicomnode.testing.phantom import AIR, CSF, GRAY, LESION, SCALP, SKULL, WHITE, HeadPhantom

# T1 (MPRAGE-like): fat-rich scalp bright, cortical bone dark, white > gray, CSF dark, lesion subtle
MR_T1 = {AIR: 0.0, SCALP: 900.0, SKULL: 60.0, GRAY: 480.0, WHITE: 700.0, CSF: 140.0, LESION: 590.0}
CT_HU = {AIR: -1000.0, SCALP: 40.0, SKULL: 1250.0, GRAY: 40.0, WHITE: 31.0, CSF: 6.0, LESION: 36.0}
PET_SUV = {AIR: 0.0, SCALP: 1.0, SKULL: 0.5, GRAY: 7.5, WHITE: 4.5, CSF: 1.0, LESION: 18.0}
NM_COUNTS = {AIR: 0.0, SCALP: 15.0, SKULL: 8.0, GRAY: 220.0, WHITE: 120.0, CSF: 20.0, LESION: 420.0}

PET_FWHM_MM = 6.0
NM_FWHM_MM = 11.0
MR_NOISE_SIGMA = 16.0
CT_NOISE_HU = 6.0
MR_MAX_STORED = 4095  # 12 bits stored
PET_MAX_STORED = 32767


def _sigma_voxels(grid: Grid, fwhm_mm: float) -> tuple[float, float, float]:
    s = fwhm_mm / 2.3548
    return (s / grid.slice_spacing, s / grid.pixel_spacing[0], s / grid.pixel_spacing[1])


def mr_slices(
    phantom: HeadPhantom, grid: Grid, rng: np.random.Generator, noise: bool = True
) -> Iterator[np.ndarray]:
    """Stored MR slices (uint16, 12 bits): T1 contrast, a smooth coil bias field, Rician noise."""
    axes = grid.voxel_axes()
    bias = np.array([0.06, -0.04, -0.05]) / 100.0  # relative gain change per mm from the head centre
    for k in range(grid.n_slices):
        plane = grid.plane(k)
        img = phantom.render(plane, MR_T1, axes)
        img *= plane.linear(
            1.0 + float((plane.origin - phantom.center) @ bias),
            float(plane.du @ bias),
            float(plane.dv @ bias),
        )
        if noise:
            n = rng.standard_normal((2,) + img.shape, dtype=np.float32) * np.float32(MR_NOISE_SIGMA)
            img = np.sqrt((img + n[0]) ** 2 + n[1] ** 2)
        yield np.clip(np.rint(img), 0, MR_MAX_STORED).astype(np.uint16)


def ct_slices(
    phantom: HeadPhantom, grid: Grid, rng: np.random.Generator, noise: bool = True
) -> Iterator[np.ndarray]:
    """Stored CT slices (int16, HU + 1024) with Gaussian noise."""
    axes = grid.voxel_axes()
    for k in range(grid.n_slices):
        hu = phantom.render(grid.plane(k), CT_HU, axes)
        if noise:
            hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(CT_NOISE_HU)
        yield np.clip(np.rint(hu + 1024.0), 0, 32767).astype(np.int16)


def _emission_truth(phantom: HeadPhantom, grid: Grid, values: dict[int, float], fwhm_mm: float) -> np.ndarray:
    axes = grid.voxel_axes()
    vol = np.stack([phantom.render(grid.plane(k), values, axes) for k in range(grid.n_slices)])
    return gaussian_filter(vol, _sigma_voxels(grid, fwhm_mm), mode="constant")


def pet_volume(phantom: HeadPhantom, grid: Grid, rng: np.random.Generator, noise: bool = True) -> np.ndarray:
    """SUV volume (k, j, i) float32 at PET resolution with correlated, activity-dependent noise."""
    act = _emission_truth(phantom, grid, PET_SUV, PET_FWHM_MM)
    if noise:
        n = rng.standard_normal(act.shape, dtype=np.float32) * np.sqrt(np.maximum(act, 0.0) * 0.25)
        act = act + gaussian_filter(n, 0.7)
    return np.maximum(act, 0.0).astype(np.float32)


def nm_volume(phantom: HeadPhantom, grid: Grid, rng: np.random.Generator, noise: bool = True) -> np.ndarray:
    """Perfusion SPECT counts (k, j, i) uint16: Poisson counts, post-filtered as a reconstruction would."""
    act = _emission_truth(phantom, grid, NM_COUNTS, NM_FWHM_MM)
    if noise:
        act = gaussian_filter(rng.poisson(np.maximum(act, 0.0)).astype(np.float32), 0.6)
    return np.clip(np.rint(act), 0, 65535).astype(np.uint16)
