"""``output.iod: multiframe-sc``: the fused series as one Multi-frame SC instance with geometry.

The Multi-frame Grayscale Byte SC (MR+CT) and Multi-frame True Color SC (MR+PET, MR+SPECT) IODs
take an optional Frame of Reference module and the Multi-frame Functional Groups module with the
Pixel Measures, Plane Position (Patient) and Plane Orientation (Patient) functional groups. So the
fused frames carry the reference (MR) series' Frame of Reference UID and each frame the position
of its reference slice: viewers that read functional-group geometry can link the fused series to
its sources by patient position (reference lines, synchronised scrolling), which the single-frame
SC Image IOD of dicom3tools' edition cannot express.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomnode.output.secondary_capture import (
    OutputError,
    _MovingIndex,
    _references,
    _Series,
    sc_instance,
    settle_encoding,
)

MULTIFRAME_GRAYSCALE_BYTE_SC = UID("1.2.840.10008.5.1.4.1.1.7.2")
MULTIFRAME_TRUE_COLOR_SC = UID("1.2.840.10008.5.1.4.1.1.7.4")
SLICE_LOCATION_VECTOR = 0x00182005


def _floats(value: object, n: int, what: str) -> list[float]:
    try:
        out = [float(v) for v in value]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        out = []
    if len(out) != n:
        raise OutputError(f"a reference slice has no usable {what}; multiframe-sc needs the slice geometry")
    return out


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{value:.8g}"


def multiframe_instance(
    pixels: np.ndarray, reference: Sequence[Dataset], moving: Sequence[Dataset], common: _Series
) -> Dataset:
    """All fused slices as the frames of one instance, with the reference series' geometry."""
    ref0 = reference[0]
    for_uid = str(ref0.get("FrameOfReferenceUID", "") or "")
    if not for_uid:
        raise OutputError("the reference series has no Frame of Reference UID; multiframe-sc needs one")
    positions = [_floats(r.get("ImagePositionPatient"), 3, "Image Position (Patient)") for r in reference]
    orientations = [
        _floats(r.get("ImageOrientationPatient"), 6, "Image Orientation (Patient)") for r in reference
    ]
    spacing = _floats(ref0.get("PixelSpacing"), 2, "Pixel Spacing")
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    locations = [float(np.dot(p, normal)) for p in positions]

    ds = sc_instance(pixels[0], ref0, 1, common)
    sop_class = MULTIFRAME_TRUE_COLOR_SC if common.photometric == "RGB" else MULTIFRAME_GRAYSCALE_BYTE_SC
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.NumberOfFrames = len(reference)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if "PixelSpacing" in ds:
        del ds.PixelSpacing  # in the Pixel Measures functional group instead
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = str(ref0.get("PositionReferenceIndicator", "") or "")
    thickness = ref0.get("SliceThickness")
    steps = np.diff(sorted(locations))
    if thickness in (None, ""):
        thickness = _ds(float(np.median(steps))) if steps.size else "1"
    measures = _item(PixelSpacing=[_ds(v) for v in spacing], SliceThickness=thickness)
    shared = _item(PixelMeasuresSequence=[measures])
    same_orientation = all(np.allclose(o, orientations[0], atol=1e-4) for o in orientations)
    if same_orientation:
        shared.PlaneOrientationSequence = [_item(ImageOrientationPatient=[_ds(v) for v in orientations[0]])]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for pos, iop in zip(positions, orientations, strict=True):
        frame = _item(PlanePositionSequence=[_item(ImagePositionPatient=[_ds(v) for v in pos])])
        if not same_orientation:
            frame.PlaneOrientationSequence = [_item(ImageOrientationPatient=[_ds(v) for v in iop])]
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    # The Multi-frame module's Frame Increment Pointer: frames step through Slice Location Vector.
    ds.FrameIncrementPointer = SLICE_LOCATION_VECTOR
    ds.SliceLocationVector = [_ds(v) for v in locations]
    if common.photometric == "MONOCHROME2":
        ds.PresentationLUTShape = "IDENTITY"
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
    index = _MovingIndex(moving)
    sources: dict[str, Dataset] = {}
    for ref in reference:
        for m in index.contributing(ref):
            sources.setdefault(str(m.SOPInstanceUID), m)
    _references(ds, common, reference, list(sources.values()))
    settle_encoding(ds, common)
    return ds
