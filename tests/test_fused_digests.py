"""Every fused pixel stays as it was: digests of ``dicomnode fuse --png`` on the 136 benchmark pairs.

``tests/data/fused_digests.json`` holds, per fuser and pair type, the SHA-256 of the fused images
(decoded pixels, in name order) that the PNG batch path writes for the Harvard benchmark pairs
(``../shared/eval/harvard-cddfuse``): the shipped model (its MRI-CT, MRI-PET and general entries)
and every classical fuser. A refactor must reproduce them byte for byte; a change that means to
move pixels (new weights, a new fuser version) rewrites the file with
``.venv/bin/python tests/test_fused_digests.py --write`` and says so in its commit.

Float32 results depend on the CPU's kernels: oneDNN's convolutions, ATen's vector kernels and MKL
pick code (and summation order) by the instruction set, so an AVX-512 and an AVX2 machine differ in
single pixels. The digests are therefore computed in a child process with a pinned numeric
environment (``NUMERICS``: ATen's portable kernels, MKL's conditional numerical reproducibility,
glibc's maths without FMA/AVX, oneDNN off, one thread), which gives the same bytes on any x86-64
machine; the product itself keeps the fast kernels.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def compute_all(work: Path) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, int]]]:
    """Digests of every fuser on every pair type, and how many pairs each fused."""
    digests: dict[str, dict[str, str]] = {}
    fused: dict[str, dict[str, int]] = {}
    for m in FUSERS:
        for t in PAIR_TYPES:
            digests.setdefault(m, {})[t], fused.setdefault(m, {})[t] = fused_digest(m, t, work)
    return digests, fused


# Read by torch, MKL and glibc when the child process starts (see the module's docstring).
NUMERICS = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX2,-FMA,-FMA4,-AVX",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}


def compute_pinned() -> dict:
    """``compute_all`` in a child process under ``NUMERICS``: {"pairs", "fused", "digests"}."""
    env = {**os.environ, **NUMERICS}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--compute"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"digest child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def recorded() -> dict:
    if not BENCHMARK.is_dir():
        pytest.skip("benchmark data (../shared/eval) not present")
    return json.loads(DIGESTS.read_text())


@pytest.fixture(scope="module")
def computed(recorded: dict) -> dict:
    return compute_pinned()


@pytest.mark.parametrize("method", FUSERS)
def test_fused_benchmark_pixels_are_byte_identical(method: str, recorded: dict, computed: dict) -> None:
    for pair_type in PAIR_TYPES:
        assert computed["fused"][method][pair_type] == recorded["pairs"][pair_type]
        got = computed["digests"][method][pair_type]
        assert got == recorded["digests"][method][pair_type], f"{method} on {pair_type} moved pixels"


def test_the_pinned_environment_reaches_the_child() -> None:
    """The child really runs ATen's portable kernels with oneDNN off (else the digests would follow
    the CPU they run on)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    env = {**os.environ, **NUMERICS}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "DEFAULT"


def _child() -> int:
    """``--compute``: print the digests as one JSON line (run under ``NUMERICS`` by the parent)."""
    import tempfile  # noqa: PLC0415

    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        digests, fused = compute_all(Path(tmp))
    pairs = {t: len(list((BENCHMARK / t).glob("*_a.png"))) for t in PAIR_TYPES}
    print(json.dumps({"pairs": pairs, "fused": fused, "digests": digests}))
    return 0


def main() -> int:
    """``--write``: recompute the digests (pinned, in a child) at the current commit and store them."""
    if sys.argv[1:] == ["--compute"]:
        return _child()
    if sys.argv[1:] != ["--write"]:
        print("usage: python tests/test_fused_digests.py --write", file=sys.stderr)
        return 2
    commit = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    result = compute_pinned()
    record = {
        "commit": commit,
        "torch": torch.__version__,
        "threads": 1,
        "numerics": {**NUMERICS, "torch.backends.mkldnn.enabled": "False"},
        "what": "sha256 of the decoded PNGs `dicomnode fuse --png --modality TYPE` writes for "
        "../shared/eval/harvard-cddfuse/TYPE (name, shape, pixels; name order)",
        "pairs": result["pairs"],
        "digests": result["digests"],
    }
    DIGESTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {DIGESTS} at {commit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
