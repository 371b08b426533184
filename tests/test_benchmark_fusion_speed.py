"""benchmarks/fusion_speed.py at a tiny size: the entries it times, the PET/SPECT colour path included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.fusion.registry import get_fuser
from tests.test_benchmark_fusion_quality import bench_module


def test_fusion_speed_times_the_colour_path(capsys: pytest.CaptureFixture[str]) -> None:
    mod = bench_module("fusion_speed")
    argv = ["--method", "max", "--sizes", "16", "--batches", "2", "--min-seconds", "0.01"]
    assert mod.main([*argv, "--modalities", "general", "PT+colour", "NM+rgb"]) == 0
    rows = [
        ln.split() for ln in capsys.readouterr().out.splitlines() if ln.strip().endswith(tuple("0123456789"))
    ]
    assert [r[0] for r in rows if r[1:3] == ["16", "2"]] == ["general", "PT+colour", "NM+rgb"]
    for rgb_input in (False, True):
        path = mod.ColourPath(get_fuser("max"), rgb=rgb_input)
        rgb = path.fuse(np.zeros((2, 8, 8), np.float32), np.ones((2, 8, 8), np.float32))
        assert rgb.shape == (2, 8, 8, 3) and rgb.dtype == np.uint8 and (rgb == 255).all()  # Hot Iron top
    with pytest.raises(SystemExit, match="unknown entry"):
        mod.main([*argv, "--modalities", "PT+grey"])


def test_fusion_speed_times_a_weights_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from dicomnode.fusion import model as FM

    mod = bench_module("fusion_speed")
    cand = tmp_path / "cand.pt"
    net = FM.build_net({"width": 8})
    pt = {"state_dict": net.state_dict(), "config": {"width": 8, "edge_select": [0.7, 1.1, 5]}, "meta": {}}
    torch.save({"state_dict": net.state_dict(), "config": {"width": 8}, "per_modality": {"PT": pt}}, cand)
    argv = ["--sizes", "16", "--batches", "2", "--min-seconds", "0.01", "--weights", str(cand)]
    assert mod.main([*argv, "--modalities", "general", "PT"]) == 0
    out = capsys.readouterr().out
    rows = [ln.split() for ln in out.splitlines() if ln.strip().endswith(tuple("0123456789"))]
    assert [r[0] for r in rows if r[1:3] == ["16", "2"]] == ["general", "PT"]
    assert mod.main(["--weights", str(tmp_path / "none.pt")]) == 2
    assert "no weights file" in capsys.readouterr().err
