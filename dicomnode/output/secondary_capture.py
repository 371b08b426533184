"""Fused slices -> DICOM Secondary Capture instances (highdicom), one per reference slice.

What the SC Image IOD allows and what we put there:
- Patient and Study modules are copied from the reference (MR) series, so PACS files the fused
  series into the same study; a new series (Modality ``OT``, as highdicom sets for SC) holds it.
- Geometry: the SC IOD has no Frame of Reference or Image Plane module, so Image Position /
  Orientation (Patient) and the Frame of Reference UID are *not* written (dciodvfy flags them).
  What is allowed is written: Pixel Spacing (SC Image module) and Patient Orientation (General
  Image module, derived from the reference Image Orientation, e.g. ``L\\P`` for an axial slice).
  Viewers (Orthanc Explorer, OHIF, Weasis) therefore show the slices in Instance Number order with
  a mm scale and orientation markers, but cannot draw reference lines or sync scrolling with the
  source series by position.
- References: the Source Image Sequence of each instance lists the reference slice and the moving
  slices that contributed to it, i.e. the moving slices whose planes lie within one moving slice
  step of the reference slice plane (the ones interpolation reads from; the nearest one when the
  slice lies outside the moving coverage). When the moving headers carry no usable geometry, all
  moving instances are listed. The Common Instance Reference module (Referenced Series Sequence;
  a moving series from another study goes under Studies Containing Other Referenced Instances)
  names both source series with the instances this image references, as PS3.3 C.12.2 defines it
  (listing whole series in every instance made 200-slice outputs ~10x slower to write).
- A research-use notice is put in Image Comments and in the Derivation Description.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import numpy as np
import pydicom
from highdicom.sc import SCImage
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode import __version__

RESEARCH_NOTICE = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
MANUFACTURER = "dicomnode"

_PATIENT_STUDY_KEYWORDS = (
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)


class OutputError(ValueError):
    """The fused array and the source headers cannot make a valid SC series; the message says why."""


def series_description(
    reference_modality: str, moving_modality: str, method_name: str, registered: bool = False
) -> str:
    """The output Series Description, e.g. ``FUSED MR+CT [laplacian-pyramid]`` (LO: at most 64)."""
    reg = " REG" if registered else ""
    ref, mov = reference_modality.strip().upper(), moving_modality.strip().upper()
    text = f"FUSED {ref}+{mov}{reg} [{method_name}]"
    return text[:64]


def _axis_letters(vec: Sequence[float]) -> str:
    """Patient Orientation letters for one direction (LPS): dominant component first, up to three."""
    pos, neg = ("L", "P", "H"), ("R", "A", "F")
    v = np.asarray(vec, dtype=float)
    order = np.argsort(-np.abs(v))
    letters = ""
    for axis in order:
        if abs(v[axis]) < 1e-3 or (letters and abs(v[axis]) < 0.25):
            continue
        letters += pos[axis] if v[axis] > 0 else neg[axis]
    return letters or "L"


def patient_orientation(ds: Dataset) -> tuple[str, str] | None:
    """(row, column) Patient Orientation from Image Orientation (Patient), e.g. ("L", "P") for axial."""
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is None or len(iop) != 6:
        return None
    try:
        vals = [float(v) for v in iop]
    except (TypeError, ValueError):
        return None
    return _axis_letters(vals[:3]), _axis_letters(vals[3:])


def _geometry(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(position, row dir, col dir, (row sp, col sp)) or None when the header lacks geometry."""
    try:
        pos = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        sp = np.array([float(v) for v in ds.PixelSpacing])
    except (AttributeError, TypeError, ValueError):
        return None
    if pos.shape != (3,) or iop.shape != (6,) or sp.shape != (2,):
        return None
    return pos, iop[:3], iop[3:], sp


def _corners(ds: Dataset) -> np.ndarray | None:
    """Patient coordinates of the four corner pixels of a slice (4, 3)."""
    geo = _geometry(ds)
    if geo is None:
        return None
    pos, row, col, sp = geo
    w = (int(ds.Columns) - 1) * sp[1]
    h = (int(ds.Rows) - 1) * sp[0]
    return np.array([pos, pos + row * w, pos + col * h, pos + row * w + col * h])


class _MovingIndex:
    """Moving slices sorted along their normal, to find the ones a reference slice reads from."""

    def __init__(self, moving: Sequence[Dataset]) -> None:
        self.moving = list(moving)
        self.normal: np.ndarray | None = None
        geos = [_geometry(ds) for ds in self.moving]
        if not self.moving or any(g is None for g in geos):
            return
        _, row, col, _ = geos[0]  # type: ignore[misc]
        normal = np.cross(row, col)
        if np.linalg.norm(normal) < 1e-6:
            return
        self.normal = normal / np.linalg.norm(normal)
        self.dist = np.array([float(g[0] @ self.normal) for g in geos])  # type: ignore[index]
        steps = np.diff(np.sort(self.dist))
        steps = steps[steps > 1e-4]
        thickness = float(getattr(self.moving[0], "SliceThickness", 0) or 0)
        self.step = float(np.median(steps)) if steps.size else max(thickness, 1.0)

    def contributing(self, ref: Dataset) -> list[Dataset]:
        """Moving slices within one moving step of the reference slice plane (all when unknown)."""
        if self.normal is None:
            return self.moving
        corners = _corners(ref)
        if corners is None:
            return self.moving
        d = corners @ self.normal
        lo, hi = float(d.min()) - self.step, float(d.max()) + self.step
        hits = [ds for ds, x in zip(self.moving, self.dist, strict=True) if lo < x < hi]
        if not hits:  # outside the moving coverage: the nearest slice is what the resampler saw
            centre = (float(d.min()) + float(d.max())) / 2
            hits = [self.moving[int(np.argmin(np.abs(self.dist - centre)))]]
        return sorted(hits, key=lambda ds: float(_geometry(ds)[0] @ self.normal))  # type: ignore[index]


def _code_item(code: object) -> Dataset:
    """A code sequence item (value, scheme, meaning) from a pydicom ``Code``."""
    item = Dataset()
    item.CodeValue = code.value  # type: ignore[attr-defined]
    item.CodingSchemeDesignator = code.scheme_designator  # type: ignore[attr-defined]
    item.CodeMeaning = code.meaning  # type: ignore[attr-defined]
    return item


def _image_ref(ds: Dataset, purpose: bool) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    # A per-frame header of a multi-frame source (fusion.multiframe.FrameHeader) names its frame.
    frame = getattr(ds, "frame_number", None) if purpose else None
    if isinstance(frame, int):
        item.ReferencedFrameNumber = frame
    if purpose:
        item.PurposeOfReferenceCodeSequence = [_code_item(codes.DCM.SourceImageForImageProcessingOperation)]
    return item


def _series_ref(datasets: Sequence[Dataset]) -> Dataset:
    """A Referenced Series Sequence item listing ``datasets`` (all of one series)."""
    item = Dataset()
    item.SeriesInstanceUID = datasets[0].SeriesInstanceUID
    unique = {str(ds.SOPInstanceUID): ds for ds in datasets}  # a multi-frame instance is listed once
    item.ReferencedInstanceSequence = [_image_ref(ds, purpose=False) for ds in unique.values()]
    return item


def _check_inputs(fused: np.ndarray, reference: Sequence[Dataset], moving: Sequence[Dataset]) -> str:
    """Validate shapes and headers; return the photometric interpretation."""
    if not isinstance(fused, np.ndarray):
        raise OutputError("fused must be a numpy array")
    if fused.dtype != np.uint8:
        raise OutputError(f"fused must be uint8, got {fused.dtype}")
    if fused.ndim == 3:
        photometric = "MONOCHROME2"
    elif fused.ndim == 4 and fused.shape[-1] == 3:
        photometric = "RGB"
    else:
        raise OutputError(f"fused must be (N,H,W) or (N,H,W,3), got shape {fused.shape}")
    if len(reference) != fused.shape[0]:
        raise OutputError(f"fused has {fused.shape[0]} slices but {len(reference)} reference headers given")
    if not moving:
        raise OutputError("no moving-series headers given")
    for name, group in (("reference", reference), ("moving", moving)):
        for ds in group:
            for kw in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID"):
                if not getattr(ds, kw, None):
                    raise OutputError(f"a {name} header has no {kw}")
        if len({str(ds.SeriesInstanceUID) for ds in group}) != 1:
            raise OutputError(f"{name} headers belong to more than one series")
    return photometric


def _optional(ds: Dataset, keyword: str) -> str | None:
    value = getattr(ds, keyword, None)
    return None if value in (None, "") else str(value)


def build_fused_series(
    fused: np.ndarray,
    reference: Sequence[pydicom.Dataset],
    moving: Sequence[pydicom.Dataset],
    *,
    rule_name: str,
    method_name: str,
    method_version: str,
    series_instance_uid: str | None = None,
    series_number: int = 9001,
    registered: bool = False,
    derivation_note: str = "",
) -> list[pydicom.Dataset]:
    """Build one SC instance per reference slice (slice order = Instance Number order).

    ``fused`` (N,H,W) uint8 gives MONOCHROME2, (N,H,W,3) uint8 gives RGB. Raises OutputError
    when the inputs do not fit together. Nothing is written or sent.
    """
    photometric = _check_inputs(fused, reference, moving)
    ref0, mov0 = reference[0], moving[0]
    series_uid = series_instance_uid or generate_uid()
    ref_modality = str(getattr(ref0, "Modality", "") or "MR")
    mov_modality = str(getattr(mov0, "Modality", "") or "OT")
    description = series_description(ref_modality, mov_modality, method_name, registered)
    derivation = (
        f"Fusion of {ref_modality} series (reference grid) with {mov_modality} series resampled "
        f"{'after registration ' if registered else ''}by patient coordinates; "
        f"method {method_name} version {method_version}; rule {rule_name}; "
        f"dicomnode {__version__}. {RESEARCH_NOTICE}."
    )
    if derivation_note:
        derivation += f" {derivation_note}"
    derivation = derivation[:1024]

    moving_index = _MovingIndex(moving)
    same_study = str(mov0.StudyInstanceUID) == str(ref0.StudyInstanceUID)
    now = datetime.datetime.now()
    charset = getattr(ref0, "SpecificCharacterSet", None)

    out: list[Dataset] = []
    for k, ref in enumerate(reference):
        pixels = np.ascontiguousarray(fused[k])
        spacing = None
        if "PixelSpacing" in ref:
            spacing = (float(ref.PixelSpacing[0]), float(ref.PixelSpacing[1]))
        orientation = patient_orientation(ref)
        sc = SCImage(
            pixel_array=pixels,
            photometric_interpretation=photometric,
            bits_allocated=8,
            coordinate_system="PATIENT",
            study_instance_uid=str(ref0.StudyInstanceUID),
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=k + 1,
            manufacturer=MANUFACTURER,
            patient_id=_optional(ref0, "PatientID"),
            patient_name=_optional(ref0, "PatientName"),
            patient_birth_date=_optional(ref0, "PatientBirthDate"),
            patient_sex=_optional(ref0, "PatientSex"),
            accession_number=_optional(ref0, "AccessionNumber"),
            study_id=_optional(ref0, "StudyID"),
            study_date=_optional(ref0, "StudyDate"),
            study_time=_optional(ref0, "StudyTime"),
            referring_physician_name=_optional(ref0, "ReferringPhysicianName"),
            pixel_spacing=spacing,
            # highdicom only accepts single letters; the exact (possibly oblique) value is set below.
            patient_orientation=("L", "P"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=description,
            manufacturer_model_name="dicomnode fusion",
            software_versions=f"dicomnode {__version__}; {method_name} {method_version}",
            content_date=now.date(),
            content_time=now.time(),
            series_date=now.date(),
            series_time=now.time(),
            specific_character_set=charset,
        )
        if orientation is not None:
            sc.PatientOrientation = list(orientation)
        else:
            sc.PatientOrientation = ""
        # Type 2C in General Series; dciodvfy wants it present (empty = unknown / unpaired).
        sc.Laterality = str(getattr(ref, "Laterality", "") or "")
        for kw in _PATIENT_STUDY_KEYWORDS:
            if kw in ref0:
                setattr(sc, kw, ref0[kw].value)
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.ConversionType = "WSD"
        sc.BurnedInAnnotation = "NO"
        sc.LossyImageCompression = "00"
        sc.ImageComments = f"{RESEARCH_NOTICE}. {description}"[:10240]
        sc.DerivationDescription = derivation
        sc.DerivationCodeSequence = [_code_item(codes.DCM.SpatialResampling)]
        sources = moving_index.contributing(ref)
        sc.SourceImageSequence = [_image_ref(ref, purpose=True)] + [
            _image_ref(m, purpose=True) for m in sources
        ]
        ref_series_item, mov_series_item = _series_ref([ref]), _series_ref(sources)
        if same_study:
            sc.ReferencedSeriesSequence = [ref_series_item, mov_series_item]
        else:
            sc.ReferencedSeriesSequence = [ref_series_item]
            other = Dataset()
            other.StudyInstanceUID = mov0.StudyInstanceUID
            other.ReferencedSeriesSequence = [mov_series_item]
            sc.StudiesContainingOtherReferencedInstancesSequence = [other]
        if photometric == "MONOCHROME2":
            sc.WindowCenter = 128
            sc.WindowWidth = 256
        out.append(sc)
    return out
