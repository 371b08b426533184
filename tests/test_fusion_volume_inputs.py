"""Volumes from what real scanners send: each variant loads to the plain-encoded series' volume."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.fusion.resample import resample_to
from dicomnode.fusion.stacks import split_stacks
from dicomnode.fusion.volume import Volume, VolumeError, load_volume, volume_from_datasets
from dicomnode.testing import variants as V

AFFINE_TOL = 1e-3


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vol")


@pytest.fixture(scope="module")
def mr(work: Path) -> V.GeneratedSeries:
    return V.generate_series(work / "mr", "MR", V.small_grid("MR", n_slices=10), noise=True)


@pytest.fixture(scope="module")
def ct(work: Path) -> V.GeneratedSeries:
    return V.generate_series(work / "ct", "CT", V.small_grid("CT", n_slices=10), noise=True)


@pytest.fixture(scope="module")
def pet(work: Path) -> V.GeneratedSeries:
    grid = V.small_grid("PT", n_slices=10, matrix=32, pixel_mm=6.0, slice_mm=6.0)
    return V.generate_series(work / "pt", "PT", grid, noise=True)


def _same_geometry(v: Volume, ref: Volume) -> None:
    assert v.shape == ref.shape
    assert np.abs(v.affine - ref.affine).max() < AFFINE_TOL


def _covered(moving: Volume, reference: Volume) -> np.ndarray:
    """Reference voxels whose resampled value comes from the moving volume only (no fill mixed in)."""
    ones = Volume(np.ones_like(moving.array), moving.affine, slice_k=moving.slice_k)
    return resample_to(ones, reference) > 0.999


def _rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)) / (np.ptp(b) or 1.0))


@pytest.mark.parametrize("encoding", list(V.ENCODINGS))
@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_every_encoding_loads_to_the_plain_volume(
    encoding: str, modality: str, mr: V.GeneratedSeries, ct: V.GeneratedSeries, work: Path
) -> None:
    if V.ENCODINGS[encoding].tool == "dcmcjpeg" and shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmtk not installed")
    series = mr if modality == "MR" else ct
    ref = load_volume(series.paths)
    paths = V.reencode(series.paths, work / f"enc-{modality}-{encoding}", encoding)
    assert str(pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID) == V.ENCODINGS[encoding].uid
    vol = load_volume(paths)
    _same_geometry(vol, ref)
    if V.ENCODINGS[encoding].lossy:
        assert _rel_rms(vol.array, ref.array) < 0.05  # the codec's loss on noisy 32x32 slices
    else:
        np.testing.assert_array_equal(vol.array, ref.array)


def test_undecodable_stream_raises_volume_error_naming_the_syntax(mr: V.GeneratedSeries, work: Path) -> None:
    j2k = V.reencode(mr.paths[:3], work / "j2k-ok", "jpeg2000-lossless")
    bad = V.corrupt_pixel_data(j2k, work / "j2k-bad")
    name = r"JPEG 2000 Image Compression \(Lossless Only\) \(1\.2\.840\.10008\.1\.2\.4\.90\)"
    with pytest.raises(VolumeError, match=name):
        load_volume(bad)


def test_unknown_transfer_syntax_raises_volume_error(mr: V.GeneratedSeries) -> None:
    datasets = [pydicom.dcmread(p) for p in mr.paths[:3]]
    for ds in datasets:
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.999"
    with pytest.raises(VolumeError, match=r"1\.2\.840\.10008\.1\.2\.4\.999"):
        volume_from_datasets(datasets)


@pytest.mark.parametrize("modality", ["MR", "CT", "PT"])
def test_enhanced_multiframe_matches_single_frames(
    modality: str, mr: V.GeneratedSeries, ct: V.GeneratedSeries, pet: V.GeneratedSeries, work: Path
) -> None:
    series = {"MR": mr, "CT": ct, "PT": pet}[modality]
    ref = load_volume(series.paths)
    n = len(series.paths)
    shuffled = [(k * 3) % n for k in range(n)] if n % 3 else list(reversed(range(n)))
    path = V.to_enhanced(series.paths, work / f"enh-{modality}.dcm", frame_order=shuffled)
    ds = pydicom.dcmread(path)
    assert int(ds.NumberOfFrames) == n and "PerFrameFunctionalGroupsSequence" in ds
    vol = load_volume([path])
    _same_geometry(vol, ref)
    np.testing.assert_allclose(vol.array, ref.array, rtol=1e-5, atol=1e-4)
    # one header per slice: the instance's UID, its own position and the frame to reference
    assert vol.sop_instance_uids == [str(ds.SOPInstanceUID)] * n
    assert sorted(vol.frame_numbers) == list(range(1, n + 1))  # type: ignore[type-var]
    for k, header in enumerate(vol.datasets):
        pos = np.array([float(v) for v in header.ImagePositionPatient])
        np.testing.assert_allclose(pos, vol.slice_affine(k)[:3, 3], atol=AFFINE_TOL)
        assert shuffled[header.frame_number - 1] == k  # frame f holds original slice shuffled[f-1]


def test_enhanced_pet_has_per_frame_rescale(pet: V.GeneratedSeries, work: Path) -> None:
    ds = pydicom.dcmread(V.to_enhanced(pet.paths, work / "enh-pt-check.dcm"))
    frames = ds.PerFrameFunctionalGroupsSequence
    slopes = {str(f.PixelValueTransformationSequence[0].RescaleSlope) for f in frames}
    assert len(slopes) > 1


def test_nm_multiframe_reconstruction_matches_single_frames(work: Path) -> None:
    grid = V.small_grid("NM", n_slices=12, matrix=32, pixel_mm=6.0, slice_mm=6.0)
    nm = V.generate_series(work / "nm", "NM", grid, noise=True)
    ref = load_volume(nm.paths)
    path = V.to_nm_multiframe(nm.paths, work / "nm-mf.dcm")
    ds = pydicom.dcmread(path)
    assert "ImagePositionPatient" not in ds and int(ds.NumberOfFrames) == 12
    vol = load_volume([path])
    _same_geometry(vol, ref)
    np.testing.assert_array_equal(vol.array, ref.array)
    assert vol.frame_numbers == list(range(1, 13))


def test_classic_multiframe_without_geometry_is_refused(mr: V.GeneratedSeries) -> None:
    ds = pydicom.dcmread(mr.paths[0])
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    with pytest.raises(VolumeError, match="no per-frame geometry"):
        volume_from_datasets([ds])


@pytest.mark.parametrize("plane", ["axial", "sagittal", "coronal", "oblique"])
def test_orientations_place_the_anatomy_in_patient_space(plane: str, work: Path) -> None:
    grid = V.small_grid("MR", n_slices=12, plane=plane)
    series = V.generate_series(work / f"mr-{plane}", "MR", grid, noise=False)
    vol = load_volume(series.paths)
    assert series.grid is not None
    np.testing.assert_allclose(vol.affine, series.grid.affine(), atol=AFFINE_TOL)
    axial = load_volume(V.generate_series(work / "mr-axial-clean", "MR", V.small_grid("MR", 12)).paths)
    on_axial = resample_to(vol, axial)
    inside = _covered(vol, axial) & (axial.array > 50)
    assert inside.sum() > 500
    corr = np.corrcoef(on_axial[inside], axial.array[inside])[0, 1]
    assert corr > 0.8, f"{plane}: correlation {corr:.2f} with the axial acquisition"


def test_monochrome1_loads_like_monochrome2(mr: V.GeneratedSeries, work: Path) -> None:
    ref = load_volume(mr.paths)
    vol = load_volume(V.monochrome1(mr.paths, work / "mono1"))
    np.testing.assert_array_equal(vol.array, ref.array)
    assert any("MONOCHROME1" in n for n in vol.notes)


def test_rescale_per_slice_is_applied_per_slice(ct: V.GeneratedSeries, work: Path) -> None:
    ref = load_volume(ct.paths)
    paths = V.rescale_per_slice(ct.paths, work / "rescale")
    assert len({str(pydicom.dcmread(p).RescaleIntercept) for p in paths}) == len(paths)
    vol = load_volume(paths)
    np.testing.assert_allclose(vol.array, ref.array, atol=1e-3)


def test_gaps_keep_each_slice_at_its_position(work: Path) -> None:
    full = load_volume(V.generate_series(work / "mr-full", "MR", V.small_grid("MR", 14)).paths)
    series = V.generate_series(work / "mr-gap", "MR", V.small_grid("MR", 14))
    vol = load_volume(V.with_gaps(series.paths, [4, 5, 9]))
    assert vol.slice_k is not None and any("non-uniform" in n for n in vol.notes)
    kept = [k for k in range(14) if k not in (4, 5, 9)]
    for n, k in enumerate(kept):
        np.testing.assert_allclose(vol.slice_affine(n)[:3, 3], full.slice_affine(k)[:3, 3], atol=AFFINE_TOL)
    # as reference: each of its slices gets the moving values at its own position
    on_gappy = resample_to(full, vol)
    np.testing.assert_allclose(on_gappy, full.array[kept], atol=1e-2)
    # as moving: the gaps are interpolated, every acquired slice lands where it was acquired
    on_full = resample_to(vol, full)
    np.testing.assert_allclose(on_full[kept], full.array[kept], atol=1e-2)


def test_non_uniform_spacing_matches_uniform_acquisition(work: Path) -> None:
    offsets = [0.0, 6.0, 12.0, 15.0, 18.0, 24.0, 36.0, 42.0, 48.0, 54.0]
    irregular = V.generate_irregular(work / "mr-irr", "MR", offsets)
    vol = load_volume(irregular.paths)
    assert vol.slice_k is not None
    positions = np.array([vol.slice_affine(k)[:3, 3] for k in range(vol.shape[0])])
    np.testing.assert_allclose(np.linalg.norm(positions - positions[0], axis=1), offsets, atol=AFFINE_TOL)
    for k, p in enumerate(irregular.paths):
        np.testing.assert_array_equal(vol.array[k], pydicom.dcmread(p).pixel_array)


def test_gantry_tilt_is_resampled_into_patient_space(work: Path) -> None:
    tilted = V.generate_tilted_ct(work / "ct-tilt", tilt_deg=20.0, n_slices=14)
    vol = load_volume(tilted.paths)
    assert any("gantry tilt" in n for n in vol.notes)
    assert tilted.grid is not None
    np.testing.assert_allclose(vol.affine, tilted.grid.affine(), atol=AFFINE_TOL)
    axial = load_volume(V.generate_series(work / "ct-axial", "CT", V.small_grid("CT", 14)).paths)
    on_axial = resample_to(vol, axial)
    inside = _covered(vol, axial) & (axial.array > 300)  # skull
    corr = np.corrcoef(on_axial[inside], axial.array[inside])[0, 1]
    # the same stack read as if the slices stepped along the normal (tilt ignored) lands elsewhere
    wrong = Volume(vol.array, vol.affine.copy(), modality="CT")
    wrong.affine[:3, 2] = np.cross(vol.affine[:3, 0], vol.affine[:3, 1])
    wrong.affine[:3, 2] *= np.linalg.norm(vol.affine[:3, 2]) / np.linalg.norm(wrong.affine[:3, 2])
    on_axial_wrong = resample_to(wrong, axial)
    both = inside & _covered(wrong, axial)
    err = np.abs(on_axial[both] - axial.array[both]).mean()
    err_wrong = np.abs(on_axial_wrong[both] - axial.array[both]).mean()
    assert corr > 0.8 and err < 0.7 * err_wrong


def test_tilt_only_in_the_tag_is_refused(ct: V.GeneratedSeries) -> None:
    datasets = [pydicom.dcmread(p) for p in ct.paths]
    for ds in datasets:
        ds.GantryDetectorTilt = "15"
    with pytest.raises(VolumeError, match="Gantry/Detector Tilt is 15"):
        volume_from_datasets(datasets)


def test_positions_off_one_line_are_refused(ct: V.GeneratedSeries) -> None:
    datasets = [pydicom.dcmread(p) for p in ct.paths]
    pos = [float(v) for v in datasets[3].ImagePositionPatient]
    datasets[3].ImagePositionPatient = [pos[0], pos[1] + 5.0, pos[2]]
    with pytest.raises(VolumeError, match="one line"):
        volume_from_datasets(datasets)


@pytest.mark.parametrize("mark", [True, False])
def test_localizers_are_excluded(mark: bool, mr: V.GeneratedSeries, work: Path) -> None:
    ref = load_volume(mr.paths)
    out = work / f"loc-{mark}"
    out.mkdir()
    vol = load_volume(V.with_localizers(mr.paths, out, n=2, mark=mark))
    _same_geometry(vol, ref)
    np.testing.assert_array_equal(vol.array, ref.array)
    assert any("localizer" in n for n in vol.notes)


def test_only_localizers_is_an_error(mr: V.GeneratedSeries) -> None:
    datasets = [pydicom.dcmread(p) for p in mr.paths[:3]]
    for ds in datasets:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    with pytest.raises(VolumeError, match="only localizer"):
        volume_from_datasets(datasets)


def test_two_orientations_in_one_series_are_split(mr: V.GeneratedSeries, work: Path) -> None:
    sag = V.generate_series(work / "mr-sag", "MR", V.small_grid("MR", n_slices=6, plane="sagittal"))
    out = work / "merged"
    out.mkdir()
    paths = V.merge_into_series(mr.paths, sag.paths, out)
    datasets = [pydicom.dcmread(p) for p in paths]
    stacks = split_stacks(datasets)
    assert [len(s) for s in stacks] == [10, 6]
    vol = volume_from_datasets(datasets)
    np.testing.assert_array_equal(vol.array, load_volume(mr.paths).array)
    assert any("2 stacks" in n for n in vol.notes)


def test_two_echoes_at_the_same_positions_are_split(mr: V.GeneratedSeries, work: Path) -> None:
    out = work / "echoes"
    out.mkdir()
    datasets = [pydicom.dcmread(p) for p in V.second_echo(mr.paths, out)]
    stacks = split_stacks(datasets)
    assert [len(s) for s in stacks] == [10, 10]
    assert {str(s[0].EchoNumbers) for s in stacks} == {"1", "2"}
    vol = volume_from_datasets(datasets)
    np.testing.assert_array_equal(vol.array, load_volume(mr.paths).array)  # echo 1: first by Instance Number


def test_duplicate_positions_without_a_distinguishing_tag_are_refused(mr: V.GeneratedSeries) -> None:
    datasets = [pydicom.dcmread(p) for p in mr.paths] + [pydicom.dcmread(mr.paths[2])]
    datasets[-1].SOPInstanceUID = "1.2.3.4"
    with pytest.raises(VolumeError, match="share positions"):
        volume_from_datasets(datasets)
