"""``dicomnode fuse`` on folders, no network: DICOM series (Enhanced MR, JPEG 2000 CT) and PNG pairs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicomnode.cli import main as cli_main
from dicomnode.runner.batch import fuse_png_dirs
from dicomnode.testing import generate_study
from dicomnode.testing import variants as V
from tests.test_fusion_training import _blob, _save


def test_fuse_folders_with_multiframe_reference_and_compressed_ct(tmp_path: Path):
    st = generate_study(tmp_path / "st", modalities=("MR", "CT"), scale=0.2, seed=4)
    mr_dir = tmp_path / "mr-enhanced"
    mr_dir.mkdir()
    V.to_enhanced(st.series["MR"].paths, mr_dir / "enhanced.dcm")
    ct_dir = tmp_path / "ct"
    V.reencode(st.series["CT"].paths, ct_dir, "jpeg2000-lossless")
    assert pydicom.dcmread(next(ct_dir.glob("*.dcm"))).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    out = tmp_path / "out"
    assert (
        cli_main(
            ["fuse", str(mr_dir), str(ct_dir), str(out), "--method", "laplacian-pyramid", "--device", "cpu"]
        )
        == 0
    )
    files = sorted(out.glob("*.dcm"))
    n = len(st.series["MR"].paths)
    assert len(files) == n
    enhanced_uid = pydicom.dcmread(mr_dir / "enhanced.dcm", stop_before_pixels=True).SOPInstanceUID
    frames = []
    for f in files:
        ds = pydicom.dcmread(f)
        first = ds.SourceImageSequence[0]
        assert first.ReferencedSOPInstanceUID == enhanced_uid
        frames.append(int(first.ReferencedFrameNumber))
        ref_items = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
        assert len({it.ReferencedSOPInstanceUID for it in ref_items}) == len(ref_items)
    assert sorted(frames) == list(range(1, n + 1))
    if shutil.which("dciodvfy"):
        res = subprocess.run(["dciodvfy", str(files[0])], capture_output=True, text=True)
        assert [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")] == []


def test_fuse_cli_names_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["fuse", str(empty), str(empty), str(tmp_path / "o")]) == 2
    assert "no DICOM images found in" in capsys.readouterr().err
    st = generate_study(tmp_path / "st", modalities=("MR", "CT"), scale=0.2)
    args = ["fuse", str(st.series["MR"].directory), str(st.series["CT"].directory), str(tmp_path / "o")]
    assert cli_main([*args, "--method", "no-such-fuser"]) == 2
    assert "unknown fusion method 'no-such-fuser'" in capsys.readouterr().err


def test_fuse_png_mode_from_the_cli(tmp_path: Path):
    src = Path(__file__).resolve().parents[1].parent / "shared" / "eval" / "harvard-cddfuse" / "MRI-PET"
    if not src.is_dir():
        pytest.skip("../shared/eval is absent")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for n in ("0001", "0002"):
        shutil.copy(src / f"{n}_a.png", a / f"{n}.png")
        shutil.copy(src / f"{n}_b.png", b / f"{n}.png")
    assert cli_main(["fuse", "--png", str(a), str(b), str(tmp_path / "out"), "--modality", "PT"]) == 0
    out = np.asarray(Image.open(tmp_path / "out" / "0001.png"))
    pet = np.asarray(Image.open(b / "0001.png").convert("RGB"))
    assert out.shape == pet.shape  # colour in, colour out
    assert not np.array_equal(out, pet)  # the MRI contributed


def test_fuse_png_dirs_pairs_files_by_name_gray_and_colour(tmp_path: Path) -> None:
    a_dir, b_dir, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    _save(a_dir / "g.png", _blob(1))
    _save(b_dir / "g.png", _blob(2))
    _save(a_dir / "c.png", _blob(3))
    _save(b_dir / "c.png", np.stack([_blob(4)] * 3, axis=-1))
    _save(a_dir / "lonely.png", _blob(5))
    n = fuse_png_dirs(a_dir, b_dir, out, method="max", device="cpu", progress=False)
    assert n == 2
    gray = np.asarray(Image.open(out / "g.png"))
    np.testing.assert_array_equal(gray, np.maximum(_blob(1), _blob(2)))
    col = np.asarray(Image.open(out / "c.png"))
    assert col.shape == (32, 32, 3)
    with pytest.raises(FileNotFoundError):
        fuse_png_dirs(tmp_path / "nope", b_dir, out, method="max")


def test_fuse_png_dirs_rejects_unknown_modality(tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    _save(a_dir / "x.png", _blob(1))
    _save(b_dir / "x.png", _blob(2))
    with pytest.raises(ValueError, match="modality"):
        fuse_png_dirs(a_dir, b_dir, tmp_path / "o", method="max", progress=False, modality="MR")
    assert fuse_png_dirs(a_dir, b_dir, tmp_path / "o", method="max", progress=False, modality="MRI-CT") == 1


def test_fuse_png_cli_names_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["fuse", "--png", str(tmp_path / "nope"), str(empty), str(tmp_path / "o")]) == 2
    assert "not a folder" in capsys.readouterr().err
    args = ["fuse", "--png", str(empty), str(empty), str(tmp_path / "o"), "--method", "no-such-fuser"]
    assert cli_main(args) == 2
    assert "unknown fusion method 'no-such-fuser'" in capsys.readouterr().err
