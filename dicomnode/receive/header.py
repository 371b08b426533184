"""Header-only parsing of a received dataset: the tags the index needs, never the pixel data.

The dataset bytes are parsed as they arrived (inflated first for Deflated Explicit VR Little
Endian) and parsing stops after Pixel Spacing (0028,0030), so pixel data is never read.
Every value is checked before it reaches the index: UIDs must be UIDs, numbers finite and within
their VR's range, identifiers within their VR's length, sequences nested at most
``elements.MAX_DEPTH`` deep. Anything else is a HeaderError naming the element (0xC000).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from dicomnode.receive.elements import NestingTooDeep, scan_elements
from dicomnode.uid import uid_problem

_LAST_TAG = 0x00280030  # Pixel Spacing: the last tag the index needs
_INFLATE_HEAD = 1 << 20  # inflate at most this much of a Deflated dataset: the header fits
_IS_RANGE = (-(2**31), 2**31 - 1)  # PS3.5 6.2: an Integer String is a signed 32-bit value


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
    protocol_name: str = ""
    sequence_name: str = ""
    body_part: str = ""
    acquisition_type: str = ""
    image_type: str = ""
    frame_of_reference_uid: str = ""
    study_datetime: datetime | None = None
    series_number: int | None = None
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


# The tags the index needs (all at or before Pixel Spacing) and how their text is read.
_TAGS: dict[int, str] = {
    0x00080005: "SpecificCharacterSet",
    0x00080008: "ImageType",
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080020: "StudyDate",
    0x00080030: "StudyTime",
    0x00080060: "Modality",
    0x0008103E: "SeriesDescription",
    0x00100010: "PatientName",
    0x00100020: "PatientID",
    0x00100021: "IssuerOfPatientID",
    0x00180015: "BodyPartExamined",
    0x00180023: "MRAcquisitionType",
    0x00180024: "SequenceName",
    0x00180050: "SliceThickness",
    0x00181030: "ProtocolName",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200011: "SeriesNumber",
    0x00200013: "InstanceNumber",
    0x00200032: "ImagePositionPatient",
    0x00200037: "ImageOrientationPatient",
    0x00200052: "FrameOfReferenceUID",
    0x00280008: "NumberOfFrames",
    0x00280010: "Rows",
    0x00280011: "Columns",
    0x00280030: "PixelSpacing",
}
_WANTED = frozenset(_TAGS)
_BINARY_US = {"Rows", "Columns"}
# Index column widths. Identifiers longer than their VR allows are refused (a cut identifier could
# name another patient); descriptive text is cut to fit; decimals longer than this are refused.
_ID_LIMITS = {"PatientID": 64, "IssuerOfPatientID": 64, "Modality": 16}
_TEXT_LIMITS = {
    "PatientName": 200,
    "SeriesDescription": 200,
    "ProtocolName": 200,
    "SequenceName": 200,
    "BodyPartExamined": 64,
    "MRAcquisitionType": 8,
    "ImageType": 200,
    "ImagePositionPatient": 128,
    "ImageOrientationPatient": 256,
    "PixelSpacing": 64,
}
_CHARSET_TEXT = {"SeriesDescription", "PatientName", "PatientID", "IssuerOfPatientID", "ProtocolName"}
_PN_DELIMITERS = {0x5E, 0x3D}  # ^ and =


def _stop(tag: int, _vr: str | None, _length: int) -> bool:
    return tag > _LAST_TAG


def _values_fast(data: bytes, implicit: bool) -> dict[str, str | int]:
    """Index values straight from the element bytes (little endian only)."""
    raw = scan_elements(data, implicit, _WANTED, _LAST_TAG)
    charset = raw.get(0x00080005, b"").decode("ascii", "replace").strip(" \x00")
    encodings = convert_encodings([c.strip() for c in charset.split("\\")] if charset else None)
    values: dict[str, str | int] = {}
    for tag, value in raw.items():
        name = _TAGS[tag]
        if name in _BINARY_US:
            if len(value) >= 2:
                values[name] = int.from_bytes(value[:2], "little")
            continue
        if name in _CHARSET_TEXT:
            text = decode_bytes(value, encodings, _PN_DELIMITERS if name == "PatientName" else set())
        else:
            text = value.decode("ascii", "replace")
        text = text.strip(" \x00")
        if text:
            values[name] = text
    return values


def _values_pydicom(data: bytes, implicit: bool, little: bool) -> dict[str, str | int]:
    """Index values through pydicom (big endian, or datasets the fast scanner refuses)."""
    ds = read_dataset(BytesIO(data), implicit, little, stop_when=_stop)
    if len(ds) == 0:
        raise HeaderError("the dataset cannot be parsed: no DICOM elements found")
    values: dict[str, str | int] = {}
    for name in _TAGS.values():
        elem = ds.get_item(name)
        if elem is None or elem.value in (None, b"", ""):
            continue
        if name in _BINARY_US:
            values[name] = int(ds[name].value)
        elif isinstance(elem.value, bytes) and name not in _CHARSET_TEXT:
            values[name] = elem.value.decode("ascii", "replace").strip(" \x00")
        else:
            value = ds[name].value
            if isinstance(value, MultiValue):
                values[name] = "\\".join(str(x) for x in value)
            else:
                values[name] = value if isinstance(value, str) else str(value)
    return {k: (v.strip() if isinstance(v, str) else v) for k, v in values.items() if v != ""}


def _tag(name: str) -> str:
    tag = next(t for t, n in _TAGS.items() if n == name)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _int(name: str, value: str | int | None) -> int | None:
    """An IS value as int; HeaderError when it is not a finite number within the IS range."""
    if value is None or isinstance(value, int):
        return value
    try:
        number = int(value)
    except ValueError:
        try:
            real = float(value)
        except ValueError:
            raise HeaderError(f"{name} {_tag(name)} is not a number: {value[:32]!r}") from None
        if not math.isfinite(real):
            raise HeaderError(f"{name} {_tag(name)} is not a finite number: {value[:32]!r}") from None
        number = int(real)
    if not _IS_RANGE[0] <= number <= _IS_RANGE[1]:
        raise HeaderError(f"{name} {_tag(name)} is out of the IS range: {value[:32]!r}")
    return number


def _decimals(name: str, value: str | int | None) -> str | None:
    """A DS value (backslash-separated) unchanged, after checking every part is a finite number."""
    if value is None:
        return None
    text = str(value)
    if len(text) > _TEXT_LIMITS.get(name, 256):
        raise HeaderError(f"{name} {_tag(name)} is longer than {_TEXT_LIMITS.get(name, 256)} characters")
    for part in text.split("\\"):
        try:
            ok = math.isfinite(float(part))
        except ValueError:
            ok = False
        if not ok:
            raise HeaderError(f"{name} {_tag(name)} is not a finite decimal: {part[:32]!r}")
    return text


def _float(name: str, value: str | int | None) -> float | None:
    text = _decimals(name, value)
    return None if text is None else float(text.split("\\")[0])


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
    values: dict[str, str | int] | None = None
    if little:
        try:
            values = _values_fast(data, implicit)
        except NestingTooDeep as exc:
            raise HeaderError(f"the dataset cannot be parsed: {exc}") from None
        except (ValueError, LookupError):
            values = None  # unusual encoding: let pydicom try
    if values is None:
        try:
            values = _values_pydicom(data, implicit, little)
        except HeaderError:
            raise
        except RecursionError:
            raise HeaderError("the dataset cannot be parsed: sequences nested too deeply") from None
        except Exception as exc:  # pydicom raises many types on garbage; all mean "cannot understand"
            raise HeaderError(f"the dataset cannot be parsed: {type(exc).__name__}: {exc}") from None
    if not values:
        raise HeaderError("the dataset cannot be parsed: no DICOM elements found")
    return _build(values, request_sop_class, request_sop_instance)


def _build(v: dict[str, str | int], request_sop_class: str, request_sop_instance: str) -> InstanceHeader:
    def text(name: str) -> str:
        value = str(v.get(name, ""))
        if name in _ID_LIMITS and len(value) > _ID_LIMITS[name]:
            raise HeaderError(f"{name} {_tag(name)} is longer than {_ID_LIMITS[name]} characters")
        return value[: _TEXT_LIMITS[name]] if name in _TEXT_LIMITS else value

    sop_instance = text("SOPInstanceUID")
    sop_class = text("SOPClassUID") or request_sop_class.strip()
    if sop_instance and request_sop_instance and sop_instance != request_sop_instance.strip():
        raise HeaderError(
            "SOP Instance UID in the dataset differs from the Affected SOP Instance UID of the request"
        )
    uids = (
        ("SOP Instance UID", sop_instance),
        ("SOP Class UID", sop_class),
        ("Study Instance UID", text("StudyInstanceUID")),
        ("Series Instance UID", text("SeriesInstanceUID")),
    )
    missing = [name for name, value in uids if not value]
    if missing:
        raise HeaderError("required attribute missing: " + ", ".join(missing))
    for name, value in (*uids, ("Frame of Reference UID", text("FrameOfReferenceUID"))):
        problem = uid_problem(value) if value else None
        if problem:
            raise HeaderError(f"{name} is not a valid UID: {problem}")
    frames = _int("NumberOfFrames", v.get("NumberOfFrames"))
    return InstanceHeader(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_instance_uid=text("StudyInstanceUID"),
        series_instance_uid=text("SeriesInstanceUID"),
        patient_id=text("PatientID"),
        issuer_of_patient_id=text("IssuerOfPatientID"),
        patient_name=text("PatientName"),
        modality=text("Modality").upper(),
        series_description=text("SeriesDescription"),
        protocol_name=text("ProtocolName"),
        sequence_name=text("SequenceName"),
        body_part=text("BodyPartExamined").upper(),
        acquisition_type=text("MRAcquisitionType").upper(),
        image_type=text("ImageType").upper(),
        frame_of_reference_uid=text("FrameOfReferenceUID"),
        study_datetime=parse_study_datetime(text("StudyDate"), text("StudyTime")),
        series_number=_int("SeriesNumber", v.get("SeriesNumber")),
        instance_number=_int("InstanceNumber", v.get("InstanceNumber")),
        image_position=_decimals("ImagePositionPatient", v.get("ImagePositionPatient")),
        image_orientation=_decimals("ImageOrientationPatient", v.get("ImageOrientationPatient")),
        pixel_spacing=_decimals("PixelSpacing", v.get("PixelSpacing")),
        slice_thickness=_float("SliceThickness", v.get("SliceThickness")),
        rows=_int("Rows", v.get("Rows")),
        columns=_int("Columns", v.get("Columns")),
        number_of_frames=frames if frames and frames > 0 else 1,
    )
