"""Colour handling: the DICOM Hot Iron palette and YCbCr, so functional images fuse on their luma.

PET/SPECT pseudo-colour images are fused on Y (JPEG / BT.601 full range, Y = 0.299R + 0.587G +
0.114B) and keep their own Cb/Cr; grayscale DICOM PET/NM is first mapped through Hot Iron. Where
the fused Y with the source's full chroma lies outside the RGB cube (a bright fused pixel on a
strongly coloured hot spot), the chroma is scaled down just enough to fit instead of clipping
R, G or B: the hue stays, and the image keeps the fused luma (clipping would flatten the fused
detail inside hot spots and change the very luma the fusion made).
"""

from __future__ import annotations

import numpy as np

from dicomnode.fusion.base import Fuser


def _hot_iron_table() -> np.ndarray:
    """The 256-entry Hot Iron Color Palette of DICOM PS3.6 Annex B (as pydicom ships it)."""
    i = np.arange(256)
    red = np.where(i < 128, 2 * i, 255)
    green = np.where(i < 128, 0, 2 * (i - 128))
    blue = np.where(i < 192, 0, 4 * (i - 191))
    green[255] = 255
    return np.clip(np.stack([red, green, blue], axis=1), 0, 255).astype(np.uint8)


HOT_IRON = _hot_iron_table()


def apply_hot_iron(x01: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to Hot Iron RGB, uint8 with a trailing axis of 3."""
    return HOT_IRON[_hot_iron_index(x01)]


def _hot_iron_index(x01: np.ndarray) -> np.ndarray:
    """Palette entry (0..255) of each value in [0, 1]; NaN and below 0 are 0, above 1 is 255."""
    x = np.asarray(x01, dtype=np.float32)
    return np.clip(np.rint(np.nan_to_num(x, nan=0.0) * 255.0), 0, 255).astype(np.intp)


_RGB2YCC = np.array(
    [
        [0.299, 0.587, 0.114],
        [-0.168735892, -0.331264108, 0.5],
        [0.5, -0.418687589, -0.081312411],
    ],
    dtype=np.float64,
)
_YCC2RGB = np.linalg.inv(_RGB2YCC)


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """RGB (...,3) in 0..255 (uint8 or float) -> float32 YCbCr (...,3), Cb/Cr centred on 128."""
    x = np.asarray(rgb)
    if x.shape[-1] != 3:
        raise ValueError(f"RGB images need a last axis of 3, got shape {x.shape}")
    r, g, b = (x[..., k].astype(np.float32) for k in range(3))
    m = _RGB2YCC.astype(np.float32)
    out = np.empty(x.shape, np.float32)
    for k, offset in enumerate((0.0, 128.0, 128.0)):
        out[..., k] = m[k, 0] * r + m[k, 1] * g + m[k, 2] * b + np.float32(offset)
    return out


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """Float YCbCr (...,3) (Cb/Cr centred on 128) -> float32 RGB (...,3), not clipped or rounded."""
    x = np.asarray(ycc, dtype=np.float64).copy()
    if x.shape[-1] != 3:
        raise ValueError(f"YCbCr images need a last axis of 3, got shape {x.shape}")
    x[..., 1:] -= 128.0
    return (x @ _YCC2RGB.T).astype(np.float32)


def ycbcr_to_rgb_in_gamut(ycc: np.ndarray) -> np.ndarray:
    """Float YCbCr (...,3) -> float32 RGB (...,3) inside [0, 255] with the luma of ``ycc``.

    Y is clipped to [0, 255]; per pixel, the chroma (Cb, Cr) is multiplied by the largest
    s in [0, 1] that keeps R, G and B inside [0, 255]. Chroma adds no luma, so the result's
    Y = 0.299R + 0.587G + 0.114B equals the (clipped) input Y, and its hue is the input's.
    """
    x = np.asarray(ycc, dtype=np.float32)
    if x.shape[-1] != 3:
        raise ValueError(f"YCbCr images need a last axis of 3, got shape {x.shape}")
    y = np.clip(x[..., 0], 0.0, 255.0)
    cb, cr = x[..., 1] - np.float32(128.0), x[..., 2] - np.float32(128.0)
    m = _YCC2RGB.astype(np.float32)
    # what Cb/Cr add to R, G and B (BT.601: R takes only Cr, B only Cb)
    adds = (m[0, 2] * cr, m[1, 1] * cb + m[1, 2] * cr, m[2, 1] * cb)
    up, down = np.float32(255.0) - y, y  # room above and below the luma
    s = np.ones_like(y)
    for d in adds:
        room = np.where(d > 0, up, down)
        np.minimum(s, room / np.maximum(np.abs(d), np.float32(1e-6)), out=s)
    out = np.empty(x.shape, np.float32)
    for k, d in enumerate(adds):
        out[..., k] = y + s * d
    return np.clip(out, 0.0, 255.0, out=out)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Round and clip to uint8."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


HOT_IRON_YCC = rgb_to_ycbcr(HOT_IRON)  # (256, 3): Y, Cb, Cr of each Hot Iron entry


def fuse_hot_iron(fuser: Fuser, mri01: np.ndarray, x01: np.ndarray) -> np.ndarray:
    """A grayscale PET/NM (N,H,W) in [0,1] as :func:`fuse_colour` of its Hot Iron image, without the RGB.

    Same result as ``fuse_colour(fuser, mri01, apply_hot_iron(x01))``: the luma and chroma come
    from a 256-entry YCbCr copy of the palette instead of converting a whole RGB image.
    """
    mri = np.asarray(mri01, dtype=np.float32)
    x = np.asarray(x01, dtype=np.float32)
    if mri.ndim != 3 or x.shape != mri.shape:
        raise ValueError(
            f"fuse_hot_iron needs MRI and PET/NM (N,H,W) of one size; got {mri.shape} and {x.shape}"
        )
    return _fuse_luma(fuser, mri, HOT_IRON_YCC[_hot_iron_index(x)])


def fuse_colour(fuser: Fuser, mri01: np.ndarray, rgb_uint8: np.ndarray) -> np.ndarray:
    """Fuse MRI (N,H,W) in [0,1] with the luma of RGB (N,H,W,3); return uint8 RGB with its Cb/Cr."""
    mri = np.asarray(mri01, dtype=np.float32)
    rgb = np.asarray(rgb_uint8)
    if mri.ndim != 3 or rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.shape[:3] != mri.shape:
        raise ValueError(
            f"fuse_colour needs MRI (N,H,W) and RGB (N,H,W,3) of one size; got {mri.shape} and {rgb.shape}"
        )
    return _fuse_luma(fuser, mri, rgb_to_ycbcr(rgb))


def _fuse_luma(fuser: Fuser, mri: np.ndarray, ycc: np.ndarray) -> np.ndarray:
    """Fuse the MRI with the luma of ``ycc`` (changed in place); uint8 RGB with its chroma, in gamut."""
    fused = fuser.fuse(mri, ycc[..., 0] / np.float32(255.0))
    ycc[..., 0] = np.clip(fused, 0.0, 1.0) * 255.0
    return to_uint8(ycbcr_to_rgb_in_gamut(ycc))
