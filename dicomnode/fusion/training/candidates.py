"""Candidate fusers for the training database: the classical rules plus enhanced multi-scale variants.

The database keeps, per training pair, the candidate that scores best on the nine metrics; the
CNN learns those targets. Enhanced variants exist because the target is what the network learns:
pixel max is strong on fidelity (MI, SSIM, Qabf) but weak on contrast and detail (EN, SD, SF,
AG); the variants trade a little fidelity for detail and contrast. Background (both sources 0)
stays 0 in every variant, so pyramid ringing never paints the air around the head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dicomnode.fusion.classical import (
    GuidedFilterFuser,
    LaplacianPyramidFuser,
    _sep_blur,
    gaussian_kernel1d,
)

Candidate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def keep_background(f: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Zero where both sources are zero (no signal in, no signal out)."""
    return torch.where(torch.maximum(a, b) <= 0.5 / 255, torch.zeros_like(f), f)


def unsharp(x: torch.Tensor, amount: float, sigma: float = 1.0) -> torch.Tensor:
    """x + amount * (x - gaussian(x)): boosts fine detail."""
    return x + amount * (x - _sep_blur(x, gaussian_kernel1d(sigma)))


def _gain(fn: Candidate, gain: float) -> Candidate:
    return lambda a, b: fn(a, b) * gain


def _soft_gain(fn: Candidate, alpha: float) -> Candidate:
    """f + alpha f (1 - f): more contrast in the dark and mid tones, no clipping of bright spots."""

    def run(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        f = fn(a, b).clamp(0.0, 1.0)
        return f + alpha * f * (1.0 - f)

    return run


def candidate_set() -> dict[str, Candidate]:
    """Name -> function of (N,1,H,W) tensors in [0,1]; outputs are clipped to [0,1] by the caller."""
    lpmax = LaplacianPyramidFuser(base="max")
    lpwin = LaplacianPyramidFuser(base="max", activity_radius=1)
    lpwin_sharp = LaplacianPyramidFuser(base="max", activity_radius=1, detail_gain=1.3)
    gff = GuidedFilterFuser()

    def bg(f: LaplacianPyramidFuser | GuidedFilterFuser) -> Candidate:
        return lambda a, b: keep_background(f.fuse_tensors(a, b), a, b)

    return {
        "max": torch.maximum,
        "lp-maxbase-window": bg(lpwin),
        "guided-filter": bg(gff),
        "lp-maxbase-x1.15": _gain(bg(lpmax), 1.15),
        "lp-maxbase-window-x1.15": _gain(bg(lpwin), 1.15),
        "lp-maxbase-window-soft0.3": _soft_gain(bg(lpwin), 0.3),
        "lp-maxbase-window-detail1.3-x1.1": _gain(bg(lpwin_sharp), 1.1),
        "guided-filter-x1.15": _gain(bg(gff), 1.15),
        "guided-filter-x1.05": _gain(bg(gff), 1.05),
        "lp-maxbase-window-x1.05": _gain(bg(lpwin), 1.05),
        "lp-maxbase-window-detail1.3-soft0.3": _soft_gain(bg(lpwin_sharp), 0.3),
        "max-unsharp-x1.15": _gain(
            lambda a, b: keep_background(unsharp(torch.maximum(a, b), 0.5), a, b), 1.15
        ),
    }
