"""The CNN fuser: any size, range, background, max prior at init, shipped weights as the default."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dicomnode.fusion import model as M
from dicomnode.fusion import registry
from dicomnode.fusion.registry import default_fuser_name, get_fuser


def _pair(n: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, h, w, generator=g), torch.rand(n, 1, h, w, generator=g)


@pytest.mark.parametrize("shape", [(64, 64), (37, 50), (5, 7), (1, 3)])
def test_any_image_size(shape: tuple[int, int]) -> None:
    a, b = _pair(2, *shape)
    with torch.inference_mode():
        out = M.FusionNet()(a, b)
    assert out.shape == a.shape


def test_untrained_net_is_pixel_max() -> None:
    a, b = _pair(2, 40, 40)
    with torch.inference_mode():
        out = M.FusionNet()(a, b)
    torch.testing.assert_close(out, torch.maximum(a, b), atol=1e-6, rtol=0)


def test_background_stays_zero() -> None:
    net = M.FusionNet()
    with torch.no_grad():
        net.head.bias[M.BASIS_NAMES.index("one")] = 0.3  # a net that would paint the air grey
    a, b = _pair(1, 32, 32)
    a[..., :8, :] = 0
    b[..., :8, :] = 0
    with torch.inference_mode():
        out = net(a, b)
    assert float(out[..., :8, :].abs().max()) == 0.0
    assert float(out[..., 8:, :].min()) > 0.0


def test_keep_saturated_keeps_full_scale_pixels_at_full_scale() -> None:
    torch.manual_seed(0)
    plain = M.FusionNet()
    with torch.no_grad():
        plain.head.weight.normal_(0, 0.3)  # a net that paints texture everywhere
    kept = M.build_net({"keep_saturated": True})
    kept.load_state_dict(plain.state_dict())  # a flag, no new parameters
    a, b = _pair(1, 32, 32)
    b[..., 10:20, 10:20] = 1.0  # bone clipped by the CT window
    a[..., 0:4, :] = 1.0  # a saturated MRI band
    sat = torch.maximum(a, b) >= 1.0 - 0.5 / 255  # 255 of 8 bits
    with torch.inference_mode():
        out_plain, out_kept = plain(a, b), kept(a, b)
    assert float((out_plain[sat] - 1).abs().max()) > 0.05  # without the flag: not full scale there
    assert bool((out_kept[sat] == 1.0).all())
    torch.testing.assert_close(out_kept[~sat], out_plain[~sat])  # everywhere else unchanged
    assert M.build_net({}).keep_saturated is False  # old weights files behave as before


def test_keep_lone_source_shows_the_only_source_with_signal_unchanged() -> None:
    torch.manual_seed(0)
    plain = M.FusionNet()
    with torch.no_grad():
        plain.head.weight.normal_(0, 0.3)  # a net that enhances and mixes everywhere
    kept = M.build_net({"keep_lone_source": True})
    kept.load_state_dict(plain.state_dict())  # a flag, no new parameters
    a, b = _pair(1, 32, 32)
    b[..., :, 16:] = 0.0  # no PET uptake on the right half
    a[..., 0:4, :] = 0.0  # air in the MRI along the top
    only_a, only_b = (b <= 0.5 / 255) & (a > 0.5 / 255), (a <= 0.5 / 255) & (b > 0.5 / 255)
    both = (a > 0.5 / 255) & (b > 0.5 / 255)
    assert only_a.any() and only_b.any() and both.any()
    with torch.inference_mode():
        out_plain, out_kept = plain(a, b), kept(a, b)
    assert float((out_plain[only_a] - a[only_a]).abs().max()) > 0.05  # without the flag: changed
    assert torch.equal(out_kept[only_a], a[only_a]) and torch.equal(out_kept[only_b], b[only_b])
    assert bool((out_kept[(a <= 0.5 / 255) & (b <= 0.5 / 255)] == 0).all())  # no signal: black
    torch.testing.assert_close(out_kept[both], out_plain[both])  # where both have signal: unchanged
    assert M.build_net({}).keep_lone_source is False  # old weights files behave as before


def test_lone_rim_keeps_the_single_source_next_to_the_air() -> None:
    torch.manual_seed(0)
    plain = M.FusionNet()
    with torch.no_grad():
        plain.head.weight.normal_(0, 0.3)  # a net that enhances and mixes everywhere
    rim = M.build_net({"lone_rim": 1})
    rim.load_state_dict(plain.state_dict())  # a flag, no new parameters
    a, b = _pair(1, 32, 32)
    a[..., 0:4, :] = 0.0  # air along the top
    b[..., 0:12, :] = 0.0  # no PET in the top part: the MRI alone from row 4 to 11
    b[..., 0:2, 5] = 0.4  # a PET-only speck in the air
    with torch.inference_mode():
        out_plain, out_rim = plain(a, b), rim(a, b)
    assert float((out_plain[..., 4, :] - a[..., 4, :]).abs().max()) > 0.05  # without the flag: changed
    torch.testing.assert_close(out_rim[..., 4, :], a[..., 4, :], atol=0, rtol=0)  # next to the air: MRI
    torch.testing.assert_close(out_rim[..., 0:2, 5], b[..., 0:2, 5], atol=0, rtol=0)  # the PET speck: the PET
    torch.testing.assert_close(out_rim[..., 6:, :], out_plain[..., 6:, :])  # further in: unchanged
    assert bool((out_rim[..., 0:4, 0:3] == 0).all())  # air black
    assert M.build_net({}).lone_rim == 0  # old weights files behave as before
    with pytest.raises(ValueError, match="lone_rim"):
        M.build_net({"lone_rim": -1})


def test_edge_select_is_a_fixed_output_step_from_the_config() -> None:
    torch.manual_seed(0)
    plain = M.FusionNet()
    with torch.no_grad():
        plain.head.weight.normal_(0, 0.3)
    step = M.build_net({"edge_select": [0.7, 1.1, 5]})
    step.load_state_dict(plain.state_dict())  # no new parameters
    assert step.edge_select == (0.7, 1.1, 5)
    a, b = (0.05 + 0.95 * x for x in _pair(2, 48, 40))  # no near-black pixel but the PET's zeros
    b[..., :, :10] = 0.0  # MRI alone on the left
    with torch.inference_mode():
        out_plain, out_step = plain(a, b), step(a, b)
    from dicomnode.fusion.classical import select_edges_in_overlap

    torch.testing.assert_close(out_step, select_edges_in_overlap(a, b, out_plain, 0.7, 1.1, 5))
    assert M.build_net({}).edge_select is None
    with pytest.raises(ValueError, match="edge_select"):
        M.build_net({"edge_select": [1.5, 1.1, 5]})
    held = M.build_net({"edge_select": [0.7, 1.1, 5], "edge_anchor": "base"})
    held.load_state_dict(plain.state_dict())
    with torch.inference_mode():
        out_held = held(a, b)
    torch.testing.assert_close(out_held, select_edges_in_overlap(a, b, out_plain, 0.7, 1.1, 5, anchor="base"))
    assert M.build_net({}).edge_anchor == "max"
    with pytest.raises(ValueError, match="edge_anchor"):
        M.build_net({"edge_anchor": "min"})


def test_gradients_flow() -> None:
    net = M.FusionNet()
    a, b = _pair(2, 32, 32)
    net(a, b).mean().backward()
    assert net.head.weight.grad is not None and float(net.head.weight.grad.abs().sum()) > 0


def test_fuser_with_saved_weights(tmp_path) -> None:
    net = M.FusionNet(width=8)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": net.state_dict(), "config": {"width": 8}, "meta": {"version": "t1"}}, path)
    f = M.CNNFuser(device="cpu", weights=path)
    assert f.version == "t1" and f.name == M.DEFAULT_MODEL_NAME
    a = np.random.default_rng(0).random((3, 20, 24), dtype=np.float32)
    b = np.random.default_rng(1).random((3, 20, 24), dtype=np.float32)
    out = f.fuse(a, b)
    assert out.shape == a.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    np.testing.assert_allclose(out, np.maximum(a, b), atol=1e-6)  # untrained = max


def test_missing_or_bad_weights_are_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="train fit"):
        M.CNNFuser(weights=tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"nothing": 1}, bad)
    with pytest.raises(ValueError, match="weights file"):
        M.CNNFuser(weights=bad)


def test_default_is_the_model_when_weights_ship() -> None:
    assert registry._DEFAULT_WEIGHTS == M.WEIGHTS_FILE and registry.DEFAULT_MODEL == M.DEFAULT_MODEL_NAME
    if not M.weights_available():
        assert default_fuser_name() == "laplacian-pyramid"
        pytest.skip("no weights shipped in this checkout")
    assert default_fuser_name() == M.DEFAULT_MODEL_NAME
    f = get_fuser("default")
    assert isinstance(f, M.CNNFuser)
    a = np.zeros((1, 16, 16), np.float32)
    b = np.zeros((1, 16, 16), np.float32)
    a[0, 4:12, 4:12] = 0.8
    out = f.fuse(a, b)
    assert out[0, 0, 0] == 0.0 and out[0, 8, 8] > 0.3


def test_shipped_weights_are_small() -> None:
    if not M.weights_available():
        pytest.skip("no weights shipped in this checkout")
    assert M.WEIGHTS_FILE.stat().st_size < 5 * 1024 * 1024


def test_mix_with_max_is_the_blend() -> None:
    """Rescaling the head gives exactly alpha * net + (1 - alpha) * max."""
    torch.manual_seed(0)
    net = M.FusionNet(width=8)
    with torch.no_grad():
        net.head.weight.normal_(0, 0.1)
    a, b = _pair(2, 24, 20)
    with torch.no_grad():
        ref = 0.7 * net(a, b) + 0.3 * torch.maximum(a, b)
        out = M.mix_with_max(net, 0.7)(a, b)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_for_modality_uses_per_modality_weights(tmp_path) -> None:
    """A checkpoint with per_modality entries: CT gets its own net, unknown modalities the general one."""
    general = M.FusionNet(width=8)
    ct = M.FusionNet(width=8)
    with torch.no_grad():
        ct.head.bias.zero_()
        ct.head.bias[M.BASIS_NAMES.index("a")] = 1.0  # CT specialisation: returns the MRI
    path = tmp_path / "w.pt"
    torch.save(
        {
            "state_dict": general.state_dict(),
            "config": {"width": 8},
            "meta": {"version": "g"},
            "per_modality": {
                "CT": {"state_dict": ct.state_dict(), "config": {"width": 8}, "meta": {"version": "c"}}
            },
        },
        path,
    )
    f = M.CNNFuser(device="cpu", weights=path)
    a = np.random.default_rng(0).random((2, 16, 16), dtype=np.float32) * 0.5 + 0.1
    b = np.random.default_rng(1).random((2, 16, 16), dtype=np.float32) * 0.5 + 0.1
    assert f.modalities == ["CT"]
    assert f.for_modality("PT") is f and f.for_modality("NM") is f
    fct = f.for_modality("ct")
    assert fct is not f and fct.version == "g-CT-c"
    np.testing.assert_allclose(fct.fuse(a, b), a, atol=1e-6)
    np.testing.assert_allclose(f.fuse(a, b), np.maximum(a, b), atol=1e-6)  # the general net is untouched
    assert fct.for_modality("CT") is fct
