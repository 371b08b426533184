"""Rigid MI registration: known rigid moves of an analytic head are recovered (MR->CT, MR->PET)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dicomnode.fusion.registration import (
    RegistrationError,
    RigidResult,
    euler_angles,
    euler_matrix,
    register_rigid,
    rigid_matrix,
    rotation_angle_deg,
)
from dicomnode.fusion.resample import resample_to
from dicomnode.fusion.volume import Volume
from dicomnode.testing import Grid, HeadPhantom
from dicomnode.testing.appearance import ct_slices, mr_slices, pet_volume

PHANTOM = HeadPhantom(seed=3)
REF_GRID = Grid(rows=80, columns=72, pixel_spacing=(2.5, 2.5), slice_spacing=3.0, n_slices=64)
MOVING_GRIDS = {
    "CT": Grid(rows=104, columns=96, pixel_spacing=(2.2, 2.2), slice_spacing=2.5, n_slices=84),
    "PT": Grid(rows=64, columns=64, pixel_spacing=(4.0, 4.0), slice_spacing=4.0, n_slices=50),
}


def _render(modality: str, grid: Grid, seed: int) -> Volume:
    """A generator volume on ``grid`` (patient mm = phantom mm), physical values (HU, SUV, MR signal)."""
    rng = np.random.default_rng(seed)
    if modality == "MR":
        arr = np.stack(list(mr_slices(PHANTOM, grid, rng))).astype(np.float32)
    elif modality == "CT":
        arr = np.stack(list(ct_slices(PHANTOM, grid, rng))).astype(np.float32) - 1024.0
    else:
        arr = pet_volume(PHANTOM, grid, rng)
    return Volume(array=arr, affine=grid.affine(), modality=modality)


def _truth(
    rot_deg: tuple[float, float, float],
    trans_mm: tuple[float, float, float],
    frame_offset: tuple[float, float, float],
) -> np.ndarray:
    """Reference mm -> moving mm: a head move (rotation about a point near the head centre, translation)
    plus the difference between the two scanners' frames of reference."""
    move = rigid_matrix(np.radians(rot_deg), np.array(trans_mm), PHANTOM.center + np.array([3.0, -5.0, 10.0]))
    move[:3, 3] += np.array(frame_offset)
    return move


def _mr() -> Volume:
    return _render("MR", REF_GRID.centred_on(PHANTOM.center + np.array([0.0, 4.0, -3.0])), seed=1)


def _moving(modality: str, truth: np.ndarray) -> Volume:
    """The phantom scanned in another frame: the volume's affine is moved by ``truth`` (its patient point
    ``truth(x)`` shows the phantom at ``x``); the grid itself is off-centre like a real scan."""
    grid = MOVING_GRIDS[modality].centred_on(PHANTOM.center + np.array([4.0, -6.0, 5.0]))
    vol = _render(modality, grid, seed=2)
    vol.affine = truth @ vol.affine
    return vol


def _errors(result: RigidResult, truth: np.ndarray) -> tuple[float, float, float]:
    """(rotation error deg, translation error at the head centre mm, max error over the head mm)."""
    rot_err = rotation_angle_deg(result.matrix[:3, :3].T @ truth[:3, :3])
    head_centre = np.append(PHANTOM.center, 1.0)
    trans_err = float(np.linalg.norm((result.matrix - truth) @ head_centre))
    axes = PHANTOM.head.semi_axes
    rng = np.random.default_rng(0)
    pts = rng.uniform(-1, 1, (2000, 3))
    pts = pts[(pts**2).sum(1) <= 1] * axes + PHANTOM.center
    hom = np.c_[pts, np.ones(len(pts))]
    max_err = float(np.linalg.norm(hom @ (result.matrix - truth).T, axis=1).max())
    return rot_err, trans_err, max_err


@pytest.fixture(scope="module")
def mr() -> Volume:
    return _mr()


CASES = [
    ("CT", (10.0, -8.0, 12.0), (12.0, -10.0, 8.0), (5.0, -30.0, 400.0)),
    ("CT", (0.0, 15.0, 0.0), (0.0, 0.0, -20.0), (-2.0, 0.0, -150.0)),
    ("PT", (-12.0, 6.0, -9.0), (-10.0, 14.0, -8.0), (0.0, 0.0, 600.0)),
    ("PT", (15.0, 0.0, 0.0), (20.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
]


@pytest.mark.parametrize(("modality", "rot", "trans", "offset"), CASES)
def test_known_rigid_move_is_recovered(mr: Volume, modality: str, rot, trans, offset) -> None:
    truth = _truth(rot, trans, offset)
    moving = _moving(modality, truth)
    result = register_rigid(mr, moving, device="cpu", finest_mm=3.0)
    rot_err, trans_err, max_err = _errors(result, truth)
    assert rot_err < 1.0, (rot_err, result)
    assert trans_err < 1.0, (trans_err, result)
    assert max_err < 2.0, (max_err, result)
    assert result.plausible, result.reason
    assert result.similarity > result.initial_similarity
    assert result.levels == 3 and result.iterations > 0 and result.device == "cpu"


def test_matrix_is_the_transform_resample_to_expects(mr: Volume) -> None:
    truth = _truth((8.0, -5.0, 10.0), (10.0, 5.0, -12.0), (0.0, 0.0, 250.0))
    ct = _moving("CT", truth)
    result = register_rigid(mr, ct, device="cpu", finest_mm=3.0)
    on_ref = resample_to(ct, mr, transform=result.matrix, fill=-1000.0)
    expected = _render("CT", REF_GRID.centred_on(PHANTOM.center + np.array([0.0, 4.0, -3.0])), seed=4).array
    unregistered = resample_to(ct, mr, transform=None, fill=-1000.0)
    err_registered = np.abs(on_ref - expected).mean()
    err_unregistered = np.abs(unregistered - expected).mean()
    assert err_registered < 0.25 * err_unregistered
    bone = expected > 600
    assert np.mean(on_ref[bone] > 300) > 0.8


def test_same_seed_same_result_and_json(mr: Volume) -> None:
    truth = _truth((5.0, 0.0, -5.0), (5.0, 5.0, 5.0), (0.0, 0.0, 0.0))
    pet = _moving("PT", truth)
    kw = {"device": "cpu", "finest_mm": 4.0, "levels": 2, "iterations": (60, 40)}
    a = register_rigid(mr, pet, seed=7, **kw)
    b = register_rigid(mr, pet, seed=7, **kw)
    np.testing.assert_array_equal(a.matrix, b.matrix)
    data = json.loads(a.to_json())
    assert np.allclose(np.array(data["matrix"]), a.matrix, atol=1e-5)
    assert data["plausible"] == a.plausible and data["iterations"] == a.iterations
    assert len(data["rotation_deg"]) == 3 and len(data["translation_mm"]) == 3


def test_initial_transform_is_used(mr: Volume) -> None:
    truth = _truth((14.0, -10.0, 8.0), (18.0, -15.0, 10.0), (30.0, 40.0, 900.0))
    ct = _moving("CT", truth)
    near = truth @ rigid_matrix(np.radians([1.0, -1.0, 1.0]), np.array([2.0, -2.0, 1.0]), np.zeros(3))
    result = register_rigid(mr, ct, device="cpu", finest_mm=3.0, initial=near, iterations=(20, 30, 60))
    rot_err, trans_err, _ = _errors(result, truth)
    assert rot_err < 1.0 and trans_err < 1.0, result
    assert result.plausible, result.reason


def test_rotation_bound_refuses(mr: Volume) -> None:
    truth = _truth((0.0, 0.0, 12.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    ct = _moving("CT", truth)
    result = register_rigid(mr, ct, device="cpu", finest_mm=3.0, max_rotation_deg=5.0)
    assert not result.plausible
    assert "rotation" in result.reason and "exceeds 5 deg" in result.reason


def test_partial_coverage_refuses(mr: Volume) -> None:
    truth = _truth((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    ct = _moving("CT", truth)
    slab = Volume(array=ct.array[40:50].copy(), affine=ct.affine.copy(), modality="CT")
    slab.affine[:3, 3] = ct.affine[:3, :3] @ np.array([0, 0, 40.0]) + ct.affine[:3, 3]
    result = register_rigid(mr, slab, device="cpu", finest_mm=3.0)
    assert not result.plausible
    assert "inside the moving volume" in result.reason


def test_unrelated_noise_is_refused(mr: Volume) -> None:
    rng = np.random.default_rng(5)
    noise = Volume(
        array=rng.normal(0, 1, (60, 70, 60)).astype(np.float32),
        affine=np.diag([3.0, 3.0, 3.0, 1.0]),
        modality="CT",
    )
    noise.affine[:3, 3] = -90.0
    try:
        result = register_rigid(mr, noise, device="cpu", finest_mm=3.0)
    except RegistrationError:
        return
    assert not result.plausible, result.reason


def test_bad_inputs_raise_clear_errors(mr: Volume) -> None:
    flat = Volume(array=np.zeros((1, 64, 64), np.float32), affine=np.eye(4), modality="CT")
    with pytest.raises(RegistrationError, match="3D"):
        register_rigid(mr, flat, device="cpu")
    const = Volume(array=np.full((20, 20, 20), 7.0, np.float32), affine=np.eye(4), modality="CT")
    with pytest.raises(RegistrationError, match="constant"):
        register_rigid(mr, const, device="cpu")
    ct = _moving("CT", np.eye(4))
    with pytest.raises(RegistrationError, match="rigid"):
        register_rigid(mr, ct, device="cpu", initial=np.diag([2.0, 1.0, 1.0, 1.0]))


def test_euler_round_trip() -> None:
    angles = np.radians([12.0, -25.0, 7.5])
    np.testing.assert_allclose(euler_angles(euler_matrix(angles)), angles, atol=1e-12)
    m = rigid_matrix(angles, np.array([1.0, 2.0, 3.0]), np.array([10.0, 0.0, -5.0]))
    np.testing.assert_allclose(m @ np.array([10.0, 0.0, -5.0, 1.0]), [11.0, 2.0, -2.0, 1.0])
    assert abs(rotation_angle_deg(euler_matrix(np.radians([0.0, 0.0, 20.0]))) - 20.0) < 1e-9


def test_cpu_threads_is_restored(mr: Volume) -> None:
    import torch

    before = torch.get_num_threads()
    truth = _truth((5.0, 0.0, 0.0), (5.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    pet = _moving("PT", truth)
    result = register_rigid(mr, pet, device="cpu", finest_mm=4.0, levels=2, cpu_threads=1)
    assert torch.get_num_threads() == before
    rot_err, trans_err, _ = _errors(result, truth)
    assert rot_err < 1.0 and trans_err < 1.0, result
