"""Batch fusion of folders, without DB or network: ``dicomnode fuse`` and ``dicomnode fuse --png``.

``fuse_dicom_dirs`` does the fuse stage's work on two series folders (volumes, alignment, fusion,
Secondary Capture files); ``fuse_png_dirs`` fuses folders of registered 8-bit PNG slices (the
Harvard atlas layout), gray or pseudo-colour, into PNGs.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from tqdm import tqdm

from dicomnode.fusion.align import align
from dicomnode.fusion.colour import fuse_colour
from dicomnode.fusion.model import MODALITY_OF_TYPE
from dicomnode.fusion.pipeline import fuse_pair, input_notes
from dicomnode.fusion.png import read_gray_or_rgb
from dicomnode.fusion.registry import get_fuser
from dicomnode.fusion.resample import resolve_device
from dicomnode.fusion.volume import Volume, VolumeError, volume_from_datasets

log = logging.getLogger(__name__)


def read_series_dir(directory: Path) -> Volume:
    """All DICOM image files under ``directory`` (one series) as a volume."""
    if not directory.is_dir():
        raise VolumeError(f"{directory} is not a folder")
    datasets: list[Dataset] = []
    for p in sorted(directory.rglob("*")):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(p)
        except Exception:
            continue  # not DICOM (e.g. DICOMDIR siblings, README): skipped
        if "PixelData" in ds:
            datasets.append(ds)
    if not datasets:
        raise VolumeError(f"no DICOM images found in {directory}")
    series = {str(getattr(d, "SeriesInstanceUID", "")) for d in datasets}
    if len(series) > 1:
        raise VolumeError(f"{directory} holds {len(series)} series; give one series per folder")
    return volume_from_datasets(datasets)


def fuse_dicom_dirs(
    ref_dir: Path,
    moving_dir: Path,
    out_dir: Path,
    method: str = "default",
    device: str = "auto",
    batch_size: int = 16,
) -> list[Path]:
    """Fuse two series folders into Secondary Capture files in ``out_dir``; returns the paths."""
    from dicomnode.output import build_fused_series  # noqa: PLC0415

    dev = str(resolve_device(device))
    reference = read_series_dir(ref_dir)
    moving = read_series_dir(moving_dir)
    fuser = get_fuser(method, device=dev)
    transform, info = align(reference, moving, device=dev)
    bar = tqdm(total=reference.shape[0], unit="slice", desc=f"fusing with {fuser.name}", file=sys.stderr)

    def progress(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    fused = fuse_pair(
        reference, moving, fuser, batch_size=batch_size, device=dev, transform=transform, progress=progress
    )
    bar.close()
    rule = f"{reference.modality.lower()}-{moving.modality.lower()}"
    datasets = build_fused_series(
        fused.pixels,
        reference.datasets,
        moving.datasets,
        rule_name=rule,
        method_name=fused.method_name,
        method_version=fused.method_version,
        registered=fused.registered,
        derivation_note="; ".join([str(info["alignment"]), *input_notes(reference, moving)])[:400],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = out_dir / f"{int(ds.InstanceNumber):04d}_{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def fuse_png_dirs(
    a_dir: str | Path,
    b_dir: str | Path,
    out_dir: str | Path,
    method: str = "default",
    device: str = "auto",
    batch_size: int = 16,
    progress: bool = True,
    modality: str | None = None,
) -> int:
    """Fuse PNGs of ``a_dir`` (MRI) with same-named PNGs of ``b_dir``; write to ``out_dir``; return the count.

    ``modality`` (CT, PT, NM, or a pair type MRI-CT/MRI-PET/MRI-SPECT) picks the fuser's
    specialisation (:meth:`Fuser.for_modality`); when None, gray ``b`` images count as CT and
    colour ones use the general model (PET and SPECT pseudo-colour cannot be told apart).

    A colour ``b`` is fused on its luma and keeps its chroma (RGB out); gray stays gray. Files without
    a partner are skipped with a warning; pairs of different sizes raise ValueError naming the file.
    """
    a_dir, b_dir, out_dir = Path(a_dir), Path(b_dir), Path(out_dir)
    for d in (a_dir, b_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"not a folder: {d}")
    names = sorted(p.name for p in a_dir.glob("*.png"))
    missing = [n for n in names if not (b_dir / n).is_file()]
    if missing:
        log.warning("%d file(s) of %s have no partner in %s; skipped", len(missing), a_dir, b_dir)
    names = [n for n in names if (b_dir / n).is_file()]
    out_dir.mkdir(parents=True, exist_ok=True)
    base_fuser = get_fuser(method, device=device)
    mod = MODALITY_OF_TYPE.get(modality, modality) if modality else None
    if mod is not None and mod.upper() not in ("CT", "PT", "NM"):
        raise ValueError(f"unknown modality {modality!r}; use CT, PT, NM or MRI-CT, MRI-PET, MRI-SPECT")
    gray_fuser = base_fuser.for_modality(mod or "CT")
    colour_fuser = base_fuser.for_modality(mod) if mod else base_fuser
    fuser = base_fuser
    done = 0
    bar = tqdm(total=len(names), desc=f"fuse ({fuser.name})", disable=not progress, unit="slice")
    for i in range(0, len(names), batch_size):
        chunk = names[i : i + batch_size]
        gray_a, gray_b, col_a, col_b, col_n, gray_n = [], [], [], [], [], []
        for n in chunk:
            a = read_gray_or_rgb(a_dir / n)
            b = read_gray_or_rgb(b_dir / n)
            if a.ndim == 3:
                a = np.asarray(Image.fromarray(a).convert("L"))
            if a.shape[:2] != b.shape[:2]:
                raise ValueError(f"{n}: sizes differ ({a.shape[:2]} vs {b.shape[:2]}); register them first")
            if b.ndim == 3:
                col_a.append(a)
                col_b.append(b)
                col_n.append(n)
            else:
                gray_a.append(a)
                gray_b.append(b)
                gray_n.append(n)
        groups = ((gray_a, gray_b, gray_n, False), (col_a, col_b, col_n, True))
        for group_a, group_b, group_n, colour in groups:
            # one size per call: group by shape so any mixture of sizes works
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for k, arr in enumerate(group_a):
                by_shape.setdefault(arr.shape, []).append(k)
            for ks in by_shape.values():
                a01 = np.stack([group_a[k] for k in ks]).astype(np.float32) / 255.0
                if colour:
                    out = fuse_colour(colour_fuser, a01, np.stack([group_b[k] for k in ks]))
                else:
                    b01 = np.stack([group_b[k] for k in ks]).astype(np.float32) / 255.0
                    out = np.clip(np.rint(gray_fuser.fuse(a01, b01) * 255.0), 0, 255).astype(np.uint8)
                for j, k in enumerate(ks):
                    Image.fromarray(out[j]).save(out_dir / group_n[k])
                    done += 1
        bar.update(len(chunk))
    bar.close()
    return done
