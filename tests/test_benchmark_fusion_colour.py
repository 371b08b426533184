"""benchmarks/fusion_colour.py on a tiny eval root: the in-gamut colour image keeps the fused luma."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.test_benchmark_fusion_quality import bench_module
from tests.test_fusion_training import _blob, _make_eval, _save


def test_fusion_colour_in_gamut_keeps_the_fused_luma(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _make_eval(tmp_path / "eval")
    folder = root / "harvard" / "MRI-PET"
    for name in ("0004", "0005"):  # the val rows: saturated red uptake under a bright MRI
        g = _blob(int(name))
        _save(folder / f"{name}_b.png", np.stack([g, g // 8, g // 8], axis=-1).astype(np.uint8))
        _save(folder / f"{name}_a.png", np.maximum(_blob(3), (g > 0) * np.uint8(210)).astype(np.uint8))
    mod = bench_module("fusion_colour")
    rows = mod.run(root, "max", ("MRI-PET",))["MRI-PET"]
    assert list(rows) == ["fused luma", "sent, RGB clipped", "sent, chroma in gamut"]
    assert rows["sent, chroma in gamut"] == pytest.approx(rows["fused luma"], rel=1e-6)
    assert rows["sent, RGB clipped"]["SD"] < rows["fused luma"]["SD"]  # clipping darkens the bright uptake
    out = capsys.readouterr().out
    assert "MRI-PET (2 val pairs, max)" in out and "|dY|>=2 px %" in out


def test_fusion_colour_times_both_conversions(capsys: pytest.CaptureFixture[str]) -> None:
    got = bench_module("fusion_colour").time_conversions(sizes=(16,), rounds=2)
    assert set(got[16]) == {"RGB clipped", "chroma in gamut"} and all(v > 0 for v in got[16].values())
    assert "16x16:" in capsys.readouterr().out
