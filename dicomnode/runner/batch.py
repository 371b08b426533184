"""``dicomnode fuse REF_DIR MOVING_DIR OUT_DIR``: the fuse stage's work on folders, without DB or network."""

from __future__ import annotations

import sys
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from tqdm import tqdm

from dicomnode.fusion.align import align
from dicomnode.fusion.base import get_fuser
from dicomnode.fusion.pipeline import fuse_pair, input_notes
from dicomnode.fusion.resample import resolve_device
from dicomnode.fusion.volume import Volume, VolumeError, volume_from_datasets


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
