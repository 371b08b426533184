"""Every fused pixel stays as it was: digests of ``dicomnode fuse --png`` on the 136 benchmark pairs.

``tests/data/fused_digests.json`` holds, per fuser and pair type, the SHA-256 of the fused images
(decoded pixels, in name order) that the PNG batch path writes for the Harvard benchmark pairs
(``../shared/eval/harvard-cddfuse``): the shipped model (its MRI-CT, MRI-PET and general entries)
and every classical fuser. A refactor must reproduce them byte for byte; a change that means to
move pixels (new weights, a new fuser version) rewrites the file with
``.venv/bin/python tests/test_fused_digests.py --write`` and says so in its commit.

The digests were computed with torch's CPU kernels at one thread; the test fuses at one thread too.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from dicomnode.runner.batch import fuse_png_dirs  # noqa: E402

DIGESTS = Path(__file__).parent / "data" / "fused_digests.json"
BENCHMARK = ROOT.parent / "shared" / "eval" / "harvard-cddfuse"
PAIR_TYPES = ("MRI-CT", "MRI-PET", "MRI-SPECT")
FUSERS = ("li2021-cnn", "max", "average", "laplacian-pyramid", "guided-filter", "gradient-domain")


def _split_pairs(pair_type: str, work: Path) -> tuple[Path, Path]:
    """Links ``NNNN_a.png`` / ``NNNN_b.png`` into ``a/NNNN.png`` / ``b/NNNN.png`` (the PNG mode's layout)."""
    a_dir, b_dir = work / pair_type / "a", work / pair_type / "b"
    if not a_dir.is_dir():
        a_dir.mkdir(parents=True)
        b_dir.mkdir(parents=True)
        for src in sorted((BENCHMARK / pair_type).glob("*_a.png")):
            name = src.name[: -len("_a.png")] + ".png"
            (a_dir / name).symlink_to(src)
            (b_dir / name).symlink_to(src.with_name(src.name.replace("_a.png", "_b.png")))
    return a_dir, b_dir


def fused_digest(method: str, pair_type: str, work: Path) -> tuple[str, int]:
    """SHA-256 of the decoded fused images (name, shape, pixels) and how many pairs went in."""
    a_dir, b_dir = _split_pairs(pair_type, work)
    out = work / "out" / method / pair_type
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = fuse_png_dirs(a_dir, b_dir, out, method=method, device="cpu", progress=False, modality=pair_type)
    finally:
        torch.set_num_threads(threads)
    h = hashlib.sha256()
    for p in sorted(out.glob("*.png")):
        with Image.open(p) as im:
            px = np.asarray(im)
        h.update(p.name.encode() + repr(px.shape).encode() + px.tobytes())
    return h.hexdigest(), n


def compute_all(work: Path) -> dict[str, dict[str, str]]:
    """Digests of every fuser on every pair type."""
    return {m: {t: fused_digest(m, t, work)[0] for t in PAIR_TYPES} for m in FUSERS}


@pytest.fixture(scope="module")
def recorded() -> dict:
    if not BENCHMARK.is_dir():
        pytest.skip("benchmark data (../shared/eval) not present")
    return json.loads(DIGESTS.read_text())


@pytest.mark.parametrize("method", FUSERS)
def test_fused_benchmark_pixels_are_byte_identical(method: str, recorded: dict, tmp_path: Path) -> None:
    for pair_type in PAIR_TYPES:
        digest, n = fused_digest(method, pair_type, tmp_path)
        assert n == recorded["pairs"][pair_type]
        assert digest == recorded["digests"][method][pair_type], f"{method} on {pair_type} moved pixels"


def main() -> int:
    """``--write``: recompute the digests at the current commit and store them."""
    if sys.argv[1:] != ["--write"]:
        print("usage: python tests/test_fused_digests.py --write", file=sys.stderr)
        return 2
    import tempfile  # noqa: PLC0415

    commit = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        digests = compute_all(Path(tmp))
        pairs = {t: len(list((BENCHMARK / t).glob("*_a.png"))) for t in PAIR_TYPES}
    record = {
        "commit": commit,
        "torch": torch.__version__,
        "threads": 1,
        "what": "sha256 of the decoded PNGs `dicomnode fuse --png --modality TYPE` writes for "
        "../shared/eval/harvard-cddfuse/TYPE (name, shape, pixels; name order)",
        "pairs": pairs,
        "digests": digests,
    }
    DIGESTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {DIGESTS} at {commit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
