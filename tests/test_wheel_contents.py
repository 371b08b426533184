"""The wheel holds the product only: no research notes or scripts, and a model card, not a lab log.

It builds the wheel from a copy of the checkout's files (tracked and untracked, not ignored: what a
commit would hold), so a packaging change that pulls ``docs/research`` or ``benchmarks/research`` in,
or a model card that grows back into an experiment log, fails here.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_CARD = "dicomnode/fusion/MODEL.md"
MODEL_CARD_MAX_BYTES = 12_500
LAB_LOG = re.compile(r"\bstops?\s*\d+|\bstop-\d+", re.IGNORECASE)  # "stop 9": a lab log's chapters


def _checkout_files() -> list[str]:
    try:
        res = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        )
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [f for f in res.stdout.decode().split("\0") if f and (ROOT / f).is_file()]


def _can_build_in_place() -> bool:
    """The venv has the build backend pyproject.toml asks for (then no download is needed)."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
        importlib.metadata.version("wheel")
    except importlib.metadata.PackageNotFoundError:
        return False
    return major >= 68


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src")
    for f in _checkout_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)]
    if _can_build_in_place():
        cmd.insert(4, "--no-build-isolation")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (path,) = out.glob("dicomnode-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_no_research_log_and_no_scripts(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    assert MODEL_CARD in names and any(n.startswith("dicomnode/fusion/weights/") for n in names)
    assert [n for n in names if "research" in n.lower()] == []
    assert [n for n in names if not n.startswith(("dicomnode/", "dicomnode-"))] == []  # no docs/, benchmarks/
    assert [n for n in names if n.endswith(".md") and n != MODEL_CARD] == []


def test_model_card_is_a_card_not_a_lab_log(wheel: zipfile.ZipFile) -> None:
    card = wheel.read(MODEL_CARD)
    assert len(card) <= MODEL_CARD_MAX_BYTES
    text = card.decode()
    for heading in (
        "Intended use",
        "Training data and split",
        "Evaluation",
        "Limits",
        "Speed",
        "Reproducing",
    ):
        assert f"\n## {heading}" in text
    assert LAB_LOG.findall(text) == []
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    assert LAB_LOG.findall(wheel.read(metadata).decode()) == []  # the README travels in METADATA


def test_wheel_carries_the_schema_migrations(wheel: zipfile.ZipFile, tmp_path: Path) -> None:
    """`pip install` users get the migrations: the wheel holds every revision and they load from it."""
    names = set(wheel.namelist())
    versions = ROOT / "dicomnode/db/migrations/versions"
    shipped = {f"dicomnode/db/migrations/versions/{p.name}" for p in versions.glob("*.py")}
    assert shipped and shipped <= names and "dicomnode/db/migrations/env.py" in names
    wheel.extractall(tmp_path / "site")
    code = "import dicomnode.db.schema as s; print(s.MIGRATIONS); print(s.head_revision())"
    res = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,  # not the checkout: python -c puts the working directory first on sys.path
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    from dicomnode.db.schema import head_revision  # noqa: PLC0415

    assert res.stdout.split() == [str(tmp_path / "site/dicomnode/db/migrations"), head_revision()]
