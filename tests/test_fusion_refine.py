"""Metric-aware refinement: the torch metrics match the reference ones, the reward, `train refine`/`pack`."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dicomnode.fusion import metrics as M
from dicomnode.fusion import model as FM
from dicomnode.fusion.training import metric_loss as L
from dicomnode.fusion.training.cli import add_train_parser
from dicomnode.fusion.training.fit import fit
from dicomnode.fusion.training.refine import (
    DOWN_STRIDE,
    INTENSITY_CONDITIONS,
    KEEP_SATURATED,
    REWARD_WEIGHTS,
    apply_condition,
    case_of,
    darken_mri,
    dim_mri,
    load_split,
    random_intensity,
    refine,
    reward_weights,
    val_score,
)
from tests.test_fusion_training import _blob, _make_eval


def _images(n: int = 3, size: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.stack([_blob(7 * k + 1, size) for k in range(n)]).astype(np.float64)
    b = np.stack([_blob(7 * k + 2, size) for k in range(n)]).astype(np.float64)
    rng = np.random.default_rng(5)
    f = np.clip(np.maximum(a, b) * 0.9 + rng.normal(0, 6, a.shape), 0, 255).round()
    return f, a, b


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x / 255.0).float()[:, None]


def _eval_and_stage1(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny eval root (MRI-PET) and a 2-step stage-1 model trained on its database."""
    root = _make_eval(tmp_path / "eval")
    from dicomnode.fusion.training import build_db as B

    B.build_db(root, tmp_path / "db", ("MRI-PET",), progress=False)
    base = tmp_path / "base.pt"
    fit(tmp_path / "db", base, steps=2, batch_size=2, crop=24, width=8, progress=False, device="cpu")
    return root, base


def test_torch_metrics_match_the_reference_metrics() -> None:
    f, a, b = _images()
    ref = {
        "SD": M.sd(f), "SF": M.sf(f), "AG": M.ag(f), "SCD": M.scd(f, a, b),
        "VIF": M.vif(f, a, b), "Qabf": M.qabf(f, a, b), "SSIM": M.ssim(f, a, b),
        "Detail": M.overlap_detail(f, a, b),
    }  # fmt: skip
    got = L.metric_values(_t(f), _t(a), _t(b))
    assert set(got) == set(ref)
    for k, v in ref.items():
        np.testing.assert_allclose(got[k].double().numpy(), v, rtol=2e-4, atol=2e-4, err_msg=k)


def test_reward_is_zero_at_the_reference_saturates_and_has_gradients() -> None:
    f, a, b = _images()
    ta, tb = _t(a), _t(b)
    mx = torch.maximum(ta, tb)
    w = {"SD": 1.0, "SF": 1.0, "Qabf": 1.0, "SSIM": 1.0, "VIF": 1.0}
    assert abs(float(L.metric_reward(mx, ta, tb, [mx], w))) < 1e-5
    # noise buys SF without limit; the reward for it cannot pass the cap
    noisy = (mx + torch.rand(mx.shape, generator=torch.Generator().manual_seed(0)) * 0.5).clamp(0, 1)
    sf_only = float(L.metric_reward(noisy, ta, tb, [mx], {"SF": 1.0}, cap=0.05))
    assert 0.04 < sf_only <= 0.05 + 1e-6
    # worse than the reference counts linearly (negative)
    assert float(L.metric_reward(mx * 0.5, ta, tb, [mx], {"SD": 1.0})) == pytest.approx(-0.5, abs=1e-3)
    x = _t(f).requires_grad_(True)
    L.metric_reward(x, ta, tb, [mx], w).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # cap 0 is a pure floor: nothing above the reference, the same linear loss below it
    assert float(L.metric_reward(noisy, ta, tb, [mx], {"SF": 1.0}, cap=0.0)) == 0.0
    below = float(L.metric_reward(mx * 0.5, ta, tb, [mx], {"SD": 1.0}, cap=0.0))
    assert below == pytest.approx(-0.5, abs=1e-3)
    with pytest.raises(ValueError, match="cap"):
        L.metric_reward(mx, ta, tb, [mx], {"SD": 1.0}, cap=-0.1)


def test_detail_reward_pulls_the_overlap_back_to_the_mri() -> None:
    rng = np.random.default_rng(3)
    a = np.zeros((2, 40, 40))
    b = np.zeros((2, 40, 40))
    a[:, :, :30] = rng.integers(20, 250, (2, 40, 30))
    b[:, 10:, 10:] = rng.integers(20, 250, (2, 30, 30))
    ta, tb = _t(a), _t(b)
    shows_b = torch.where(tb > 0, tb, ta)  # inside the overlap: B's picture instead of A's
    w = {"Detail": 1.0}
    assert float(L.metric_reward(shows_b, ta, tb, [ta], w)) < -0.5  # far below keeping A
    x = shows_b.clone().requires_grad_(True)
    L.metric_reward(x, ta, tb, [ta], w).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_val_score_counts_strict_wins() -> None:
    refs = {"max": {k: 1.0 for k in M.METRIC_NAMES}}
    ours = {k: (1.1 if i < 4 else 1.0) for i, k in enumerate(M.METRIC_NAMES)}
    firsts, margin = val_score(ours, refs)
    assert firsts == 4 and margin == pytest.approx(0.4)


def test_refine_is_deterministic_leak_free_and_packs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _make_eval(tmp_path / "eval", leak=True)  # train row 0002 holds a benchmark MRI
    from dicomnode.fusion.training import build_db as B

    B.build_db(root, tmp_path / "db", ("MRI-PET",), progress=False)
    base = tmp_path / "base.pt"
    fit(tmp_path / "db", base, steps=2, batch_size=2, crop=24, width=8, progress=False, device="cpu")
    kw = dict(init=base, steps=3, batch_size=2, val_every=1, progress=False, device="cpu")
    m1 = refine(root, "MRI-PET", tmp_path / "r1.pt", **kw)
    refine(root, "MRI-PET", tmp_path / "r2.pt", **kw)
    s1 = torch.load(tmp_path / "r1.pt", weights_only=True)["state_dict"]
    s2 = torch.load(tmp_path / "r2.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    cfg = torch.load(tmp_path / "r1.pt", weights_only=True)["config"]
    assert cfg["down_stride"] == 2 and cfg["keep_saturated"] is False  # the PET defaults
    assert m1["n_train"] == 2 and m1["n_val"] == 2  # the leaked row is left out
    assert not set(m1["train_hashes"]) & B.benchmark_hashes(root)
    assert set(m1["val_references"]) == {"max", "average", "laplacian-pyramid", "guided-filter"}
    assert 0 <= m1["val_firsts"] <= 9
    assert m1["reward_references"] == ["max", "laplacian-pyramid"]  # the PET default
    assert m1["val_conditions"] == list(INTENSITY_CONDITIONS) and m1["intensity_augment"] == 0.0
    with pytest.raises(ValueError, match="reward references"):
        refine(root, "MRI-PET", tmp_path / "r3.pt", references=("median",), **kw)
    with pytest.raises(ValueError, match="unknown pair type"):
        refine(root, "MRI-XR", tmp_path / "r3.pt", **kw)

    parser = argparse.ArgumentParser(prog="dicomnode")
    add_train_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "packed.pt"
    args = parser.parse_args(["train", "pack", "--base", str(base), "--spec", f"PT={tmp_path / 'r1.pt'}",
                              "--out", str(out)])  # fmt: skip
    assert args.func(args) == 0
    fuser = FM.CNNFuser(weights=out)
    assert fuser.modalities == ["PT"]
    pt = fuser.for_modality("PT")
    assert pt is not fuser and "-PT-" in pt.version
    assert fuser.for_modality("CT") is fuser
    packed_meta = torch.load(out, weights_only=True)["meta"]
    assert set(m1["train_hashes"]) <= set(packed_meta["train_hashes"])
    both, only = tmp_path / "both.pt", tmp_path / "only.pt"
    spec_ct = ["--spec", f"CT={tmp_path / 'r1.pt'}"]
    args = parser.parse_args(["train", "pack", "--base", str(out), *spec_ct, "--keep", "--out", str(both)])
    assert args.func(args) == 0 and "['CT', 'PT']" in capsys.readouterr().out
    assert sorted(FM.CNNFuser(weights=both).modalities) == ["CT", "PT"]  # PT kept, CT added
    kept = torch.load(both, weights_only=True)["per_modality"]["PT"]["state_dict"]
    first = torch.load(out, weights_only=True)["per_modality"]["PT"]["state_dict"]
    assert all(torch.equal(kept[k], first[k]) for k in first)
    args = parser.parse_args(["train", "pack", "--base", str(out), *spec_ct, "--out", str(only)])
    assert args.func(args) == 0 and FM.CNNFuser(weights=only).modalities == ["CT"]  # without --keep
    bad = parser.parse_args(["train", "pack", "--base", str(base), "--spec", "MR=x.pt", "--out", str(out)])
    assert bad.func(bad) == 2


def test_shipped_ct_entry_is_what_the_ct_refine_defaults_train() -> None:
    """`dicomnode train refine --type MRI-CT` with no options uses the shipped CT entry's settings."""
    ck = torch.load(FM.WEIGHTS_FILE, weights_only=True)
    ct = ck["per_modality"]["CT"]
    assert ct["config"]["down_stride"] == DOWN_STRIDE["MRI-CT"] == 1
    assert ct["config"]["keep_saturated"] is KEEP_SATURATED["MRI-CT"] is True
    assert ct["meta"]["reward_weights"] == REWARD_WEIGHTS["MRI-CT"]
    assert ct["meta"]["pair_type"] == "MRI-CT" and ct["meta"]["val_firsts"] >= 6
    assert set(DOWN_STRIDE) == set(KEEP_SATURATED) == set(REWARD_WEIGHTS)


def test_shipped_pt_entry_is_the_recorded_refine_run() -> None:
    """The PT entry is the edge-step network its recorded command trains, served for PT only."""
    ck = torch.load(FM.WEIGHTS_FILE, weights_only=True)
    pt = ck["per_modality"]["PT"]
    assert pt["config"]["down_stride"] == 2 and list(pt["config"]["edge_select"]) == [0.55, 1.1, 5]
    meta = pt["meta"]
    assert meta["pair_type"] == "MRI-PET" and meta["best_step"] == 250 and meta["seed"] == 0
    flags = ("--type MRI-PET", "--edge-select 0.55,1.1,5", "--select-target 0.55,1.1,5", "--mri-dim 0.45")
    assert all(f in meta["command"] for f in flags)
    fuser = FM.CNNFuser(device="cpu")
    fpt = fuser.for_modality("PT")
    assert fpt is not fuser and fpt.net.edge_select == (0.55, 1.1, 5)
    assert fuser.for_modality("NM") is fuser and fuser.net.edge_select is None
    a, b = torch.zeros(1, 64, 64), torch.zeros(1, 64, 64)
    a[:, 8:56, 8:56], b[:, 20:44, 20:44] = 0.5, 0.8
    a[:, 30:34, :] = 0.9  # an MRI edge running through the uptake
    out_pt, out_gen = fpt.fuse(a.numpy(), b.numpy()), fuser.fuse(a.numpy(), b.numpy())
    assert out_pt.shape == (1, 64, 64) and float(out_pt[0, 0, 0]) == 0.0  # air stays black
    assert not np.allclose(out_pt, out_gen)


def test_case_of_reads_the_atlas_case() -> None:
    assert case_of("25015") == "25" and case_of("3008") == "3"
    for bad in ("", "12", "ab123"):
        with pytest.raises(ValueError, match="aanlib_id"):
            case_of(bad)


def test_refine_holds_out_a_whole_case_and_keeps_history(tmp_path: Path) -> None:
    root = _make_eval(tmp_path / "eval", leak=True)  # row 0002 (case 7) holds a benchmark MRI
    a7, _, h7 = load_split(root, "MRI-PET", ("train", "val"), case_in={"7"})
    a8, _, h8 = load_split(root, "MRI-PET", ("train", "val"), case_out={"7"})
    assert a7.shape[0] == 2 and a8.shape[0] == 2 and not set(h7) & set(h8)  # 0001+0004 | 0003+0005
    with pytest.raises(ValueError, match="never used"):
        load_split(root, "MRI-PET", ("train", "benchmark"))
    from dicomnode.fusion.training import build_db as B

    B.build_db(root, tmp_path / "db", ("MRI-PET",), progress=False)
    base = tmp_path / "base.pt"
    fit(tmp_path / "db", base, steps=2, batch_size=2, crop=24, width=8, progress=False, device="cpu")
    kw = dict(init=base, steps=3, batch_size=2, val_every=1, progress=False, device="cpu")
    m = refine(root, "MRI-PET", tmp_path / "h.pt", holdout_case="8", pick="last", **kw)
    assert m["holdout_case"] == "8" and m["n_train"] == 2 and m["n_val"] == 2
    assert m["best_step"] == 3 and [h["step"] for h in m["val_history"]] == [0, 1, 2, 3]
    assert all(set(M.METRIC_NAMES) <= set(h) for h in m["val_history"])
    with pytest.raises(ValueError, match="no atlas case '9'"):  # the benchmark row's case
        refine(root, "MRI-PET", tmp_path / "x.pt", holdout_case="9", **kw)
    with pytest.raises(ValueError, match="pick"):
        refine(root, "MRI-PET", tmp_path / "x.pt", pick="best", **kw)


def test_intensity_conditions_and_augmentation() -> None:
    a = (torch.arange(256, dtype=torch.float32) / 255).reshape(1, 1, 16, 16)  # 8-bit levels
    b = a.flip(-1)
    sa, sb = apply_condition(a, b, "stored")
    assert sa is a and sb is b
    da, db = apply_condition(a, b, "mri-x0.7")
    assert torch.equal(db, b) and float(da.max()) == pytest.approx(round(0.7 * 255) / 255)
    assert torch.equal(da * 255, torch.round(da * 255))  # requantised to 8 bits
    ga, gb = apply_condition(a, b, "moving-gamma1.5")
    assert torch.equal(ga, a) and bool((gb <= b + 1e-6).all()) and float(gb.max()) == 1.0
    assert set(INTENSITY_CONDITIONS) >= {"stored", "mri-x0.7", "moving-x0.7"}
    ba, bb = apply_condition(a, b, "moving-x1.7")  # diagnostic only: brighter, clipped at full scale
    assert torch.equal(ba, a) and float(bb.max()) == 1.0 and torch.equal(bb * 255, torch.round(bb * 255))
    assert float(bb[b > 0.7].min()) == 1.0 and float(bb[b == 0].max()) == 0.0
    assert "moving-x1.7" not in INTENSITY_CONDITIONS  # never a condition a checkpoint is picked on
    with pytest.raises(ValueError, match="intensity condition"):
        apply_condition(a, b, "MRI x0.7")
    x = torch.rand(64, 2, 8, 8)
    y = random_intensity(x, 0.4, torch.Generator().manual_seed(1))
    ratio = y.amax((2, 3)) / x.clamp(min=1e-3).amax((2, 3))
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert float(ratio.min()) < 0.8 and float(ratio.max()) <= 1.0 + 1e-5  # gains in [0.6, 1]
    assert torch.equal(y, random_intensity(x, 0.4, torch.Generator().manual_seed(1)))  # seeded


def test_refine_picks_over_intensity_conditions_with_augmentation(tmp_path: Path) -> None:
    root, base = _eval_and_stage1(tmp_path)
    conds = ("stored", "mri-x0.7")
    kw = dict(init=base, steps=2, batch_size=2, val_every=1, progress=False, device="cpu")
    kw["val_conditions"] = conds
    m = refine(root, "MRI-PET", tmp_path / "a.pt", intensity_augment=0.3, **kw)
    assert m["val_conditions"] == list(conds) and m["intensity_augment"] == 0.3
    assert set(m["val_by_condition"]) == set(conds)
    assert m["val_firsts_all"] == sum(m["val_by_condition"][c]["firsts"] for c in conds)
    assert m["val_firsts"] == m["val_by_condition"]["stored"]["firsts"]
    assert all(set(h["by_condition"]) == set(conds) for h in m["val_history"])
    m2 = refine(root, "MRI-PET", tmp_path / "b.pt", intensity_augment=0.3, **kw)
    assert m2["val_by_condition"] == m["val_by_condition"]  # seeded, augmentation included
    floored = refine(root, "MRI-PET", tmp_path / "f.pt", stage1_floor=("SF", "AG"), pick="last", **kw)
    assert floored["stage1_floor"] == ["SF", "AG"] and m["stage1_floor"] == []
    refine(root, "MRI-PET", tmp_path / "p.pt", pick="last", **kw)
    sf_ = torch.load(tmp_path / "f.pt", weights_only=True)["state_dict"]
    sp = torch.load(tmp_path / "p.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(sf_[k], sp[k]) for k in sp)  # the floor changes the reward
    refine(root, "MRI-PET", tmp_path / "d.pt", down_stride=1, **kw)
    fine = torch.load(tmp_path / "d.pt", weights_only=True)
    assert fine["config"]["down_stride"] == 1 and FM.build_net(fine["config"]).down_stride == 1
    with pytest.raises(ValueError, match="stage-1 floor"):
        refine(root, "MRI-PET", tmp_path / "c.pt", stage1_floor=("MI",), **kw)
    with pytest.raises(ValueError, match="intensity augmentation"):
        refine(root, "MRI-PET", tmp_path / "c.pt", intensity_augment=1.5, **kw)
    with pytest.raises(ValueError, match="intensity condition"):
        refine(root, "MRI-PET", tmp_path / "c.pt", **{**kw, "val_conditions": ("dim",)})


def test_dim_mri_dims_each_image_by_its_own_gain_on_the_8_bit_grid() -> None:
    a = torch.rand(64, 1, 8, 8)
    d = dim_mri(a, 0.45, torch.Generator().manual_seed(1))
    assert torch.equal(d, dim_mri(a, 0.45, torch.Generator().manual_seed(1)))  # seeded
    assert torch.allclose(d * 255, (d * 255).round(), atol=1e-4)  # requantised to 8 bits
    gain = (d.sum((1, 2, 3)) / a.sum((1, 2, 3))).numpy()
    assert gain.min() >= 0.55 - 0.01 and gain.max() <= 1.0 + 0.01  # gain in [1 - 0.45, 1]
    assert gain.max() - gain.min() > 0.2  # one gain per image, not one per batch
    assert torch.equal(dim_mri(a, 0.0, torch.Generator()), torch.round(a * 255) / 255)


def test_darken_mri_lowers_mid_tones_per_image_and_keeps_black_and_white() -> None:
    a = torch.rand(64, 1, 8, 8)
    a[:, :, 0, 0], a[:, :, 0, 1] = 0.0, 1.0
    d = darken_mri(a, 2.0, torch.Generator().manual_seed(1))
    assert torch.equal(d, darken_mri(a, 2.0, torch.Generator().manual_seed(1)))  # seeded
    assert torch.allclose(d * 255, (d * 255).round(), atol=1e-4)  # requantised to 8 bits
    assert torch.all(d <= torch.round(a * 255) / 255 + 1e-6)  # a gamma >= 1 never brightens
    assert torch.all(d[:, :, 0, 0] == 0) and torch.all(d[:, :, 0, 1] == 1)  # black and white stay
    # the gamma of each image, from its mean log ratio: one per image, within [1, 2]
    keep = (a > 0.05) & (a < 0.95) & (d > 0)
    g = torch.stack([(d[i][keep[i]].log() / a[i][keep[i]].log()).median() for i in range(64)])
    assert float(g.min()) >= 0.97 and float(g.max()) <= 2.03 and float(g.max() - g.min()) > 0.5
    assert torch.equal(darken_mri(a, 1.0, torch.Generator()), torch.round(a * 255) / 255)


def test_refine_with_mri_dimming_is_seeded_and_recorded(tmp_path: Path) -> None:
    root, base = _eval_and_stage1(tmp_path)
    kw = dict(init=base, steps=2, batch_size=2, val_every=1, progress=False, device="cpu", pick="last")
    m = refine(root, "MRI-PET", tmp_path / "a.pt", mri_dim=0.45, **kw)
    assert m["mri_dim"] == 0.45 and m["intensity_augment"] == 0.0
    refine(root, "MRI-PET", tmp_path / "b.pt", mri_dim=0.45, **kw)
    refine(root, "MRI-PET", tmp_path / "c.pt", **kw)
    sa, sb, sc = (torch.load(tmp_path / f"{n}.pt", weights_only=True)["state_dict"] for n in "abc")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # seeded, dimming included
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)  # the dimming changes the training
    with pytest.raises(ValueError, match="MRI dimming"):
        refine(root, "MRI-PET", tmp_path / "d.pt", mri_dim=1.0, **kw)
    m = refine(root, "MRI-PET", tmp_path / "e.pt", mri_gamma=2.0, **kw)
    assert m["mri_gamma"] == 2.0 and c_meta_gamma(tmp_path / "c.pt") == 1.0
    se = torch.load(tmp_path / "e.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(se[k], sc[k]) for k in se)  # the darkening changes the training
    with pytest.raises(ValueError, match="MRI gamma"):
        refine(root, "MRI-PET", tmp_path / "f.pt", mri_gamma=0.5, **kw)


def c_meta_gamma(path: Path) -> float:
    return float(torch.load(path, weights_only=True)["meta"]["mri_gamma"])


def test_refine_with_an_edge_target_is_seeded_and_recorded(tmp_path: Path) -> None:
    root, base = _eval_and_stage1(tmp_path)
    kw = dict(init=base, steps=2, batch_size=2, val_every=1, progress=False, device="cpu", pick="last")
    m = refine(root, "MRI-PET", tmp_path / "a.pt", edge_target=(0.5, 1.1), **kw)
    assert m["edge_target"] == [0.5, 1.1]
    refine(root, "MRI-PET", tmp_path / "b.pt", edge_target=(0.5, 1.1), **kw)
    c = refine(root, "MRI-PET", tmp_path / "c.pt", **kw)
    assert c["edge_target"] is None
    sa, sb, sc = (torch.load(tmp_path / f"{n}.pt", weights_only=True)["state_dict"] for n in "abc")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # seeded
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)  # the grafted edges change the supervision
    with pytest.raises(ValueError, match="edge_target"):
        refine(root, "MRI-PET", tmp_path / "d.pt", edge_target=(0.0, 1.1), **kw)
    with pytest.raises(ValueError, match="diagnostic condition"):  # never picked on the PET-like proxy
        refine(root, "MRI-PET", tmp_path / "d.pt", val_conditions=("stored", "moving-x1.7"), **kw)


def test_refine_with_a_select_target_and_the_output_flags(tmp_path: Path) -> None:
    root, base = _eval_and_stage1(tmp_path)
    kw = dict(init=base, steps=2, batch_size=2, val_every=1, progress=False, device="cpu", pick="last")
    m = refine(root, "MRI-PET", tmp_path / "a.pt", select_target=(0.7, 1.1, 5), lone_rim=1, **kw)
    assert m["select_target"] == [0.7, 1.1, 5] and m["edge_target"] is None
    refine(root, "MRI-PET", tmp_path / "b.pt", select_target=(0.7, 1.1, 5), lone_rim=1, **kw)
    c = refine(root, "MRI-PET", tmp_path / "c.pt", lone_rim=1, **kw)
    assert c["select_target"] is None
    ca, cb, cc = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in "abc")
    assert all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"])  # seeded
    assert any(not torch.equal(ca["state_dict"][k], cc["state_dict"][k]) for k in ca["state_dict"])
    assert ca["config"]["lone_rim"] == 1 and "edge_select" not in ca["config"]
    # zero steps with the fixed output step: the init weights with the step in their config
    d = refine(root, "MRI-PET", tmp_path / "d.pt", edge_select=(0.7, 1.1, 5), **{**kw, "steps": 0})
    cd = torch.load(tmp_path / "d.pt", weights_only=True)
    assert d["best_step"] == 0 and cd["config"]["edge_select"] == [0.7, 1.1, 5]
    init = torch.load(base, weights_only=True)["state_dict"]
    assert all(torch.equal(cd["state_dict"][k], init[k]) for k in init)
    with pytest.raises(ValueError, match="not both"):
        refine(root, "MRI-PET", tmp_path / "e.pt", select_target=(0.7, 1.1, 5), edge_target=(0.5, 1.1), **kw)
    with pytest.raises(ValueError, match="select_target"):
        refine(root, "MRI-PET", tmp_path / "e.pt", select_target=(0.0, 1.1, 5), **kw)
    with pytest.raises(ValueError, match="lone_rim"):
        refine(root, "MRI-PET", tmp_path / "e.pt", lone_rim=-1, **kw)
    # the edge image held to the image it is added to: another supervision, recorded in the config
    f = refine(root, "MRI-PET", tmp_path / "f.pt", select_target=(0.7, 1.1, 5), edge_anchor="base", **kw)
    cf = torch.load(tmp_path / "f.pt", weights_only=True)
    assert f["edge_anchor"] == "base" and cf["config"]["edge_anchor"] == "base"
    assert any(not torch.equal(cf["state_dict"][k], ca["state_dict"][k]) for k in ca["state_dict"])
    with pytest.raises(ValueError, match="edge_anchor"):
        refine(root, "MRI-PET", tmp_path / "e.pt", edge_anchor="min", **kw)


def test_refine_also_trains_on_another_pair_type_re_lit(tmp_path: Path) -> None:
    import shutil

    root, base = _eval_and_stage1(tmp_path)
    shutil.copytree(root / "harvard" / "MRI-PET", root / "harvard" / "MRI-SPECT")  # cases 7, 8, 9
    kw = dict(init=base, steps=2, batch_size=2, val_every=1, progress=False, device="cpu", pick="last")
    plain = refine(root, "MRI-PET", tmp_path / "a.pt", **kw)
    m = refine(
        root, "MRI-PET", tmp_path / "b.pt", also_train="MRI-SPECT", also_gain=1.7, also_cases={"8"}, **kw
    )
    assert plain["n_train"] == 3 and m["n_train"] == 4  # + the one MRI-SPECT train row of case 8
    assert m["n_val"] == plain["n_val"] == 2  # validation unchanged
    assert m["also_train"] == {"pair_type": "MRI-SPECT", "gain": 1.7, "cases": ["8"]}
    assert plain["also_train"] is None
    with pytest.raises(ValueError, match="another pair type"):
        refine(root, "MRI-PET", tmp_path / "c.pt", also_train="MRI-PET", **kw)
    with pytest.raises(ValueError, match="no train rows for MRI-SPECT"):  # case 9 holds only a benchmark row
        refine(root, "MRI-PET", tmp_path / "c.pt", also_train="MRI-SPECT", also_cases={"9"}, **kw)
    with pytest.raises(ValueError, match="also_gain"):
        refine(root, "MRI-PET", tmp_path / "c.pt", also_train="MRI-SPECT", also_gain=0.0, **kw)


def test_refine_keeps_every_scored_checkpoint_as_a_weights_file(tmp_path: Path) -> None:
    root, base = _eval_and_stage1(tmp_path)
    kw = dict(init=base, steps=3, batch_size=2, val_every=2, progress=False, device="cpu", pick="last")
    m = refine(root, "MRI-PET", tmp_path / "a.pt", keep_checkpoints=tmp_path / "kept", **kw)
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["step-0002.pt", "step-0003.pt"]
    picked = torch.load(tmp_path / "a.pt", weights_only=True)
    last = torch.load(tmp_path / "kept" / "step-0003.pt", weights_only=True)
    assert all(torch.equal(picked["state_dict"][k], last["state_dict"][k]) for k in picked["state_dict"])
    assert m["saved_as"] == "picked" and last["meta"]["saved_as"] == "kept checkpoint"
    two = torch.load(tmp_path / "kept" / "step-0002.pt", weights_only=True)
    assert two["meta"]["best_step"] == 2 and [h["step"] for h in two["meta"]["val_history"]] == [0, 2]
    assert any(not torch.equal(two["state_dict"][k], last["state_dict"][k]) for k in last["state_dict"])
    assert two["meta"]["train_hashes"] == m["train_hashes"]  # each one packs like the picked file
    fuser = FM.CNNFuser(weights=tmp_path / "kept" / "step-0002.pt")
    a = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)
    assert fuser.fuse(a, a).shape == (1, 32, 32)


def test_reward_weight_overrides() -> None:
    w = reward_weights("MRI-PET", ["VIF=4", "SD=0"])
    assert w["VIF"] == 4 and "SD" not in w and w["SSIM"] == 4  # the rest stay as the type's defaults
    cases = [("VIF", "METRIC=W"), ("EN=1", "METRIC=W"), ("VIF=x", "not a number"), ("VIF=-1", ">= 0")]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            reward_weights("MRI-PET", [bad])
    with pytest.raises(ValueError, match="every reward weight is 0"):
        reward_weights("MRI-CT", [f"{k}=0" for k in ("SD", "SF", "AG", "SCD", "VIF", "Qabf", "SSIM")])


def test_val_against_stage1_makes_step_zero_win_nothing(tmp_path: Path) -> None:
    root, base = _eval_and_stage1(tmp_path)
    kw = dict(init=base, steps=1, batch_size=2, val_every=1, progress=False, device="cpu")
    m = refine(root, "MRI-PET", tmp_path / "a.pt", val_against_stage1=True, val_conditions=("stored",), **kw)
    assert m["val_against_stage1"] and "stage1" in m["val_references"]
    step0 = m["val_history"][0]
    assert step0["firsts"] == 0  # step 0 is the stage-1 model itself: it beats itself on nothing
    for k in M.METRIC_NAMES:  # ... and its metrics are the stage1 reference's
        assert step0[k] == pytest.approx(m["val_references"]["stage1"][k])


def test_down_stride_one_reads_the_same_weights_at_a_finer_coefficient_grid() -> None:
    torch.manual_seed(0)
    coarse = FM.build_net({"width": 8})
    with torch.no_grad():
        coarse.head.weight.normal_(0, 0.2)
    fine = FM.build_net({"width": 8, "down_stride": 1})
    fine.load_state_dict(coarse.state_dict())  # same parameters, no new ones
    a, b = torch.rand(2, 1, 64, 48), torch.rand(2, 1, 64, 48)
    full = (2, len(FM.BASIS_NAMES), 64, 48)
    assert fine.coefficients(a, b).shape == coarse.coefficients(a, b).shape == full
    h_fine = F.relu(fine.down(F.relu(fine.stem(torch.zeros(1, 4, 32, 24)))))
    assert h_fine.shape[-2:] == (16, 12)  # 1/4 of the input instead of 1/8
    assert not torch.allclose(fine(a, b), coarse(a, b))
    with pytest.raises(ValueError, match="down_stride"):
        FM.build_net({"down_stride": 4})


def test_refine_cli_passes_the_validation_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    root, base = _eval_and_stage1(tmp_path)
    shutil.copytree(root / "harvard" / "MRI-PET", root / "harvard" / "MRI-SPECT")
    parser = argparse.ArgumentParser(prog="dicomnode")
    add_train_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "r.pt"
    common = ["train", "refine", "--type", "MRI-PET", "--eval-root", str(root), "--init", str(base)]
    args = parser.parse_args(
        [*common, "--out", str(out), "--steps", "1", "--holdout-case", "8", "--pick", "last",
         "--val-conditions", "stored", "mri-x0.7", "--stage1-floor", "SF", "--floor-cap", "0",
         "--down-stride", "1", "--device", "cpu"]
    )  # fmt: skip
    assert args.func(args) == 0 and "first on" in capsys.readouterr().out
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["holdout_case"] == "8" and meta["pick"] == "last" and meta["stage1_floor"] == ["SF"]
    assert meta["floor_cap"] == 0.0 and meta["cap"] == 0.05  # PET's cap; the floor's given apart
    assert meta["val_conditions"] == ["stored", "mri-x0.7"] and meta["val_against_stage1"] is False
    args = parser.parse_args(
        [*common, "--out", str(out), "--steps", "2", "--val-every", "1", "--val-against-stage1",
         "--reward-weight", "VIF=5", "--reward-weight", "Detail=3",
         "--reward-weight", "SD=0", "--mri-dim", "0.3", "--keep-lone-source", "--device", "cpu",
         "--keep-checkpoints", str(tmp_path / "kept"), "--edge-target", "0.5,1.1",
         "--also-train", "MRI-SPECT", "--also-gain", "1.7", "--also-cases", "7", "8"]
    )  # fmt: skip
    assert args.func(args) == 0
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["step-0001.pt", "step-0002.pt"]
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["val_against_stage1"] is True and "stage1" in meta["val_references"]
    assert meta["reward_weights"]["VIF"] == 5 and "SD" not in meta["reward_weights"]
    assert meta["reward_weights"]["Detail"] == 3  # the MRI-structure term is rewardable too
    assert meta["mri_dim"] == 0.3 and [h["step"] for h in meta["val_history"]] == [0, 1, 2]
    assert meta["edge_target"] == [0.5, 1.1] and meta["also_train"]["cases"] == ["7", "8"]
    sel = parser.parse_args([*common, "--out", str(out), "--select-target", "0.7,1.1,5", "--lone-rim", "1"])
    assert sel.select_target == (0.7, 1.1, 5) and sel.lone_rim == 1 and sel.edge_select is None
    assert sel.edge_anchor is None
    assert parser.parse_args([*common, "--out", str(out), "--edge-anchor", "base"]).edge_anchor == "base"
    for text in ("0.7,1.1", "0,1.1,5", "0.7,1.1,2.5", "0.7,-1,5"):
        with pytest.raises(SystemExit):
            parser.parse_args([*common, "--out", str(out), "--edge-select", text])
    assert "AMOUNT,GAIN,SOFT" in capsys.readouterr().err
    both = parser.parse_args([*common, "--out", str(out), "--edge-target", "0.05,1.0,both"])
    assert both.edge_target == (0.05, 1.0, 1.0)
    for text in ("0.5", "0,1.1", "a,b", "0.5,1.1,all"):
        with pytest.raises(SystemExit):
            parser.parse_args([*common, "--out", str(out), "--edge-target", text])
    assert "LAM,GAIN" in capsys.readouterr().err
    bad = parser.parse_args([*common, "--out", str(out), "--val-every", "0"])
    assert bad.func(bad) == 2 and "val_every must be >= 1" in capsys.readouterr().err
    assert torch.load(out, weights_only=True)["config"]["keep_lone_source"] is True
    bad = parser.parse_args([*common, "--out", str(out), "--floor-cap", "-1"])
    assert bad.func(bad) == 2 and "floor cap >= 0" in capsys.readouterr().err
    bad = parser.parse_args([*common, "--out", str(out), "--mri-dim", "1.2"])
    assert bad.func(bad) == 2 and "MRI dimming must be in [0, 1)" in capsys.readouterr().err
    assert parser.parse_args([*common, "--out", str(out), "--mri-gamma", "2"]).mri_gamma == 2.0
    bad = parser.parse_args([*common, "--out", str(out), "--mri-gamma", "5"])
    assert bad.func(bad) == 2 and "MRI gamma must be in [1, 4]" in capsys.readouterr().err
    bad = parser.parse_args([*common, "--out", str(out), "--reward-weight", "MI=2"])
    assert bad.func(bad) == 2 and "METRIC=W" in capsys.readouterr().err
    bad = parser.parse_args([*common, "--out", str(out), "--holdout-case", "99"])
    assert bad.func(bad) == 2 and "no atlas case '99'" in capsys.readouterr().err
    bad = parser.parse_args([*common, "--out", str(out), "--val-conditions", "stored", "dim"])
    assert bad.func(bad) == 2 and "unknown intensity condition 'dim'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "refine", "--help"])
    shown = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
    assert all(name in shown for name in INTENSITY_CONDITIONS)  # the help lists every condition


def test_train_command_records_the_arguments_once() -> None:
    from dicomnode.fusion.training.cli import train_command

    typed = ["train", "refine", "--type", "MRI-PET", "--out", "x.pt"]
    assert train_command("refine", typed) == "dicomnode train refine --type MRI-PET --out x.pt"
    assert (
        train_command("refine", ["refine", "--steps", "5"]) == "dicomnode train refine --steps 5"
    )  # -m form
    assert train_command("fit", ["train", "fit"]) == "dicomnode train fit"
    assert train_command("fit", ["pytest", "-q"]) == ""
