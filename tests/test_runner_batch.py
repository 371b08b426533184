"""``dicomnode fuse`` on folders: Enhanced (multi-frame) MR reference and a JPEG 2000 CT, no network."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from dicomnode.cli import main as cli_main
from dicomnode.testing import generate_study
from dicomnode.testing import variants as V


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
    import numpy as np
    from PIL import Image

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
