"""Every Specific Character Set pydicom decodes reaches the fused series unchanged and reads the same
in Orthanc as the source does.

One case per character set (dicomnode.testing.charsets): names and text in German, Czech, Maltese,
Latvian, Russian, Arabic, Greek, Hebrew, Turkish, Thai, Japanese (JIS X 0201, ISO 2022 IR 87 with
each first value, IR 159, UTF-8), Korean (IR 149, UTF-8), Chinese (IR 58, GB18030, GBK). The source
files are written as scanners send them and read back, as the fuse stage reads them from the spool.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from dicomnode.output import build_fused_series
from dicomnode.output.charset import writable_text
from dicomnode.testing.charsets import CASES, CharsetCase, case
from dicomnode.testing.peers import Orthanc, have_orthanc

CARRIED = (
    "PatientName",
    "OtherPatientNames",
    "PatientComments",
    "StudyDescription",
    "ReferringPhysicianName",
)
HAVE_DCIODVFY = shutil.which("dciodvfy") is not None
# Orthanc 1.10 decodes the ISO 2022 sets only with an empty first value (\ISO 2022 IR 87, IR 149,
# IR 58); with these it shows escape sequences, for the source and the fused series alike.
ORTHANC_MISREADS = {"japanese-ir6-ir87", "japanese-ir13-ir87", "japanese-ir159"}
# dicom3tools 2022 knows neither ISO_IR 13's katakana half nor GBK: it calls their bytes invalid
# (in the source files as in the fused series).
DCIODVFY_UNKNOWN_SETS = {"japanese-katakana", "chinese-gbk"}


def dciodvfy_findings(path: Path) -> list[str]:
    """dciodvfy's Error and Warning lines for one file."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, timeout=60)
    lines = (proc.stdout + proc.stderr).decode("utf-8", "replace").splitlines()
    return [ln for ln in lines if ln.startswith(("Error", "Warning"))]


def _header(c: CharsetCase, modality: str, series_uid: str, k: int, study_uid: str, for_uid: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if c.value is not None:
        ds.SpecificCharacterSet = c.value
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
    ds.Modality = modality
    ds.add_new(0x00100010, "PN", c.encode(c.patient_name, person_name=True))
    ds.add_new(0x00101001, "PN", c.encode(c.patient_name.split("=")[0], person_name=True))  # Other Names
    ds.add_new(0x00104000, "LT", c.encode(c.description))  # Patient Comments
    ds.add_new(0x00081030, "LO", c.encode(c.description))  # Study Description
    ds.add_new(0x00080090, "PN", c.encode(c.patient_name.split("=")[0], person_name=True))
    ds.add_new(0x0008103E, "LO", c.encode(c.series_label if modality == "MR" else "CT " + c.description))
    ds.PatientID = f"CS-{c.id}"[:64]
    ds.PatientBirthDate = "19580417"
    ds.PatientBirthTime = "093000"
    ds.PatientSex = "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240312", "093000", "ACC1", "1"
    ds.SeriesNumber = 3 if modality == "MR" else 2
    ds.InstanceNumber = k + 1
    ds.BodyPartExamined = "HEAD"
    ds.ImagePositionPatient = [-8.0, -8.0, 3.0 * k]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 3.0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(256, dtype=np.uint16).reshape(16, 16) * (k + 1)).tobytes()
    return ds


def source_files(c: CharsetCase, folder: Path, implicit: bool = False) -> tuple[list[Path], list[Path]]:
    """Two MR and three CT slices of one patient whose text is in the case's character set."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, for_uid = generate_uid(), generate_uid()
    paths: dict[str, list[Path]] = {"MR": [], "CT": []}
    for modality, n in (("MR", 2), ("CT", 3)):
        series_uid = generate_uid()
        for k in range(n):
            ds = _header(c, modality, series_uid, k, study_uid, for_uid)
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
            path = folder / f"{modality}{k}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths[modality].append(path)
    return paths["MR"], paths["CT"]


def fuse(mr: list[Path], ct: list[Path], out: Path) -> Path:
    """The fused series of the sources (header-only fusion: the pixels do not matter here)."""
    reference = [pydicom.dcmread(p) for p in mr]
    moving = [pydicom.dcmread(p) for p in ct]
    series = build_fused_series(
        np.full((2, 16, 16), 40, np.uint8),
        reference,
        moving,
        rule_name="mr-ct",
        method_name="m",
        method_version="1",
        patient_study_source=pydicom.dcmread(mr[0], stop_before_pixels=True),
    )
    series[0].save_as(out, enforce_file_format=True)
    return out


def raw(path: Path, keyword: str) -> bytes:
    """The value bytes of an element as stored in the file (trailing padding removed)."""
    elem = pydicom.dcmread(path, stop_before_pixels=True).get_item(keyword)
    assert elem is not None, keyword
    return bytes(elem.value).rstrip(b" \x00")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    if not have_orthanc():
        pytest.skip("needs Debian orthanc")
    handle = Orthanc(tmp_path_factory.mktemp("charsets") / "orthanc", stop_graceful=False).start()
    yield handle
    handle.stop()


def _store(orthanc: Orthanc, path: Path) -> dict:
    answer = orthanc.rest("/instances", "POST", path.read_bytes())
    return orthanc.instance_tags(answer["ID"])


def _pn(text: str) -> str:
    """A Person Name as Orthanc shows it: trailing empty components dropped."""
    return text.rstrip("=^")


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_character_set_is_carried_unchanged_and_reads_the_same_in_orthanc(
    c: CharsetCase, tmp_path: Path, orthanc: Orthanc
) -> None:
    mr, ct = source_files(c, tmp_path / "src")
    out = fuse(mr, ct, tmp_path / "fused.dcm")
    src = pydicom.dcmread(mr[0], stop_before_pixels=True)
    back = pydicom.dcmread(out, stop_before_pixels=True)
    assert back.get("SpecificCharacterSet") == src.get("SpecificCharacterSet")
    for keyword in CARRIED:
        assert raw(out, keyword) == raw(mr[0], keyword), keyword
    assert raw(out, "PatientBirthTime") == b"093000"
    # Orthanc renders the fused series' names exactly as the source's, and as written
    src_tags, out_tags = _store(orthanc, mr[0]), _store(orthanc, out)
    for keyword in CARRIED:
        assert out_tags[keyword] == src_tags[keyword], keyword
    if c.id not in ORTHANC_MISREADS:
        assert _pn(src_tags["PatientName"]) == _pn(c.patient_name)
        assert src_tags["StudyDescription"] == c.description
    # the node's own text: the reference's series name, as far as the character set carries it and
    # 64 bytes leave room, and never longer than an LO allows in bytes
    description = str(back.SeriesDescription)
    if c.id not in ORTHANC_MISREADS:
        assert out_tags["SeriesDescription"] == description
    assert len(raw(out, "SeriesDescription")) <= 64
    match = re.match(r"FUSED MR (.*?) ?\+ CT", description)
    assert match is not None, description
    label = writable_text(c.series_label, list(c.charset))
    assert match.group(1) and label.startswith(match.group(1))
    if c.id not in ("chinese-ir58", "japanese-katakana"):  # see test_ir58_and_ir13_labels_fold_to_ascii
        assert label == c.series_label


def test_ir58_and_ir13_labels_fold_to_ascii() -> None:
    """pydicom 3.0 writes GB 2312 without its escape sequence and refuses mixed JIS X 0201 text:
    the node then keeps the ASCII part of a label rather than write bytes a PACS misreads."""
    assert writable_text("T1 轴位", ["", "ISO 2022 IR 58"]) == "T1"
    assert writable_text("T1 ｼﾞｸ", ["ISO_IR 13"]) == "T1"


@pytest.mark.skipif(not HAVE_DCIODVFY, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_dciodvfy_has_nothing_to_say(c: CharsetCase, tmp_path: Path) -> None:
    mr, ct = source_files(c, tmp_path / "src")
    findings = dciodvfy_findings(fuse(mr, ct, tmp_path / "fused.dcm"))
    if c.id in DCIODVFY_UNKNOWN_SETS:  # the 2022 checker reads these bytes as outside the repertoire
        findings = [f for f in findings if "character repertoire" not in f and "invalid data values" not in f]
    assert findings == []


def test_implicit_vr_sources_are_carried_too(tmp_path: Path) -> None:
    c = case("japanese-ir87")
    mr, ct = source_files(c, tmp_path / "src", implicit=True)
    out = fuse(mr, ct, tmp_path / "fused.dcm")
    for keyword in CARRIED:
        assert raw(out, keyword) == raw(mr[0], keyword), keyword
    back = pydicom.dcmread(out)
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert str(back.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"


def test_iso_2022_ir_87_with_empty_first_value_is_fused(tmp_path: Path) -> None:
    """The value Japanese scanners send (``\\ISO 2022 IR 87``) used to fail inside highdicom."""
    c = case("japanese-ir87")
    mr, ct = source_files(c, tmp_path / "src")
    series = build_fused_series(
        np.full((2, 16, 16), 40, np.uint8),
        [pydicom.dcmread(p) for p in mr],
        [pydicom.dcmread(p) for p in ct],
        rule_name="mr-ct",
        method_name="m",
        method_version="1",
    )
    series[0].save_as(tmp_path / "fused.dcm", enforce_file_format=True)
    out = pydicom.dcmread(tmp_path / "fused.dcm")
    assert list(out.SpecificCharacterSet) == ["", "ISO 2022 IR 87"]
    assert out.SeriesDescription == "FUSED MR T1強調 + CT 頭部 [m] RESEARCH USE ONLY"  # 64 bytes
    buf = io.BytesIO()
    out.save_as(buf)  # decoded and written again: still the same names
    assert str(pydicom.dcmread(io.BytesIO(buf.getvalue())).PatientName) == str(out.PatientName)
