"""Per-frame headers for multi-frame images: Enhanced MR/CT/PET (functional groups) and NM reconstructions.

A volume is built from headers, one per 2-D frame. A single-frame image is its own header; a
multi-frame image gives one ``FrameHeader`` per frame: the instance's top-level attributes plus the
frame's geometry and rescale as plain single-frame attributes, its ``frame_number`` (1-based, for
Referenced Frame Number) and its ``source`` dataset (where the pixels are).
"""

from __future__ import annotations

import copy

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomnode.fusion.decode import VolumeError

# Top-level elements not copied into per-frame headers (large, or replaced per frame).
_SKIP = {
    0x7FE00010,  # Pixel Data
    0x7FE00008,  # Float Pixel Data
    0x7FE00009,  # Double Float Pixel Data
    0x52009229,  # Shared Functional Groups Sequence
    0x52009230,  # Per-frame Functional Groups Sequence
    0x00540022,  # Detector Information Sequence
    0x00280008,  # Number of Frames
}
_FRAME_TYPE_SEQUENCES = ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence", "PETFrameTypeSequence")
_SLICE_VECTOR = 0x00540080
_CONTENT_KEYWORDS = ("StackID", "InStackPositionNumber", "TemporalPositionIndex", "FrameAcquisitionDateTime")


class FrameHeader(Dataset):
    """Header of one frame of a multi-frame instance: ``frame_number`` (1-based) and ``source`` dataset."""

    frame_number: int
    source: Dataset


def is_multiframe(ds: Dataset) -> bool:
    """True when the image carries several frames or keeps its geometry in functional groups."""
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        return True
    return "PerFrameFunctionalGroupsSequence" in ds or (
        "ImagePositionPatient" not in ds and "DetectorInformationSequence" in ds
    )


def frame_number(header: Dataset) -> int | None:
    """1-based frame number of a per-frame header, None for a single-frame image."""
    return header.frame_number if isinstance(header, FrameHeader) else None


def pixel_source(header: Dataset) -> tuple[Dataset, int]:
    """(dataset holding the pixels, 0-based frame index) for a header."""
    if isinstance(header, FrameHeader):
        return header.source, header.frame_number - 1
    return header, 0


def expand_frames(ds: Dataset) -> list[Dataset]:
    """One header per frame: ``[ds]`` for single-frame images, FrameHeaders for multi-frame ones."""
    if not is_multiframe(ds):
        return [ds]
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return _enhanced_frames(ds)
    if str(getattr(ds, "Modality", "")) == "NM" or "DetectorInformationSequence" in ds:
        return _nm_frames(ds)
    raise VolumeError(
        f"multi-frame image ({int(getattr(ds, 'NumberOfFrames', 1) or 1)} frames) has no per-frame geometry"
        " (neither functional groups nor NM detector/slice vectors)"
    )


def _base_header(ds: Dataset, number: int) -> FrameHeader:
    h = FrameHeader()
    for elem in ds:
        if elem.tag not in _SKIP:
            h.add(copy.copy(elem))
    h.frame_number = number
    h.source = ds
    return h


def _group(ds: Dataset, item: Dataset | None, name: str) -> Dataset | None:
    """First item of functional group macro ``name`` for a frame: per-frame item first, then shared."""
    for holder in (item, _first(ds, "SharedFunctionalGroupsSequence")):
        if holder is not None and name in holder and len(holder[name].value):
            return holder[name].value[0]
    return None


def _first(ds: Dataset, name: str) -> Dataset | None:
    if name in ds and len(ds[name].value):
        return ds[name].value[0]
    return None


def _enhanced_frames(ds: Dataset) -> list[Dataset]:
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    if per_frame and len(per_frame) != n:
        raise VolumeError(f"Per-frame Functional Groups has {len(per_frame)} items for {n} frames")
    headers: list[Dataset] = []
    for f in range(n):
        item = per_frame[f] if per_frame else None
        h = _base_header(ds, f + 1)
        pos = _group(ds, item, "PlanePositionSequence")
        orient = _group(ds, item, "PlaneOrientationSequence")
        measures = _group(ds, item, "PixelMeasuresSequence")
        if pos is None or "ImagePositionPatient" not in pos:
            raise VolumeError(f"frame {f + 1} has no Plane Position (Patient)")
        if orient is None or "ImageOrientationPatient" not in orient:
            raise VolumeError(f"frame {f + 1} has no Plane Orientation (Patient)")
        if measures is None or "PixelSpacing" not in measures:
            raise VolumeError(f"frame {f + 1} has no Pixel Measures (Pixel Spacing)")
        h.ImagePositionPatient = pos.ImagePositionPatient
        h.ImageOrientationPatient = orient.ImageOrientationPatient
        h.PixelSpacing = measures.PixelSpacing
        for kw in ("SliceThickness", "SpacingBetweenSlices"):
            if kw in measures:
                setattr(h, kw, measures[kw].value)
        pvt = _group(ds, item, "PixelValueTransformationSequence")
        if pvt is not None:
            for kw in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
                if kw in pvt:
                    setattr(h, kw, pvt[kw].value)
        content = _group(ds, item, "FrameContentSequence")
        if content is not None:
            for kw in _CONTENT_KEYWORDS:
                if kw in content:
                    setattr(h, kw, content[kw].value)
        for seq in _FRAME_TYPE_SEQUENCES:
            ftype = _group(ds, item, seq)
            if ftype is not None and "FrameType" in ftype:
                h.ImageType = ftype.FrameType
                break
        headers.append(h)
    return headers


def _nm_frames(ds: Dataset) -> list[Dataset]:
    """NM reconstruction: shared plane position/orientation, frame k at k spacings along the normal."""
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    raw = ds.get("FrameIncrementPointer", [])
    pointers = [int(p) for p in (raw if isinstance(raw, list | tuple | MultiValue) else [raw])]
    pointers = [p for p in pointers if p]
    if n > 1 and _SLICE_VECTOR not in pointers:
        raise VolumeError("NM multi-frame image is no reconstruction: no Slice Vector in its frame pointers")
    for p in pointers:
        if p == _SLICE_VECTOR or p not in ds:
            continue
        value = ds[p].value
        values = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
        if len(set(values)) > 1:
            raise VolumeError(
                f"NM multi-frame image varies {ds[p].keyword or hex(p)} across frames; only one detector,"
                " energy window, phase and rotation per volume is supported"
            )
    det = _first(ds, "DetectorInformationSequence")
    src = det if det is not None and "ImagePositionPatient" in det else ds
    if "ImagePositionPatient" not in src or "ImageOrientationPatient" not in src:
        raise VolumeError("NM image has no Image Position/Orientation (Patient) in the Detector Information")
    if "PixelSpacing" not in ds:
        raise VolumeError("NM image has no Pixel Spacing")
    slices = [int(v) for v in ds.get("SliceVector", list(range(1, n + 1)))]
    if len(slices) != n:
        raise VolumeError(f"NM Slice Vector has {len(slices)} values for {n} frames")
    spacing = float(ds.get("SpacingBetweenSlices", 0) or 0) or float(ds.get("SliceThickness", 0) or 0)
    if n > 1 and spacing == 0:
        raise VolumeError("NM reconstruction has no Spacing Between Slices (nor Slice Thickness)")
    pos0 = np.array([float(v) for v in src.ImagePositionPatient])
    iop = np.array([float(v) for v in src.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    headers: list[Dataset] = []
    for f in range(n):
        h = _base_header(ds, f + 1)
        pos = pos0 + (slices[f] - 1) * spacing * normal
        h.ImagePositionPatient = [f"{v:.10g}" if abs(v) >= 1e-6 else "0" for v in pos]
        h.ImageOrientationPatient = src.ImageOrientationPatient
        h.PixelSpacing = ds.PixelSpacing
        headers.append(h)
    return headers
