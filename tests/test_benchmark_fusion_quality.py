"""benchmarks/fusion_quality.py on a tiny synthetic benchmark: it scores a candidate weights file as ours."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.fusion import model as FM
from tests.test_fusion_training import _blob, _save

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESEARCH = BENCHMARKS / "research"


def bench_module(name: str = "fusion_quality", folder: Path = BENCHMARKS):  # noqa: ANN201
    """A script of ``benchmarks/`` (or ``folder``) loaded as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench(root: Path) -> Path:
    for i, t in enumerate(("MRI-CT", "MRI-PET", "MRI-SPECT")):
        d = root / "harvard-cddfuse" / t
        for k in (1, 2):
            _save(d / f"{k:04d}_a.png", _blob(20 * i + k))
            g = _blob(20 * i + k + 7)
            b = g if t == "MRI-CT" else np.stack([g, g // 2, g // 4], axis=-1).astype(np.uint8)
            _save(d / f"{k:04d}_b.png", b)
            if t == "MRI-PET":  # one peer's output for one type; the others have none
                _save(root / "peers" / "IFCNN" / "harvard-cddfuse" / t / f"{k:04d}.png", g)
    return root


def test_fusion_quality_scores_a_candidate_weights_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _bench(tmp_path / "eval")
    torch.manual_seed(0)
    net = FM.build_net({"width": 8})
    cand = tmp_path / "cand.pt"
    torch.save({"state_dict": net.state_dict(), "config": {"width": 8}, "meta": {"version": "t"}}, cand)
    mod = bench_module()
    sheet = tmp_path / "sheet.png"
    argv = ["--eval-root", str(root), "--weights", str(cand), "--device", "cpu", "--sheet", str(sheet)]
    assert mod.main(argv) == 0
    out = capsys.readouterr().out
    assert f"ours (li2021-cnn {cand})" in out and "MRI-PET" in out and sheet.is_file()
    assert out.count("IFCNN") >= 1 and out.count("target") == 3  # a verdict per pair type
    assert out.count("MRI kept where both have signal") == 3  # unranked line per pair type
    assert out.count("EN ceiling with the air kept one level") == 3
    assert "split by region" not in out  # only on request
    assert mod.main([*argv, "--regions"]) == 0
    out = capsys.readouterr().out
    assert out.count("split by region") == 3
    split_rows = [  # "<method>  VIF A|VIF B|Qabf|SSIM A|SSIM B  <five parts>  <sum>"
        row
        for row in (ln.split() for ln in out.splitlines())
        if len(row) >= 7 and row[-7] in ("A", "B", "Qabf") and row[-1].replace(".", "").isdigit()
    ]
    assert len(split_rows) >= 3 * 5 * 4  # 3 types, 5 parts, ours + average/max/Laplacian (+ IFCNN for PET)
    assert sum(row[-8] == "SSIM" for row in split_rows) >= 3 * 2 * 4
    for cells in ([float(x) for x in row[-6:]] for row in split_rows):
        assert sum(cells[:5]) == pytest.approx(cells[5], abs=5e-4)  # the parts add up
    rows = [ln for ln in out.splitlines() if ln.startswith("max ") and "VIF B" in ln]
    assert len(rows) == 3  # max's VIF(B,F) split, per pair type
    assert mod.main([*argv[:2], "--weights", str(tmp_path / "none.pt")]) == 2
    assert "no weights file" in capsys.readouterr().err


def test_fusion_quality_scores_the_delivered_colour_image(tmp_path: Path) -> None:
    """For PET/SPECT the table scores the luma of what the node sends: fuse_colour's RGB."""
    from dicomnode.fusion.colour import fuse_colour
    from dicomnode.fusion.metrics import evaluate
    from dicomnode.fusion.registry import get_fuser
    from dicomnode.fusion.training.data import load_pairs, luma_u8

    root = _bench(tmp_path / "eval")
    d = root / "harvard-cddfuse" / "MRI-PET"
    for k in (1, 2):  # saturated red uptake under a bright MRI: the full chroma does not fit in RGB
        g = _blob(k + 3)
        _save(d / f"{k:04d}_b.png", np.stack([g, g // 8, g // 8], axis=-1).astype(np.uint8))
        _save(d / f"{k:04d}_a.png", np.maximum(_blob(k), (g > 0) * np.uint8(210)).astype(np.uint8))
    tables = bench_module().run(root, "max", "cpu", None)
    ps = load_pairs(root / "harvard-cddfuse" / "MRI-PET", "MRI-PET")
    assert ps.b_rgb is not None
    sent = luma_u8(fuse_colour(get_fuser("max"), ps.a.astype(np.float32) / 255.0, ps.b_rgb))
    want = {k: float(v.mean()) for k, v in evaluate(sent, ps.a, ps.b).items()}
    got = tables["MRI-PET"]["max"]
    assert got == pytest.approx(want, rel=1e-9)
