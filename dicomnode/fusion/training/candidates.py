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


def candidate_set() -> dict[str, Candidate]:
    """Name -> function of (N,1,H,W) tensors in [0,1]; outputs are clipped to [0,1] by the caller."""
    lpmax = LaplacianPyramidFuser(base="max")
    lpmax_act = LaplacianPyramidFuser(base="max", activity_radius=1)
    gff = GuidedFilterFuser()
    base: dict[str, Candidate] = {
        "max": torch.maximum,
        "lp-maxbase": lambda a, b: keep_background(lpmax.fuse_tensors(a, b), a, b),
        "lp-maxbase-window": lambda a, b: keep_background(lpmax_act.fuse_tensors(a, b), a, b),
        "guided-filter": lambda a, b: keep_background(gff.fuse_tensors(a, b), a, b),
        "max-unsharp": lambda a, b: keep_background(unsharp(torch.maximum(a, b), 0.5), a, b),
    }
    out = {k: v for k, v in base.items() if k != "max-unsharp"}
    for name in ("max", "lp-maxbase", "lp-maxbase-window", "max-unsharp"):
        out[f"{name}-x1.15"] = _gain(base[name], 1.15)
    return out
