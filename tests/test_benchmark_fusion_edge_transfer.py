"""benchmarks/fusion_edge_transfer.py: the stage-1 + edges variants and the table on a tiny eval root."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dicomnode.fusion import model as FM
from tests.test_benchmark_fusion_quality import bench_module
from tests.test_fusion_training import _make_eval


def test_stage1_with_edges_changes_only_what_it_says() -> None:
    mod = bench_module("fusion_edge_transfer")
    torch.manual_seed(0)
    a = torch.zeros(1, 1, 32, 32)
    b = torch.zeros(1, 1, 32, 32)
    a[..., :, :20] = torch.rand(1, 1, 32, 20) * 0.5 + 0.1  # MRI: left, textured
    b[..., 8:, 12:] = 0.8  # PET: flat and bright, overlapping the MRI in columns 12..19
    s = torch.maximum(a, b) * 1.05  # a stand-in stage-1 image
    lone = mod.stage1_with_edges(a, b, s, 1.0, None, None)
    only_a = (a > 0) & (b <= 0)
    assert torch.equal(lone[only_a], a[only_a]) and torch.equal(lone[~only_a], s.clamp(0, 1)[~only_a])
    edges = mod.stage1_with_edges(a, b, s, None, 0.5, 1.0)
    inside = (a > 0) & (b > 0)
    assert float((edges[~inside] - s.clamp(0, 1)[~inside]).abs().mean()) < 0.02  # mostly as it was
    # inside the overlap F now carries the MRI's texture: its gradient follows the MRI's there
    fx, mx = torch.diff(edges, dim=-1)[..., 9:, 12:19], torch.diff(a, dim=-1)[..., 9:, 12:19]
    assert float(torch.corrcoef(torch.stack([fx.flatten(), mx.flatten()]))[0, 1]) > 0.8
    # where the MRI's edges are nowhere the stronger, nothing is replaced: F is the stage-1 image
    none = mod.stage1_with_edges(torch.zeros_like(a), b, s, None, 0.5, 1.1)
    assert torch.allclose(none, s.clamp(0, 1) * (b > 0), atol=1e-4)


def test_fusion_edge_transfer_prints_changes_over_stage1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _make_eval(tmp_path / "eval")
    shutil.copytree(root / "harvard" / "MRI-PET", root / "harvard" / "MRI-SPECT")
    mod = bench_module("fusion_edge_transfer")
    torch.manual_seed(0)
    cand = tmp_path / "run" / "step-0025.pt"
    cand.parent.mkdir()
    torch.save({"state_dict": FM.build_net({"width": 8}).state_dict(), "config": {"width": 8}}, cand)
    assert mod.main(["--eval-root", str(root), "--quick", "--weights", str(cand)]) == 0
    out = capsys.readouterr().out
    assert sum(ln.startswith("step-0025.pt ") for ln in out.splitlines()) == 3  # a row per set
    for key in ("MRI-PET stored", "MRI-PET mri-x0.7", "MRI-SPECT moving-x1.7"):
        assert f"{key} (2 val pairs)" in out
    stage1 = [ln.split() for ln in out.splitlines() if ln.startswith("stage 1 ") and "+ " not in ln]
    assert len(stage1) == 3 and all(set(r[2:11]) == {"+0.0"} for r in stage1)  # itself: no change
    assert out.count("gradient-domain") == 3 and out.count("stage 1 + edges l0.05 g1.0 ") == 3
    assert mod.main(["--eval-root", str(root), "--weights", str(tmp_path / "none.pt")]) == 2
    assert mod.main(["--eval-root", str(root), "--quick", "--proxy-cases", "8"]) == 0  # val row 0005 only
    out = capsys.readouterr().out
    assert "MRI-SPECT moving-x1.7 (1 val pairs)" in out and "MRI-PET stored (2 val pairs)" in out
