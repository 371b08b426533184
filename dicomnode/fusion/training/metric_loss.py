"""Differentiable torch versions of the benchmark's fusion metrics, for metric-aware training.

Each function mirrors the NumPy reference in :mod:`dicomnode.fusion.metrics` (same windows,
constants and conventions; a test checks they agree) but takes (N,1,H,W) tensors in [0,1],
works on the 0..255 scale inside and keeps the graph, so a loss can reward the fused image for
what the metrics measure against the *sources*, not only for resembling a target image. EN and
MI count histogram bins and have no useful gradient; they are not here. Values are per image (N,).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dicomnode.fusion import metrics as ref

_EPS = 1e-10


def _s(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0] * 255.0 if x.dim() == 4 else x * 255.0


def sd(f: torch.Tensor) -> torch.Tensor:
    t = _s(f).flatten(1)
    return (t.var(1, unbiased=False) + _EPS).sqrt()


def sf(f: torch.Tensor) -> torch.Tensor:
    t = _s(f)
    dx = ((t[:, :, 1:] - t[:, :, :-1]) ** 2).mean((1, 2))
    dy = ((t[:, 1:, :] - t[:, :-1, :]) ** 2).mean((1, 2))
    return (dx + dy + _EPS).sqrt()


def ag(f: torch.Tensor) -> torch.Tensor:
    t = _s(f)
    gx = torch.cat(
        [t[:, :, 1:2] - t[:, :, 0:1], (t[:, :, 2:] - t[:, :, :-2]) / 2, t[:, :, -1:] - t[:, :, -2:-1]], 2
    )
    gy = torch.cat([t[:, 1:2] - t[:, 0:1], (t[:, 2:] - t[:, :-2]) / 2, t[:, -1:] - t[:, -2:-1]], 1)
    return ((gx * gx + gy * gy) / 2 + _EPS).sqrt().mean((1, 2))


def _corr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xc = x - x.mean((1, 2), keepdim=True)
    yc = y - y.mean((1, 2), keepdim=True)
    return (xc * yc).sum((1, 2)) / ((xc * xc).sum((1, 2)) * (yc * yc).sum((1, 2)) + _EPS).sqrt()


def scd(f: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    tf, ta, tb = _s(f), _s(a), _s(b)
    return _corr(ta, tf - tb) + _corr(tb, tf - ta)


def _box_valid(x: torch.Tensor, win: int) -> torch.Tensor:
    return F.avg_pool2d(x[:, None], win, stride=1)[:, 0]


def _ssim_pair(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    return _ssim_map(x, y, data_range).mean((1, 2))


def _ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    win = 7
    cov_norm = win * win / (win * win - 1)
    ux, uy = _box_valid(x, win), _box_valid(y, win)
    vx = cov_norm * (_box_valid(x * x, win) - ux * ux)
    vy = cov_norm * (_box_valid(y * y, win) - uy * uy)
    vxy = cov_norm * (_box_valid(x * y, win) - ux * uy)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def overlap_detail(f: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`dicomnode.fusion.metrics.overlap_detail`: SSIM(F, A) where both sources have signal."""
    tf, ta, tb = _s(f), _s(a), _s(b)
    with torch.no_grad():
        inside_a = _box_valid((ta > 0).to(tf.dtype), 7) > 1 - 1e-6
        both = inside_a & (_box_valid((tb > 0).to(tf.dtype), 7) > 1 - 1e-6)
        n = both.sum((1, 2))
    s = _ssim_map(tf, ta)
    kept = (s * both).sum((1, 2)) / n.clamp_min(1)
    return torch.where(n > 0, kept, torch.ones_like(kept))


def ssim(f: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    tf = _s(f)
    return _ssim_pair(tf, _s(a)) + _ssim_pair(tf, _s(b))


def _gauss1d(n: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(ref._gauss1d(n)).float().to(device)


def _filt_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    n = g.numel()
    y = F.conv2d(x[:, None], g.view(1, 1, 1, n))
    return F.conv2d(y, g.view(1, 1, n, 1))[:, 0]


def _vif_single(ref: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    sigma_nsq = 2.0
    num = torch.zeros(ref.shape[0], device=ref.device)
    den = torch.zeros(ref.shape[0], device=ref.device)
    r, d = ref, dist
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        g = _gauss1d(n, ref.device)
        if scale > 1:
            if min(r.shape[-2:]) < n:
                break
            r = _filt_valid(r, g)[:, ::2, ::2]
            d = _filt_valid(d, g)[:, ::2, ::2]
        if min(r.shape[-2:]) < n:
            break
        mu1, mu2 = _filt_valid(r, g), _filt_valid(d, g)
        s1 = (_filt_valid(r * r, g) - mu1 * mu1).clamp_min(0)
        s2 = (_filt_valid(d * d, g) - mu2 * mu2).clamp_min(0)
        s12 = _filt_valid(r * d, g) - mu1 * mu2
        gg = s12 / (s1 + _EPS)
        sv = s2 - gg * s12
        low1 = s1 < _EPS
        low2 = s2 < _EPS
        neg = gg < 0
        gg = torch.where(low1 | low2 | neg, torch.zeros_like(gg), gg)
        sv = torch.where(low1 | neg, s2, sv)
        sv = torch.where(low2 & ~low1, torch.zeros_like(sv), sv)
        sv = sv.clamp_min(_EPS)
        s1 = torch.where(low1, torch.zeros_like(s1), s1)
        num = num + torch.log10(1 + gg * gg * s1 / (sv + sigma_nsq)).sum((1, 2))
        den = den + torch.log10(1 + s1 / sigma_nsq).sum((1, 2))
    return torch.where(den > 0, num / den.clamp_min(_EPS), torch.ones_like(num))


def vif(f: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    tf = _s(f)
    return _vif_single(_s(a), tf) + _vif_single(_s(b), tf)


def _sobel(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # scipy's convolve flips the kernel; conv2d correlates: flip to match the reference
    kx = torch.from_numpy(ref._SOBEL_X[::-1, ::-1].copy()).float().to(t.device).view(1, 1, 3, 3)
    ky = torch.from_numpy(ref._SOBEL_Y[::-1, ::-1].copy()).float().to(t.device).view(1, 1, 3, 3)
    sx = F.conv2d(t[:, None], kx, padding=1)[:, 0]
    sy = F.conv2d(t[:, None], ky, padding=1)[:, 0]
    g = (sx * sx + sy * sy + _EPS).sqrt()
    zero = sx.abs() < 1e-6
    safe = torch.where(zero, torch.ones_like(sx), sx)
    ang = torch.where(zero, torch.full_like(sx, math.pi / 2), torch.atan(sy / safe))
    return g, ang


def _q_edge(ga: torch.Tensor, aa: torch.Tensor, gf: torch.Tensor, af: torch.Tensor) -> torch.Tensor:
    gaf = torch.minimum(ga, gf) / torch.maximum(ga, gf).clamp_min(1e-6)
    aaf = 1 - (aa - af).abs() / (math.pi / 2)
    tg, kg, dg = ref.QABF_STRENGTH
    ta, ka, da = ref.QABF_ORIENTATION
    qg = tg / (1 + torch.exp(kg * (gaf - dg)))
    qa = ta / (1 + torch.exp(ka * (aaf - da)))
    return qg * qa


def qabf(f: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ga, aa = _sobel(_s(a))
    gb, ab = _sobel(_s(b))
    gf, af = _sobel(_s(f))
    ga = ga.detach()
    gb = gb.detach()
    num = (_q_edge(ga, aa, gf, af) * ga + _q_edge(gb, ab, gf, af) * gb).sum((1, 2))
    return num / (ga + gb).sum((1, 2)).clamp_min(_EPS)


METRICS = {
    "SD": sd,
    "SF": sf,
    "AG": ag,
    "SCD": scd,
    "VIF": vif,
    "Qabf": qabf,
    "SSIM": ssim,
    # not one of the nine: MRI structure kept where both sources have signal (a floor, not a prize)
    "Detail": overlap_detail,
}
_ONE_INPUT = {"SD", "SF", "AG"}


def metric_values(f: torch.Tensor, a: torch.Tensor, b: torch.Tensor, names: list[str] | None = None) -> dict:
    """{name: (N,) tensor} for the differentiable metrics in ``names`` (default: all of them)."""
    out = {}
    for k in names or list(METRICS):
        fn = METRICS[k]
        out[k] = fn(f) if k in _ONE_INPUT else fn(f, a, b)  # type: ignore[operator]
    return out


def metric_reward(
    f: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    refs: list[torch.Tensor],
    weights: dict[str, float],
    cap: float = 0.1,
) -> torch.Tensor:
    """How far ``f`` beats the best reference fusion per metric, weighted: a reward to maximise.

    For each metric k: gain_k = m_k(f) / max_r m_k(r) - 1 per image (``refs`` are e.g. pixel max
    and a Laplacian pyramid); below the reference it counts linearly, above it saturates at
    ``cap`` (``cap * tanh(gain / cap)``), so no metric can be bought without limit (sharpening
    noise raises SF and AG forever) and the effort goes to the metrics still behind. ``cap`` 0 is a
    pure floor: only a loss against the best reference counts, nothing above it.
    """
    if cap < 0:
        raise ValueError(f"reward cap must be >= 0, got {cap}")
    names = list(weights)
    with torch.no_grad():
        per_ref = [metric_values(r, a, b, names) for r in refs]
        base = {k: torch.stack([p[k] for p in per_ref]).max(0).values for k in names}
    mine = metric_values(f, a, b, names)
    total = torch.zeros((), device=f.device)
    for k, w in weights.items():
        gain = mine[k] / base[k].clamp_min(1e-3) - 1.0
        above = cap * torch.tanh(gain / cap) if cap > 0 else torch.zeros_like(gain)
        shaped = torch.where(gain > 0, above, gain)
        total = total + w * shaped.mean()
    return total
