"""Fused slices -> DICOM Secondary Capture instances (highdicom), one per reference slice.

``output.iod: multiframe-sc`` makes one Multi-frame SC instance instead, with the reference's
geometry (see :mod:`dicomnode.output.multiframe`).

What the SC Image IOD allows and what we put there:
- The Patient and Study modules of the reference (MR) series are copied completely (every
  attribute of those modules the source has, text byte for byte in the source's Specific Character
  Set, which is carried unchanged), so PACS files the fused series into the same study; a new series
  (Modality ``OT``, as highdicom sets for SC) holds it, numbered and described by the caller
  (:mod:`dicomnode.output.identity`).
- Geometry: the SC IOD that dicom3tools checks has no Frame of Reference or Image Plane module, so
  Image Position / Orientation (Patient) and the Frame of Reference UID are *not* written.
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
- The site's notice (``output.notice``) is in the Series Description, Image Comments and the
  Derivation Description and, unless switched off, burned into a corner of every image (Burned In
  Annotation ``YES`` then). A re-fusion names the series it replaces there too.
- General Series: Body Part Examined is copied from the sources; Laterality only when the
  reference has one (an empty Laterality is wrong for an unpaired body part such as the head).
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from highdicom.sc import SCImage
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode import __version__
from dicomnode.output.charset import (
    charset_element,
    charset_value,
    encoded_length,
    fit,
    python_encodings,
    source_text,
    writable_text,
)
from dicomnode.output.identity import series_description
from dicomnode.output.modules import copy_modules
from dicomnode.output.notice import burn_notice

DEFAULT_NOTICE = "RESEARCH USE ONLY"
RESEARCH_NOTICE = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"  # always in the Derivation Description
MANUFACTURER = "dicomnode"
IODS = ("sc", "multiframe-sc")


@dataclass(frozen=True)
class OutputOptions:
    """How the fused series presents itself (``output.*`` in the config)."""

    notice: str = DEFAULT_NOTICE  # empty: no notice in the description and nothing burned in
    notice_in_description: bool = True
    burn_in_notice: bool = True
    iod: str = "sc"  # sc: one SC Image per slice | multiframe-sc: one Multi-frame SC with geometry
    replaces: str = ""  # re-fusion marker for the description, e.g. "REPLACES 9100"
    replaces_series_uid: str | None = None


class OutputError(ValueError):
    """The fused array and the source headers cannot make a valid SC series; the message says why."""


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


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value)


@dataclass
class _Series:
    """What every instance of one fused series shares."""

    series_uid: str
    series_number: int
    description: str
    comments: str
    derivation: str
    burned_in: bool
    photometric: str
    software: str
    source: Dataset  # Patient and Study modules come from here
    body_part: str
    now: datetime.datetime
    same_study: bool


def _series(
    photometric: str,
    reference: Sequence[Dataset],
    moving: Sequence[Dataset],
    *,
    rule_name: str,
    method_name: str,
    method_version: str,
    series_instance_uid: str | None,
    series_number: int,
    registered: bool,
    derivation_note: str,
    options: OutputOptions,
    source: Dataset,
) -> _Series:
    ref0, mov0 = reference[0], moving[0]
    charset = charset_value(source)
    ref_modality = _text(ref0, "Modality") or "MR"
    mov_modality = _text(mov0, "Modality") or "OT"
    notice = writable_text(options.notice, charset)
    description = series_description(
        ref_modality,
        mov_modality,
        writable_text(method_name, charset),
        registered,
        reference_label=writable_text(source_text(ref0, "SeriesDescription"), charset),
        moving_label=writable_text(source_text(mov0, "SeriesDescription"), charset),
        notice=notice if options.notice_in_description else "",
        replaces=writable_text(options.replaces, charset),
        measure=lambda text: encoded_length(text, charset),
    )
    replaced = ""
    if options.replaces_series_uid:
        replaced = f" Replaces the earlier fused series {options.replaces_series_uid}."
    derivation = (
        f"Fusion of {ref_modality} series (reference grid) with {mov_modality} series resampled "
        f"{'after registration ' if registered else ''}by patient coordinates; "
        f"method {method_name} version {method_version}; rule {rule_name}; "
        f"dicomnode {__version__}. {RESEARCH_NOTICE}.{replaced}"
    )
    if derivation_note:
        derivation += f" {derivation_note}"
    body_part = _text(ref0, "BodyPartExamined") or _text(mov0, "BodyPartExamined")
    return _Series(
        series_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        description=description,
        comments=fit(
            " ".join(x for x in (f"{notice}." if notice else "", description, replaced) if x), 10240, charset
        ),
        derivation=fit(writable_text(derivation, charset), 1024, charset),
        burned_in=bool(options.burn_in_notice and notice),
        photometric=photometric,
        software=f"dicomnode {__version__}; {method_name} {method_version}"[:64],
        source=source,
        body_part=body_part.strip().upper()[:16],
        now=datetime.datetime.now(),
        same_study=str(mov0.StudyInstanceUID) == str(ref0.StudyInstanceUID),
    )


def _references(sc: Dataset, common: _Series, refs: Sequence[Dataset], sources: Sequence[Dataset]) -> None:
    """Source Image Sequence and the Common Instance Reference module for ``refs`` + ``sources``."""
    sc.SourceImageSequence = [_image_ref(r, purpose=True) for r in refs] + [
        _image_ref(m, purpose=True) for m in sources
    ]
    ref_series_item, mov_series_item = _series_ref(list(refs)), _series_ref(list(sources))
    if common.same_study:
        sc.ReferencedSeriesSequence = [ref_series_item, mov_series_item]
    else:
        sc.ReferencedSeriesSequence = [ref_series_item]
        other = Dataset()
        other.StudyInstanceUID = sources[0].StudyInstanceUID
        other.ReferencedSeriesSequence = [mov_series_item]
        sc.StudiesContainingOtherReferencedInstancesSequence = [other]


def sc_instance(pixels: np.ndarray, ref: Dataset, number: int, common: _Series) -> SCImage:
    """One Secondary Capture instance of the fused series for the reference slice ``ref``."""
    spacing = None
    if "PixelSpacing" in ref:
        spacing = (float(ref.PixelSpacing[0]), float(ref.PixelSpacing[1]))
    orientation = patient_orientation(ref)
    sc = SCImage(
        pixel_array=np.ascontiguousarray(pixels),
        photometric_interpretation=common.photometric,
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=str(common.source.StudyInstanceUID),
        series_instance_uid=common.series_uid,
        series_number=common.series_number,
        sop_instance_uid=generate_uid(),
        instance_number=number,
        manufacturer=MANUFACTURER,
        pixel_spacing=spacing,
        # highdicom only accepts single letters; the exact (possibly oblique) value is set below.
        patient_orientation=("L", "P"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        manufacturer_model_name="dicomnode fusion",
        software_versions=common.software,
        content_date=common.now.date(),
        content_time=common.now.time(),
        series_date=common.now.date(),
        series_time=common.now.time(),
        # Specific Character Set and the patient/study values are set below, as received: highdicom
        # refuses some legal values (e.g. an empty first value as in "\ISO 2022 IR 87").
    )
    sc.PatientOrientation = list(orientation) if orientation is not None else ""
    copy_modules(common.source, sc)
    charset = charset_element(common.source)
    if charset is not None:
        sc[charset.tag] = copy.deepcopy(charset)
    sc.SeriesDescription = common.description
    if common.body_part:
        sc.BodyPartExamined = common.body_part
    laterality = _text(ref, "Laterality").strip().upper()
    if laterality in ("R", "L"):
        sc.Laterality = laterality
    elif not common.body_part:
        sc.Laterality = ""  # Type 2C with nothing to say whether the part is paired: empty = unknown
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES" if common.burned_in else "NO"
    sc.LossyImageCompression = "00"
    sc.ImageComments = common.comments
    sc.DerivationDescription = common.derivation
    sc.DerivationCodeSequence = [_code_item(codes.DCM.SpatialResampling)]
    if common.photometric == "MONOCHROME2":
        sc.WindowCenter = 128
        sc.WindowWidth = 256
    settle_encoding(sc, common)
    return sc


def settle_encoding(ds: Dataset, common: _Series) -> None:
    """Mark ``ds`` as encoded in the source's character set and Explicit VR Little Endian, so the
    copied text is written byte for byte; ambiguous VRs (e.g. Pixel Data) are fixed here, since
    the writer then leaves the dataset as it is."""
    ds.set_original_encoding(False, True, python_encodings(charset_value(common.source)))
    correct_ambiguous_vr(ds, True)


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
    options: OutputOptions | None = None,
    patient_study_source: pydicom.Dataset | None = None,
) -> list[pydicom.Dataset]:
    """Build the fused series: one SC instance per reference slice (slice order = Instance Number
    order), or with ``options.iod == "multiframe-sc"`` one Multi-frame SC instance.

    ``fused`` (N,H,W) uint8 gives MONOCHROME2, (N,H,W,3) uint8 gives RGB. The Patient and Study
    modules come from ``patient_study_source`` (default: the first reference header; give a header
    read afresh so its text is still as received). Raises OutputError when the inputs do not fit
    together. Nothing is written or sent.
    """
    options = options or OutputOptions()
    if options.iod not in IODS:
        raise OutputError(f"unknown output IOD {options.iod!r}; choose from {', '.join(IODS)}")
    photometric = _check_inputs(fused, reference, moving)
    common = _series(
        photometric,
        reference,
        moving,
        rule_name=rule_name,
        method_name=method_name,
        method_version=method_version,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        registered=registered,
        derivation_note=derivation_note,
        options=options,
        source=patient_study_source if patient_study_source is not None else reference[0],
    )
    pixels = fused
    if common.burned_in:
        pixels, _corner = burn_notice(fused, writable_text(options.notice, ["ISO_IR 100"]))
    moving_index = _MovingIndex(moving)
    if options.iod == "multiframe-sc":
        from dicomnode.output.multiframe import multiframe_instance  # noqa: PLC0415

        return [multiframe_instance(pixels, reference, moving, common)]
    out: list[Dataset] = []
    for k, ref in enumerate(reference):
        sc = sc_instance(pixels[k], ref, k + 1, common)
        _references(sc, common, [ref], moving_index.contributing(ref))
        out.append(sc)
    return out
