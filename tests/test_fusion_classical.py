"""Classical fusers: shapes, ranges, exact rules, perfect reconstruction of the pyramid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dicomnode.fusion.base import available_fusers, get_fuser
from dicomnode.fusion.classical import (
    LaplacianPyramidFuser,
    box_filter,
    collapse_pyramid,
    guided_filter,
    laplacian_pyramid,
)

NAMES = ["average", "max", "laplacian-pyramid", "guided-filter"]


def _pair(n: int = 3, h: int = 40, w: int = 33, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.random((n, h, w), dtype=np.float32)
    b = np.zeros((n, h, w), dtype=np.float32)
    b[:, h // 4 : h // 2, w // 4 : w // 2] = 0.9
    return a, b


def test_registered() -> None:
    assert set(NAMES) <= set(available_fusers())


@pytest.mark.parametrize("name", NAMES)
def test_shape_range_dtype(name: str) -> None:
    a, b = _pair()
    out = get_fuser(name).fuse(a, b)
    assert out.shape == a.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("name", NAMES)
def test_identical_inputs_give_the_input(name: str) -> None:
    a, _ = _pair(n=2, h=32, w=32)
    out = get_fuser(name).fuse(a, a)
    np.testing.assert_allclose(out, a, atol=2e-3)


@pytest.mark.parametrize("name", NAMES)
def test_tiny_and_odd_sizes(name: str) -> None:
    a, b = _pair(n=1, h=5, w=7)
    assert get_fuser(name).fuse(a, b).shape == (1, 5, 7)


def test_average_and_max_exact() -> None:
    a, b = _pair()
    np.testing.assert_allclose(get_fuser("average").fuse(a, b), (a + b) / 2, atol=1e-6)
    np.testing.assert_array_equal(get_fuser("max").fuse(a, b), np.maximum(a, b))


def test_batching_does_not_change_results() -> None:
    a, b = _pair(n=5)
    f = get_fuser("laplacian-pyramid")
    whole = f.fuse(a, b)
    f.batch_size = 2
    np.testing.assert_allclose(f.fuse(a, b), whole, atol=1e-6)


def test_pyramid_reconstructs_exactly() -> None:
    x = torch.rand(2, 1, 37, 50, generator=torch.Generator().manual_seed(1))
    pyr = laplacian_pyramid(x, 4)
    assert len(pyr) == 5
    torch.testing.assert_close(collapse_pyramid(pyr), x, atol=1e-5, rtol=0)


def test_pyramid_keeps_the_stronger_edge() -> None:
    # a carries a sharp edge, b is flat: the fused detail must be a's, the level the mean.
    a = np.zeros((1, 64, 64), np.float32)
    a[:, :, 32:] = 1.0
    b = np.full((1, 64, 64), 0.5, np.float32)
    out = LaplacianPyramidFuser().fuse(a, b)
    edge_out = np.abs(np.diff(out[0], axis=1)).max()
    assert edge_out > 0.4  # average would give a 0.5 step spread out; the max-abs rule keeps it
    assert abs(float(out.mean()) - 0.5) < 0.05


def test_box_filter_matches_naive() -> None:
    x = torch.rand(1, 1, 9, 11, generator=torch.Generator().manual_seed(2))
    r = 2
    got = box_filter(x, r)[0, 0]
    xn = x[0, 0].numpy()
    want = np.zeros_like(xn)
    for i in range(9):
        for j in range(11):
            want[i, j] = xn[max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1].mean()
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_guided_filter_with_self_guide_small_eps_is_identity() -> None:
    x = torch.rand(1, 1, 20, 20, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(guided_filter(x, x, 3, 1e-8), x, atol=1e-3, rtol=0)


def test_mismatched_shapes_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="one shape"):
        get_fuser("max").fuse(np.zeros((1, 4, 4), np.float32), np.zeros((1, 4, 5), np.float32))
    with pytest.raises(ValueError, match="N,H,W"):
        get_fuser("max").fuse(np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32))


def test_unknown_base_rule() -> None:
    with pytest.raises(ValueError, match="base rule"):
        LaplacianPyramidFuser(base="median")
