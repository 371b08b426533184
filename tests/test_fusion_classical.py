"""Classical fusers: shapes, ranges, exact rules, perfect reconstruction of the pyramid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dicomnode.fusion.classical import (
    GradientDomainFuser,
    LaplacianPyramidFuser,
    box_filter,
    collapse_pyramid,
    dct_ii,
    dct_ii_inverse,
    divergence,
    forward_grads,
    graft_stronger_edges,
    guided_filter,
    laplacian_pyramid,
    screened_poisson,
    select_edges_in_overlap,
    sobel_strength,
    stronger_edge_image,
)
from dicomnode.fusion.registry import available_fusers, get_fuser

NAMES = ["average", "max", "laplacian-pyramid", "guided-filter", "gradient-domain"]


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


def test_sobel_strength_is_the_zero_padded_sobel_convolution() -> None:
    torch.manual_seed(4)
    x = torch.rand(2, 1, 13, 18)
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    gx = torch.nn.functional.conv2d(x, k.view(1, 1, 3, 3), padding=1)
    gy = torch.nn.functional.conv2d(x, k.t().contiguous().view(1, 1, 3, 3), padding=1)
    torch.testing.assert_close(sobel_strength(x), torch.hypot(gx, gy))


def test_screened_poisson_recovers_an_image_from_its_own_gradient() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 17, 24, dtype=torch.float64)
    gx, gy = forward_grads(x)
    # the divergence is minus the adjoint of the gradient: <grad x, g> = -<x, div g>
    g1, g2 = torch.rand_like(x), torch.rand_like(x)
    g1[..., :, -1] = 0
    g2[..., -1, :] = 0
    assert torch.allclose((gx * g1 + gy * g2).sum(), -(x * divergence(g1, g2)).sum())
    for base in (x, torch.zeros_like(x)):  # exact gradient: the image itself (base only fixes the mean)
        out = screened_poisson(gx, gy, base, 1e-6 if base.abs().sum() == 0 else 0.3)
        m = (-2, -1)
        assert torch.allclose(out - out.mean(m, keepdim=True) + x.mean(m, keepdim=True), x, atol=1e-4)
    # zero gradient: the result is the base smoothed, mean kept
    flat = screened_poisson(torch.zeros_like(x), torch.zeros_like(x), x, 0.5)
    assert torch.allclose(flat.mean((-2, -1)), x.mean((-2, -1))) and flat.std() < x.std()
    with pytest.raises(ValueError, match="lam"):
        screened_poisson(gx, gy, x, 0.0)


def _mirror_fft_poisson(gx: torch.Tensor, gy: torch.Tensor, base: torch.Tensor, lam: float) -> torch.Tensor:
    """The former solver: FFT of the 2H x 2W mirror extension (reference)."""
    h, w = base.shape[-2:]
    rhs = divergence(gx, gy) - lam * base
    ext = torch.cat([rhs, rhs.flip(-1)], dim=-1)
    ext = torch.cat([ext, ext.flip(-2)], dim=-2)
    ky = 2 * torch.cos(torch.pi * torch.arange(2 * h, dtype=torch.float64) / h) - 2
    kx = 2 * torch.cos(torch.pi * torch.arange(2 * w, dtype=torch.float64) / w) - 2
    spec = torch.fft.fft2(ext.to(torch.float64)) / (ky[:, None] + kx[None, :] - lam)
    return torch.fft.ifft2(spec).real[..., :h, :w]


def test_dct_ii_is_the_cosine_sum_and_inverts() -> None:
    torch.manual_seed(0)
    for n in (1, 2, 3, 8, 11):
        x = torch.rand(2, 3, n, dtype=torch.float64)
        j = torch.arange(n, dtype=torch.float64)
        basis = torch.cos(torch.pi * j[:, None] * (2 * j[None, :] + 1) / (2 * n))  # [k, n]
        torch.testing.assert_close(dct_ii(x), x @ basis.T)
        torch.testing.assert_close(dct_ii_inverse(dct_ii(x)), x)


def test_screened_poisson_matches_the_mirror_extension_solver_and_has_gradients() -> None:
    torch.manual_seed(1)
    for h, w in ((17, 24), (1, 5), (6, 1), (64, 33)):
        g1, g2, base = (torch.rand(2, 1, h, w, dtype=torch.float64) for _ in range(3))
        ref = _mirror_fft_poisson(g1, g2, base, 0.05)
        torch.testing.assert_close(screened_poisson(g1, g2, base, 0.05), ref, rtol=0, atol=1e-12)
        f32 = screened_poisson(g1.float(), g2.float(), base.float(), 0.05)
        assert f32.dtype == torch.float32 and (f32.double() - ref).abs().max() < 1e-5
    g1, g2, base = (torch.rand(1, 1, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda x, y, z: screened_poisson(x, y, z, 0.3), (g1, g2, base))


def test_gradient_domain_takes_the_stronger_edge_and_keeps_air_black() -> None:
    a = np.zeros((1, 32, 32), dtype=np.float32)
    b = np.zeros((1, 32, 32), dtype=np.float32)
    a[0, 4:28, 4:28] = 0.3
    a[0, 4:28, 16:28] = 0.5  # A: a weak step inside its square
    b[0, 10:22, 10:22] = 0.9  # B: a strong, brighter square over it
    out = GradientDomainFuser(lam=0.05).fuse(a, b)[0]
    assert out[0, 0] == 0.0 and out[31, 31] == 0.0  # air stays black
    # B's edge is the stronger one at its border: F steps up there
    assert out[15, 12] - out[15, 8] > 0.4
    # A's step survives outside B (F follows A's gradient, not max's flat 0.3 | 0.5 jump alone)
    assert out[6, 18] - out[6, 13] == pytest.approx(0.2, abs=0.05)


def test_graft_stronger_edges_takes_a_and_with_both_also_b() -> None:
    torch.manual_seed(1)
    a = torch.zeros(1, 1, 32, 32)
    b = torch.zeros(1, 1, 32, 32)
    a[..., :, :24] = 0.2 + 0.3 * (torch.arange(24) % 4 == 0)  # A: strong vertical stripes
    b[..., 8:, 8:] = 0.6 + 0.02 * torch.rand(1, 1, 24, 24)  # B: bright, nearly flat, with its own square edge
    base = torch.maximum(a, b)  # inside the overlap the base shows flat B, none of A's stripes
    grafted = graft_stronger_edges(a, b, base, 0.05)
    fx, ax = torch.diff(grafted, dim=-1)[..., 12:28, 10:20], torch.diff(a, dim=-1)[..., 12:28, 10:20]
    assert float(torch.corrcoef(torch.stack([fx.flatten(), ax.flatten()]))[0, 1]) > 0.8  # A's stripes are in
    assert float(grafted[0, 0, 0, 30]) == 0.0  # air stays black
    # with both, F also follows B's gradient where B's edge is the stronger (B's noise between stripes)
    with_b = graft_stronger_edges(a, b, torch.zeros_like(base), 0.05, both=True)
    without_b = graft_stronger_edges(a, b, torch.zeros_like(base), 0.05)
    assert not torch.allclose(with_b, without_b)
    same = graft_stronger_edges(a, torch.zeros_like(b), a, 0.05, both=True)  # no overlap: base kept
    assert torch.allclose(same, a, atol=1e-4)


def test_select_edges_in_overlap_moves_only_the_overlap_towards_the_stronger_edges() -> None:
    torch.manual_seed(2)
    a = torch.zeros(1, 1, 40, 40)
    b = torch.zeros(1, 1, 40, 40)
    a[..., 4:36, 4:36] = 0.3 + 0.3 * (torch.arange(32) % 4 == 0)  # MRI: strong stripes in the head
    b[..., 12:28, 12:28] = 0.7  # PET: a flat, brighter uptake inside it
    base = torch.maximum(a, b) + 0.05  # a base brighter than max; it is clipped to [0, 1] first
    edges = stronger_edge_image(a, b, 1.0)
    gd = torch.from_numpy(GradientDomainFuser(lam=0.05).fuse(a[:, 0].numpy(), b[:, 0].numpy()))[:, None]
    torch.testing.assert_close(edges.clamp(0, 1), gd)  # gain 1: the gradient-domain fuser's image
    assert float((stronger_edge_image(a, b, 1.2) - edges).abs().max()) > 0.01  # the gain scales the edges
    out = select_edges_in_overlap(a, b, base, 1.0, 1.0, soft=0)
    overlap = (a > 0) & (b > 0)
    torch.testing.assert_close(out[overlap], edges[overlap])  # amount 1, no fade: E in the overlap
    lone = (a > 0) & ~overlap
    torch.testing.assert_close(out[lone], base[lone])  # outside it: the base, untouched
    assert bool((out[(a <= 0) & (b <= 0)] == 0).all())  # air black
    # inside the flat uptake the MRI's stripes are back (the base shows flat PET there)
    assert float(torch.diff(out, dim=-1)[..., 18, 14:26].abs().max()) > 0.1
    half = select_edges_in_overlap(a, b, base, 0.5, 1.0, soft=0)
    torch.testing.assert_close(half[overlap], 0.5 * (base[overlap] + edges[overlap]))
    soft = select_edges_in_overlap(a, b, base, 1.0, 1.0, soft=3)
    ring = overlap & (torch.nn.functional.avg_pool2d((~overlap).float(), 7, 1, 3) > 0)
    assert float((soft[ring] - edges[ring]).abs().max()) > 0.01  # the step fades at the uptake's edge
    far = lone & (torch.nn.functional.avg_pool2d(overlap.float(), 7, 1, 3) == 0)
    torch.testing.assert_close(soft[far], base[far])  # further than 3 px from the overlap: the base
    for bad in ((1.5, 1.0, 5), (0.5, 0.0, 5), (0.5, 1.0, -1)):
        with pytest.raises(ValueError, match="amount"):
            select_edges_in_overlap(a, b, base, *bad)
    with pytest.raises(ValueError, match="anchor"):
        select_edges_in_overlap(a, b, base, 0.5, anchor="min")


def test_the_edge_step_held_to_the_base_keeps_its_brightness() -> None:
    a = torch.zeros(1, 1, 64, 64)
    b = torch.zeros(1, 1, 64, 64)
    a[..., 4:60, 4:60] = 0.9 + 0.1 * (torch.arange(56) % 4 == 0)  # a bright MRI with fine stripes
    b[..., 12:52, 12:52] = 0.5  # a dimmer, flat uptake
    base = torch.where((a > 0) & (b > 0), 0.6 * torch.ones_like(a), a)  # a base that shows the uptake dim
    inner = (..., slice(22, 42), slice(22, 42))
    to_max = select_edges_in_overlap(a, b, base, 1.0, 1.0, soft=0)
    to_base = select_edges_in_overlap(a, b, base, 1.0, 1.0, soft=0, anchor="base")
    assert float(to_max[inner].mean()) > 0.85  # held to max: the uptake goes as bright as the MRI
    # held to the base, the brightness stays near the base's beyond a few pixels from the uptake's edge
    assert abs(float(to_base[inner].mean()) - 0.6) < 0.3 * abs(float(to_max[inner].mean()) - 0.6)
    # and the MRI's stripes are in both
    for out in (to_max, to_base):
        assert float(torch.diff(out, dim=-1)[inner].abs().max()) > 0.05
