"""Scale-out shape: each stage in its own `dicomnode serve --stage X` process over one DB and spool."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicomnode.testing import generate_study
from dicomnode.testing.peers import (
    Orthanc,
    echoscu,
    free_port,
    have_dcmtk,
    have_orthanc,
    peer_env,
    storescu,
    wait_until,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (have_orthanc() and have_dcmtk()), reason="needs Debian orthanc and dcmtk"),
]


def test_stages_in_separate_processes(tmp_path: Path, db_url: str):
    study = generate_study(tmp_path / "study", modalities=("MR", "CT"), scale=0.2, seed=7)
    n_mr = len(study.series["MR"].paths)
    with Orthanc(tmp_path / "orthanc") as orthanc:
        port = free_port()
        cfg = {
            "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port},
            "storage": {
                "spool_dir": str(tmp_path / "spool"),
                "database_url": db_url,
            },
            "assembly": {"series_stable_seconds": 1, "poll_seconds": 0.2},
            "destinations": [
                {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
            ],
            "fusion": {"device": "cpu", "poll_seconds": 0.2},
            "dispatch": {"poll_seconds": 0.2},
            "admin": {"http_port": 0},
        }
        (tmp_path / "node.yaml").write_text(yaml.safe_dump(cfg))
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dicomnode.cli",
                    "--config",
                    str(tmp_path / "node.yaml"),
                    "serve",
                    "--stage",
                    stage,
                ],
                env=peer_env(),
                stdout=subprocess.DEVNULL,
                stderr=open(tmp_path / f"{stage}.log", "wb"),  # noqa: SIM115
            )
            for stage in ("receive", "assemble", "fuse", "dispatch")
        ]
        try:
            assert wait_until(lambda: echoscu(port).returncode == 0, procs[0], timeout=60)
            assert storescu([tmp_path / "study"], port).returncode == 0

            def delivered() -> bool:
                for s in orthanc.rest("/series?expand"):
                    if s["MainDicomTags"].get("SeriesDescription", "").startswith("FUSED MR T1 3D AX + CT"):
                        return len(s["Instances"]) == n_mr
                return False

            assert wait_until(delivered, None, timeout=180, interval=0.3), (
                tmp_path / "fuse.log"
            ).read_text()[-2000:]
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
        assert all(p.returncode == 0 for p in procs)  # SIGTERM is a clean stop
    out = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "--config", str(tmp_path / "node.yaml"), "status"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "done=1" in out and f"sent={n_mr}" in out
