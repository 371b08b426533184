"""Header-only parsing of a received dataset: the tags the index needs, never the pixel data.

The dataset bytes are parsed as they arrived (inflated first for Deflated Explicit VR Little
Endian) and parsing stops after Pixel Spacing (0028,0030), so pixel data is never read.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

_LAST_TAG = 0x00280030  # Pixel Spacing: the last tag the index needs
_INFLATE_HEAD = 1 << 20  # inflate at most this much of a Deflated dataset: the header fits


class HeaderError(ValueError):
    """The dataset cannot be understood (not DICOM, or a required UID is missing)."""


@dataclass(slots=True)
class InstanceHeader:
    """The index tags of one instance, as strings/numbers ready for the DB."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    modality: str = ""
    series_description: str = ""
    frame_of_reference_uid: str = ""
    study_datetime: datetime | None = None
    instance_number: int | None = None
    image_position: str | None = None
    image_orientation: str | None = None
    pixel_spacing: str | None = None
    slice_thickness: float | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int = 1

    @property
    def patient_key(self) -> str:
        """Patient grouping key: "<issuer>^<id>" when an issuer is present, else "<id>"."""
        if self.issuer_of_patient_id:
            return f"{self.issuer_of_patient_id}^{self.patient_id}"
        return self.patient_id


def _stop(tag: int, _vr: str | None, _length: int) -> bool:
    return tag > _LAST_TAG


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip()


def _multi(ds: Dataset, keyword: str) -> str | None:
    """A multi-valued DS/IS attribute as its text exactly as sent ("x\\y\\z"), or None."""
    elem = ds.get_item(keyword)
    if elem is None:
        return None
    raw = elem.value
    if isinstance(raw, bytes):
        text = raw.decode("ascii", "replace").strip(" \x00")
    elif raw is None or isinstance(raw, str | int | float):
        text = "" if raw is None else str(raw)
    else:
        text = "\\".join(str(v) for v in raw)
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return int(value)


def _float(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return float(value)


def parse_study_datetime(date: str, time: str) -> datetime | None:
    """Study Date (DA) + Study Time (TM) as a naive datetime; None when the date is absent or bad."""
    date = date.strip()
    if len(date) != 8 or not date.isdigit():
        return None
    time = time.strip().replace(":", "")
    whole, _, frac = time.partition(".")
    whole = (whole + "000000")[:6] if whole.isdigit() else "000000"
    micro = int((frac + "000000")[:6]) if frac.isdigit() else 0
    try:
        return datetime.strptime(date + whole, "%Y%m%d%H%M%S").replace(microsecond=micro)
    except ValueError:
        return None


def _dataset_bytes(raw: bytes, transfer_syntax: UID) -> bytes:
    if transfer_syntax.is_deflated:
        try:
            return zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw, _INFLATE_HEAD)
        except zlib.error as exc:
            raise HeaderError(f"deflated dataset cannot be inflated: {exc}") from None
    return raw


def parse_header(
    raw: bytes, transfer_syntax: str, request_sop_class: str = "", request_sop_instance: str = ""
) -> InstanceHeader:
    """Parse the index tags from the raw dataset bytes; HeaderError names what is wrong."""
    ts = UID(transfer_syntax)
    if ts.is_transfer_syntax:
        implicit, little = ts.is_implicit_VR, ts.is_little_endian
    else:  # private/unknown transfer syntax: its dataset is Explicit VR Little Endian by rule
        implicit, little = False, True
    data = _dataset_bytes(raw, ts)
    if not data:
        raise HeaderError("the dataset is empty")
    try:
        ds = read_dataset(BytesIO(data), implicit, little, stop_when=_stop)
        if len(ds) == 0:
            raise HeaderError("the dataset cannot be parsed: no DICOM elements found")
        header = _extract(ds, request_sop_class, request_sop_instance)
    except HeaderError:
        raise
    except Exception as exc:  # pydicom raises many types on garbage; all mean "cannot understand"
        raise HeaderError(f"the dataset cannot be parsed: {type(exc).__name__}: {exc}") from None
    return header


def _extract(ds: Dataset, request_sop_class: str, request_sop_instance: str) -> InstanceHeader:
    sop_instance = _text(ds, "SOPInstanceUID") or request_sop_instance.strip()
    sop_class = _text(ds, "SOPClassUID") or request_sop_class.strip()
    if request_sop_instance and sop_instance != request_sop_instance.strip():
        raise HeaderError(
            "SOP Instance UID in the dataset differs from the Affected SOP Instance UID of the request"
        )
    missing = [
        name
        for name, value in (
            ("SOP Instance UID", sop_instance),
            ("SOP Class UID", sop_class),
            ("Study Instance UID", _text(ds, "StudyInstanceUID")),
            ("Series Instance UID", _text(ds, "SeriesInstanceUID")),
        )
        if not value
    ]
    if missing:
        raise HeaderError("required attribute missing: " + ", ".join(missing))
    frames = _int(ds, "NumberOfFrames")
    return InstanceHeader(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName"),
        modality=_text(ds, "Modality").upper(),
        series_description=_text(ds, "SeriesDescription"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        study_datetime=parse_study_datetime(_text(ds, "StudyDate"), _text(ds, "StudyTime")),
        instance_number=_int(ds, "InstanceNumber"),
        image_position=_multi(ds, "ImagePositionPatient"),
        image_orientation=_multi(ds, "ImageOrientationPatient"),
        pixel_spacing=_multi(ds, "PixelSpacing"),
        slice_thickness=_float(ds, "SliceThickness"),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        number_of_frames=frames if frames and frames > 0 else 1,
    )
