"""benchmarks/research/fusion_edge_transfer.py: stage 1 + edges variants and the table on a tiny eval root."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dicomnode.fusion import model as FM
from tests.test_benchmark_fusion_quality import RESEARCH, bench_module
from tests.test_fusion_training import _make_eval


def test_stage1_with_edges_changes_only_what_it_says() -> None:
    mod = bench_module("fusion_edge_transfer", RESEARCH)
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
    mod = bench_module("fusion_edge_transfer", RESEARCH)
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
    assert mod.main(["--eval-root", str(root), "--edge-step", "--predict"]) == 0
    out = capsys.readouterr().out
    assert out.count("stage 1 + step a0.7 g1.1 rim 1 ") == 4  # a row per set and one predicted
    assert out.count("stage 1 + rim 8 ") == 4 and "stage 1 + edges" not in out
    assert "predicted benchmark change over stage 1 (mean of the 3 sets)" in out


def test_predict_averages_the_sets_and_applies_the_rule(capsys: pytest.CaptureFixture[str]) -> None:
    mod = bench_module("fusion_edge_transfer", RESEARCH)
    zero = {k: 0.0 for k in ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM")}

    def row(qabf: float, ssim: float, od: float = 0.4) -> dict[str, float]:
        return {**zero, "Qabf": qabf, "SSIM": ssim, "od": od}

    results = {
        "MRI-PET stored": {"stage 1": row(0, 0, 0.364), "good": row(4.0, 0.2), "flat": row(-1.0, 0.5)},
        "MRI-PET mri-x0.7": {"stage 1": row(0, 0, 0.364), "good": row(3.0, 0.0), "flat": row(5.0, 0.5)},
        "MRI-SPECT moving-x1.7": {"stage 1": row(0, 0, 0.564), "good": row(5.0, 0.1), "flat": row(5.0, 0.5)},
    }
    out = mod.predict(results)
    assert out["good"]["Qabf"] == pytest.approx(4.0) and out["good"]["SSIM"] == pytest.approx(0.1)
    assert out["good"]["slack"] == pytest.approx(0.4)  # SSIM: +0.1 against -0.3 is the smallest
    assert out["good"]["eligible"] is True
    # the same mean Qabf, but it falls on one set: not eligible (the gain must be on every set)
    assert out["flat"]["Qabf"] == pytest.approx(3.0) and out["flat"]["qabf_up_everywhere"] is False
    assert out["flat"]["eligible"] is False and "stage 1" not in out
    results["MRI-PET mri-x0.7"]["good"]["od"] = 0.3  # keeps less MRI than stage 1: not eligible
    assert mod.predict(results)["good"]["eligible"] is False
    printed = capsys.readouterr().out
    assert "predicted benchmark change over stage 1 (mean of the 3 sets)" in printed and "ELIGIBLE" in printed


def test_stage1_with_step_is_the_models_output_step() -> None:
    mod = bench_module("fusion_edge_transfer", RESEARCH)
    from dicomnode.fusion.classical import select_edges_in_overlap

    torch.manual_seed(3)
    a = torch.zeros(1, 1, 40, 40)
    b = torch.zeros(1, 1, 40, 40)
    a[..., 4:36, 4:36] = 0.2 + 0.5 * torch.rand(1, 1, 32, 32)  # MRI: a textured head
    b[..., 12:28, 12:28] = 0.3 + 0.4 * (torch.arange(16) >= 8)  # PET: dimmer left, brighter right
    s = torch.maximum(a, b)
    step = mod.stage1_with_step(a, b, s, 0.7, 1.1, 1)
    expect = FM.keep_lone_rim(a, b, select_edges_in_overlap(a, b, s, 0.7, 1.1, 5), 1).clamp(0, 1)
    torch.testing.assert_close(step, expect)
    rim = mod.stage1_with_step(a, b, s * 1.1, 0.0, 1.0, 1)  # the rim alone
    edge = (a > 0) & (torch.nn.functional.max_pool2d((a <= 0).float(), 3, 1, 1) > 0)
    assert torch.equal(rim[edge], a[edge]) and torch.equal(rim[~edge], (s * 1.1).clamp(0, 1)[~edge])
    # "brighter": the step only near where the PET is also the brighter source
    bright = mod.stage1_with_step(a, b, s, 1.0, 1.0, 0, "brighter")
    far = torch.nn.functional.avg_pool2d(((a > 0) & (b > a)).float(), 11, 1, 5) == 0
    torch.testing.assert_close(bright[far], s[far])
    assert not torch.allclose(bright, s)
    # the high-pass step keeps stage 1's brightness over a large window
    hp = mod.stage1_with_step(a, b, s, 1.0, 1.0, 0, "overlap", 4.0)
    full = mod.stage1_with_step(a, b, s, 1.0, 1.0, 0)
    inner = (..., slice(14, 26), slice(14, 26))
    assert abs(float((hp - s)[inner].mean())) < abs(float((full - s)[inner].mean())) + 1e-6
    assert mod._step_name(0.0, 1.0, 2, "overlap", None) == "stage 1 + rim 2"
    assert mod._step_name(0.9, 1.05, 1, "brighter", None) == "stage 1 + step a0.9 g1.05 brighter rim 1"


def test_calibrated_prediction_uses_the_pet_sets_the_offsets_and_amounts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _make_eval(tmp_path / "eval")
    mod = bench_module("fusion_edge_transfer", RESEARCH)
    torch.manual_seed(0)
    cfg = {"width": 8, "edge_select": [0.7, 1.1, 5], "edge_anchor": "base"}
    cand = tmp_path / "run" / "step-0025.pt"
    cand.parent.mkdir()
    torch.save({"state_dict": FM.build_net(cfg).state_dict(), "config": cfg}, cand)
    spec = f"{cand}@0.5"
    assert mod.main(["--eval-root", str(root), "--quick", "--calibrated", "--weights", str(cand), spec]) == 0
    out = capsys.readouterr().out
    assert "MRI-PET stored (2 val pairs)" in out and "MRI-PET mri-gamma2 (2 val pairs)" in out
    assert "MRI-SPECT" not in out and "mri-x0.7" not in out
    assert "mean of the 2 sets; Qabf -0.45, SSIM -0.25" in out
    # the same network with its step at another amount is another row, and scores differently
    # (named with its run's folder: two rows share the file name)
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.startswith("run/step-0025.pt")}
    assert set(rows) == {"run/step-0025.pt", "run/step-0025.pt@0.5"}
    assert rows["run/step-0025.pt"] != rows["run/step-0025.pt@0.5"]
    assert mod.split_amount("a/b.pt@0.55") == (Path("a/b.pt"), 0.55)
    assert mod.split_amount("a/b.pt") == (Path("a/b.pt"), None)
    for bad in ("a.pt@x", "a.pt@1.5"):
        with pytest.raises(ValueError, match="amount"):
            mod.split_amount(bad)
        assert mod.main(["--eval-root", str(root), "--calibrated", "--weights", bad]) == 2
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": FM.build_net({"width": 8}).state_dict(), "config": {"width": 8}}, plain)
    with pytest.raises(ValueError, match="no edge step"):
        mod._load_nets([f"{plain}@0.5"])


def test_predict_offsets_shift_the_mean_and_the_floor_is_stage1s() -> None:
    mod = bench_module("fusion_edge_transfer", RESEARCH)
    zero = {k: 0.0 for k in ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM")}
    stored = {"stage 1": {**zero, "od": 0.5}, "c": {**zero, "Qabf": 4.0, "SSIM": 0.2, "od": 0.6}}
    dark = {"stage 1": {**zero, "od": 0.4}, "c": {**zero, "Qabf": 5.0, "SSIM": 0.0, "od": 0.45}}
    results = {"MRI-PET stored": stored, "MRI-PET mri-gamma2": dark}
    out = mod.predict(results, offsets=mod.CALIBRATION)
    assert out["c"]["Qabf"] == pytest.approx(4.5 - 0.45) and out["c"]["SSIM"] == pytest.approx(0.1 - 0.25)
    assert out["c"]["slack"] == pytest.approx(-0.15 + 0.3) and out["c"]["eligible"] is False  # 0.15 < 0.3
    assert mod.predict(results, slack=0.1)["c"]["eligible"] is True
    results["MRI-PET mri-gamma2"]["c"]["od"] = 0.39  # below stage 1's 0.4 on the darkened set
    assert mod.predict(results, slack=0.1)["c"]["eligible"] is False
