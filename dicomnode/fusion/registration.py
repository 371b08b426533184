"""Rigid 6-DOF registration of a moving volume to a reference by maximizing mutual information.

Used when the two series have different frames of reference (MR and CT on different days). The
result's ``matrix`` maps reference patient mm to moving patient mm, the ``transform`` that
:func:`dicomnode.fusion.resample.resample_to` takes.

Method: intensities mapped to [0, 1] per modality (CT: a piecewise-linear HU map that keeps the
soft-tissue contrast; others: clipped at percentiles, :data:`CLIP_PERCENTILES`); both volumes
average-pooled to a coarse-to-fine pyramid (default 8, 4, 2 mm); at each level a seeded random
subsample of reference points inside the (dilated) head is mapped through the transform,
the moving volume is sampled there (trilinear, ``grid_sample``), and a Parzen-window joint
histogram (reference hard-binned, moving through a cubic B-spline window, 32 bins, as in Mattes'
MI) gives a differentiable mutual information that Adam maximizes
over three Euler angles (rotation around the reference head centroid) and a translation.
The start aligns the head-mask centroids of the two volumes (or is ``initial`` when given).

Plausibility check (``RigidResult.plausible``; the ``reason`` lists every failed item):

* the matrix is finite and its rotation part is a proper rotation;
* the rotation moved by the registration (relative to the start) is at most ``max_rotation_deg``
  (30 degrees), and the translation of the head centre relative to the start is at most
  ``max_translation_mm`` (50 mm);
* at least ``min_overlap`` (50 %) of the reference head points map inside the moving volume;
* the final MI is at least ``min_mi`` (0.1 nats with 32 bins: aligned heads score 0.7-1.2,
  unrelated images about 0.01), so content that shares nothing with the reference is refused;
* the final MI is better than the initial MI by ``min_mi_gain`` (relative, 2 %), unless the
  registration moved the head by less than ``aligned_mm`` (2 mm): a start that was already aligned
  cannot gain.

The caller (the fusion job) refuses to fuse and records ``reason`` when ``plausible`` is False.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dicomnode.fusion.resample import resolve_device
from dicomnode.fusion.volume import Volume

# (low, high) percentiles of the intensity clip, per DICOM Modality; others use "default".
CLIP_PERCENTILES: dict[str, tuple[float, float]] = {
    "MR": (0.5, 99.5),
    "PT": (0.5, 99.9),
    "NM": (0.5, 99.9),
    "default": (0.5, 99.5),
}


# CT in HU: piecewise-linear map (HU, value in [0, 1]) that spreads the soft-tissue range (CSF, grey,
# white) over many histogram bins while keeping air and bone apart; a plain clip would put the whole
# brain in one bin and leave only the skull to register on.
CT_HU_KNOTS: tuple[tuple[float, float], ...] = (
    (-1000.0, 0.0),
    (-150.0, 0.1),
    (0.0, 0.2),
    (100.0, 0.6),
    (300.0, 0.7),
    (1500.0, 1.0),
)


class RegistrationError(ValueError):
    """The volumes cannot be registered at all (not 3D, empty, constant); the message says why."""


@dataclass
class RigidResult:
    """A rigid transform (reference patient mm -> moving patient mm) with its quality and cost."""

    matrix: np.ndarray  # (4, 4) reference patient mm -> moving patient mm
    rotation_deg: np.ndarray  # (3,) Euler angles about patient x, y, z: R = Rz @ Ry @ Rx
    translation_mm: np.ndarray  # (3,) displacement of the rotation centre (reference head centroid)
    similarity: float  # final mutual information (nats) at the finest level
    initial_similarity: float  # mutual information at the start, same samples
    iterations: int
    levels: int
    seconds: float
    device: str
    plausible: bool
    reason: str
    center_mm: np.ndarray | None = None  # rotation centre in reference patient mm
    overlap: float = 0.0  # fraction of reference head points inside the moving volume

    def to_json(self) -> str:
        """The result as JSON (arrays as lists), for the audit log."""
        d = asdict(self)
        for key, value in d.items():
            if isinstance(value, np.ndarray):
                d[key] = np.round(value.astype(np.float64), 6).tolist()
            elif isinstance(value, float):
                d[key] = round(value, 6)
        return json.dumps(d)


def euler_matrix(angles_rad: np.ndarray) -> np.ndarray:
    """Rotation ``Rz @ Ry @ Rx`` for angles (x, y, z) in radians."""
    ax, ay, az = (float(a) for a in angles_rad)
    cx, sx, cy, sy = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay)
    cz, sz = math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def euler_angles(rotation: np.ndarray) -> np.ndarray:
    """Angles (x, y, z) in radians with ``euler_matrix(angles) == rotation``."""
    r = np.asarray(rotation, dtype=np.float64)
    ay = -math.asin(max(-1.0, min(1.0, r[2, 0])))
    ax = math.atan2(r[2, 1], r[2, 2])
    az = math.atan2(r[1, 0], r[0, 0])
    return np.array([ax, ay, az])


def rigid_matrix(angles_rad: np.ndarray, translation_mm: np.ndarray, center_mm: np.ndarray) -> np.ndarray:
    """4x4 ``x -> R (x - c) + c + t``: rotation around ``center_mm`` then translation."""
    m = np.eye(4)
    r = euler_matrix(angles_rad)
    c = np.asarray(center_mm, dtype=np.float64)
    m[:3, :3] = r
    m[:3, 3] = c - r @ c + np.asarray(translation_mm, dtype=np.float64)
    return m


def rotation_angle_deg(rotation: np.ndarray) -> float:
    """Total angle (degrees) of a 3x3 rotation, from its trace."""
    cos = (float(np.trace(rotation)) - 1.0) / 2.0
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def _euler_torch(a: torch.Tensor) -> torch.Tensor:
    """Differentiable ``Rz @ Ry @ Rx`` for a (3,) angle tensor."""
    cx, cy, cz = torch.cos(a)
    sx, sy, sz = torch.sin(a)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx]).view(3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy]).view(3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one]).view(3, 3)
    return rz @ ry @ rx


def _check_volume(vol: Volume, role: str) -> None:
    arr = vol.array
    if arr.ndim != 3 or min(arr.shape) < 4:
        raise RegistrationError(f"{role} volume must be 3D with at least 4 voxels per axis, got {arr.shape}")
    aff = np.asarray(vol.affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
        raise RegistrationError(f"{role} volume has an invalid affine")


def _subsample(arr: np.ndarray, n: int = 1_000_000) -> np.ndarray:
    flat = arr.reshape(-1)
    step = max(1, flat.size // n)
    sub = flat[::step]
    return sub[np.isfinite(sub)]


def _clip_range(vol: Volume) -> tuple[float, float]:
    """(low, high) of the intensity clip: the modality's percentiles of a voxel subsample."""
    lo_p, hi_p = CLIP_PERCENTILES.get(vol.modality.upper(), CLIP_PERCENTILES["default"])
    sub = _subsample(vol.array)
    if sub.size == 0:
        raise RegistrationError(f"{vol.modality or 'volume'} has no finite voxel values")
    lo, hi = np.percentile(sub, [lo_p, hi_p])
    if not hi > lo:
        lo, hi = float(sub.min()), float(sub.max())
    if not hi > lo:
        raise RegistrationError(f"{vol.modality or 'volume'} volume is constant; nothing to register")
    return float(lo), float(hi)


def _otsu(values: torch.Tensor, bins: int = 128) -> float:
    """Otsu threshold of values in [0, 1]: separates head from background in any modality."""
    hist = torch.histc(values.float(), bins=bins, min=0.0, max=1.0).double()
    p = hist / hist.sum()
    centers = (torch.arange(bins, dtype=torch.float64, device=values.device) + 0.5) / bins
    w0 = torch.cumsum(p, 0)
    mu = torch.cumsum(p * centers, 0)
    mu_t = mu[-1]
    between = (mu_t * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    return float(centers[int(torch.argmax(between[:-1]))] + 0.5 / bins)


@dataclass
class _Pyramid:
    """One volume pooled to one level: normalized image (1,1,D,H,W) and its affine."""

    image: torch.Tensor
    affine: np.ndarray


def _looks_like_hu(vol: Volume) -> bool:
    """CT whose air sits near -1000 HU (rescale applied), so the HU map fits."""
    if vol.modality.upper() != "CT":
        return False
    sub = _subsample(vol.array, 200_000)
    return sub.size > 0 and -1200.0 < float(np.percentile(sub, 1.0)) < -700.0


def _map_hu(img: torch.Tensor) -> torch.Tensor:
    """CT HU -> [0, 1] along :data:`CT_HU_KNOTS`."""
    out = torch.full_like(img, CT_HU_KNOTS[0][1])
    for (x0, y0), (x1, y1) in zip(CT_HU_KNOTS[:-1], CT_HU_KNOTS[1:], strict=True):
        out += (img - x0).clamp(0.0, x1 - x0) * ((y1 - y0) / (x1 - x0))
    return out


def _normalizer(vol: Volume) -> tuple[str, tuple[float, float]]:
    """How to bring this volume's intensities to [0, 1]: ("hu", ...) or ("clip", (low, high))."""
    if _looks_like_hu(vol):
        return "hu", (CT_HU_KNOTS[0][0], CT_HU_KNOTS[-1][0])
    return "clip", _clip_range(vol)


def _pool(
    vol: Volume, spacing_mm: float, dev: torch.device, norm: tuple[str, tuple[float, float]]
) -> _Pyramid:
    """Average-pool the volume to about ``spacing_mm`` voxels, then map its intensities to [0, 1]."""
    sp = vol.spacing  # (i, j, k)
    f = [max(1, int(round(spacing_mm / s))) for s in sp]
    f = [min(fi, n) for fi, n in zip(f, vol.array.shape[::-1], strict=True)]
    src = torch.as_tensor(np.ascontiguousarray(vol.array, dtype=np.float32), device=dev)
    src = torch.nan_to_num(src)[None, None]
    img = F.avg_pool3d(src, kernel_size=(f[2], f[1], f[0]), stride=(f[2], f[1], f[0])) if max(f) > 1 else src
    kind, (lo, hi) = norm
    img = _map_hu(img) if kind == "hu" else ((img - lo) / (hi - lo)).clamp_(0.0, 1.0)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(f)
    scale[:3, 3] = [(fi - 1) / 2.0 for fi in f]
    return _Pyramid(image=img, affine=np.asarray(vol.affine, dtype=np.float64) @ scale)


def _down(pyr: _Pyramid, factor: int) -> _Pyramid:
    """Halve (or more) a pyramid level again by average pooling."""
    shape = pyr.image.shape[2:]
    f = [min(factor, n) for n in shape]  # (k, j, i)
    img = F.avg_pool3d(pyr.image, kernel_size=f, stride=f)
    scale = np.eye(4)
    fi = [f[2], f[1], f[0]]
    scale[:3, :3] = np.diag(fi)
    scale[:3, 3] = [(x - 1) / 2.0 for x in fi]
    return _Pyramid(image=img, affine=pyr.affine @ scale)


def _head_mask(img: torch.Tensor) -> torch.Tensor:
    thr = _otsu(img.reshape(-1))
    return img > thr


def _index_points(mask: torch.Tensor) -> torch.Tensor:
    """(N, 3) float voxel indices (i, j, k) of a (1,1,D,H,W) boolean mask."""
    kji = torch.nonzero(mask[0, 0], as_tuple=False)
    return kji.flip(1).to(torch.float32)


def _to_patient(affine: np.ndarray, idx: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(affine, dtype=torch.float32, device=idx.device)
    return idx @ a[:3, :3].T + a[:3, 3]


def _sample(img: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trilinear values of ``img`` (1,1,D,H,W) at float voxel indices (N, 3) (i, j, k), and inside mask."""
    d, h, w = img.shape[2:]
    size = torch.tensor([w - 1, h - 1, d - 1], dtype=idx.dtype, device=idx.device).clamp_min(1)
    grid = idx * (2.0 / size) - 1.0
    vals = F.grid_sample(
        img, grid.view(1, 1, 1, -1, 3), mode="bilinear", padding_mode="zeros", align_corners=True
    )
    inside = ((grid >= -1.0) & (grid <= 1.0)).all(dim=1)
    return vals.view(-1), inside


def _reference_bins(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Hard bin index of each reference value in [0, 1] (the fixed image needs no gradient)."""
    return (values * bins).long().clamp_(0, bins - 1)


def _bspline_bins(values: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cubic B-spline Parzen window of moving values in [0, 1]: (N, 4) bin indices and weights.

    Four bins per sample instead of all of them keeps the soft histogram O(N); the weights sum to 1
    and are differentiable in the value (Mattes et al. 2003).
    """
    x = 1.0 + values.clamp(0.0, 1.0) * (bins - 3 - 1e-4)
    base = torch.floor(x.detach()).long() - 1
    idx = base[:, None] + torch.arange(4, device=values.device)[None, :]
    t = (x[:, None] - idx.to(x.dtype)).abs()
    near = 2.0 / 3.0 - t**2 + 0.5 * t**3
    far = (2.0 - t).clamp_min(0.0) ** 3 / 6.0
    return idx, torch.where(t < 1.0, near, far)


def _mutual_information(
    ref_bin: torch.Tensor, mov_idx: torch.Tensor, mov_w: torch.Tensor, weight: torch.Tensor, bins: int
) -> torch.Tensor:
    """MI (nats) of the joint histogram of hard reference bins and B-spline moving bins."""
    flat = (ref_bin[:, None] * bins + mov_idx).reshape(-1)
    vals = (mov_w * weight[:, None]).reshape(-1)
    joint = torch.zeros(bins * bins, dtype=vals.dtype, device=vals.device).index_add(0, flat, vals)
    p = joint.view(bins, bins) / joint.sum().clamp_min(1e-12)
    pr = p.sum(dim=1)
    pm = p.sum(dim=0)
    eps = 1e-10
    joint_h = (p * torch.log(p + eps)).sum()
    return joint_h - (pr * torch.log(pr + eps)).sum() - (pm * torch.log(pm + eps)).sum()


@dataclass
class _Level:
    """Everything one pyramid level needs per iteration."""

    spacing: float
    points: torch.Tensor  # (N, 3) reference patient mm minus the rotation centre
    head: torch.Tensor  # (N,) bool: point lies in the (undilated) head mask
    ref_bin: torch.Tensor  # (N,) hard histogram bin of the reference value
    moving: torch.Tensor  # (1,1,D,H,W)
    mov_inv: torch.Tensor  # (4, 4) moving patient mm -> moving level index
    bins: int


class _Objective:
    """MI of one level as a function of the 6 parameters (angles scaled to mm, translation mm)."""

    def __init__(self, level: _Level, center: np.ndarray, rot_scale: float) -> None:
        self.level = level
        self.center = torch.as_tensor(center, dtype=torch.float32, device=level.points.device)
        self.rot_scale = rot_scale

    def map_points(self, params: torch.Tensor) -> torch.Tensor:
        """Moving level voxel indices of the level's reference points."""
        r = _euler_torch(params[:3] / self.rot_scale)
        m = self.level.mov_inv
        lin = m[:3, :3] @ r
        off = m[:3, :3] @ (self.center + params[3:]) + m[:3, 3]
        return self.level.points @ lin.T + off

    def __call__(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.map_points(params)
        vals, inside = _sample(self.level.moving, idx)
        mov_idx, mov_w = _bspline_bins(vals, self.level.bins)
        mi = _mutual_information(self.level.ref_bin, mov_idx, mov_w, inside.to(vals.dtype), self.level.bins)
        return mi, inside


def _per_level(value: tuple[int, ...] | int, levels: int) -> list[int]:
    """A per-level setting, coarse to fine: an int for all levels, or a tuple whose last entries apply."""
    if isinstance(value, int):
        return [value] * levels
    vals = list(value)
    if not vals:
        raise RegistrationError("per-level settings must not be empty")
    return ([vals[0]] * (levels - len(vals)) + vals)[-levels:]


def _level_spacings(levels: int, finest_mm: float) -> list[float]:
    return [finest_mm * 2 ** (levels - 1 - n) for n in range(levels)]


def _build_levels(
    reference: Volume,
    moving: Volume,
    spacings: list[float],
    dev: torch.device,
    samples: list[int],
    bins: int,
    seed: int,
) -> tuple[list[_Level], list[_Pyramid], list[_Pyramid]]:
    ref_fine = _pool(reference, spacings[-1], dev, _normalizer(reference))
    mov_fine = _pool(moving, spacings[-1], dev, _normalizer(moving))
    ref_pyr, mov_pyr = [ref_fine], [mov_fine]
    for _ in spacings[:-1]:
        ref_pyr.insert(0, _down(ref_pyr[0], 2))
        mov_pyr.insert(0, _down(mov_pyr[0], 2))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    levels: list[_Level] = []
    for spacing, n_samples, rp, mp in zip(spacings, samples, ref_pyr, mov_pyr, strict=True):
        mask = _head_mask(rp.image)
        if int(mask.sum()) < 50:
            raise RegistrationError("reference volume has no head (too few voxels above background)")
        radius = max(1, int(round(10.0 / max(spacing, 1e-3))))
        dil = F.max_pool3d(mask.float(), kernel_size=2 * radius + 1, stride=1, padding=radius) > 0
        idx = _index_points(dil)
        if idx.shape[0] > n_samples:
            pick = torch.randperm(idx.shape[0], generator=gen)[:n_samples].to(dev)
            idx = idx[pick]
        jitter = (torch.rand(idx.shape, generator=gen) - 0.5).to(dev)
        idx = idx + jitter
        ref_vals, _ = _sample(rp.image, idx)
        head_vals, _ = _sample(mask.float(), idx)
        levels.append(
            _Level(
                spacing=spacing,
                points=_to_patient(rp.affine, idx),  # centre subtracted later
                head=head_vals > 0.5,
                ref_bin=_reference_bins(ref_vals, bins),
                moving=mp.image,
                mov_inv=torch.as_tensor(np.linalg.inv(mp.affine), dtype=torch.float32, device=dev),
                bins=bins,
            )
        )
    return levels, ref_pyr, mov_pyr


def _mask_centroid(pyr: _Pyramid) -> tuple[np.ndarray, float]:
    """Patient-mm centroid of the head mask, and its RMS radius."""
    mask = _head_mask(pyr.image)
    if int(mask.sum()) < 10:
        raise RegistrationError("a volume has no head (too few voxels above background)")
    pts = _to_patient(pyr.affine, _index_points(mask)).double()
    c = pts.mean(dim=0)
    radius = float(((pts - c) ** 2).sum(dim=1).mean().sqrt())
    return c.cpu().numpy(), radius


def register_rigid(
    reference: Volume,
    moving: Volume,
    *,
    device: str = "auto",
    initial: np.ndarray | None = None,
    levels: int = 3,
    finest_mm: float = 2.0,
    iterations: tuple[int, ...] | int = (120, 80, 60),
    samples: tuple[int, ...] | int = (20_000, 40_000, 100_000),
    bins: int = 32,
    seed: int = 0,
    max_rotation_deg: float = 30.0,
    max_translation_mm: float = 50.0,
    min_overlap: float = 0.5,
    min_mi_gain: float = 0.02,
    min_mi: float = 0.1,
    aligned_mm: float = 2.0,
    cpu_threads: int | None = None,
) -> RigidResult:
    """Register ``moving`` to ``reference`` (rigid, MI); the result maps reference mm -> moving mm.

    ``initial`` (4x4, reference mm -> moving mm, e.g. from a Spatial Registration object) replaces the
    centroid start. Raises :class:`RegistrationError` for inputs that cannot be registered; an
    implausible result is returned with ``plausible=False`` and a ``reason`` (see the module docstring).
    ``cpu_threads`` sets torch's CPU threads for the call (process-wide, restored after): 1 is several
    times faster on a CPU shared with other busy processes; None leaves torch's setting.
    """
    if cpu_threads is not None and cpu_threads > 0:
        saved = torch.get_num_threads()
        torch.set_num_threads(cpu_threads)
        try:
            return register_rigid(
                reference,
                moving,
                device=device,
                initial=initial,
                levels=levels,
                finest_mm=finest_mm,
                iterations=iterations,
                samples=samples,
                bins=bins,
                seed=seed,
                max_rotation_deg=max_rotation_deg,
                max_translation_mm=max_translation_mm,
                min_overlap=min_overlap,
                min_mi_gain=min_mi_gain,
                min_mi=min_mi,
                aligned_mm=aligned_mm,
            )
        finally:
            torch.set_num_threads(saved)
    t_start = time.perf_counter()
    _check_volume(reference, "reference")
    _check_volume(moving, "moving")
    if levels < 1:
        raise RegistrationError("levels must be at least 1")
    iters = _per_level(iterations, levels)
    n_samples = _per_level(samples, levels)
    dev = resolve_device(device)
    spacings = _level_spacings(levels, finest_mm)
    with torch.no_grad():
        lvls, ref_pyr, mov_pyr = _build_levels(reference, moving, spacings, dev, n_samples, bins, seed)
        center, radius = _mask_centroid(ref_pyr[-1])
        mov_center, _ = _mask_centroid(mov_pyr[-1])
    rot_scale = max(radius, 10.0)
    if initial is None:
        start_angles = np.zeros(3)
        start_t = mov_center - center
    else:
        init = np.asarray(initial, dtype=np.float64)
        if init.shape != (4, 4) or not np.all(np.isfinite(init)):
            raise RegistrationError("initial transform must be a finite 4x4 matrix")
        r0 = init[:3, :3]
        if abs(np.linalg.det(r0) - 1.0) > 1e-3 or np.abs(r0 @ r0.T - np.eye(3)).max() > 1e-3:
            raise RegistrationError("initial transform is not rigid (its 3x3 part is not a rotation)")
        start_angles = euler_angles(r0)
        start_t = init[:3, :3] @ center + init[:3, 3] - center
    for lvl in lvls:
        lvl.points = lvl.points - torch.as_tensor(center, dtype=torch.float32, device=dev)
    start = np.concatenate([start_angles * rot_scale, start_t])
    params = torch.tensor(start, dtype=torch.float32, device=dev, requires_grad=True)
    total_iters = 0
    for lvl, n_iter in zip(lvls, iters, strict=True):
        objective = _Objective(lvl, center, rot_scale)
        lr0 = lvl.spacing * 0.5
        opt = torch.optim.Adam([params], lr=lr0, betas=(0.8, 0.95))
        history: list[torch.Tensor] = []
        for it in range(n_iter):
            for group in opt.param_groups:
                group["lr"] = lr0 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * it / max(n_iter, 1))))
            opt.zero_grad(set_to_none=True)
            mi, _ = objective(params)
            (-mi).backward()
            opt.step()
            total_iters += 1
            history.append(params.detach().clone())
            if len(history) > 10:
                if float((history[-1] - history[-11]).abs().max()) < 0.01 * lvl.spacing:
                    break
                history.pop(0)
    final = params.detach()
    finest = _Objective(lvls[-1], center, rot_scale)
    with torch.no_grad():
        sim, inside = finest(final)
        init_sim, _ = finest(torch.tensor(start, dtype=torch.float32, device=dev))
        head = lvls[-1].head
        overlap = float(inside[head].float().mean()) if bool(head.any()) else 0.0
        start_params = torch.tensor(start, dtype=torch.float32, device=dev)
        moved = finest.map_points(final) - finest.map_points(start_params)
        mov_affine = torch.as_tensor(mov_pyr[-1].affine[:3, :3], dtype=torch.float32, device=dev)
        displacement = float((moved[head] @ mov_affine.T).norm(dim=1).max()) if bool(head.any()) else 0.0
    p = final.cpu().double().numpy()
    angles, trans = p[:3] / rot_scale, p[3:]
    matrix = rigid_matrix(angles, trans, center)
    start_matrix = rigid_matrix(start_angles, start_t, center)
    plausible, reason = _plausibility(
        matrix,
        start_matrix,
        float(sim),
        float(init_sim),
        overlap,
        displacement,
        center,
        max_rotation_deg=max_rotation_deg,
        max_translation_mm=max_translation_mm,
        min_overlap=min_overlap,
        min_mi_gain=min_mi_gain,
        min_mi=min_mi,
        aligned_mm=aligned_mm,
    )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return RigidResult(
        matrix=matrix,
        rotation_deg=np.degrees(angles),
        translation_mm=trans,
        similarity=float(sim),
        initial_similarity=float(init_sim),
        iterations=total_iters,
        levels=levels,
        seconds=time.perf_counter() - t_start,
        device=str(dev),
        plausible=plausible,
        reason=reason,
        center_mm=center,
        overlap=overlap,
    )


def _plausibility(
    matrix: np.ndarray,
    start: np.ndarray,
    sim: float,
    init_sim: float,
    overlap: float,
    displacement: float,
    center: np.ndarray,
    *,
    max_rotation_deg: float,
    max_translation_mm: float,
    min_overlap: float,
    min_mi_gain: float,
    min_mi: float,
    aligned_mm: float,
) -> tuple[bool, str]:
    """The documented check of the module docstring: (plausible, reason listing failures or 'ok')."""
    problems: list[str] = []
    if not np.all(np.isfinite(matrix)) or not np.isfinite(sim):
        return False, "registration diverged (non-finite transform or similarity)"
    r = matrix[:3, :3]
    if abs(np.linalg.det(r) - 1.0) > 1e-3:
        problems.append("transform is not a proper rotation")
    change = np.linalg.inv(start) @ matrix
    rot = rotation_angle_deg(change[:3, :3])
    c = np.append(center, 1.0)
    shift = float(np.linalg.norm((matrix @ c)[:3] - (start @ c)[:3]))
    if rot > max_rotation_deg:
        problems.append(f"rotation {rot:.1f} deg from the start exceeds {max_rotation_deg:g} deg")
    if shift > max_translation_mm:
        problems.append(f"translation {shift:.1f} mm from the start exceeds {max_translation_mm:g} mm")
    if overlap < min_overlap:
        problems.append(f"only {overlap:.0%} of the reference head lies inside the moving volume")
    if sim < min_mi:
        problems.append(f"mutual information {sim:.3f} is below {min_mi:g}: the images share no structure")
    gain = (sim - init_sim) / max(abs(init_sim), 1e-6)
    if displacement >= aligned_mm and gain < min_mi_gain:
        problems.append(
            f"mutual information gained {gain:.1%} over the start (needs {min_mi_gain:.0%})"
            f" while moving the head by {displacement:.1f} mm"
        )
    if problems:
        return False, "; ".join(problems)
    return True, (
        f"ok: MI {init_sim:.3f} -> {sim:.3f}, rotation {rot:.1f} deg, translation {shift:.1f} mm "
        f"from the start, overlap {overlap:.0%}"
    )
