"""Write a realistic multi-modal head study (MR, CT, PET, SPECT) of one patient as DICOM files.

Every modality samples the same ``HeadPhantom`` on its own grid in one frame of reference, so the
skull (CT), the lesion (PET/SPECT) and the anatomy (MR) line up by patient coordinates.
Output is deterministic for a given seed: UIDs come from hashed inputs, times are fixed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from dicomnode.testing import appearance
from dicomnode.testing.appearance import PET_MAX_STORED
from dicomnode.testing.grid import Grid, default_grids
from dicomnode.testing.headers import StudyInfo, ds_str, series_template, set_slice
from dicomnode.testing.phantom import HeadPhantom

MODALITIES = ("MR", "CT", "PT", "NM")
DEFAULT_STUDY_DATETIME = datetime(2024, 3, 12, 9, 30, 0)
_UID_NAMESPACE = uuid.UUID("6b1f5c52-3f0e-4d0a-9a57-6469636f6d6e")
_MODALITY_STREAM = {"MR": 1, "CT": 2, "PT": 3, "NM": 4, "CT-BULK": 5}


@dataclass
class GeneratedSeries:
    """One written series; ``paths`` are in slice order (Instance Number 1..n)."""

    modality: str
    series_instance_uid: str
    directory: Path
    paths: list[Path]
    grid: Grid | None = field(default=None, repr=False)  # with its origin resolved


@dataclass
class GeneratedStudy:
    """One patient's generated study; ``series`` keyed by modality (MR, CT, PT, NM)."""

    patient_id: str
    study_instance_uid: str
    frame_of_reference_uid: str
    phantom: HeadPhantom
    series: dict[str, GeneratedSeries]


def _uid(*parts: object) -> str:
    """A deterministic UUID-derived UID (2.25.<uuid5 as integer>) from the given parts."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(map(str, parts))).int}"


def _study_info(
    seed: int,
    patient_id: str,
    patient_name: str,
    issuer_of_patient_id: str | None,
    study_instance_uid: str | None,
    study_datetime: datetime | None,
    frame_of_reference_uid: str | None,
    specific_character_set: str | list[str] = "ISO_IR 100",
    extra_attributes: Mapping[str, object] | None = None,
) -> StudyInfo:
    study_uid = study_instance_uid or _uid("study", patient_id, issuer_of_patient_id, seed)
    when = study_datetime or DEFAULT_STUDY_DATETIME
    accession = f"ACC{int(_uid('accession', study_uid).split('.')[-1]) % 10**8:08d}"
    return StudyInfo(
        patient_id=patient_id,
        patient_name=patient_name,
        issuer_of_patient_id=issuer_of_patient_id,
        study_instance_uid=study_uid,
        study_datetime=when,
        frame_of_reference_uid=frame_of_reference_uid or _uid("for", study_uid),
        accession_number=accession,
        specific_character_set=specific_character_set,
        extra_attributes=dict(extra_attributes or {}),
    )


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _MODALITY_STREAM[stream]]))


def _write_series(
    out: Path,
    modality: str,
    study: StudyInfo,
    series_uid: str,
    grid: Grid,
    slices: Iterable[np.ndarray],
    slopes: Sequence[str] | None = None,
) -> GeneratedSeries:
    out.mkdir(parents=True, exist_ok=True)
    ds = series_template(modality, study, series_uid, grid)
    paths = []
    for k, pixels in enumerate(slices):
        set_slice(
            ds, modality, grid, k, f"{series_uid}.{k + 1}", pixels, slopes[k] if slopes is not None else None
        )
        path = out / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return GeneratedSeries(modality, series_uid, out, paths, grid)


def _pet_stored(suv: np.ndarray) -> tuple[list[np.ndarray], list[str]]:
    """Per-slice uint16 pixels and the Rescale Slope strings that turn them back into SUV."""
    stored, slopes = [], []
    for img in suv:
        slope_txt = ds_str(max(float(img.max()), 1e-3) / PET_MAX_STORED)
        stored.append(np.clip(np.rint(img / float(slope_txt)), 0, PET_MAX_STORED).astype(np.uint16))
        slopes.append(slope_txt)
    return stored, slopes


def _series_pixels(
    modality: str, phantom: HeadPhantom, grid: Grid, rng: np.random.Generator, noise: bool
) -> tuple[Iterator[np.ndarray] | list[np.ndarray], list[str] | None]:
    if modality == "MR":
        return appearance.mr_slices(phantom, grid, rng, noise), None
    if modality == "CT":
        return appearance.ct_slices(phantom, grid, rng, noise), None
    if modality == "PT":
        return _pet_stored(appearance.pet_volume(phantom, grid, rng, noise))
    if modality == "NM":
        return list(appearance.nm_volume(phantom, grid, rng, noise)), None
    raise ValueError(f"unknown modality {modality!r}; choose from {', '.join(MODALITIES)}")


def generate_study(
    out_dir: Path,
    modalities: Sequence[str] = MODALITIES,
    *,
    scale: float = 1.0,
    grids: dict[str, Grid] | None = None,
    seed: int = 0,
    patient_id: str = "DN-DEMO-0001",
    patient_name: str = "Demo^Fusion",
    issuer_of_patient_id: str | None = None,
    study_instance_uid: str | None = None,
    study_datetime: datetime | None = None,
    frame_of_reference_uid: str | None = None,
    noise: bool = True,
    specific_character_set: str | list[str] = "ISO_IR 100",
    extra_attributes: Mapping[str, object] | None = None,
) -> GeneratedStudy:
    """Write ``out_dir/<modality>/<nnnn>.dcm`` for each modality; ``grids`` overrides the defaults.

    ``patient_name`` is written in ``specific_character_set``; ``extra_attributes`` (keyword: value)
    are set on every instance after everything else, e.g. ``{"PatientBirthTime": "0930"}``.
    """
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modality {unknown[0]!r}; choose from {', '.join(MODALITIES)}")
    out_dir = Path(out_dir)
    phantom = HeadPhantom(seed)
    study = _study_info(
        seed,
        patient_id,
        patient_name,
        issuer_of_patient_id,
        study_instance_uid,
        study_datetime,
        frame_of_reference_uid,
        specific_character_set,
        extra_attributes,
    )
    all_grids = {**default_grids(scale), **(grids or {})}
    written: dict[str, GeneratedSeries] = {}
    for modality in modalities:
        grid = all_grids[modality]
        if grid.origin_mm is None:
            grid = grid.centred_on(phantom.center)
        series_uid = _uid("series", study.study_instance_uid, modality, seed)
        pixels, slopes = _series_pixels(modality, phantom, grid, _rng(seed, modality), noise)
        written[modality] = _write_series(
            out_dir / modality, modality, study, series_uid, grid, pixels, slopes
        )
    return GeneratedStudy(
        study.patient_id, study.study_instance_uid, study.frame_of_reference_uid, phantom, written
    )


def generate_ct_series(
    out_dir: Path, n_slices: int = 500, rows: int = 512, columns: int = 512, seed: int = 0, **kw: object
) -> GeneratedSeries:
    """A thin-slice 16-bit CT series through the head (ingest benchmark), same patient/study as ``seed``'s.

    ``kw`` takes generate_study's identity keywords (patient_id, study_instance_uid, ...), ``noise``, and
    optionally ``pixel_spacing`` / ``slice_spacing`` in mm. Files go to ``out_dir/CT``.
    """
    noise = bool(kw.pop("noise", True))
    pixel_spacing = float(kw.pop("pixel_spacing", 256.0 / max(rows, columns)))  # type: ignore[arg-type]
    slice_spacing = float(kw.pop("slice_spacing", min(1.25, 200.0 / n_slices)))  # type: ignore[arg-type]
    allowed = {
        "patient_id",
        "patient_name",
        "issuer_of_patient_id",
        "study_instance_uid",
        "study_datetime",
        "frame_of_reference_uid",
        "specific_character_set",
        "extra_attributes",
    }
    extra = set(kw) - allowed
    if extra:
        raise TypeError(f"generate_ct_series got unexpected keywords: {', '.join(sorted(extra))}")
    ident = {
        "patient_id": "DN-DEMO-0001",
        "patient_name": "Demo^Fusion",
        "issuer_of_patient_id": None,
        "study_instance_uid": None,
        "study_datetime": None,
        "frame_of_reference_uid": None,
        **kw,
    }
    study = _study_info(seed, **ident)  # type: ignore[arg-type]
    phantom = HeadPhantom(seed)
    grid = Grid(
        rows=rows,
        columns=columns,
        pixel_spacing=(pixel_spacing, pixel_spacing),
        slice_spacing=slice_spacing,
        n_slices=n_slices,
    ).centred_on(phantom.center)
    series_uid = _uid("series", study.study_instance_uid, "CT-BULK", n_slices, rows, columns, seed)
    pixels = appearance.ct_slices(phantom, grid, _rng(seed, "CT-BULK"), noise)
    return _write_series(Path(out_dir) / "CT", "CT", study, series_uid, grid, pixels)
