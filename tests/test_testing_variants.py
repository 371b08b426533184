"""The variant writers: each produces the DICOM structure it promises (syntax, frames, geometry tags)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.testing import variants as V


@pytest.fixture(scope="module")
def mr(tmp_path_factory: pytest.TempPathFactory) -> V.GeneratedSeries:
    return V.generate_series(tmp_path_factory.mktemp("mr"), "MR", V.small_grid("MR", n_slices=6))


@pytest.mark.parametrize("encoding", ["implicit-le", "deflated", "rle", "jpeg-ls", "jpeg2000-lossless"])
def test_reencode_writes_the_syntax_and_keeps_pixels(
    encoding: str, mr: V.GeneratedSeries, tmp_path: Path
) -> None:
    paths = V.reencode(mr.paths, tmp_path, encoding)
    assert [p.name for p in paths] == [p.name for p in mr.paths]
    for src, dst in zip(mr.paths, paths, strict=True):
        a, b = pydicom.dcmread(src), pydicom.dcmread(dst)
        assert b.file_meta.TransferSyntaxUID == V.ENCODINGS[encoding].uid
        assert b.SOPInstanceUID == a.SOPInstanceUID
        np.testing.assert_array_equal(b.pixel_array, a.pixel_array)


def test_enhanced_has_shared_and_per_frame_groups(mr: V.GeneratedSeries, tmp_path: Path) -> None:
    ds = pydicom.dcmread(V.to_enhanced(mr.paths, tmp_path / "e.dcm"))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1"
    assert "ImagePositionPatient" not in ds and "PixelSpacing" not in ds
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert list(shared.PlaneOrientationSequence[0].ImageOrientationPatient) == list(
        pydicom.dcmread(mr.paths[0]).ImageOrientationPatient
    )
    frames = ds.PerFrameFunctionalGroupsSequence
    positions = [list(f.PlanePositionSequence[0].ImagePositionPatient) for f in frames]
    assert positions == [list(pydicom.dcmread(p).ImagePositionPatient) for p in mr.paths]
    assert ds.pixel_array.shape == (6, 32, 32)


def test_nm_multiframe_uses_slice_vector_and_detector_plane(tmp_path: Path) -> None:
    grid = V.small_grid("NM", n_slices=5, matrix=32)
    nm = V.generate_series(tmp_path / "nm", "NM", grid)
    ds = pydicom.dcmread(V.to_nm_multiframe(nm.paths, tmp_path / "nm.dcm"))
    assert int(ds.NumberOfFrames) == 5 and list(ds.SliceVector) == [1, 2, 3, 4, 5]
    assert ds.FrameIncrementPointer == 0x00540080
    assert list(ds.DetectorInformationSequence[0].ImagePositionPatient) == list(
        pydicom.dcmread(nm.paths[0]).ImagePositionPatient
    )


def test_tilted_ct_steps_along_z_with_tilted_planes(tmp_path: Path) -> None:
    ct = V.generate_tilted_ct(tmp_path, tilt_deg=15.0, n_slices=4)
    datasets = [pydicom.dcmread(p) for p in ct.paths]
    pos = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
    steps = np.diff(pos, axis=0)
    np.testing.assert_allclose(steps, [[0.0, 0.0, 6.0]] * 3, atol=1e-3)
    iop = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    assert abs(np.degrees(np.arccos(iop[4])) - 15.0) < 1e-3
    assert float(datasets[0].GantryDetectorTilt) == 15.0


def test_irregular_series_sits_at_the_given_offsets(tmp_path: Path) -> None:
    s = V.generate_irregular(tmp_path, "MR", [0.0, 3.0, 9.0, 10.0])
    z = [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in s.paths]
    np.testing.assert_allclose(np.array(z) - z[0], [0.0, 3.0, 9.0, 10.0], atol=1e-3)


def test_localizers_join_the_series_with_another_orientation(mr: V.GeneratedSeries, tmp_path: Path) -> None:
    paths = V.with_localizers(mr.paths, tmp_path, n=2)
    locs = [pydicom.dcmread(p) for p in paths[len(mr.paths) :]]
    assert len(locs) == 2
    series_uid = pydicom.dcmread(mr.paths[0]).SeriesInstanceUID
    for d in locs:
        assert d.SeriesInstanceUID == series_uid and "LOCALIZER" in d.ImageType
        assert list(d.ImageOrientationPatient) != list(pydicom.dcmread(mr.paths[0]).ImageOrientationPatient)


def test_monochrome1_inverts_the_stored_range(mr: V.GeneratedSeries, tmp_path: Path) -> None:
    a = pydicom.dcmread(mr.paths[0])
    b = pydicom.dcmread(V.monochrome1(mr.paths[:1], tmp_path)[0])
    assert b.PhotometricInterpretation == "MONOCHROME1"
    np.testing.assert_array_equal(b.pixel_array.astype(int), 4095 - a.pixel_array.astype(int))
