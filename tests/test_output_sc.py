"""Output stage: fused arrays + source headers -> SC instances that dciodvfy accepts."""

from __future__ import annotations

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
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicomnode.output import (
    RESEARCH_NOTICE,
    OutputError,
    OutputOptions,
    build_fused_series,
    patient_orientation,
    series_description,
)

SOP_CLASS = {"MR": MRImageStorage, "CT": CTImageStorage, "PT": PositronEmissionTomographyImageStorage}
STUDY_UID = generate_uid()
FOR_UID = generate_uid()


def make_headers(
    modality: str,
    n: int,
    *,
    spacing: float,
    step: float,
    z0: float,
    size: int = 16,
    study_uid: str = STUDY_UID,
    iop: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
) -> list[Dataset]:
    """Minimal but complete headers for one axial series with geometry (no pixel data needed)."""
    series_uid = generate_uid()
    out = []
    row, col = np.array(iop[:3], float), np.array(iop[3:], float)
    normal = np.cross(row, col)
    for k in range(n):
        ds = Dataset()
        ds.SOPClassUID = SOP_CLASS[modality]
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = FOR_UID
        ds.Modality = modality
        ds.PatientName = "Doe^Jane"
        ds.PatientID = "PID-42"
        ds.IssuerOfPatientID = "HOSP"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.StudyDate = "20240102"
        ds.StudyTime = "101010"
        ds.AccessionNumber = "ACC1"
        ds.ReferringPhysicianName = "Ref^Doc"
        ds.StudyID = "S1"
        ds.BodyPartExamined = "HEAD"
        ds.InstanceNumber = k + 1
        pos = np.array([-size * spacing / 2, -size * spacing / 2, 0.0]) + normal * (z0 + k * step)
        ds.ImagePositionPatient = [f"{v:.3f}" for v in pos]
        ds.ImageOrientationPatient = list(iop)
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = step
        ds.Rows = size
        ds.Columns = size
        out.append(ds)
    return out


def dciodvfy_findings(path: Path, kinds: tuple[str, ...] = ("Error", "Warning")) -> list[str]:
    """The Error (and Warning) lines dciodvfy prints for a file."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, timeout=60)
    lines = (proc.stdout + proc.stderr).decode("utf-8", "replace").splitlines()
    return [ln for ln in lines if ln.startswith(kinds)]


def dciodvfy_errors(path: Path) -> list[str]:
    """The 'Error' lines dciodvfy prints for a file."""
    return dciodvfy_findings(path, ("Error",))


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def mr_ct() -> tuple[list[Dataset], list[Dataset]]:
    ref = make_headers("MR", 4, spacing=1.0, step=3.0, z0=0.0)
    mov = make_headers("CT", 12, spacing=0.5, step=1.25, z0=-2.0, size=32)
    return ref, mov


def test_series_description_names_modalities_sources_method_and_notice() -> None:
    assert series_description("MR", "CT", "laplacian-pyramid") == "FUSED MR + CT [laplacian-pyramid]"
    assert series_description("mr", "pt", "net", registered=True) == "FUSED MR + PT [net] REG"
    assert (
        series_description(
            "MR", "CT", "li2021-cnn", reference_label="T1", moving_label="CT BRAIN", notice="RESEARCH"
        )
        == "FUSED MR T1 + CT BRAIN [li2021-cnn] RESEARCH"
    )
    assert len(series_description("MR", "CT", "x" * 100)) <= 64


def test_series_description_shortens_source_names_first_and_keeps_notice_and_replacement() -> None:
    text = series_description(
        "MR",
        "CT",
        "li2021-cnn",
        reference_label="t1_mprage_sag_iso_0.9mm_p2_postcontrast_navigator",
        moving_label="HEAD ROUTINE 5mm STANDARD KERNEL BRAIN WINDOW AXIAL",
        notice="RESEARCH USE ONLY",
        replaces="REPLACES 9100",
    )
    assert len(text) <= 64
    assert text == "FUSED MR + CT HEAD [li2021-cnn] RESEARCH USE ONLY REPLACES 9100"
    assert text.endswith("[li2021-cnn] RESEARCH USE ONLY REPLACES 9100")
    text = series_description(
        "MR",
        "CT",
        "li2021-cnn",
        reference_label="t1_mprage_sag_iso_0.9mm_p2_postcontrast_navigator",
        moving_label="CT HEAD ROUTINE 5mm STANDARD KERNEL BRAIN WINDOW AXIAL",
        notice="RESEARCH USE ONLY",
    )
    assert len(text) <= 64
    assert text.startswith("FUSED MR t1_mp")
    assert " + CT HEAD " in text  # the repeated modality of the CT's own name is dropped
    assert text.endswith("[li2021-cnn] RESEARCH USE ONLY")
    long_method = series_description("MR", "CT", "m" * 80, notice="RESEARCH USE ONLY")
    assert len(long_method) == 64 and long_method.endswith("] RESEARCH USE ONLY")


def test_patient_orientation_from_iop() -> None:
    ds = Dataset()
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    assert patient_orientation(ds) == ("L", "P")
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
    assert patient_orientation(ds) == ("P", "F")
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    assert patient_orientation(ds) == ("L", "F")
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    ds.ImageOrientationPatient = [c, s, 0, -s, c, 0]  # oblique axial
    assert patient_orientation(ds) == ("LP", "PR")


def test_monochrome_series_keeps_patient_study_and_references(mr_ct, tmp_path: Path) -> None:
    ref, mov = mr_ct
    fused = np.random.default_rng(0).integers(0, 256, (4, 16, 16), dtype=np.uint8)
    uid = generate_uid()
    out = build_fused_series(
        fused,
        ref,
        mov,
        rule_name="mr-ct",
        method_name="laplacian-pyramid",
        method_version="1.0",
        series_instance_uid=uid,
        derivation_note="note-xyz",
    )
    assert len(out) == 4
    for k, sc in enumerate(out):
        assert sc.SOPClassUID == SecondaryCaptureImageStorage
        assert sc.Modality == "OT"
        assert sc.SeriesInstanceUID == uid
        assert sc.SeriesNumber == 9001
        assert sc.InstanceNumber == k + 1
        assert sc.PatientName == "Doe^Jane" and sc.PatientID == "PID-42"
        assert sc.IssuerOfPatientID == "HOSP"
        assert str(sc.PatientBirthDate) == "19700101" and sc.PatientSex == "F"
        assert sc.StudyInstanceUID == STUDY_UID
        assert sc.AccessionNumber == "ACC1" and sc.StudyID == "S1" and str(sc.StudyDate) == "20240102"
        assert sc.SeriesDescription == "FUSED MR + CT [laplacian-pyramid] RESEARCH USE ONLY"
        assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
        assert sc.ConversionType == "WSD"
        assert sc.BurnedInAnnotation == "YES"
        assert sc.PhotometricInterpretation == "MONOCHROME2"
        assert [float(v) for v in sc.PixelSpacing] == [1.0, 1.0]
        assert list(sc.PatientOrientation) == ["L", "P"]
        assert "laplacian-pyramid" in sc.DerivationDescription and "1.0" in sc.DerivationDescription
        assert "mr-ct" in sc.DerivationDescription and "note-xyz" in sc.DerivationDescription
        assert sc.ImageComments.startswith("RESEARCH USE ONLY. FUSED MR + CT")
        assert RESEARCH_NOTICE in sc.DerivationDescription
        changed = sc.pixel_array != fused[k]  # only the burned-in notice differs, in one corner
        assert 0 < changed.sum() < changed.size // 2
        srcs = [it.ReferencedSOPInstanceUID for it in sc.SourceImageSequence]
        assert srcs[0] == ref[k].SOPInstanceUID
        assert len(srcs) > 1
        series_refs = {it.SeriesInstanceUID: it for it in sc.ReferencedSeriesSequence}
        assert set(series_refs) == {ref[0].SeriesInstanceUID, mov[0].SeriesInstanceUID}
        listed = {
            it.ReferencedSOPInstanceUID
            for ser in series_refs.values()
            for it in ser.ReferencedInstanceSequence
        }
        assert listed == set(srcs)
    assert len({sc.SOPInstanceUID for sc in out}) == 4


def test_moving_sources_are_the_nearby_slices(mr_ct) -> None:
    ref, mov = mr_ct
    fused = np.zeros((4, 16, 16), np.uint8)
    out = build_fused_series(fused, ref, mov, rule_name="r", method_name="m", method_version="1")
    z_of = {ds.SOPInstanceUID: float(ds.ImagePositionPatient[2]) for ds in mov}
    for ref_ds, sc in zip(ref, out, strict=True):
        z_ref = float(ref_ds.ImagePositionPatient[2])
        zs = [z_of[it.ReferencedSOPInstanceUID] for it in sc.SourceImageSequence[1:]]
        assert zs, "each slice must reference the moving slices it was read from"
        assert all(abs(z - z_ref) < 1.25 for z in zs)
        # the two moving slices bracketing the reference plane are both there
        below = max(z for z in z_of.values() if z <= z_ref)
        above = min(z for z in z_of.values() if z >= z_ref)
        assert below in zs and above in zs


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("rgb", [False, True])
def test_dciodvfy_reports_no_errors_and_no_warnings(mr_ct, tmp_path: Path, rgb: bool) -> None:
    ref, mov = mr_ct
    if rgb:
        mov = make_headers("PT", 5, spacing=4.0, step=4.0, z0=-4.0, size=8)
    shape = (4, 16, 16, 3) if rgb else (4, 16, 16)
    fused = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    out = build_fused_series(
        fused,
        ref,
        mov,
        rule_name="mr-pet" if rgb else "mr-ct",
        method_name="laplacian-pyramid",
        method_version="1.0",
    )
    for sc in out[:2]:
        path = _save(sc, tmp_path / f"{sc.SOPInstanceUID}.dcm")
        assert dciodvfy_findings(path) == []
        back = pydicom.dcmread(path)
        assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert back.PhotometricInterpretation == ("RGB" if rgb else "MONOCHROME2")
        assert back.SamplesPerPixel == (3 if rgb else 1)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dciodvfy_catches_a_broken_file(tmp_path: Path) -> None:
    """The checker itself must be able to fail: an SC without its mandatory SOP Common tags."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    path = _save(ds, tmp_path / "broken.dcm")
    assert dciodvfy_errors(path)


def test_moving_series_from_other_study_goes_to_other_studies_sequence() -> None:
    ref = make_headers("MR", 2, spacing=1.0, step=3.0, z0=0.0)
    other_study = generate_uid()
    mov = make_headers("CT", 4, spacing=1.0, step=2.0, z0=0.0, study_uid=other_study)
    out = build_fused_series(
        np.zeros((2, 16, 16), np.uint8), ref, mov, rule_name="r", method_name="m", method_version="1"
    )
    sc = out[0]
    assert [it.SeriesInstanceUID for it in sc.ReferencedSeriesSequence] == [ref[0].SeriesInstanceUID]
    other = sc.StudiesContainingOtherReferencedInstancesSequence[0]
    assert other.StudyInstanceUID == other_study
    assert other.ReferencedSeriesSequence[0].SeriesInstanceUID == mov[0].SeriesInstanceUID


def test_slice_outside_moving_coverage_references_nearest_moving_slice() -> None:
    ref = make_headers("MR", 3, spacing=1.0, step=10.0, z0=0.0)
    mov = make_headers("CT", 3, spacing=1.0, step=1.0, z0=0.0)  # covers z 0..2 only
    out = build_fused_series(
        np.zeros((3, 16, 16), np.uint8), ref, mov, rule_name="r", method_name="m", method_version="1"
    )
    far = [it.ReferencedSOPInstanceUID for it in out[2].SourceImageSequence[1:]]
    assert far == [mov[2].SOPInstanceUID]


def test_moving_without_geometry_references_all_moving_instances() -> None:
    ref = make_headers("MR", 2, spacing=1.0, step=3.0, z0=0.0)
    mov = make_headers("CT", 3, spacing=1.0, step=2.0, z0=0.0)
    for ds in mov:
        del ds.ImagePositionPatient
    out = build_fused_series(
        np.zeros((2, 16, 16), np.uint8), ref, mov, rule_name="r", method_name="m", method_version="1"
    )
    assert len(out[0].SourceImageSequence) == 1 + 3


def test_registered_flag_in_description() -> None:
    ref = make_headers("MR", 1, spacing=1.0, step=3.0, z0=0.0)
    mov = make_headers("PT", 2, spacing=4.0, step=4.0, z0=0.0)
    out = build_fused_series(
        np.zeros((1, 16, 16, 3), np.uint8),
        ref,
        mov,
        rule_name="mr-pet",
        method_name="net",
        method_version="2",
        registered=True,
    )
    assert out[0].SeriesDescription == "FUSED MR + PT [net] REG RESEARCH USE ONLY"
    assert out[0].PhotometricInterpretation == "RGB"


@pytest.mark.parametrize(
    ("fused", "n_ref", "match"),
    [
        (np.zeros((2, 16, 16), np.float32), 2, "uint8"),
        (np.zeros((2, 16, 16, 4), np.uint8), 2, "shape"),
        (np.zeros((16, 16), np.uint8), 2, "shape"),
        (np.zeros((3, 16, 16), np.uint8), 2, "3 slices but 2 reference"),
    ],
)
def test_bad_input_gives_clear_error(fused: np.ndarray, n_ref: int, match: str) -> None:
    ref = make_headers("MR", n_ref, spacing=1.0, step=3.0, z0=0.0)
    mov = make_headers("CT", 2, spacing=1.0, step=2.0, z0=0.0)
    with pytest.raises(OutputError, match=match):
        build_fused_series(fused, ref, mov, rule_name="r", method_name="m", method_version="1")


def test_missing_moving_headers_is_an_error() -> None:
    ref = make_headers("MR", 1, spacing=1.0, step=3.0, z0=0.0)
    with pytest.raises(OutputError, match="moving"):
        build_fused_series(
            np.zeros((1, 16, 16), np.uint8), ref, [], rule_name="r", method_name="m", method_version="1"
        )


def _fuse(ref, mov, options=None, **kw):  # type: ignore[no-untyped-def]
    shape = (len(ref), 16, 16, 3) if kw.pop("rgb", False) else (len(ref), 16, 16)
    fused = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    if options is not None:
        kw["options"] = options
    return build_fused_series(fused, ref, mov, rule_name="mr-ct", method_name="m", method_version="1", **kw)


def test_patient_and_study_modules_are_copied_completely(mr_ct) -> None:
    """Every attribute of the Patient and Study modules the source has, not a hand-picked list."""
    ref, mov = mr_ct
    extra = {
        "PatientBirthTime": "093000",
        "OtherPatientNames": "Roe^Jane",
        "PatientComments": "claustrophobic",
        "PatientIdentityRemoved": "NO",
        "ClinicalTrialSponsorName": "ACME",
        "ClinicalTrialProtocolID": "P-1",
        "ClinicalTrialSubjectID": "S-7",
        "ClinicalTrialSiteID": "",
        "ClinicalTrialSiteName": "",
        "ClinicalTrialProtocolName": "",
        "ClinicalTrialTimePointID": "BASELINE",
        "StudyDescription": "HEAD",
        "PhysiciansOfRecord": "Rec^Ord",
        "NameOfPhysiciansReadingStudy": "Rea^Der",
        "AdmittingDiagnosesDescription": "headache",
        "PatientAge": "054Y",
        "PatientSize": "1.70",
        "PatientWeight": "70",
        "AdditionalPatientHistory": "none",
        "Occupation": "pilot",
        "AdmissionID": "ADM9",
        "InstitutionName": "not a patient/study attribute",
    }
    for ds in ref:
        for keyword, value in extra.items():
            setattr(ds, keyword, value)
        item = Dataset()
        item.PatientID = "OTHER-1"
        item.IssuerOfPatientID = "OTHERHOSP"
        item.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = [item]
    out = _fuse(ref, mov)
    for sc in out:
        for keyword, value in extra.items():
            if keyword == "InstitutionName":
                assert keyword not in sc  # General Equipment is the node's, not the scanner's
            else:
                assert str(sc[keyword].value) == value, keyword
        assert sc.OtherPatientIDsSequence[0].IssuerOfPatientID == "OTHERHOSP"


def test_module_table_comes_from_the_standard() -> None:
    from dicomnode.output.modules import module_keywords

    keywords = module_keywords()
    for keyword in ("PatientBirthTime", "OtherPatientNames", "PatientComments", "StudyDescription"):
        assert keyword in keywords
    assert "ClinicalTrialSubjectID" in keywords and "PatientWeight" in keywords
    assert "Manufacturer" not in keywords and "SeriesDescription" not in keywords
    assert len(keywords) > 80


def test_laterality_absent_for_an_unpaired_body_part_and_copied_when_known(mr_ct) -> None:
    ref, mov = mr_ct
    out = _fuse(ref, mov)
    assert "Laterality" not in out[0] and out[0].BodyPartExamined == "HEAD"
    for ds in ref:
        ds.Laterality = "L"
        ds.BodyPartExamined = "BREAST"
    assert _fuse(ref, mov)[0].Laterality == "L"


def test_notice_can_be_switched_off_in_description_and_pixels(mr_ct) -> None:
    ref, mov = mr_ct
    fused = np.random.default_rng(3).integers(0, 256, (4, 16, 16), dtype=np.uint8)
    options = OutputOptions(notice="RESEARCH", notice_in_description=False, burn_in_notice=False)
    out = build_fused_series(
        fused, ref, mov, rule_name="r", method_name="m", method_version="1", options=options
    )
    assert out[0].SeriesDescription == "FUSED MR + CT [m]"
    assert out[0].BurnedInAnnotation == "NO"
    assert np.array_equal(out[0].pixel_array, fused[0])
    assert out[0].ImageComments.startswith("RESEARCH.")  # still in the comments
    none = build_fused_series(
        fused, ref, mov, rule_name="r", method_name="m", method_version="1", options=OutputOptions(notice="")
    )
    assert none[0].BurnedInAnnotation == "NO" and none[0].SeriesDescription == "FUSED MR + CT [m]"


def test_notice_is_burned_into_the_darkest_corner_of_every_slice() -> None:
    """Bright anatomy everywhere but the bottom-left corner: the notice goes there, on every slice."""
    n, size = 3, 128
    ref = make_headers("MR", n, spacing=1.0, step=3.0, z0=0.0, size=size)
    mov = make_headers("CT", 4, spacing=1.0, step=3.0, z0=0.0, size=size)
    fused = np.full((n, size, size), 200, np.uint8)
    fused[:, 96:, :112] = 0
    out = build_fused_series(
        fused, ref, mov, rule_name="r", method_name="m", method_version="1", options=OutputOptions()
    )
    for sc in out:
        px = sc.pixel_array
        changed = px != fused[0]
        ys, xs = np.nonzero(changed)
        assert ys.min() >= 96 and xs.max() < 112  # only the dark corner was written
        assert (px[changed] == 255).sum() > 30 and sc.BurnedInAnnotation == "YES"


def test_replaced_series_is_named_in_description_and_derivation(mr_ct) -> None:
    ref, mov = mr_ct
    options = OutputOptions(replaces="REPLACES 9100", replaces_series_uid="1.2.3.4")
    sc = _fuse(ref, mov, options)[0]
    assert sc.SeriesDescription == "FUSED MR + CT [m] RESEARCH USE ONLY REPLACES 9100"
    assert "Replaces the earlier fused series 1.2.3.4" in sc.DerivationDescription
    assert "1.2.3.4" in sc.ImageComments


@pytest.mark.parametrize("rgb", [False, True])
def test_multiframe_sc_carries_the_reference_geometry(mr_ct, tmp_path: Path, rgb: bool) -> None:
    ref, mov = mr_ct
    (mf,) = _fuse(ref, mov, OutputOptions(iod="multiframe-sc"), rgb=rgb)
    expected = "1.2.840.10008.5.1.4.1.1.7.4" if rgb else "1.2.840.10008.5.1.4.1.1.7.2"
    assert mf.SOPClassUID == expected and mf.NumberOfFrames == 4
    assert mf.FrameOfReferenceUID == FOR_UID
    shared = mf.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [
        1,
        0,
        0,
        0,
        1,
        0,
    ]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [1.0, 1.0]
    positions = [
        [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
        for f in mf.PerFrameFunctionalGroupsSequence
    ]
    assert positions == [[float(v) for v in r.ImagePositionPatient] for r in ref]
    assert [float(v) for v in mf.SliceLocationVector] == [0.0, 3.0, 6.0, 9.0]
    refs = {it.ReferencedSOPInstanceUID for it in mf.SourceImageSequence}
    assert {r.SOPInstanceUID for r in ref} <= refs and len(refs) > len(ref)
    path = _save(mf, tmp_path / "mf.dcm")
    back = pydicom.dcmread(path)
    assert back.pixel_array.shape == ((4, 16, 16, 3) if rgb else (4, 16, 16))
    if shutil.which("dciodvfy"):
        assert dciodvfy_findings(path) == []


def test_multiframe_sc_needs_the_reference_geometry(mr_ct) -> None:
    ref, mov = mr_ct
    for ds in ref:
        del ds.FrameOfReferenceUID
    with pytest.raises(OutputError, match="Frame of Reference"):
        _fuse(ref, mov, OutputOptions(iod="multiframe-sc"))
    with pytest.raises(OutputError, match="unknown output IOD"):
        _fuse(ref, mov, OutputOptions(iod="enhanced-mr"))
