"""Metrics: hand-computed values, properties, and agreement with a direct scipy port of the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.signal import convolve2d

from dicomnode.fusion import metrics as M


def _img(seed: int, shape: tuple[int, int] = (72, 68)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.zeros(shape)
    base[8:30, 6:20] = 180
    base += rng.normal(0, 20, shape)
    return np.clip(np.rint(base + np.linspace(0, 60, shape[1])[None]), 0, 255)


# --- direct, unbatched ports of the published evaluator's formulas (the oracle) -------------
def _ref_vif_one(ref: np.ndarray, dist: np.ndarray) -> float:
    num = den = 0.0
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        s = n / 5.0
        m = (n - 1) / 2
        y, x = np.ogrid[-m : m + 1, -m : m + 1]
        win = np.exp(-(x * x + y * y) / (2 * s * s))
        win /= win.sum()
        if scale > 1:
            ref = convolve2d(ref, win, mode="valid")[::2, ::2]
            dist = convolve2d(dist, win, mode="valid")[::2, ::2]
        mu1, mu2 = convolve2d(ref, win, mode="valid"), convolve2d(dist, win, mode="valid")
        s1 = np.maximum(convolve2d(ref * ref, win, mode="valid") - mu1 * mu1, 0)
        s2 = np.maximum(convolve2d(dist * dist, win, mode="valid") - mu2 * mu2, 0)
        s12 = convolve2d(ref * dist, win, mode="valid") - mu1 * mu2
        g = s12 / (s1 + 1e-10)
        sv = s2 - g * s12
        g[s1 < 1e-10] = 0
        sv[s1 < 1e-10] = s2[s1 < 1e-10]
        s1[s1 < 1e-10] = 0
        g[s2 < 1e-10] = 0
        sv[s2 < 1e-10] = 0
        sv[g < 0] = s2[g < 0]
        g[g < 0] = 0
        sv[sv <= 1e-10] = 1e-10
        num += np.sum(np.log10(1 + g * g * s1 / (sv + 2)))
        den += np.sum(np.log10(1 + s1 / 2))
    return num / den


def _ref_qabf(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    def grad(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sx = convolve2d(img, np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]), mode="same")
        sy = convolve2d(img, np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]]), mode="same")
        ang = np.full(img.shape, math.pi / 2)
        nz = sx != 0
        ang[nz] = np.arctan(sy[nz] / sx[nz])
        return np.sqrt(sx * sx + sy * sy), ang

    def q(ga: np.ndarray, aa: np.ndarray, gf: np.ndarray, af: np.ndarray) -> np.ndarray:
        G = np.zeros_like(ga)
        G[ga > gf] = gf[ga > gf] / ga[ga > gf]
        G[ga == gf] = gf[ga == gf]
        G[ga < gf] = ga[ga < gf] / gf[ga < gf]
        A = 1 - np.abs(aa - af) / (math.pi / 2)
        return 0.9994 / (1 + np.exp(-15 * (G - 0.5))) * 0.9879 / (1 + np.exp(-22 * (A - 0.8)))

    (ga, aa), (gb, ab), (gf, af) = grad(a), grad(b), grad(f)
    return float(np.sum(q(ga, aa, gf, af) * ga + q(gb, ab, gf, af) * gb) / np.sum(ga + gb))


def _ref_ssim(x: np.ndarray, y: np.ndarray, data_range: float = 2.0) -> float:
    k = np.ones((7, 7)) / 49
    cn = 49 / 48
    ux, uy = convolve2d(x, k, mode="valid"), convolve2d(y, k, mode="valid")
    vx = cn * (convolve2d(x * x, k, mode="valid") - ux * ux)
    vy = cn * (convolve2d(y * y, k, mode="valid") - uy * uy)
    vxy = cn * (convolve2d(x * y, k, mode="valid") - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return float(np.mean((2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))))


def _ref_mi(x: np.ndarray, y: np.ndarray) -> float:
    j, _, _ = np.histogram2d(x.ravel(), y.ravel(), bins=256, range=[[-0.5, 255.5], [-0.5, 255.5]])
    p = j / j.sum()
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / (px @ py)[nz])))


def test_agrees_with_reference_port() -> None:
    a, b = _img(1), _img(2)[::-1]
    f = np.clip(np.rint(0.6 * a + 0.5 * b), 0, 255)
    assert M.vif(f, a, b) == pytest.approx(_ref_vif_one(a, f) + _ref_vif_one(b, f), rel=1e-9)
    assert M.qabf(f, a, b) == pytest.approx(_ref_qabf(f, a, b), rel=1e-9)
    assert M.ssim(f, a, b) == pytest.approx(_ref_ssim(f, a) + _ref_ssim(f, b), rel=1e-9)
    assert M.mi(f, a, b) == pytest.approx(_ref_mi(f, a) + _ref_mi(f, b), rel=1e-9)


def test_hand_values_step_image() -> None:
    img = np.zeros((4, 4))
    img[:, 2:] = 255  # half black, half white
    assert M.en(img) == pytest.approx(1.0)
    assert M.sd(img) == pytest.approx(127.5)
    # one of three horizontal differences per row is 255; no vertical ones
    assert M.sf(img) == pytest.approx(math.sqrt(255**2 / 3))
    # central differences: columns 1 and 2 see 127.5, borders 0 -> mean of |g|/sqrt2
    assert M.ag(img) == pytest.approx((2 * 127.5 / math.sqrt(2)) / 4)
    # MI of an image with itself = its entropy in nats, twice
    assert M.mi(img, img, img) == pytest.approx(2 * math.log(2))


def test_identical_inputs() -> None:
    a = _img(3)
    assert M.ssim(a, a, a) == pytest.approx(2.0)
    assert M.vif(a, a, a) == pytest.approx(2.0)
    assert M.mi(a, a, a) == pytest.approx(2 * M.en(a) * math.log(2))
    # equal strengths give G = g_F (>= 1 on edges), so Q_g saturates at Tg; angles agree exactly
    q_max = 0.9994 * 0.9879 / (1 + math.exp(-22 * 0.2))
    assert M.qabf(a, a, a) == pytest.approx(q_max, abs=2e-3)
    assert M.qabf(a, a, a) <= q_max + 1e-12


def test_constant_images() -> None:
    c = np.full((16, 16), 77.0)
    assert M.en(c) == 0.0 and M.sd(c) == 0.0 and M.sf(c) == 0.0 and M.ag(c) == 0.0
    assert M.mi(c, c, c) == 0.0
    assert M.scd(c, c, c) == 0.0
    # zero-padded Sobel (as the reference) sees the frame of a non-zero constant image
    assert M.qabf(c, c, c) == pytest.approx(_ref_qabf(c, c, c), rel=1e-12)
    z = np.zeros((16, 16))
    assert M.qabf(z, z, z) == 0.0
    assert M.vif(c, c, c) == pytest.approx(2.0)
    assert M.ssim(c, c, c) == pytest.approx(2.0)


def test_symmetry_in_sources() -> None:
    a, b = _img(4), _img(5)
    f = np.maximum(a, b)
    for fn in (M.mi, M.scd, M.vif, M.qabf, M.ssim):
        assert fn(f, a, b) == pytest.approx(fn(f, b, a), rel=1e-12), fn.__name__


def test_scd_average_rule() -> None:
    # F = A + B exactly: F-B = A and F-A = B, so both correlations are 1.
    a, b = _img(6) / 2, _img(7) / 2
    assert M.scd(a + b, a, b) == pytest.approx(2.0)


def test_detail_metrics_rise_with_sharpening() -> None:
    a = _img(8)
    smooth = convolve2d(a, np.ones((3, 3)) / 9, mode="same", boundary="symm")
    assert M.sf(a) > M.sf(smooth) and M.ag(a) > M.ag(smooth)


def test_batched_equals_single_and_evaluate_keys() -> None:
    a = np.stack([_img(9), _img(10)])
    b = np.stack([_img(11), _img(12)])
    f = (a + b) / 2
    res = M.evaluate(f, a, b)
    assert list(res) == list(M.METRIC_NAMES)
    assert all(v.shape == (2,) for v in res.values())
    fr = np.rint(f[1])
    assert res["VIF"][1] == pytest.approx(M.vif(fr, a[1], b[1]))
    assert res["SSIM"][1] == pytest.approx(M.ssim(fr, a[1], b[1]))


def test_bad_shapes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="one shape"):
        M.mi(np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(ValueError, match=r"\(H,W\)"):
        M.en(np.zeros(5))


def test_overlap_detail_counts_only_where_both_sources_have_signal() -> None:
    a = np.zeros((40, 40))
    b = np.zeros((40, 40))
    rng = np.random.default_rng(3)
    a[:, :30] = rng.integers(20, 250, (40, 30))  # A's anatomy
    b[10:, 10:] = rng.integers(20, 250, (30, 30))  # B's signal; overlap: rows 10.., cols 10..29
    assert M.overlap_detail(a, a, b) == pytest.approx(1.0)  # F = A keeps all of A's structure
    shows_b = np.where(b > 0, b, a)
    assert M.overlap_detail(shows_b, a, b) < 0.2  # B's picture inside the overlap: A's is lost
    outside = a.copy()
    outside[:5] = 0  # changing F where B has no signal does not count
    assert M.overlap_detail(outside, a, b) == pytest.approx(1.0)
    assert M.overlap_detail(b, a, np.zeros_like(b)) == 1.0  # no overlap: nothing to keep
    both = M.overlap_detail(np.stack([a, shows_b]), np.stack([a, a]), np.stack([b, b]))
    assert both.shape == (2,) and both[0] == pytest.approx(1.0) and both[1] < 0.2
    assert "overlap_detail" not in M.METRIC_NAMES  # ours, not one of the benchmark's nine


def test_qabf_regions_add_up_to_qabf_and_place_the_terms() -> None:
    rng = np.random.default_rng(5)
    a = np.zeros((40, 40))
    b = np.zeros((40, 40))
    a[:, :30] = rng.integers(20, 120, (40, 30))  # A: left 30 columns, dim
    b[10:, 10:] = rng.integers(130, 250, (30, 30))  # B: bright, overlaps A in rows 10.., cols 10..29
    for f in (np.maximum(a, b), (a + b) / 2, a, rng.integers(0, 256, (40, 40)).astype(float)):
        parts = M.qabf_regions(f, a, b)
        assert tuple(parts) == M.QABF_REGIONS
        assert sum(parts.values()) == pytest.approx(M.qabf(f, a, b), abs=1e-12)
    # F = A: every B edge is lost, so where B is the brighter source F scores less than max does
    at_a, at_max = M.qabf_regions(a, a, b), M.qabf_regions(np.maximum(a, b), a, b)
    assert at_a["both, B brighter"] < at_max["both, B brighter"]
    assert at_a["both, A brighter"] == pytest.approx(0.0)  # B is brighter everywhere both have signal
    batch = M.qabf_regions(np.stack([a, a]), np.stack([a, a]), np.stack([b, b]))
    assert batch["A only"].shape == (2,)
    assert batch["neither"][0] == pytest.approx(at_a["neither"])


def test_vif_regions_add_up_to_vif_and_place_the_windows() -> None:
    rng = np.random.default_rng(6)
    a = np.zeros((64, 64))
    b = np.zeros((64, 64))
    a[:, :44] = rng.integers(20, 120, (64, 44))  # A: left, dim
    b[20:, 20:] = rng.integers(130, 250, (44, 44))  # B: bright, overlaps A in rows 20.., cols 20..43
    for f in (np.maximum(a, b), (a + b) / 2, a, rng.integers(0, 256, (64, 64)).astype(float)):
        parts = M.vif_regions(f, a, b)
        assert set(parts) == {"A", "B"} and tuple(parts["A"]) == M.SIGNAL_REGIONS
        total = sum(parts["A"].values()) + sum(parts["B"].values())
        assert total == pytest.approx(M.vif(f, a, b), abs=1e-12)
    # F = A keeps none of B's information: VIF(B,F) is ~0 in every region; F = max keeps B's where B is
    at_a, at_max = M.vif_regions(a, a, b), M.vif_regions(np.maximum(a, b), a, b)
    assert at_max["B"]["both, B brighter"] > 0.2 > abs(at_a["B"]["both, B brighter"])
    assert at_max["A"]["both, A brighter"] == pytest.approx(0.0)  # B is brighter wherever both have signal
    flat = M.vif_regions(a, a, np.zeros_like(b))  # a source without variance counts 1, in "neither"
    assert flat["B"]["neither"] == pytest.approx(1.0) and flat["B"]["A only"] == 0.0
    batch = M.vif_regions(np.stack([a, f]), np.stack([a, a]), np.stack([b, b]))
    assert batch["A"]["A only"].shape == (2,)


def test_ssim_regions_add_up_to_ssim_and_place_the_windows() -> None:
    rng = np.random.default_rng(8)
    a = np.zeros((48, 48))
    b = np.zeros((48, 48))
    a[4:44, 4:36] = rng.integers(20, 120, (40, 32))  # A: a dim head
    b[16:40, 16:40] = rng.integers(130, 250, (24, 24))  # B: bright, overlapping A
    for f in (np.maximum(a, b), (a + b) / 2, a, rng.integers(0, 256, (48, 48)).astype(float)):
        parts = M.ssim_regions(f, a, b)
        assert set(parts) == {"A", "B"} and tuple(parts["A"]) == M.SIGNAL_REGIONS
        total = sum(parts["A"].values()) + sum(parts["B"].values())
        assert total == pytest.approx(M.ssim(f, a, b), abs=1e-12)
    # F = A: SSIM(F,A) is 1 in every window, so its parts are the regions' window shares
    at_a = M.ssim_regions(a, a, b)
    assert sum(at_a["A"].values()) == pytest.approx(1.0)
    # F = max copies B where B is brighter: SSIM(F,B) is larger there than for F = A
    at_max = M.ssim_regions(np.maximum(a, b), a, b)
    assert at_max["B"]["both, B brighter"] > at_a["B"]["both, B brighter"] + 0.05
    # a faint A speck in the air, 2 grey levels off in F: the 8 windows around it that hold nothing
    # else lose ~0.2 each (the constants of data_range=2 are negligible), all in "neither"
    rim = a.copy()
    rim[1, 44] = 3.0
    moved = rim.copy()
    moved[1, 44] = 5.0
    kept, lost = M.ssim_regions(rim, rim, b), M.ssim_regions(moved, rim, b)
    assert kept["A"]["neither"] - lost["A"]["neither"] > 8 * 0.1 / (42 * 42)
    assert kept["A"]["A only"] == pytest.approx(lost["A"]["A only"])
    batch = M.ssim_regions(np.stack([a, a]), np.stack([a, a]), np.stack([b, b]))
    assert batch["A"]["A only"].shape == (2,)
    with pytest.raises(ValueError, match="7x7"):
        M.ssim_regions(a[:5, :5], a[:5, :5], b[:5, :5])


def test_en_black_air_bound_caps_every_image_that_keeps_the_air_one_level() -> None:
    rng = np.random.default_rng(7)
    a = np.zeros((64, 64))
    b = np.zeros((64, 64))
    a[:, :24] = rng.integers(1, 256, (64, 24))
    b[:, 16:32] = rng.integers(1, 256, (64, 16))  # air (both 0): columns 32.., z = 0.5
    bound = M.en_black_air_bound(a, b)
    assert bound == pytest.approx(1 + 0.5 * np.log2(255))  # H2(0.5) = 1 bit
    for f in (np.maximum(a, b), (a + b) / 2, rng.integers(0, 256, (64, 64)) * (a + b > 0)):
        assert M.en(f) <= bound + 1e-9
    spread = np.zeros((64, 64))  # foreground spread evenly over levels 1..255 (as far as 2048 pixels go)
    spread[:, :32] = (np.arange(2048).reshape(64, 32) % 255) + 1
    assert M.en(spread) == pytest.approx(bound, abs=0.01)
    noisy_air = rng.integers(0, 256, (64, 64))  # a method painting noise into the air exceeds it
    assert M.en(noisy_air) > bound
    assert M.en_black_air_bound(a + 1, b) == 8.0  # no air: no cap below 8 bits
    assert M.en_black_air_bound(np.stack([a, a + 1]), np.stack([b, b])).shape == (2,)
