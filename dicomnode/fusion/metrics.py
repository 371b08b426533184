"""The nine fusion-quality metrics of the Harvard benchmark (EN SD SF AG MI SCD VIF Qabf SSIM).

Conventions follow the evaluation code behind the published CDDFuse / DDFM / EMMA tables
(MMIF-CDDFuse ``utils/Evaluator.py`` with scikit-image 0.19, scikit-learn 1.1), so our numbers
sit beside theirs:

- images are gray or luma (Y = 0.299R + 0.587G + 0.114B) on the 0..255 scale, float64 inside;
  :func:`evaluate` scores the fused image as it is stored, rounded and clipped to 8 bits;
- EN: Shannon entropy in bits of the 256-bin histogram of the rounded image;
- SD: population standard deviation; SF: sqrt(mean(dx^2) + mean(dy^2)) of forward differences;
- AG: mean of sqrt((gx^2 + gy^2) / 2) with central differences (one-sided at the border);
- MI: MI(F,A) + MI(F,B) in nats from 256-bin joint histograms of the rounded images
  (= sklearn ``mutual_info_score`` on 8-bit labels);
- SCD: corr(F-B, A) + corr(F-A, B) (Aslantas & Bendes); a correlation with a constant is 0;
- VIF: pixel-domain VIF (Sheikh & Bovik), 4 scales, Gaussian windows 17/9/5/3 with sd = N/5,
  'valid' filtering, sigma_n^2 = 2, computed per source and summed; a source without
  variance counts 1 (the reference turns its NaN into 1);
- Qabf: Xydeas-Petrovic with Sobel gradients ('same' zero-padded convolution), arctan angles,
  Tg=0.9994 kg=-15 Dg=0.5 Ta=0.9879 ka=-22 Da=0.8, including the reference's rule that
  equal strengths give G = g_F; 0 when neither source has an edge;
- SSIM: SSIM(F,A) + SSIM(F,B), 7x7 uniform window, sample covariance, K1=0.01, K2=0.03,
  mean over the window-valid interior and ``data_range = 2`` -- what scikit-image 0.19 infers
  for float images, and therefore what the published tables used.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

METRIC_NAMES: tuple[str, ...] = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM")


def _t(x: np.ndarray) -> tuple[np.ndarray, bool]:
    """(N,H,W) float64 array and whether the input was a single (H,W) image."""
    t = np.array(x, dtype=np.float64)
    if t.ndim == 2:
        return t[None], True
    if t.ndim != 3:
        raise ValueError(f"metrics take (H,W) or (N,H,W) images, got shape {t.shape}")
    if t.shape[-1] < 2 or t.shape[-2] < 2:
        raise ValueError(f"images must be at least 2x2, got shape {t.shape}")
    return t, False


def _out(v: np.ndarray, single: bool) -> np.ndarray | float:
    return float(v[0]) if single else v


def _three(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    tf, single = _t(f)
    ta, _ = _t(a)
    tb, _ = _t(b)
    if not tf.shape == ta.shape == tb.shape:
        raise ValueError(f"fused and source images must have one shape: {tf.shape}, {ta.shape}, {tb.shape}")
    return tf, ta, tb, single


def _u8(t: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(t), 0, 255).astype(np.int64)


def en(f: np.ndarray) -> np.ndarray | float:
    """Entropy (bits) of the 8-bit histogram."""
    t, single = _t(f)
    q = _u8(t).reshape(t.shape[0], -1)
    out = np.empty(t.shape[0])
    for i, row in enumerate(q):
        p = np.bincount(row, minlength=256) / row.size
        p = p[p > 0]
        out[i] = -np.sum(p * np.log2(p))
    return _out(out, single)


def sd(f: np.ndarray) -> np.ndarray | float:
    """Standard deviation (contrast)."""
    t, single = _t(f)
    return _out(t.reshape(t.shape[0], -1).std(1), single)


def sf(f: np.ndarray) -> np.ndarray | float:
    """Spatial frequency: RMS of horizontal and vertical forward differences."""
    t, single = _t(f)
    dx = ((t[:, :, 1:] - t[:, :, :-1]) ** 2).mean((1, 2))
    dy = ((t[:, 1:, :] - t[:, :-1, :]) ** 2).mean((1, 2))
    return _out(np.sqrt(dx + dy), single)


def ag(f: np.ndarray) -> np.ndarray | float:
    """Average gradient with central differences."""
    t, single = _t(f)
    gx = np.empty_like(t)
    gy = np.empty_like(t)
    gx[:, :, 0] = t[:, :, 1] - t[:, :, 0]
    gx[:, :, -1] = t[:, :, -1] - t[:, :, -2]
    gx[:, :, 1:-1] = (t[:, :, 2:] - t[:, :, :-2]) / 2
    gy[:, 0, :] = t[:, 1, :] - t[:, 0, :]
    gy[:, -1, :] = t[:, -1, :] - t[:, -2, :]
    gy[:, 1:-1, :] = (t[:, 2:, :] - t[:, :-2, :]) / 2
    return _out(np.sqrt((gx**2 + gy**2) / 2).mean((1, 2)), single)


def _mi_pair(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mutual information in nats of two (N,H,W) images from their 256x256 joint histogram."""
    idx = (_u8(x) * 256 + _u8(y)).reshape(x.shape[0], -1)
    out = np.empty(x.shape[0])
    for i, row in enumerate(idx):
        pxy = (np.bincount(row, minlength=65536) / row.size).reshape(256, 256)
        px = pxy.sum(1, keepdims=True)
        py = pxy.sum(0, keepdims=True)
        nz = pxy > 0
        out[i] = np.sum(pxy[nz] * np.log(pxy[nz] / (px @ py)[nz]))
    return out


def mi(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """MI(F,A) + MI(F,B) in nats."""
    tf, ta, tb, single = _three(f, a, b)
    return _out(_mi_pair(tf, ta) + _mi_pair(tf, tb), single)


def _corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc = x - x.mean((1, 2), keepdims=True)
    yc = y - y.mean((1, 2), keepdims=True)
    den = np.sqrt((xc**2).sum((1, 2)) * (yc**2).sum((1, 2)))
    return np.where(den > 0, (xc * yc).sum((1, 2)) / np.where(den > 0, den, 1.0), 0.0)


def scd(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Sum of the correlations of differences."""
    tf, ta, tb, single = _three(f, a, b)
    return _out(_corr(ta, tf - tb) + _corr(tb, tf - ta), single)


def _gauss1d(n: int) -> np.ndarray:
    s = n / 5.0
    m = (n - 1) / 2.0
    x = np.arange(-m, m + 1)
    g = np.exp(-(x * x) / (2 * s * s))
    return g / g.sum()


def _filt_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """'valid' correlation of (N,H,W) with the separable window g g^T."""
    r = len(g) // 2
    y = ndimage.correlate1d(x, g, axis=2, mode="constant")
    y = ndimage.correlate1d(y, g, axis=1, mode="constant")
    return y[:, r : y.shape[1] - r, r : y.shape[2] - r]


def _vif_windows(ref: np.ndarray, dist: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """Per scale: (num map, den map, offset, stride) of pixel-domain VIF's windows.

    Window ``(i, j)`` of a scale is centred on pixel ``(offset + stride*i, offset + stride*j)`` of
    the original image; ``num``/``den`` are its log10 terms before summing.
    """
    sigma_nsq = 2.0
    eps = 1e-10
    out = []
    r, d = ref, dist
    offset, stride = 0, 1
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        g = _gauss1d(n)
        if scale > 1:
            if min(r.shape[-2:]) < n:
                break
            r = _filt_valid(r, g)[:, ::2, ::2]
            d = _filt_valid(d, g)[:, ::2, ::2]
            offset, stride = offset + stride * (n // 2), stride * 2
        if min(r.shape[-2:]) < n:
            break
        mu1 = _filt_valid(r, g)
        mu2 = _filt_valid(d, g)
        s1 = np.maximum(_filt_valid(r * r, g) - mu1 * mu1, 0)
        s2 = np.maximum(_filt_valid(d * d, g) - mu2 * mu2, 0)
        s12 = _filt_valid(r * d, g) - mu1 * mu2
        gg = s12 / (s1 + eps)
        sv = s2 - gg * s12
        low1 = s1 < eps
        gg[low1] = 0
        sv[low1] = s2[low1]
        s1[low1] = 0
        low2 = s2 < eps
        gg[low2] = 0
        sv[low2] = 0
        neg = gg < 0
        sv[neg] = s2[neg]
        gg[neg] = 0
        sv[sv <= eps] = eps
        num = np.log10(1 + gg * gg * s1 / (sv + sigma_nsq))
        den = np.log10(1 + s1 / sigma_nsq)
        out.append((num, den, offset + stride * (n // 2), stride))
    return out


def _vif_single(ref: np.ndarray, dist: np.ndarray) -> np.ndarray:
    num = np.zeros(ref.shape[0])
    den = np.zeros(ref.shape[0])
    for n_map, d_map, _, _ in _vif_windows(ref, dist):
        num += n_map.sum((1, 2))
        den += d_map.sum((1, 2))
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def vif(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """VIF(A->F) + VIF(B->F), pixel domain, 4 scales."""
    tf, ta, tb, single = _three(f, a, b)
    return _out(_vif_single(ta, tf) + _vif_single(tb, tf), single)


_SOBEL_Y = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float64)
_SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)


def _sobel(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient strength and arctan angle; 'same' convolution with zero padding, as scipy's."""
    sx = ndimage.convolve(t, _SOBEL_X[None], mode="constant")
    sy = ndimage.convolve(t, _SOBEL_Y[None], mode="constant")
    g = np.sqrt(sx * sx + sy * sy)
    zero = sx == 0
    ang = np.where(zero, math.pi / 2, np.arctan(sy / np.where(zero, 1.0, sx)))
    return g, ang


# Xydeas-Petrovic sigmoid constants (T, k, D) for edge strength and orientation
QABF_STRENGTH = (0.9994, -15.0, 0.5)
QABF_ORIENTATION = (0.9879, -22.0, 0.8)


def _q_edge(ga: np.ndarray, aa: np.ndarray, gf: np.ndarray, af: np.ndarray) -> np.ndarray:
    tg, kg, dg = QABF_STRENGTH
    ta, ka, da = QABF_ORIENTATION
    gaf = np.where(ga == gf, gf, np.minimum(ga, gf) / np.maximum(np.maximum(ga, gf), 1e-300))
    aaf = 1 - np.abs(aa - af) / (math.pi / 2)
    qg = tg / (1 + np.exp(kg * (gaf - dg)))
    qa = ta / (1 + np.exp(ka * (aaf - da)))
    return qg * qa


def qabf(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Xydeas-Petrovic edge-transfer quality Q^{AB/F}."""
    tf, ta, tb, single = _three(f, a, b)
    ga, aa = _sobel(ta)
    gb, ab = _sobel(tb)
    gf, af = _sobel(tf)
    qaf = _q_edge(ga, aa, gf, af)
    qbf = _q_edge(gb, ab, gf, af)
    den = (ga + gb).sum((1, 2))
    nume = (qaf * ga + qbf * gb).sum((1, 2))
    return _out(np.where(den > 0, nume / np.where(den > 0, den, 1.0), 0.0), single)


SIGNAL_REGIONS: tuple[str, ...] = ("A only", "B only", "both, A brighter", "both, B brighter", "neither")
QABF_REGIONS = SIGNAL_REGIONS  # the name the Qabf split was introduced under


def _signal_masks(ta: np.ndarray, tb: np.ndarray) -> tuple[np.ndarray, ...]:
    """Boolean (N,H,W) masks of :data:`SIGNAL_REGIONS`: signal (> 0) in A only, B only, both with
    A >= B or B > A, neither. They partition the image."""
    sa, sb = ta > 0, tb > 0
    return (sa & ~sb, sb & ~sa, sa & sb & (ta >= tb), sa & sb & (tb > ta), ~sa & ~sb)


def qabf_regions(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray | float]:
    """Qabf split by where its terms sit; the parts add up to :func:`qabf` (a diagnostic).

    Each pixel's term ``Q_AF g_A + Q_BF g_B`` goes to one region of :data:`SIGNAL_REGIONS`:
    signal (> 0) in A only, in B only, in both with A >= B ("A brighter") or B > A, or in
    neither; each part is divided by the image's total edge weight ``sum(g_A + g_B)``. For
    MRI-PET this shows where a fused image wins or loses Qabf against another: pixel max
    takes the PET's edges wherever the PET is the brighter source.
    """
    tf, ta, tb, single = _three(f, a, b)
    ga, aa = _sobel(ta)
    gb, ab = _sobel(tb)
    gf, af = _sobel(tf)
    term = _q_edge(ga, aa, gf, af) * ga + _q_edge(gb, ab, gf, af) * gb
    den = (ga + gb).sum((1, 2))
    den = np.where(den > 0, den, 1.0)
    parts = zip(SIGNAL_REGIONS, _signal_masks(ta, tb), strict=True)
    return {name: _out((term * m).sum((1, 2)) / den, single) for name, m in parts}


def vif_regions(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, dict[str, np.ndarray | float]]:
    """VIF split by source and by where its windows sit; the parts add up to :func:`vif` (a diagnostic).

    ``{"A": {region: part}, "B": {region: part}}``: VIF(A,F) and VIF(B,F) are each a sum of
    per-window information terms (all scales) over the source's total; each window's term goes
    to the region of :data:`SIGNAL_REGIONS` its centre pixel lies in. A source without variance
    counts 1 (as in :func:`vif`), put in "neither". For MRI-PET this shows where VIF is won:
    VIF(PET, F) is normalised by the PET's own information, which sits in the uptake.
    """
    tf, ta, tb, single = _three(f, a, b)
    masks = _signal_masks(ta, tb)
    out: dict[str, dict[str, np.ndarray | float]] = {}
    for key, ref in (("A", ta), ("B", tb)):
        num = {name: np.zeros(ta.shape[0]) for name in SIGNAL_REGIONS}
        den = np.zeros(ta.shape[0])
        for n_map, d_map, offset, stride in _vif_windows(ref, tf):
            h, w = n_map.shape[1:]
            rows = offset + stride * np.arange(h)
            cols = offset + stride * np.arange(w)
            for name, m in zip(SIGNAL_REGIONS, masks, strict=True):
                num[name] += (n_map * m[:, rows][:, :, cols]).sum((1, 2))
            den += d_map.sum((1, 2))
        flat = den <= 0
        safe = np.where(flat, 1.0, den)
        parts = {name: np.where(flat, 0.0, v / safe) for name, v in num.items()}
        parts["neither"] = parts["neither"] + flat
        out[key] = {name: _out(v, single) for name, v in parts.items()}
    return out


def en_black_air_bound(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Highest EN (bits) any fused image can have that shows one grey level where both sources are 0.

    With a fraction ``z`` of such "air" pixels in one of 256 bins, entropy is largest when the
    other pixels spread evenly over the other 255 bins: ``H2(z) + (1 - z) log2(255)`` (for
    ``z >= 1/256``; 8 bits otherwise). A method scoring higher EN puts varying values (noise or
    texture of its own) where neither source has signal. Not one of the nine.
    """
    _, t, u, single = _three(a, a, b)
    z = ((t <= 0) & (u <= 0)).reshape(t.shape[0], -1).mean(1)
    zc = np.clip(z, 1e-300, 1 - 1e-16)
    h2 = -(zc * np.log2(zc) + (1 - zc) * np.log2(1 - zc))
    bound = np.where(z >= 1 / 256, h2 + (1 - z) * np.log2(255), 8.0)
    return _out(bound, single)


def _box_valid(x: np.ndarray, win: int) -> np.ndarray:
    r = win // 2
    y = ndimage.uniform_filter1d(x, win, axis=2, mode="constant")
    y = ndimage.uniform_filter1d(y, win, axis=1, mode="constant")
    return y[:, r : y.shape[1] - r, r : y.shape[2] - r]


def _ssim_map(x: np.ndarray, y: np.ndarray, data_range: float = 2.0) -> np.ndarray:
    win = 7
    cov_norm = win * win / (win * win - 1)
    ux, uy = _box_valid(x, win), _box_valid(y, win)
    vx = cov_norm * (_box_valid(x * x, win) - ux * ux)
    vy = cov_norm * (_box_valid(y * y, win) - uy * uy)
    vxy = cov_norm * (_box_valid(x * y, win) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def _ssim_pair(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    if min(x.shape[-2:]) < 7:
        raise ValueError(f"SSIM needs images of at least 7x7, got {x.shape[-2:]}")
    return _ssim_map(x, y, data_range).mean((1, 2))


def ssim(f: np.ndarray, a: np.ndarray, b: np.ndarray, data_range: float = 2.0) -> np.ndarray | float:
    """SSIM(F,A) + SSIM(F,B) (``data_range=2`` reproduces the published tables; see module doc)."""
    tf, ta, tb, single = _three(f, a, b)
    return _out(_ssim_pair(tf, ta, data_range) + _ssim_pair(tf, tb, data_range), single)


def ssim_regions(
    f: np.ndarray, a: np.ndarray, b: np.ndarray, data_range: float = 2.0
) -> dict[str, dict[str, np.ndarray | float]]:
    """SSIM split by source and by where its windows sit; the parts add up to :func:`ssim` (a diagnostic).

    ``{"A": {region: part}, "B": {region: part}}``: SSIM(F,A) and SSIM(F,B) are means over the
    7x7 windows; each window's term (over the number of windows) goes to the region of
    :data:`SIGNAL_REGIONS` its centre pixel lies in. With the published ``data_range = 2`` a window
    that is mostly air (the head's rim) scores ~1 only if F copies the source's faint pixels.
    """
    tf, ta, tb, single = _three(f, a, b)
    r = 3  # half the 7x7 window: the map's pixel (i, j) is the window centred on (i + 3, j + 3)
    masks = [m[:, r:-r, r:-r] for m in _signal_masks(ta, tb)]
    out: dict[str, dict[str, np.ndarray | float]] = {}
    for key, ref in (("A", ta), ("B", tb)):
        if min(ref.shape[-2:]) < 7:
            raise ValueError(f"SSIM needs images of at least 7x7, got {ref.shape[-2:]}")
        s = _ssim_map(tf, ref, data_range)
        n = s.shape[1] * s.shape[2]
        out[key] = {
            name: _out((s * m).sum((1, 2)) / n, single) for name, m in zip(SIGNAL_REGIONS, masks, strict=True)
        }
    return out


def overlap_detail(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """How much of A's structure F keeps where *both* sources have signal (not one of the nine).

    Mean SSIM(F, A) (the SSIM convention above) over the 7x7 windows whose 49 pixels are all > 0
    in A and in B: for MRI-PET, the MRI anatomy inside the PET uptake. The nine metrics do not
    ask for it: VIF, Qabf and SSIM(F,B) all rise when F shows B there instead of A (pixel max does
    so wherever the PET is brighter). 1 where there is no such window (nothing to keep).
    """
    tf, ta, tb, single = _three(f, a, b)
    both = (_box_valid((ta > 0).astype(np.float64), 7) > 1 - 1e-9) & (
        _box_valid((tb > 0).astype(np.float64), 7) > 1 - 1e-9
    )
    s = _ssim_map(tf, ta)
    n = both.sum((1, 2))
    v = np.where(n > 0, (s * both).sum((1, 2)) / np.maximum(n, 1), 1.0)
    return _out(v, single)


def evaluate(fused: np.ndarray, a: np.ndarray, b: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    """All nine metrics per image for (N,H,W) (or (H,W)) stacks on the 0..255 scale.

    The fused image is rounded and clipped to 8 bits first (scored as stored); sources are used
    as given (8-bit PNGs, or luma of RGB). Returns ``{name: (N,) array}`` in :data:`METRIC_NAMES` order.
    """
    f3 = np.asarray(fused, dtype=np.float64)
    a3 = np.asarray(a, dtype=np.float64)
    b3 = np.asarray(b, dtype=np.float64)
    if f3.ndim == 2:
        f3, a3, b3 = f3[None], a3[None], b3[None]
    if not (f3.shape == a3.shape == b3.shape) or f3.ndim != 3:
        raise ValueError(f"evaluate needs three stacks of one shape, got {f3.shape}, {a3.shape}, {b3.shape}")
    f3 = np.clip(np.rint(f3), 0, 255)
    out: dict[str, list[np.ndarray]] = {k: [] for k in METRIC_NAMES}
    for i in range(0, f3.shape[0], batch):
        fb, ab, bb = f3[i : i + batch], a3[i : i + batch], b3[i : i + batch]
        vals = {
            "EN": en(fb),
            "SD": sd(fb),
            "SF": sf(fb),
            "AG": ag(fb),
            "MI": mi(fb, ab, bb),
            "SCD": scd(fb, ab, bb),
            "VIF": vif(fb, ab, bb),
            "Qabf": qabf(fb, ab, bb),
            "SSIM": ssim(fb, ab, bb),
        }
        for k, v in vals.items():
            out[k].append(np.atleast_1d(np.asarray(v, dtype=np.float64)))
    return {k: np.concatenate(v) for k, v in out.items()}
