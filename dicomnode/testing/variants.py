"""Real-world variants of generated series: encodings, multi-frame, orientation, tilt, gaps, localizers.

Each function takes a generated series (its file paths) or generates one on a special grid, and writes
the variant next to it, so tests can check that the loaded volume matches the plain-encoded one.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedPETImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicomnode.testing.generator import GeneratedSeries, _uid, generate_study
from dicomnode.testing.grid import Grid
from dicomnode.testing.headers import ds_str


@dataclass(frozen=True)
class Encoding:
    """A transfer syntax variant: its UID, whether it loses information, and how it is written."""

    name: str
    uid: UID
    lossy: bool
    tool: str  # "pydicom" (save/compress) or "dcmcjpeg" (with its options)
    options: tuple[str, ...] = ()


ENCODINGS: dict[str, Encoding] = {
    e.name: e
    for e in (
        Encoding("explicit-le", ExplicitVRLittleEndian, False, "pydicom"),
        Encoding("implicit-le", ImplicitVRLittleEndian, False, "pydicom"),
        Encoding("deflated", DeflatedExplicitVRLittleEndian, False, "pydicom"),
        Encoding("jpeg-baseline", JPEGBaseline8Bit, True, "dcmcjpeg", ("+eb", "+rm", "+q", "95")),
        Encoding("jpeg-extended", JPEGExtended12Bit, True, "dcmcjpeg", ("+ee", "+q", "95")),
        Encoding("jpeg-lossless", JPEGLossless, False, "dcmcjpeg", ("+el",)),
        Encoding("jpeg-lossless-sv1", JPEGLosslessSV1, False, "dcmcjpeg", ("+e1",)),
        Encoding("jpeg-ls", JPEGLSLossless, False, "pydicom"),
        Encoding("jpeg-ls-near", JPEGLSNearLossless, True, "pydicom"),
        Encoding("jpeg2000-lossless", JPEG2000Lossless, False, "pydicom"),
        Encoding("jpeg2000", JPEG2000, True, "pydicom"),
        Encoding("rle", RLELossless, False, "pydicom"),
    )
}

PLANES: dict[str, tuple[float, ...]] = {
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
}


def _oblique(rx_deg: float = 20.0, ry_deg: float = 10.0) -> tuple[float, ...]:
    ax, ay = np.radians(rx_deg), np.radians(ry_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    r = ry @ rx
    return tuple(round(float(v), 6) for v in (*r[:, 0], *r[:, 1]))


PLANES["oblique"] = _oblique()


def _read(paths: Sequence[Path]) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in paths]


def _write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def reencode(paths: Sequence[Path], out_dir: Path, encoding: str) -> list[Path]:
    """Write ``paths`` in the named encoding (see ENCODINGS) to ``out_dir``: same names and SOP UIDs."""
    enc = ENCODINGS[encoding]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    for p in paths:
        target = out_dir / Path(p).name
        if enc.tool == "dcmcjpeg":
            if shutil.which("dcmcjpeg") is None:
                raise RuntimeError("dcmcjpeg (dcmtk) is needed for JPEG encodings")
            cmd = ["dcmcjpeg", *enc.options, "+un", str(p), str(target)]
            subprocess.run(cmd, check=True, capture_output=True, env=_dcmtk_env())
            out.append(target)
            continue
        ds = pydicom.dcmread(p)
        if enc.uid in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
            ds.file_meta.TransferSyntaxUID = enc.uid
        elif enc.uid == JPEG2000:
            ds.compress(enc.uid, j2k_cr=[4], generate_instance_uid=False)
        elif enc.uid == JPEGLSNearLossless:
            ds.compress(enc.uid, jls_error=2, generate_instance_uid=False)
        else:
            ds.compress(enc.uid, generate_instance_uid=False)
        if enc.lossy:
            ds.LossyImageCompression = "01"
        out.append(_write(ds, target))
    return out


def _set_pixels(ds: Dataset, data: bytes) -> None:
    """Native pixel data with the VR its Bits Allocated asks for."""
    ds.PixelData = data
    ds["PixelData"].VR = "OW" if int(ds.get("BitsAllocated", 16)) > 8 else "OB"


def _pixels(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.pixel_array)


def monochrome1(paths: Sequence[Path], out_dir: Path) -> list[Path]:
    """Same images stored inverted as MONOCHROME1 (stored = min + max of the stored range - value)."""
    out = []
    for p in paths:
        ds = pydicom.dcmread(p)
        bits = int(ds.BitsStored)
        signed = int(ds.PixelRepresentation) == 1
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        stored = _pixels(ds)
        _set_pixels(ds, (lo + hi - stored.astype(np.int64)).astype(stored.dtype).tobytes())
        ds.PhotometricInterpretation = "MONOCHROME1"
        out.append(_write(ds, Path(out_dir) / Path(p).name))
    return out


def rescale_per_slice(paths: Sequence[Path], out_dir: Path) -> list[Path]:
    """Same physical values, but each slice k has its own Rescale Slope/Intercept (m/2, b - 10 k m)."""
    out = []
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        m = float(ds.get("RescaleSlope", 1) or 1)
        b = float(ds.get("RescaleIntercept", 0) or 0)
        px = _pixels(ds).astype(np.int64) * 2 + 20 * k
        dtype = np.int16 if int(ds.PixelRepresentation) == 1 else np.uint16
        if px.max() > np.iinfo(dtype).max:
            raise ValueError("stored values too large to rescale per slice")
        _set_pixels(ds, px.astype(dtype).tobytes())
        ds.BitsStored, ds.HighBit = 16, 15
        ds.RescaleSlope = ds_str(m / 2)
        ds.RescaleIntercept = ds_str(b - 10 * k * m)
        if "RescaleType" not in ds:
            ds.RescaleType = "US"
        out.append(_write(ds, Path(out_dir) / Path(p).name))
    return out


def with_gaps(paths: Sequence[Path], missing: Sequence[int]) -> list[Path]:
    """The series without the slices at ``missing`` indices (gaps, as when a scanner drops slices)."""
    drop = set(missing)
    return [p for k, p in enumerate(paths) if k not in drop]


_ENHANCED = {"MR": EnhancedMRImageStorage, "CT": EnhancedCTImageStorage, "PT": EnhancedPETImageStorage}
_FRAME_TYPE = {
    "MR": "MRImageFrameTypeSequence",
    "CT": "CTImageFrameTypeSequence",
    "PT": "PETFrameTypeSequence",
}
_PER_SLICE = (
    "SOPInstanceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "SliceLocation",
    "ImageIndex",
    "InstanceNumber",
    "PixelData",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
)


def _item(**values: object) -> Dataset:
    d = Dataset()
    for k, v in values.items():
        setattr(d, k, v)
    return d


def to_enhanced(paths: Sequence[Path], out_path: Path, *, frame_order: Sequence[int] | None = None) -> Path:
    """One Enhanced MR/CT/PET multi-frame instance from single-frame slices (functional groups).

    Orientation and pixel measures go in the shared groups; position, frame content and (when it varies)
    the pixel value transformation go per frame. ``frame_order`` permutes the frames (unsorted storage).
    """
    slices = _read(paths)
    order = list(frame_order) if frame_order is not None else list(range(len(slices)))
    slices = [slices[n] for n in order]
    first = slices[0]
    modality = str(first.Modality)
    if modality not in _ENHANCED:
        raise ValueError(f"no Enhanced IOD for modality {modality}; use to_nm_multiframe for NM")
    ds = copy.deepcopy(first)
    for kw in _PER_SLICE:
        if kw in ds:
            delattr(ds, kw)
    uid = _uid("enhanced", first.SeriesInstanceUID, len(slices), tuple(order))
    ds.SOPClassUID = _ENHANCED[modality]
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.NumberOfFrames = len(slices)
    ds.ContentQualification = "PRODUCT"
    shared = Dataset()
    measures = _item(PixelSpacing=first.PixelSpacing, SliceThickness=first.SliceThickness)
    if "SpacingBetweenSlices" in first:
        measures.SpacingBetweenSlices = first.SpacingBetweenSlices
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orientation = _item(ImageOrientationPatient=first.ImageOrientationPatient)
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    frame_type = _item(FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"])
    setattr(shared, _FRAME_TYPE[modality], DicomSequence([frame_type]))

    def pvt(s: Dataset) -> Dataset | None:
        if "RescaleSlope" not in s and "RescaleIntercept" not in s:
            return None
        return _item(
            RescaleSlope=s.get("RescaleSlope", "1"),
            RescaleIntercept=s.get("RescaleIntercept", "0"),
            RescaleType=s.get("RescaleType", "US"),
        )

    rescales = {(str(s.get("RescaleSlope")), str(s.get("RescaleIntercept"))) for s in slices}
    per_frame_rescale = len(rescales) > 1
    if not per_frame_rescale and pvt(first) is not None:
        shared.PixelValueTransformationSequence = DicomSequence([pvt(first)])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for n, s in enumerate(slices):
        f = Dataset()
        f.FrameContentSequence = DicomSequence(
            [_item(StackID="1", InStackPositionNumber=order[n] + 1, DimensionIndexValues=[1, order[n] + 1])]
        )
        f.PlanePositionSequence = DicomSequence([_item(ImagePositionPatient=s.ImagePositionPatient)])
        if per_frame_rescale:
            f.PixelValueTransformationSequence = DicomSequence([pvt(s)])
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    _set_pixels(ds, b"".join(np.ascontiguousarray(_pixels(s)).tobytes() for s in slices))
    return _write(ds, Path(out_path))


def to_nm_multiframe(paths: Sequence[Path], out_path: Path) -> Path:
    """One NM reconstruction (RECON TOMO) multi-frame instance: Slice Vector, shared detector plane."""
    slices = _read(paths)
    first = slices[0]
    ds = copy.deepcopy(first)
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "SliceLocation"):
        if kw in ds:
            delattr(ds, kw)
    uid = _uid("nm-multiframe", first.SeriesInstanceUID, len(slices))
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(slices)
    ds.FrameIncrementPointer = 0x00540080
    ds.SliceVector = list(range(1, len(slices) + 1))
    ds.NumberOfSlices = len(slices)
    det = ds.DetectorInformationSequence[0]
    det.ImagePositionPatient = first.ImagePositionPatient
    det.ImageOrientationPatient = first.ImageOrientationPatient
    _set_pixels(ds, b"".join(np.ascontiguousarray(_pixels(s)).tobytes() for s in slices))
    return _write(ds, Path(out_path))


def with_localizers(paths: Sequence[Path], out_dir: Path, n: int = 3, mark: bool = True) -> list[Path]:
    """The series plus ``n`` localizers (coronal/sagittal) in its series; Image Type LOCALIZER if ``mark``."""
    out_dir = Path(out_dir)
    out = [Path(shutil.copy(p, out_dir / Path(p).name)) for p in paths]
    template = pydicom.dcmread(paths[len(paths) // 2])
    pos = np.array([float(v) for v in template.ImagePositionPatient])
    for k in range(n):
        ds = copy.deepcopy(template)
        uid = _uid("localizer", template.SeriesInstanceUID, k)
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = 900 + k
        if mark:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = list(PLANES["coronal"]) if k % 2 == 0 else list(PLANES["sagittal"])
        ds.ImagePositionPatient = [ds_str(v) for v in pos + np.array([0.0, 10.0 * k, 40.0])]
        out.append(_write(ds, out_dir / f"loc{k + 1:02d}.dcm"))
    return out


def second_echo(paths: Sequence[Path], out_dir: Path, factor: float = 0.5) -> list[Path]:
    """The series plus a second stack at the same positions (Echo Numbers 2, values x ``factor``)."""
    out_dir = Path(out_dir)
    out = []
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ds.EchoNumbers = 1
        out.append(_write(ds, out_dir / f"e1_{Path(p).name}"))
        ds2 = copy.deepcopy(ds)
        uid = _uid("echo2", ds.SOPInstanceUID)
        ds2.SOPInstanceUID = uid
        ds2.file_meta.MediaStorageSOPInstanceUID = uid
        ds2.EchoNumbers = 2
        ds2.InstanceNumber = len(paths) + k + 1
        px = _pixels(ds)
        _set_pixels(ds2, np.rint(px * factor).astype(px.dtype).tobytes())
        out.append(_write(ds2, out_dir / f"e2_{Path(p).name}"))
    return out


def merge_into_series(main: Sequence[Path], other: Sequence[Path], out_dir: Path) -> list[Path]:
    """``other``'s images relabelled into ``main``'s series (e.g. an axial and a sagittal stack in one)."""
    out_dir = Path(out_dir)
    out = [Path(shutil.copy(p, out_dir / f"a_{Path(p).name}")) for p in main]
    ref = pydicom.dcmread(main[0], stop_before_pixels=True)
    for k, p in enumerate(other):
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID = ref.SeriesInstanceUID
        ds.SeriesNumber = ref.SeriesNumber
        ds.InstanceNumber = len(main) + k + 1
        out.append(_write(ds, out_dir / f"b_{Path(p).name}"))
    return out


def pet_to_bqml(
    paths: Sequence[Path], out_dir: Path, drop: Sequence[str] = (), decay: str = "START"
) -> list[Path]:
    """Generated PET (Units GML) re-expressed in Bq/ml with the SUV factors; ``drop`` removes tags."""
    out = []
    for p in paths:
        ds = pydicom.dcmread(p)
        rp = ds.RadiopharmaceuticalInformationSequence[0]
        dose = float(rp.RadionuclideTotalDose)
        half_life = float(rp.RadionuclideHalfLife)
        injected = datetime.strptime(str(rp.RadiopharmaceuticalStartDateTime)[:14], "%Y%m%d%H%M%S")
        start = datetime.strptime(f"{ds.SeriesDate}{str(ds.SeriesTime)[:6]}", "%Y%m%d%H%M%S")
        elapsed = (start - injected).total_seconds() if decay == "START" else 0.0
        bq_per_suv = dose * 2.0 ** (-elapsed / half_life) / (float(ds.PatientWeight) * 1000.0)
        ds.RescaleSlope = ds_str(float(ds.RescaleSlope) * bq_per_suv)
        ds.Units = "BQML"
        ds.DecayCorrection = decay
        for kw in drop:
            if kw in ds:
                delattr(ds, kw)
            if kw in rp:
                delattr(rp, kw)
        out.append(_write(ds, Path(out_dir) / Path(p).name))
    return out


def corrupt_pixel_data(paths: Sequence[Path], out_dir: Path) -> list[Path]:
    """Compressed files whose codestream is garbage (the decoder must fail, naming the syntax)."""
    out = []
    for p in paths:
        ds = pydicom.dcmread(p)
        if not ds.file_meta.TransferSyntaxUID.is_compressed:
            raise ValueError("corrupt_pixel_data expects compressed files (use reencode first)")
        n = int(getattr(ds, "NumberOfFrames", 1) or 1)
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60) for _ in range(n)])
        ds["PixelData"].VR = "OB"
        out.append(_write(ds, Path(out_dir) / Path(p).name))
    return out


@dataclass
class TiltedGrid(Grid):
    """A CT grid acquired with gantry tilt: slice planes tilted about x, slices stepped along patient z."""

    tilt_deg: float = 0.0

    def __post_init__(self) -> None:
        t = np.radians(self.tilt_deg)
        self.orientation = (1.0, 0.0, 0.0, 0.0, round(float(np.cos(t)), 8), round(float(np.sin(t)), 8))
        super().__post_init__()

    def affine(self) -> np.ndarray:
        a = super().affine()
        a[:3, 2] = np.array([0.0, 0.0, 1.0]) * self.slice_spacing  # table moves along z
        return a

    def centred_on(self, center_mm: np.ndarray) -> TiltedGrid:
        row, col, _ = self.directions()
        half = (
            (self.columns - 1) / 2 * self.pixel_spacing[1] * row
            + (self.rows - 1) / 2 * self.pixel_spacing[0] * col
            + (self.n_slices - 1) / 2 * self.slice_spacing * np.array([0.0, 0.0, 1.0])
        )
        origin = np.asarray(center_mm, dtype=np.float64) - half
        return _replace(self, origin_mm=tuple(round(float(v), 4) for v in origin))


@dataclass
class PositionedGrid(Grid):
    """A grid whose slices sit at given offsets (mm along the normal) instead of a uniform step."""

    offsets_mm: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.offsets_mm) != self.n_slices:
            raise ValueError("offsets_mm needs one offset per slice")
        super().__post_init__()

    def slice_origin(self, k: int) -> np.ndarray:
        _, _, normal = self.directions()
        return np.asarray(self.origin_mm, dtype=np.float64) + normal * self.offsets_mm[k]

    def centred_on(self, center_mm: np.ndarray) -> PositionedGrid:
        row, col, normal = self.directions()
        half = (
            (self.columns - 1) / 2 * self.pixel_spacing[1] * row
            + (self.rows - 1) / 2 * self.pixel_spacing[0] * col
            + (self.offsets_mm[0] + self.offsets_mm[-1]) / 2 * normal
        )
        origin = np.asarray(center_mm, dtype=np.float64) - half
        return _replace(self, origin_mm=tuple(round(float(v), 4) for v in origin))


def _replace(grid: Grid, **changes: object) -> Grid:
    from dataclasses import replace  # noqa: PLC0415

    return replace(grid, **changes)  # type: ignore[arg-type]


def small_grid(
    modality: str = "MR",
    n_slices: int = 12,
    matrix: int = 32,
    plane: str = "axial",
    pixel_mm: float = 6.0,
    slice_mm: float = 6.0,
) -> Grid:
    """A small grid over the head (fast tests): ``plane`` is axial, sagittal, coronal or oblique."""
    return Grid(
        rows=matrix,
        columns=matrix,
        pixel_spacing=(pixel_mm, pixel_mm),
        slice_spacing=slice_mm,
        n_slices=n_slices,
        orientation=PLANES[plane],
    )


def generate_series(
    out_dir: Path, modality: str, grid: Grid, seed: int = 0, noise: bool = False
) -> GeneratedSeries:
    """One generated series of ``modality`` on ``grid`` (any Grid subclass) in ``out_dir/<modality>``."""
    study = generate_study(Path(out_dir), [modality], grids={modality: grid}, seed=seed, noise=noise)
    return study.series[modality]


def generate_tilted_ct(
    out_dir: Path,
    tilt_deg: float,
    n_slices: int = 12,
    matrix: int = 32,
    pixel_mm: float = 6.0,
    slice_mm: float = 6.0,
    seed: int = 0,
) -> GeneratedSeries:
    """CT acquired with gantry tilt ``tilt_deg`` (Gantry/Detector Tilt set): a sheared stack."""
    grid = TiltedGrid(
        rows=matrix,
        columns=matrix,
        pixel_spacing=(pixel_mm, pixel_mm),
        slice_spacing=slice_mm,
        n_slices=n_slices,
        tilt_deg=tilt_deg,
    )
    series = generate_series(out_dir, "CT", grid, seed=seed)
    for p in series.paths:
        ds = pydicom.dcmread(p)
        ds.GantryDetectorTilt = ds_str(tilt_deg)
        ds.save_as(p, enforce_file_format=True)
    return series


def generate_irregular(
    out_dir: Path,
    modality: str,
    offsets_mm: Sequence[float],
    matrix: int = 32,
    pixel_mm: float = 6.0,
    plane: str = "axial",
    seed: int = 0,
) -> GeneratedSeries:
    """A series whose slices sit at ``offsets_mm`` along the normal (non-uniform spacing)."""
    offsets = tuple(float(v) for v in offsets_mm)
    steps = np.diff(offsets)
    grid = PositionedGrid(
        rows=matrix,
        columns=matrix,
        pixel_spacing=(pixel_mm, pixel_mm),
        slice_spacing=float(np.median(steps)) if len(steps) else 1.0,
        n_slices=len(offsets),
        orientation=PLANES[plane],
        offsets_mm=offsets,
    )
    return generate_series(out_dir, modality, grid, seed=seed)
