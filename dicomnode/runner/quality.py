"""Fusion quality of one job: the nine benchmark metrics on a sample of slices, the rule's gate, thumbnails.

The metrics are those of ``fusion/metrics.py`` (EN SD SF AG MI SCD VIF Qabf SSIM) on the 0..255
scale, computed on the windowed inputs as the fuser saw them (the MR, and the CT or the luma of the
Hot Iron PET/SPECT) against the fused image's gray level or luma, averaged over an evenly spaced
sample of slices from the middle of the stack (the ends are mostly air). A gate compares the means
with the rule's minimums and, where asked, with pixel max (the per-pixel maximum of the two
inputs) on the same slices. The thumbnail strip (MR | moving | fused, three slices) is drawn from
the same inputs.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dicomnode.config import QualityGate
from dicomnode.fusion import metrics
from dicomnode.fusion.colour import apply_hot_iron
from dicomnode.fusion.pipeline import FusionResult

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)
THUMB_SIZE = 160  # pixels per tile


def thumbnail_slices(n: int) -> list[int]:
    """The middle slice and one at 30 % and 70 % of the stack."""
    return sorted({min(n - 1, max(0, round(n * f))) for f in (0.3, 0.5, 0.7)}) if n > 0 else []


def sample_slices(n: int, k: int) -> list[int]:
    """``k`` evenly spaced slices over the middle 80 % of ``n`` (all of them when ``n <= k``)."""
    if n <= k:
        return list(range(n))
    lo, hi = int(n * 0.1), max(int(n * 0.1) + 1, math.ceil(n * 0.9) - 1)
    return sorted({int(round(x)) for x in np.linspace(lo, hi, k)})


@dataclass
class QualityReport:
    """Mean metrics over the sampled slices, the gate's baseline and verdict."""

    metrics: dict[str, float]
    slices: list[int]
    pixel_max: dict[str, float] = field(default_factory=dict)
    held_reason: str | None = None
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "metrics": {k: round(v, 4) for k, v in self.metrics.items()},
            "slices": [i + 1 for i in self.slices],  # 1-based, as Instance Numbers are
            "pixel_max": {k: round(v, 4) for k, v in self.pixel_max.items()},
            "held_reason": self.held_reason,
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        """One line for the audit: ``quality SSIM 1.21, Qabf 0.52, ...``."""
        return "quality " + ", ".join(f"{k} {v:.3g}" for k, v in self.metrics.items())


def _sources(reference01: np.ndarray, moving01: np.ndarray, fused: np.ndarray, functional: bool):  # type: ignore[no-untyped-def]
    """(MR, moving, fused) gray images on 0..255 as the metrics take them."""
    a = np.rint(np.clip(reference01, 0, 1) * 255.0)
    if functional:
        b = np.rint(apply_hot_iron(moving01).astype(np.float64) @ LUMA)
        f = fused.astype(np.float64) @ LUMA if fused.ndim == 4 else fused.astype(np.float64)
    else:
        b = np.rint(np.clip(moving01, 0, 1) * 255.0)
        f = fused.astype(np.float64)
    return a, b, f


def _means(values: dict[str, np.ndarray]) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        finite = np.asarray(v, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        out[k] = float(finite.mean()) if finite.size else float("nan")
    return out


def gate_verdict(
    rule_name: str, gate: QualityGate | None, scores: dict[str, float], pixel_max: dict[str, float]
) -> str | None:
    """Why the job is held (below a minimum or below pixel max), or None when it passes."""
    if gate is None:
        return None
    misses = []
    for name, lowest in gate.min.items():
        value = scores.get(name, float("nan"))
        if not value >= lowest:  # NaN fails too
            misses.append(f"{name} {value:.3f} below the minimum {lowest:g}")
    for name in gate.not_worse_than_pixel_max:
        value, base = scores.get(name, float("nan")), pixel_max.get(name, float("nan"))
        if not value >= base:
            misses.append(f"{name} {value:.3f} below pixel max {base:.3f} on the same slices")
    if not misses:
        return None
    return f"quality gate of rule {rule_name}: " + "; ".join(misses)


def assess(
    slices: list[int],
    reference01: np.ndarray,
    moving01: np.ndarray,
    fused: np.ndarray,
    *,
    functional: bool,
    rule_name: str,
    gate: QualityGate | None,
) -> QualityReport:
    """Score the kept slices (``fused``: the job's uint8 slices at ``slices``) and apply the gate."""
    t0 = time.perf_counter()
    a, b, f = _sources(reference01, moving01, fused, functional)
    scores = _means(metrics.evaluate(f, a, b))
    baseline: dict[str, float] = {}
    if gate is not None and gate.not_worse_than_pixel_max:
        wanted = set(gate.not_worse_than_pixel_max)
        baseline = {k: v for k, v in _means(metrics.evaluate(np.maximum(a, b), a, b)).items() if k in wanted}
    reason = gate_verdict(rule_name, gate, scores, baseline)
    return QualityReport(scores, list(slices), baseline, reason, time.perf_counter() - t0)


def thumbnail_strip(
    slices: list[int],
    reference01: np.ndarray,
    moving01: np.ndarray,
    fused: np.ndarray,
    *,
    functional: bool,
    size: int = THUMB_SIZE,
) -> bytes:
    """A PNG: one row per slice in ``slices`` (the middle one and two others), MR | moving | fused."""
    from PIL import Image  # noqa: PLC0415

    rows = []
    for i in range(len(slices)):
        mr = np.repeat((np.clip(reference01[i], 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=-1)
        if functional:
            mov = apply_hot_iron(moving01[i])
        else:
            mov = np.repeat((np.clip(moving01[i], 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=-1)
        fu = fused[i] if fused[i].ndim == 3 else np.repeat(fused[i][..., None], 3, axis=-1)
        row = Image.new("RGB", (3 * size, size))
        for k, t in enumerate((mr, mov, fu)):
            tile = Image.fromarray(np.ascontiguousarray(t))
            f = size / max(tile.width, tile.height)  # up or down, keeping the aspect ratio
            tile = tile.resize(
                (max(1, round(tile.width * f)), max(1, round(tile.height * f))), Image.BILINEAR
            )
            row.paste(tile, (k * size + (size - tile.width) // 2, (size - tile.height) // 2))
        rows.append(row)
    strip = Image.new("RGB", (3 * size, size * max(1, len(rows))))
    for k, row in enumerate(rows):
        strip.paste(row, (0, k * size))
    buf = io.BytesIO()
    strip.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def review(
    result: FusionResult,
    sample: list[int],
    thumbs: list[int],
    *,
    functional: bool,
    rule_name: str,
    gate: QualityGate | None,
) -> tuple[QualityReport | None, bytes | None]:
    """Quality report on ``sample`` (None when empty) and thumbnail PNG of ``thumbs`` from a fused job."""
    if result.kept_reference is None or result.kept_moving is None:
        return None, None
    pos = {s: k for k, s in enumerate(result.kept_slices)}

    def pick(which: list[int]) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
        idx = [i for i in which if i in pos]
        rows = [pos[i] for i in idx]
        return idx, result.kept_reference[rows], result.kept_moving[rows], result.pixels[idx]  # type: ignore[index]

    report = None
    if sample:
        idx, ref, mov, fused = pick(sample)
        report = assess(idx, ref, mov, fused, functional=functional, rule_name=rule_name, gate=gate)
    png = None
    if thumbs:
        idx, ref, mov, fused = pick(thumbs)
        png = thumbnail_strip(idx, ref, mov, fused, functional=functional)
    return report, png
