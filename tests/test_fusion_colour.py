"""Colour: Hot Iron against pydicom's copy of the DICOM palette, YCbCr round trip, colour fusion."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from dicomnode.fusion.base import get_fuser
from dicomnode.fusion.colour import (
    HOT_IRON,
    apply_hot_iron,
    fuse_colour,
    rgb_to_ycbcr,
    ycbcr_to_rgb,
)


def test_hot_iron_matches_pydicom_standard_palette() -> None:
    from pydicom.pixels import apply_color_lut

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = apply_color_lut(np.arange(256, dtype=np.uint8), palette="HOT_IRON")
    np.testing.assert_array_equal(HOT_IRON, ref)


def test_apply_hot_iron_shape_and_ends() -> None:
    x = np.array([[0.0, 0.5, 1.0], [-1.0, 2.0, np.nan]], np.float32)
    rgb = apply_hot_iron(x)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [0, 0, 0]
    assert rgb[0, 2].tolist() == [255, 255, 255]
    assert rgb[1, 0].tolist() == [0, 0, 0] and rgb[1, 1].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == HOT_IRON[128].tolist()


def test_ycbcr_known_values() -> None:
    ycc = rgb_to_ycbcr(np.array([[255, 0, 0], [0, 0, 0], [255, 255, 255], [0, 0, 255]], np.uint8))
    np.testing.assert_allclose(ycc[0], [76.245, 84.972, 255.5], atol=1e-2)
    np.testing.assert_allclose(ycc[1], [0, 128, 128], atol=1e-4)
    np.testing.assert_allclose(ycc[2], [255, 128, 128], atol=1e-3)
    np.testing.assert_allclose(ycc[3, 0], 0.114 * 255, atol=1e-3)


def test_ycbcr_round_trip() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3)).astype(np.uint8)
    back = np.rint(ycbcr_to_rgb(rgb_to_ycbcr(rgb))).astype(int)
    np.testing.assert_array_equal(back, rgb)


def test_fuse_colour_keeps_chroma_and_fuses_luma() -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    mri = np.zeros((2, 16, 16), np.float32)  # max(0, Y) == Y: the output must be the input
    out = fuse_colour(get_fuser("max"), mri, rgb)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb.astype(int)).max() <= 1
    gray = np.repeat(np.full((1, 8, 8), 100, np.uint8)[..., None], 3, axis=-1)
    out = fuse_colour(get_fuser("max"), np.ones((1, 8, 8), np.float32), gray)
    assert out.min() >= 254  # luma raised to white, chroma neutral stays neutral


def test_fuse_colour_bad_shapes() -> None:
    with pytest.raises(ValueError, match="RGB"):
        fuse_colour(get_fuser("max"), np.zeros((1, 4, 4), np.float32), np.zeros((1, 4, 4), np.uint8))
