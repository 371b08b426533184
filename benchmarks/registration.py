"""Rigid MI registration: time and error for a 256x256x150 MR to a 512x512x300 CT (and a PET), per device.

Volumes come from the project's generator (``dicomnode.testing``); the moving volume is moved by known
rigid transforms (up to 20 mm, 15 degrees, plus a frame-of-reference offset) through its affine, and
the recovered transform is compared with the truth. Prints a table; run by hand:

    .venv/bin/python benchmarks/registration.py [--cases 3] [--devices cpu,cuda] [--threads N] [--pet]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dicomnode.fusion.registration import register_rigid, rigid_matrix, rotation_angle_deg
from dicomnode.fusion.volume import Volume
from dicomnode.testing import Grid, HeadPhantom
from dicomnode.testing.appearance import ct_slices, mr_slices, pet_volume

MR_GRID = Grid(rows=256, columns=256, pixel_spacing=(1.0, 1.0), slice_spacing=1.2, n_slices=150)
CT_GRID = Grid(rows=512, columns=512, pixel_spacing=(0.5, 0.5), slice_spacing=0.7, n_slices=300)
PET_GRID = Grid(rows=128, columns=128, pixel_spacing=(2.0, 2.0), slice_spacing=2.0, n_slices=100)

# (rotation deg about x, y, z; translation mm; frame-of-reference offset mm)
CASES = [
    ((10.0, -8.0, 12.0), (12.0, -10.0, 8.0), (5.0, -30.0, 400.0)),
    ((15.0, 0.0, 0.0), (0.0, 20.0, 0.0), (0.0, 0.0, -150.0)),
    ((-6.0, 12.0, -15.0), (-15.0, 8.0, -12.0), (20.0, 10.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
]


def render(phantom: HeadPhantom, modality: str, grid: Grid, seed: int) -> Volume:
    """A generator volume (physical values) on ``grid``, whose patient mm equal the phantom's mm."""
    rng = np.random.default_rng(seed)
    if modality == "MR":
        arr = np.stack([s.astype(np.float32) for s in mr_slices(phantom, grid, rng)])
    elif modality == "CT":
        arr = np.stack([s.astype(np.float32) - 1024.0 for s in ct_slices(phantom, grid, rng)])
    else:
        arr = pet_volume(phantom, grid, rng)
    return Volume(array=arr, affine=grid.affine(), modality=modality)


def truth_matrix(phantom: HeadPhantom, rot: tuple, trans: tuple, offset: tuple) -> np.ndarray:
    """Reference mm -> moving mm for a head moved by (rot, trans) in a frame shifted by ``offset``."""
    m = rigid_matrix(np.radians(rot), np.array(trans), phantom.center + np.array([3.0, -5.0, 10.0]))
    m[:3, 3] += np.array(offset)
    return m


def errors(phantom: HeadPhantom, matrix: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """(rotation error deg, error at the head centre mm, max error over points in the head mm)."""
    rot = rotation_angle_deg(matrix[:3, :3].T @ truth[:3, :3])
    centre = float(np.linalg.norm((matrix - truth) @ np.append(phantom.center, 1.0)))
    rng = np.random.default_rng(0)
    pts = rng.uniform(-1, 1, (4000, 3))
    pts = pts[(pts**2).sum(1) <= 1] * phantom.head.semi_axes + phantom.center
    worst = float(np.linalg.norm(np.c_[pts, np.ones(len(pts))] @ (matrix - truth).T, axis=1).max())
    return rot, centre, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3, help="how many known moves to recover (max 4)")
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped when absent")
    parser.add_argument(
        "--threads", type=int, default=0, help="register_rigid(cpu_threads=N) on CPU (0 = torch default)"
    )
    parser.add_argument("--pet", action="store_true", help="also register a 128x128x100 PET to the MR")
    args = parser.parse_args()
    devices = [d for d in args.devices.split(",") if d and (d != "cuda" or torch.cuda.is_available())]
    phantom = HeadPhantom(seed=0)
    t0 = time.perf_counter()
    c = phantom.center
    mr = render(phantom, "MR", MR_GRID.centred_on(c + np.array([0.0, 4.0, -3.0])), 1)
    movers = {"CT": render(phantom, "CT", CT_GRID.centred_on(c + np.array([3.0, 10.0, -10.0])), 2)}
    if args.pet:
        movers["PT"] = render(phantom, "PT", PET_GRID.centred_on(c + np.array([0.0, 0.0, 5.0])), 3)
    threads = args.threads or torch.get_num_threads()
    print(
        f"generated volumes in {time.perf_counter() - t0:.1f} s; torch {torch.__version__}, "
        f"{threads} CPU threads for registration"
    )

    def describe(v: Volume) -> str:
        return f"{'x'.join(map(str, v.shape[::-1]))} voxels of {'x'.join(f'{s:g}' for s in v.spacing)} mm"

    moving = "; ".join(f"moving {m} {describe(v)}" for m, v in movers.items())
    print(f"reference MR {describe(mr)}; {moving}")
    header = (
        f"{'device':<7} {'moving':<7} {'rotation (deg)':<20} {'translation (mm)':<20} {'seconds':>8} "
        f"{'iters':>6} {'rot err':>8} {'centre err':>10} {'max err':>8} {'MI':>12} {'plausible':>9}"
    )
    print(header)
    print("-" * len(header))
    for device in devices:
        for modality, vol in movers.items():
            base_affine = vol.affine.copy()
            if device == "cuda":  # warm-up: CUDA context and kernels, not part of a job's cost
                register_rigid(mr, vol, device=device, iterations=(5, 5, 5))
            for rot, trans, offset in CASES[: args.cases]:
                truth = truth_matrix(phantom, rot, trans, offset)
                vol.affine = truth @ base_affine
                threads = args.threads if device == "cpu" and args.threads > 0 else None
                res = register_rigid(mr, vol, device=device, cpu_threads=threads)
                rot_err, centre_err, worst = errors(phantom, res.matrix, truth)
                print(
                    f"{device:<7} {modality:<7} {str(rot):<20} {str(trans):<20} {res.seconds:>8.2f} "
                    f"{res.iterations:>6} {rot_err:>8.3f} {centre_err:>10.3f} {worst:>8.3f} "
                    f"{res.initial_similarity:>5.3f}>{res.similarity:<6.3f} {str(res.plausible):>9}"
                )
            vol.affine = base_affine


if __name__ == "__main__":
    main()
