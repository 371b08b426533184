"""Resample a volume onto another volume's grid by patient coordinates (torch grid_sample)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dicomnode.fusion.volume import Volume


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_problem(device: str) -> str | None:
    """Why ``device`` (auto | cpu | cuda | cuda:N) cannot be used on this host; None when it can.

    ``auto`` always can (cpu without a GPU); an explicit CUDA device that is not there is a
    configuration mistake, refused rather than quietly run on the CPU.
    """
    if not device.startswith("cuda"):
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device[5:]) if device.startswith("cuda:") else 0
    if index < count:
        return None
    have = f"cuda:0..cuda:{count - 1}" if count else "none"
    return f"{device} is not on this host (CUDA devices: {have}); use auto, cpu or a device it has"


def index_to_index(reference: Volume, moving: Volume, transform: np.ndarray | None = None) -> np.ndarray:
    """4x4 map from reference voxel index to moving voxel index.

    ``transform`` (optional) maps reference patient coordinates to moving patient coordinates
    (the result of a registration); None means both share one frame of reference.
    """
    t = np.eye(4) if transform is None else np.asarray(transform, dtype=np.float64)
    return np.linalg.inv(moving.affine) @ t @ reference.affine


def resample_to(
    moving: Volume,
    reference: Volume,
    transform: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    fill: float = 0.0,
    chunk: int = 32,
) -> np.ndarray:
    """Moving volume's values on the reference grid, (nz, ny, nx) float32; ``fill`` outside."""
    dev = resolve_device(device) if isinstance(device, str) else device
    moving = moving.uniform()  # non-uniform slice spacing: interpolate along the stack axis first
    ref_k = torch.as_tensor(reference.k_coords(), dtype=torch.float32, device=dev)  # each slice's own k
    m = torch.as_tensor(index_to_index(reference, moving, transform), dtype=torch.float32, device=dev)
    src = torch.as_tensor(moving.array, dtype=torch.float32, device=dev)
    src = (src - fill)[None, None]
    mz, my, mx = moving.array.shape
    nz, ny, nx = reference.array.shape
    jj, ii = torch.meshgrid(
        torch.arange(ny, dtype=torch.float32, device=dev),
        torch.arange(nx, dtype=torch.float32, device=dev),
        indexing="ij",
    )
    scale = torch.tensor([2.0 / max(mx - 1, 1), 2.0 / max(my - 1, 1), 2.0 / max(mz - 1, 1)], device=dev)
    out = torch.empty((nz, ny, nx), dtype=torch.float32, device=dev)
    for k0 in range(0, nz, chunk):
        ks = ref_k[k0 : min(nz, k0 + chunk)]
        kk = ks[:, None, None].expand(-1, ny, nx)
        idx = torch.stack([ii.expand_as(kk), jj.expand_as(kk), kk, torch.ones_like(kk)], dim=-1)
        mov = idx @ m.T  # (..., 4): moving (i, j, k, 1)
        grid = mov[..., :3] * scale - 1.0
        if mz == 1:
            grid[..., 2] = torch.where(mov[..., 2].abs() < 0.5, 0.0, 2.0)
        vals = F.grid_sample(src, grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)
        out[k0 : k0 + len(ks)] = vals[0, 0]
    return (out + fill).cpu().numpy()
