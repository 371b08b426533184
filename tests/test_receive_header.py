"""Header-only parsing and File Meta encoding of the receive stage, without a network."""

from __future__ import annotations

import struct
import zlib
from datetime import datetime
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomnode.receive.filemeta import encode_file_meta
from dicomnode.receive.header import HeaderError, parse_header, parse_study_datetime


def encoded(implicit: bool = False, **overrides: object) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.PatientID = "ID-7"
    ds.Modality = "CT"
    ds.ImagePositionPatient = ["-1.5", "2", "3.25"]
    ds.Rows, ds.Columns = 4, 4
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00\x01" * 16
    for key, value in overrides.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = implicit, True
    write_dataset(buf, ds)
    return buf.getvalue()


def test_parse_explicit_and_implicit_give_the_same_header() -> None:
    a = parse_header(encoded(), ExplicitVRLittleEndian)
    b = parse_header(encoded(implicit=True), ImplicitVRLittleEndian)
    assert a == b
    assert (a.sop_instance_uid, a.series_instance_uid, a.modality) == ("1.2.3.4.5", "1.2.3.4", "CT")
    assert a.image_position == "-1.5\\2\\3.25"
    assert (a.rows, a.columns, a.number_of_frames) == (4, 4, 1)


def test_parse_deflated() -> None:
    comp = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    raw = comp.compress(encoded()) + comp.flush()
    h = parse_header(raw, DeflatedExplicitVRLittleEndian)
    assert h.study_instance_uid == "1.2.3"


def test_patient_key_uses_issuer_when_present() -> None:
    assert parse_header(encoded(), ExplicitVRLittleEndian).patient_key == "ID-7"
    h = parse_header(encoded(IssuerOfPatientID="HOSP"), ExplicitVRLittleEndian)
    assert h.patient_key == "HOSP^ID-7"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "empty"),
        (b"\xff\xff\x00\x00garbage that is not a dataset at all....", "cannot be parsed"),
        (encoded(StudyInstanceUID=None), "Study Instance UID"),
        (encoded(SOPInstanceUID=None), "SOP Instance UID"),
    ],
)
def test_bad_datasets_raise_header_error(raw: bytes, message: str) -> None:
    with pytest.raises(HeaderError, match=message):
        parse_header(raw, ExplicitVRLittleEndian)


def test_request_uid_must_match_dataset_uid() -> None:
    with pytest.raises(HeaderError, match="differs"):
        parse_header(encoded(), ExplicitVRLittleEndian, CTImageStorage, "9.9.9")


def test_dataset_without_sop_instance_uid_is_refused_even_when_the_request_names_one() -> None:
    with pytest.raises(HeaderError, match="SOP Instance UID"):
        parse_header(encoded(SOPInstanceUID=None), ExplicitVRLittleEndian, CTImageStorage, "1.2.3.4.5")


def test_bad_deflate_is_a_header_error() -> None:
    with pytest.raises(HeaderError, match="inflate"):
        parse_header(b"\xff" * 40, DeflatedExplicitVRLittleEndian)


def test_study_datetime() -> None:
    assert parse_study_datetime("20240102", "0304") == datetime(2024, 1, 2, 3, 4)
    assert parse_study_datetime("20240102", "030405.5") == datetime(2024, 1, 2, 3, 4, 5, 500000)
    assert parse_study_datetime("20240102", "") == datetime(2024, 1, 2)
    assert parse_study_datetime("", "1200") is None
    assert parse_study_datetime("20241350", "") is None


def test_file_meta_prefix_makes_a_readable_part10_file() -> None:
    body = encoded()
    prefix = encode_file_meta(CTImageStorage, "1.2.3.4.5", ExplicitVRLittleEndian, "SCANNER")
    ds = dcmread(BytesIO(prefix + body))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert ds.file_meta.SourceApplicationEntityTitle == "SCANNER"
    assert ds.file_meta.FileMetaInformationGroupLength == len(prefix) - 144
    assert ds.SeriesInstanceUID == "1.2.3.4"


def rich(undefined_lengths: bool) -> Dataset:
    """A header with nested sequences and a non-ASCII patient name (UTF-8)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4.6"
    ds.StudyDate, ds.StudyTime = "20230101", "101010"
    ds.Modality = "MR"
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = "1.2.3.4.7"
    inner = Dataset()
    inner.CodeValue = "X1"
    item.PurposeOfReferenceCodeSequence = [inner]
    ds.ReferencedImageSequence = [item, item]
    ds.SeriesDescription = "T1 Ä"
    ds.PatientName = "Müller^Jürgen"
    ds.PatientID = "ÖID"
    ds.SliceThickness = "3"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.9"
    ds.InstanceNumber = "7"
    ds.ImagePositionPatient = ["0", "1.5", "-2"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.NumberOfFrames = "2"
    ds.Rows, ds.Columns = 8, 6
    ds.PixelSpacing = ["0.9", "0.8"]
    ds.BitsAllocated = 8
    ds.PixelData = b"\x00" * 96
    if undefined_lengths:
        ds["ReferencedImageSequence"].is_undefined_length = True
        for it in ds.ReferencedImageSequence:
            it.is_undefined_length_sequence_item = True
    return ds


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("undefined", [False, True])
def test_fast_scanner_agrees_with_pydicom(implicit: bool, undefined: bool) -> None:
    from dicomnode.receive.header import _values_fast, _values_pydicom

    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = implicit, True
    write_dataset(buf, rich(undefined))
    data = buf.getvalue()
    fast = _values_fast(data, implicit)
    slow = _values_pydicom(data, implicit, True)
    assert fast == slow
    h = parse_header(data, ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
    assert (h.patient_name, h.patient_id, h.series_description) == ("Müller^Jürgen", "ÖID", "T1 Ä")
    assert (h.rows, h.columns, h.number_of_frames, h.instance_number) == (8, 6, 2, 7)
    assert (h.pixel_spacing, h.slice_thickness) == ("0.9\\0.8", 3.0)


def test_big_endian_goes_through_pydicom() -> None:
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = False, False
    write_dataset(buf, rich(False))
    h = parse_header(buf.getvalue(), "1.2.840.10008.1.2.2")
    assert (h.rows, h.columns, h.patient_name) == (8, 6, "Müller^Jürgen")


def test_truncated_dataset_is_refused() -> None:
    data = encoded()
    with pytest.raises(HeaderError):
        parse_header(data[:30], ExplicitVRLittleEndian)


def test_series_selection_tags_are_indexed(tmp_path):
    """Image Type, Body Part, MR Acquisition Type, Sequence/Protocol Name feed series selection."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    from dicomnode.receive import parse_header
    from dicomnode.testing import generate_study

    st = generate_study(tmp_path, modalities=("MR",), scale=0.2)
    ds = dcmread(st.series["MR"].paths[0])
    ds.ProtocolName = "t1_mprage_sag"
    ds.SequenceName = "*tfl3d1"
    ds.MRAcquisitionType = "3D"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.BodyPartExamined = "head"
    for implicit in (False, True):
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, implicit
        from pydicom.filewriter import write_dataset

        write_dataset(buf, ds)
        ts = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
        h = parse_header(buf.getvalue(), ts)
        assert h.protocol_name == "t1_mprage_sag" and h.sequence_name == "*tfl3d1"
        assert h.acquisition_type == "3D" and h.body_part == "HEAD"
        assert h.image_type == "ORIGINAL\\PRIMARY\\M\\ND"


@pytest.mark.parametrize("implicit", [False, True])
def test_series_number_is_indexed(implicit: bool) -> None:
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    assert parse_header(encoded(implicit, SeriesNumber=1003), ts).series_number == 1003
    assert parse_header(encoded(implicit), ts).series_number is None
    assert parse_header(encoded(implicit, SeriesNumber=" 7 "), ts).series_number == 7


@pytest.mark.parametrize("depth", [33, 500, 5000])
def test_deeply_nested_sequences_are_refused_not_a_recursion_error(depth: int) -> None:
    from dicomnode.testing.malformed import encode, nested_sequence

    elements = {
        0x00080016: (b"UI", CTImageStorage.encode()),
        0x00080018: (b"UI", b"1.2.3.4.5"),
        0x0020000D: (b"UI", b"1.2.3"),
        0x0020000E: (b"UI", b"1.2.3.4"),
    }
    data = encode(elements, nested_sequence(depth, undefined=True), 0x00081140)
    with pytest.raises(HeaderError, match="nested deeper than 32"):
        parse_header(data, ExplicitVRLittleEndian)
    shallow = encode(elements, nested_sequence(32, undefined=True), 0x00081140)
    assert parse_header(shallow, ExplicitVRLittleEndian).sop_instance_uid == "1.2.3.4.5"


def test_deep_nesting_in_big_endian_is_refused_too() -> None:
    def element(tag: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack(">HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value

    sq = struct.pack(">HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack(">HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    ends = struct.pack(">HHI", 0xFFFE, 0xE00D, 0) + struct.pack(">HHI", 0xFFFE, 0xE0DD, 0)
    data = (
        element(0x00080016, b"UI", CTImageStorage.encode())
        + element(0x00080018, b"UI", b"1.2.3.4\x00")
        + (sq + item) * 3000
        + ends * 3000
        + element(0x0020000D, b"UI", b"1.2.3\x00")
        + element(0x0020000E, b"UI", b"1.2.3.4\x00")
    )
    with pytest.raises(HeaderError, match="nested too deeply"):
        parse_header(data, "1.2.840.10008.1.2.2")


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("InstanceNumber", "inf", "not a finite number"),
        ("InstanceNumber", "1e999", "not a finite number"),
        ("InstanceNumber", "9" * 23, "out of the IS range"),
        ("InstanceNumber", "-2147483649", "out of the IS range"),
        ("InstanceNumber", "seven", "not a number"),
        ("NumberOfFrames", "nan", "not a finite number"),
        ("SliceThickness", "1e999", "not a finite decimal"),
        ("SliceThickness", "nan", "not a finite decimal"),
        ("PixelSpacing", "0.5\\inf", "not a finite decimal"),
        ("ImagePositionPatient", "1\\2\\x", "not a finite decimal"),
        ("PatientID", "P" * 65, "longer than 64"),
    ],
)
def test_numbers_and_identifiers_out_of_range_are_refused(keyword: str, value: str, message: str) -> None:
    from dicomnode.testing.malformed import encode

    tags = {
        "InstanceNumber": (0x00200013, b"IS"),
        "NumberOfFrames": (0x00280008, b"IS"),
        "SliceThickness": (0x00180050, b"DS"),
        "PixelSpacing": (0x00280030, b"DS"),
        "ImagePositionPatient": (0x00200032, b"DS"),
        "PatientID": (0x00100020, b"LO"),
    }
    tag, vr = tags[keyword]
    elements = {
        0x00080016: (b"UI", CTImageStorage.encode()),
        0x00080018: (b"UI", b"1.2.3.4.5"),
        0x0020000D: (b"UI", b"1.2.3"),
        0x0020000E: (b"UI", b"1.2.3.4"),
        tag: (vr, value.encode()),
    }
    with pytest.raises(HeaderError, match=message):
        parse_header(encode(elements), ExplicitVRLittleEndian)


def test_integral_decimals_in_is_are_still_read() -> None:
    h = parse_header(encoded(InstanceNumber="7.0"), ExplicitVRLittleEndian)
    assert h.instance_number == 7


@pytest.mark.parametrize("uid", ["..", "X_7", "X/7", "X 7", "1.2.", "1..2", "1" * 65, "1.2.a", "/etc"])
@pytest.mark.parametrize(
    "keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"]
)
def test_values_that_are_not_uids_are_refused(keyword: str, uid: str) -> None:
    with pytest.raises(HeaderError, match="not a valid UID"):
        parse_header(encoded(**{keyword: uid}), ExplicitVRLittleEndian)
