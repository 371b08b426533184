"""Fetching a missing prior: from the MR's last instance to the fused MR+CT series in Orthanc.

Orthanc (the PACS) holds the patient's head CT of another study 5 days earlier, with its own
frame of reference; the node (`dicomnode serve`, its own process) receives only the MR, waits,
queries Orthanc, retrieves the CT (C-MOVE to itself or C-GET, alternating rounds), registers and
fuses it, and sends the fused series back. The time is split from the node's own rows:

  wait      MR's last instance received -> first C-FIND sent (series_stable_seconds + wait_minutes)
  query     first C-FIND sent -> retrieve started (study and series level, the choice)
  retrieve  retrieve started -> every sub-operation answered (the CT indexed by the receive stage)
  assemble  retrieve done -> job claimed by the fuse stage (series complete, job created, claimed)
  register  rigid registration (the prior has its own frame of reference)
  fuse      the rest of the job: load both series, resample, model, Secondary Capture files
  dispatch  job done -> last fused instance acknowledged by Orthanc

    .venv/bin/python benchmarks/prior_fetch.py [--rounds 2] [--mr-slices 200] [--ct-slices 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import func, select

from dicomnode.db import Delivery, Instance, Job, PriorQuery, PriorRetrieve, make_sessionmaker
from dicomnode.testing import Grid, default_grids, generate_study
from dicomnode.testing.peers import Orthanc, echoscu, free_port, peer_env, storescu, wait_until

STABLE_SECONDS = 1.0
PHASES = ("wait", "query", "retrieve", "assemble", "register", "fuse", "dispatch", "total")
TODAY = datetime(2024, 3, 12, 9, 30)


def make_study(root: Path, n_mr: int, n_ct: int) -> tuple[Path, Path]:
    """200-slice MR today and a 300-slice CT 5 days earlier (other study, other frame of reference)."""
    grids = default_grids(1.0)
    mr, ct = grids["MR"], grids["CT"]
    grids["MR"] = Grid(
        rows=mr.rows, columns=mr.columns, pixel_spacing=mr.pixel_spacing, slice_spacing=1.0, n_slices=n_mr
    )
    grids["CT"] = Grid(
        rows=ct.rows,
        columns=ct.columns,
        pixel_spacing=ct.pixel_spacing,
        slice_spacing=ct.slice_spacing * ct.n_slices / n_ct,
        n_slices=n_ct,
        origin_mm=ct.origin_mm,
    )
    ident = {"patient_id": "BENCH-PRIOR", "seed": 0, "grids": grids}
    generate_study(root / "mr", ("MR",), study_datetime=TODAY, **ident)
    generate_study(
        root / "ct",
        ("CT",),
        study_datetime=TODAY - timedelta(days=5),
        study_instance_uid="1.2.826.0.1.3680043.10.543.900.5",
        **ident,
    )
    return root / "mr" / "MR", root / "ct" / "CT"


def one_round(tmp: Path, mr_dir: Path, ct_dir: Path, method: str, n_mr: int) -> dict[str, Any]:
    port, http = free_port(), free_port()
    with Orthanc(tmp / "orthanc", modalities={"dicomnode": ["DICOMNODE", "127.0.0.1", port]}) as orthanc:
        orthanc.upload(sorted(ct_dir.iterdir()))
        cfg = {
            "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port},
            "storage": {"spool_dir": str(tmp / "spool"), "database_url": f"sqlite:///{tmp}/node.db"},
            "assembly": {"series_stable_seconds": STABLE_SECONDS, "poll_seconds": 0.1},
            "rules": [
                {
                    "name": "mr-ct",
                    "reference": "MR",
                    "moving": "CT",
                    "fetch_missing": {"enabled": True, "lookback_days": 30, "wait_minutes": 0},
                }
            ],
            "sources": [
                {
                    "name": "pacs",
                    "ae_title": "ORTHANC",
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                    "retrieve": method,
                }
            ],
            "retrieve": {"poll_seconds": 0.1},
            "destinations": [
                {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
            ],
            "fusion": {"device": "auto", "batch_size": 16, "poll_seconds": 0.1},
            "dispatch": {"poll_seconds": 0.1},
            "admin": {"http_port": http},
        }
        (tmp / "node.yaml").write_text(yaml.safe_dump(cfg))
        node = subprocess.Popen(
            [sys.executable, "-m", "dicomnode.cli", "--config", str(tmp / "node.yaml"), "serve"],
            env=peer_env(),
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "node.log", "wb"),  # noqa: SIM115
        )
        try:
            if not wait_until(lambda: echoscu(port).returncode == 0, node, timeout=60, interval=0.1):
                raise RuntimeError(f"the node did not answer C-ECHO; see {tmp / 'node.log'}")
            res = storescu([mr_dir], port)
            assert res.returncode == 0, res.stderr
            t_acked = time.monotonic()
            while True:
                fused = [
                    s
                    for s in orthanc.rest("/series?expand")
                    if s["MainDicomTags"].get("SeriesDescription", "").startswith("FUSED")
                ]
                if fused and len(fused[0]["Instances"]) >= n_mr:
                    break
                if time.monotonic() - t_acked > 1800:
                    raise TimeoutError(f"the fused series did not arrive; see {tmp / 'node.log'}")
                time.sleep(0.1)
            description = fused[0]["MainDicomTags"]["SeriesDescription"]
            sm = make_sessionmaker(str(cfg["storage"]["database_url"]))  # type: ignore[index]
            deadline = time.monotonic() + 60
            while True:  # Orthanc lists an instance before the node records its C-STORE response
                with sm() as s:
                    pending = s.scalar(
                        select(func.count()).select_from(Delivery).where(Delivery.state != "sent")
                    )
                if not pending or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            with sm() as s:
                job = s.scalars(select(Job)).one()
                retrieve = s.scalars(select(PriorRetrieve)).one()
                first_query = s.scalar(select(func.min(PriorQuery.started_at)))
                mr_last = s.scalar(
                    select(func.max(Instance.received_at)).where(
                        Instance.series_instance_uid == job.reference_series_uid
                    )
                )
                sent = s.scalar(select(func.max(Delivery.sent_at)))
            details = json.loads(job.details or "{}")
            register = float(details.get("registration", {}).get("seconds", 0.0))

            def sec(a: datetime | None, b: datetime | None) -> float:
                assert a is not None and b is not None
                return (b - a).total_seconds()

            return {
                "wait": sec(mr_last, first_query),
                "query": sec(first_query, retrieve.started_at),
                "retrieve": sec(retrieve.started_at, retrieve.finished_at),
                "assemble": sec(retrieve.finished_at, job.started_at),
                "register": register,
                "fuse": sec(job.started_at, job.finished_at) - register,
                "dispatch": sec(job.finished_at, sent),
                "total": sec(mr_last, sent),
                "instances": retrieve.n_completed,
                "description": description,
                "method": job.method,
            }
        finally:
            node.terminate()
            node.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="rounds per retrieve method (alternating)")
    ap.add_argument("--mr-slices", type=int, default=200)
    ap.add_argument("--ct-slices", type=int, default=300)
    ap.add_argument("--methods", default="c-move,c-get")
    args = ap.parse_args()
    os.environ["TCP_NODELAY"] = "1"
    methods = args.methods.split(",")
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory(prefix="dn-prior-") as d:
        root = Path(d)
        mr_dir, ct_dir = make_study(root / "study", args.mr_slices, args.ct_slices)
        print(f"MR {args.mr_slices} slices 256x256 today; CT {args.ct_slices} slices 512x512, 5 days earlier")
        for r in range(args.rounds):
            for m in methods if r % 2 == 0 else reversed(methods):
                row = one_round(root / f"{m}-{r}", mr_dir, ct_dir, m, args.mr_slices)
                results[m].append(row)
                shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}
                print(f"round {r + 1} {m}: {shown}", flush=True)
    print()
    any_row = next(iter(results.values()))[0]
    print(
        f"fused series: {any_row['description']!r}; series_stable_seconds {STABLE_SECONDS:g}, wait_minutes 0"
    )
    print()
    print(f"| phase (s, median of {args.rounds}) | " + " | ".join(methods) + " |")
    print("| --- | " + " | ".join("---:" for _ in methods) + " |")
    for phase in PHASES:
        cells = [f"{statistics.median(r[phase] for r in results[m]):.2f}" for m in methods]
        print(f"| {phase} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
