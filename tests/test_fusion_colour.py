"""Colour: Hot Iron against pydicom's copy of the DICOM palette, YCbCr round trip, colour fusion."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from dicomnode.fusion.colour import (
    HOT_IRON,
    apply_hot_iron,
    fuse_colour,
    fuse_hot_iron,
    rgb_to_ycbcr,
    ycbcr_to_rgb,
    ycbcr_to_rgb_in_gamut,
)
from dicomnode.fusion.registry import get_fuser


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


def test_in_gamut_conversion_keeps_luma_and_hue() -> None:
    rng = np.random.default_rng(2)
    ycc = np.stack(
        [rng.uniform(-20, 275, 5000), rng.uniform(0, 256, 5000), rng.uniform(0, 256, 5000)], axis=-1
    ).astype(np.float32)
    rgb = ycbcr_to_rgb_in_gamut(ycc)
    assert rgb.min() >= 0 and rgb.max() <= 255
    back = rgb_to_ycbcr(rgb)
    np.testing.assert_allclose(back[..., 0], np.clip(ycc[..., 0], 0, 255), atol=1e-3)  # the luma stays
    c_in, c_out = ycc[..., 1:] - 128, back[..., 1:] - 128
    scale = np.linalg.norm(c_out, axis=-1) / np.maximum(np.linalg.norm(c_in, axis=-1), 1e-9)
    assert scale.max() <= 1 + 1e-4  # chroma only shrinks ...
    np.testing.assert_allclose(c_out, c_in * scale[..., None], atol=2e-2)  # ... along its own direction
    inside = (ycbcr_to_rgb(ycc) >= 0).all(-1) & (ycbcr_to_rgb(ycc) <= 255).all(-1)
    assert inside.any() and (~inside).any()
    np.testing.assert_allclose(rgb[inside], ycbcr_to_rgb(ycc)[inside], atol=1e-3)  # in gamut: unchanged


def test_fuse_colour_keeps_the_fused_luma_on_a_hot_spot() -> None:
    """A bright MRI under saturated red: clipping R would drop the luma the fusion made."""
    red = np.zeros((1, 8, 8, 3), np.uint8)
    red[..., 0] = 255  # Y = 76
    mri = np.full((1, 8, 8), 200 / 255, np.float32)
    out = fuse_colour(get_fuser("max"), mri, red)
    y = rgb_to_ycbcr(out)[..., 0]
    assert np.abs(y - 200).max() <= 1  # the fused luma, not the ~137 a clipped red would give
    assert (out[..., 0] > out[..., 1]).all() and (out[..., 0] > out[..., 2]).all()  # still red


def test_fuse_hot_iron_is_fuse_colour_of_the_hot_iron_image() -> None:
    rng = np.random.default_rng(4)
    mri = rng.random((3, 24, 24), dtype=np.float32)
    pet = rng.random((3, 24, 24), dtype=np.float32)
    pet[0, :4] = np.nan  # as apply_hot_iron: NaN is 0
    for name in ("max", "average"):
        got = fuse_hot_iron(get_fuser(name), mri, pet)
        want = fuse_colour(get_fuser(name), mri, apply_hot_iron(pet))
        assert got.dtype == np.uint8 and np.abs(got.astype(int) - want.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="one size"):
        fuse_hot_iron(get_fuser("max"), mri, pet[:, :8])
