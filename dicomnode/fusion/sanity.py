"""Pixels that make sense before they leave: checks on the source volumes and on the fused result.

A series with non-finite values, too few pixels per slice to be an image, or one value everywhere
cannot be fused into anything a radiologist should see; neither can a fused result that is one
value everywhere or almost all black. Each check raises :class:`PixelSanityError` with a reason
an admin can act on (the job fails with it instead of pushing blank images to PACS).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the assemble stage reads MIN_IN_PLANE without loading the volume code
    from dicomnode.fusion.volume import Volume

MIN_IN_PLANE = 32  # pixels per row and per column of a slice
MIN_SIGNAL_FRACTION = 0.005  # a fused volume with less than this share of lit pixels is "empty"
SIGNAL_LEVEL = 8  # of 255: a fused pixel darker than this is background


class PixelSanityError(ValueError):
    """The pixels cannot be fused or sent; the message says why."""


def check_source(volume: Volume, role: str) -> None:
    """Refuse a source volume that is too small in plane, not finite, or constant."""
    nz, ny, nx = volume.array.shape
    what = f"{role} {volume.modality or 'series'}"
    if ny < MIN_IN_PLANE or nx < MIN_IN_PLANE:
        raise PixelSanityError(
            f"{what} has {nx}x{ny} pixels per slice, fewer than {MIN_IN_PLANE}x{MIN_IN_PLANE}: "
            "not an image to fuse"
        )
    finite = np.isfinite(volume.array)
    if not finite.all():
        bad = int(np.count_nonzero(~finite.reshape(nz, -1).all(axis=1)))
        raise PixelSanityError(f"{what} has non-finite pixel values on {bad} of {nz} slices")
    lo, hi = float(volume.array.min()), float(volume.array.max())
    if lo == hi:
        raise PixelSanityError(f"{what} is constant (every pixel is {lo:g}): nothing to fuse")


def check_fused(pixels: np.ndarray) -> None:
    """Refuse a fused result that is constant or almost entirely background."""
    if pixels.size == 0:
        raise PixelSanityError("the fusion produced no pixels")
    lo, hi = int(pixels.min()), int(pixels.max())
    if lo == hi:
        raise PixelSanityError(f"the fused volume is constant (every pixel is {lo}): not sent")
    lit = pixels.max(axis=-1) if pixels.ndim == 4 else pixels
    fraction = float(np.count_nonzero(lit >= SIGNAL_LEVEL)) / lit.size
    if fraction < MIN_SIGNAL_FRACTION:
        raise PixelSanityError(
            f"the fused volume is almost empty ({fraction:.2%} of pixels above background, "
            f"at least {MIN_SIGNAL_FRACTION:.1%} expected): not sent"
        )
