"""The study generator: readable, consistent, anatomically placed, deterministic, dciodvfy-clean DICOM."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.fusion.volume import Volume, load_volume
from dicomnode.testing import (
    GeneratedStudy,
    Grid,
    HeadPhantom,
    default_grids,
    generate_ct_series,
    generate_study,
)
from dicomnode.testing.__main__ import main as cli_main
from dicomnode.testing.phantom import AIR, CSF, GRAY, LESION, SCALP, SKULL, WHITE

SOP_CLASSES = {
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "NM": "1.2.840.10008.5.1.4.1.1.20",
}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> GeneratedStudy:
    return generate_study(tmp_path_factory.mktemp("study"), scale=0.25, seed=3)


@pytest.fixture(scope="module")
def volumes(study: GeneratedStudy) -> dict[str, Volume]:
    return {m: load_volume(s.paths) for m, s in study.series.items()}


def _voxel_centres(vol: Volume) -> np.ndarray:
    nz, ny, nx = vol.shape
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    idx = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)
    return (idx @ vol.affine.T)[..., :3]


def _nearest_index(vol: Volume, point_mm: np.ndarray) -> tuple[int, int, int]:
    i, j, k = np.rint(np.linalg.inv(vol.affine) @ np.r_[point_mm, 1.0])[:3].astype(int)
    return int(k), int(j), int(i)


def test_files_are_dicom_of_one_patient_study_and_frame(study: GeneratedStudy) -> None:
    assert set(study.series) == {"MR", "CT", "PT", "NM"}
    for modality, series in study.series.items():
        assert series.paths and all(p.parent == series.directory for p in series.paths)
        assert series.directory.name == modality
        for n, path in enumerate(series.paths, start=1):
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.SOPClassUID == SOP_CLASSES[modality]
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.Modality == modality
            assert ds.PatientID == study.patient_id
            assert ds.StudyInstanceUID == study.study_instance_uid
            assert ds.FrameOfReferenceUID == study.frame_of_reference_uid
            assert ds.SeriesInstanceUID == series.series_instance_uid
            assert ds.InstanceNumber == n
            assert ds.BodyPartExamined == "HEAD"
            assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
    descriptions = {m: pydicom.dcmread(s.paths[0]).SeriesDescription for m, s in study.series.items()}
    assert descriptions == {"MR": "T1 3D AX", "CT": "CT HEAD", "PT": "PET FDG AC", "NM": "SPECT PERFUSION"}
    sops = [pydicom.dcmread(p).SOPInstanceUID for s in study.series.values() for p in s.paths]
    assert len(set(sops)) == len(sops)


def test_paths_follow_the_slice_normal(study: GeneratedStudy) -> None:
    for series in study.series.values():
        pos = [float(np.array(pydicom.dcmread(p).ImagePositionPatient, float)[2]) for p in series.paths]
        assert np.all(np.diff(pos) > 0)


def test_pixel_encodings(study: GeneratedStudy) -> None:
    ct = pydicom.dcmread(study.series["CT"].paths[0])
    encoding = (ct.BitsAllocated, ct.PixelRepresentation, ct.RescaleIntercept, ct.RescaleSlope)
    assert encoding == (16, 1, -1024, 1)
    pt = pydicom.dcmread(study.series["PT"].paths[len(study.series["PT"].paths) // 2])
    assert pt.BitsAllocated == 16 and pt.PixelRepresentation == 0 and float(pt.RescaleSlope) < 0.01
    assert pt.Units == "GML" and pt.DecayCorrection == "START"
    nuclide = pt.RadiopharmaceuticalInformationSequence[0].RadionuclideCodeSequence[0]
    assert nuclide.CodeMeaning == "^18^Fluorine"


def test_phantom_layers_in_anatomical_order() -> None:
    ph = HeadPhantom(seed=5)
    xs = np.linspace(0.0, 100.0, 2001)
    pts = ph.center + np.stack([xs, np.zeros_like(xs), np.full_like(xs, -20.0)], axis=-1)
    labels = ph.labels(pts)
    order = [int(v) for n, v in enumerate(labels) if n == 0 or v != labels[n - 1]]
    assert order == [WHITE, GRAY, SKULL, SCALP, AIR]
    assert ph.labels(ph.lesion_center_mm[None])[0] == LESION
    assert ph.lesion_mask(ph.lesion_center_mm[None])[0]
    assert ph.skull_mask(pts).sum() > 0 and not ph.skull_mask(ph.center[None])[0]
    ventricle = ph.ventricles[0].center
    assert ph.labels(ventricle[None])[0] == CSF


def test_pet_and_spect_lesion_is_hot_at_its_place(study: GeneratedStudy, volumes: dict[str, Volume]) -> None:
    ph = study.phantom
    for modality, factor in (("PT", 1.5), ("NM", 1.2)):
        vol = volumes[modality]
        hot = vol.array[_nearest_index(vol, ph.lesion_center_mm)]
        labels = ph.labels(_voxel_centres(vol))
        brain = np.median(vol.array[(labels == GRAY) | (labels == WHITE)])
        mirror = ph.lesion_center_mm * np.array([-1, 1, 1]) + ph.center * np.array([2, 0, 0])
        assert hot > factor * brain, modality
        assert hot > factor * vol.array[_nearest_index(vol, mirror)], modality
    assert 10.0 < float(volumes["PT"].array.max()) < 30.0  # SUV-like after rescale


def test_ct_skull_is_bone_and_brain_is_soft_tissue(study: GeneratedStudy, volumes: dict[str, Volume]) -> None:
    ph, vol = study.phantom, volumes["CT"]
    centres = _voxel_centres(vol)
    labels = ph.labels(centres)
    # skull voxels well inside the shell (all in-plane neighbours skull too), away from the skull cap
    inner = labels == SKULL
    for axis, shift in ((1, 1), (1, -1), (2, 1), (2, -1)):
        inner &= np.roll(labels, shift, axis=axis) == SKULL
    inner &= np.abs(centres[..., 2] - ph.center[2]) < 40.0
    assert inner.sum() > 50
    assert np.percentile(vol.array[inner], 1) > 700
    brain = vol.array[labels == WHITE]
    assert 15 < np.median(brain) < 50
    air = vol.array[labels == AIR]
    assert np.median(air) < -900


def test_mr_has_t1_contrast(study: GeneratedStudy, volumes: dict[str, Volume]) -> None:
    vol = volumes["MR"]
    centres = _voxel_centres(vol)
    labels = study.phantom.labels(centres)
    # 12 mm slices at this scale: judge the thin layers (5 mm scalp, 7 mm skull) where they stand upright
    labels[np.abs(centres[..., 2] - study.phantom.center[2]) > 40.0] = 255
    med = {lab: np.median(vol.array[labels == lab]) for lab in (SCALP, SKULL, GRAY, WHITE, CSF)}
    assert med[WHITE] > med[GRAY] > med[CSF]
    assert np.percentile(vol.array[labels == SCALP], 90) > med[WHITE]
    assert np.percentile(vol.array[labels == SKULL], 10) < med[CSF]


def test_mr_and_ct_grids_differ(volumes: dict[str, Volume]) -> None:
    mr, ct = volumes["MR"], volumes["CT"]
    assert mr.shape != ct.shape
    assert not np.allclose(mr.spacing, ct.spacing)
    assert not np.allclose(mr.affine[:3, 3], ct.affine[:3, 3])


def test_default_grids_scale_keeps_the_field_of_view() -> None:
    full, small = default_grids(1.0), default_grids(0.25)
    assert (full["MR"].rows, full["MR"].pixel_spacing, full["MR"].slice_spacing) == (256, (1.0, 1.0), 3.0)
    assert (full["CT"].rows, full["CT"].pixel_spacing, full["CT"].slice_spacing) == (512, (0.5, 0.5), 1.25)
    assert small["MR"].rows == 64
    for m in full:
        fov_full = full[m].rows * full[m].pixel_spacing[0]
        assert small[m].rows * small[m].pixel_spacing[0] == pytest.approx(fov_full)
        extent_full = full[m].n_slices * full[m].slice_spacing
        assert small[m].n_slices * small[m].slice_spacing == pytest.approx(extent_full)


def test_same_seed_same_bytes_other_seed_other_study(tmp_path: Path) -> None:
    a = generate_study(tmp_path / "a", ("MR", "PT"), scale=0.25, seed=7)
    b = generate_study(tmp_path / "b", ("MR", "PT"), scale=0.25, seed=7)
    c = generate_study(tmp_path / "c", ("MR", "PT"), scale=0.25, seed=8)
    for m in ("MR", "PT"):
        assert [p.read_bytes() for p in a.series[m].paths] == [p.read_bytes() for p in b.series[m].paths]
    assert a.study_instance_uid == b.study_instance_uid != c.study_instance_uid
    assert not np.allclose(a.phantom.lesion_center_mm, c.phantom.lesion_center_mm)
    pixels = [pydicom.dcmread(s.series["MR"].paths[5]).PixelData for s in (a, c)]
    assert pixels[0] != pixels[1]


def test_grid_override_and_oblique_orientation(tmp_path: Path) -> None:
    coronal = Grid(
        rows=24,
        columns=32,
        pixel_spacing=(8.0, 8.0),
        slice_spacing=8.0,
        n_slices=26,
        orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    )
    mr = Grid(rows=48, columns=48, pixel_spacing=(5.0, 5.0), slice_spacing=6.0, n_slices=10)
    st = generate_study(
        tmp_path,
        ("MR", "PT"),
        grids={"PT": coronal, "MR": mr},
        seed=1,
        patient_id="P-42",
        issuer_of_patient_id="HOSP",
        frame_of_reference_uid="1.2.3.4",
    )
    assert len(st.series["MR"].paths) == 10 and len(st.series["PT"].paths) == 26
    ds = pydicom.dcmread(st.series["PT"].paths[0])
    assert ds.PatientID == "P-42" and ds.IssuerOfPatientID == "HOSP" and ds.FrameOfReferenceUID == "1.2.3.4"
    vol = load_volume(st.series["PT"].paths)
    assert vol.array[_nearest_index(vol, st.phantom.lesion_center_mm)] > 0.8 * vol.array.max()


def test_bad_input_is_refused_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown modality 'XA'"):
        generate_study(tmp_path, ("MR", "XA"))
    with pytest.raises(ValueError, match="orientation"):
        Grid(
            rows=4,
            columns=4,
            pixel_spacing=(1.0, 1.0),
            slice_spacing=1.0,
            n_slices=2,
            orientation=(1.0, 0.0, 0.0, 1.0, 0.0, 0.0),
        )
    with pytest.raises(TypeError, match="colour"):
        generate_ct_series(tmp_path, n_slices=2, rows=8, columns=8, colour="red")


def test_ct_series_for_ingest_shares_patient_and_study(tmp_path: Path, study: GeneratedStudy) -> None:
    series = generate_ct_series(tmp_path, n_slices=6, rows=64, columns=64, seed=3)
    assert len(series.paths) == 6
    ds = pydicom.dcmread(series.paths[3])
    assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.PixelRepresentation) == (64, 64, 16, 1)
    assert ds.StudyInstanceUID == study.study_instance_uid and ds.PatientID == study.patient_id
    assert ds.SeriesInstanceUID != study.series["CT"].series_instance_uid


def test_cli_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main([str(tmp_path), "--modalities", "MR,NM", "--scale", "0.25", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "MR" in out and "NM" in out and "lesion at" in out
    assert len(list((tmp_path / "NM").glob("*.dcm"))) == default_grids(0.25)["NM"].n_slices
    assert cli_main([str(tmp_path), "--modalities", "MR,US"]) == 2


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dciodvfy_reports_no_errors(study: GeneratedStudy) -> None:
    for modality, series in study.series.items():
        path = series.paths[len(series.paths) // 2]
        res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{modality}: {errors}"


def test_edges_are_partial_volume_and_plateaus_exact(tmp_path: Path) -> None:
    from dicomnode.testing.appearance import CT_HU

    st = generate_study(tmp_path, ("CT",), scale=0.25, seed=4, noise=False)
    vol = load_volume(st.series["CT"].paths)
    centres = _voxel_centres(vol)
    labels = st.phantom.labels(centres)
    same = np.ones(labels.shape, dtype=bool)  # voxels whose (enlarged) box corners share the label
    for corner in np.array(np.meshgrid(*[[-0.8, 0.8]] * 3)).reshape(3, -1).T:
        same &= st.phantom.labels(centres + vol.affine[:3, :3] @ corner) == labels
    for lab in (SKULL, WHITE, AIR):
        plateau = np.abs(vol.array[same & (labels == lab)] - CT_HU[lab]) <= 1.0
        assert plateau.mean() > 0.99, lab  # a few near thin or pointed shapes the corners miss
    edge = vol.array[~same & ((labels == SKULL) | (labels == SCALP))]
    between = (edge > CT_HU[SCALP] + 50) & (edge < CT_HU[SKULL] - 50)
    assert between.mean() > 0.2  # blended, not a hard 0/1 step
