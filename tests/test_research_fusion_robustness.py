"""benchmarks/research/fusion_robustness.py, tiny eval root: firsts, overlap_detail, changes over stage 1."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch

from dicomnode.fusion import model as FM
from tests.test_benchmark_fusion_quality import RESEARCH, bench_module
from tests.test_fusion_training import _make_eval


def test_fusion_robustness_prints_detail_and_changes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _make_eval(tmp_path / "eval")
    torch.manual_seed(0)
    extra = tmp_path / "cand.pt"
    meta = {"pair_type": "MRI-PET"}
    torch.save(
        {"state_dict": FM.build_net({"width": 8}).state_dict(), "config": {"width": 8}, "meta": meta}, extra
    )
    mod = bench_module("fusion_robustness", RESEARCH)
    argv = ["--eval-root", str(root), "--types", "MRI-PET", "--conditions", "stored", "mri-x0.7"]
    assert mod.main([*argv, "--changes", "--weights", str(extra)]) == 0
    out = capsys.readouterr().out
    assert "beats every classical fuser" in out and "overlap_detail" in out and "cand.pt" in out
    changes = out[out.index("change over the stage-1 model") :].splitlines()[1:]
    stage1 = [ln for ln in changes if ln.startswith("general (stage 1)")]
    assert len(stage1) == 2 and all(set(ln.split()[-9:]) == {"+0.0"} for ln in stage1)  # itself: no change
    assert len([ln for ln in changes if ln.startswith("cand.pt")]) == 2  # one row per condition
    assert mod.main(argv) == 0 and "change over" not in capsys.readouterr().out  # only on request


def _run_pet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *flags: str
) -> tuple[ModuleType, list[str], str]:
    """fusion_robustness on the tiny eval root's MRI-PET val pairs, stored and MRI x0.7, with ``flags``."""
    root = _make_eval(tmp_path / "eval")
    mod = bench_module("fusion_robustness", RESEARCH)
    argv = ["--eval-root", str(root), "--types", "MRI-PET", "--conditions", "stored", "mri-x0.7"]
    assert mod.main([*argv, *flags]) == 0
    return mod, argv, capsys.readouterr().out


def test_fusion_robustness_splits_qabf_by_region_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    extra = []
    for d in ("r1", "r2"):  # checkpoints kept by two runs share a file name: both are scored
        (tmp_path / d).mkdir()
        state = {"state_dict": FM.build_net({"width": 8}).state_dict(), "config": {"width": 8}}
        torch.save(state, tmp_path / d / "step-0400.pt")
        extra.append(str(tmp_path / d / "step-0400.pt"))
    mod, argv, out = _run_pet(tmp_path, capsys, "--qabf-regions", "--weights", *extra)
    table = out[out.index("Qabf by region") :].splitlines()[2:]
    rows = [
        ln for ln in table if ln.startswith(("max", "general (stage 1)", "step-0400.pt", "r2/step-0400.pt"))
    ]
    assert len(rows) == 8  # max, stage 1 and the two checkpoints, two conditions each
    for ln in rows:
        cells = [float(x) for x in ln.split()[-6:]]
        assert sum(cells[:5]) == pytest.approx(cells[5], abs=5e-4)  # the parts add up to Qabf
    assert mod.main(argv) == 0 and "Qabf by region" not in capsys.readouterr().out


def test_fusion_robustness_splits_vif_by_source_and_region_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mod, argv, out = _run_pet(tmp_path, capsys, "--vif-regions", "--classical", "gradient-domain")
    table = out[out.index("VIF by source and region") :].splitlines()[2:]
    rows = [ln for ln in table if ln.startswith(("max", "general (stage 1)", "gradient-domain"))]
    assert len(rows) == 12  # max, stage 1 and a classical fuser scored as a model: 2 conditions x 2 sources
    for a_row, b_row in zip(rows[::2], rows[1::2], strict=True):
        a_cells = [float(x) for x in a_row.split()[-6:]]
        b_cells = [float(x) for x in b_row.split()[-7:]]
        assert sum(a_cells[:5]) == pytest.approx(a_cells[5], abs=5e-4)  # A's parts add up to VIF(A,F)
        assert sum(b_cells[:5]) == pytest.approx(b_cells[5], abs=5e-4)
        assert a_cells[5] + b_cells[5] == pytest.approx(b_cells[6], abs=1e-3)  # the two make VIF
    assert mod.main(argv) == 0 and "VIF by source" not in capsys.readouterr().out
