"""End-to-end latency: a 200-slice MR + CT pair through dicomnode into Orthanc.

Measures the time from the last instance acknowledged (storescu done) to the last fused instance
stored in Orthanc, minus the stability wait (the time the node deliberately waits for more
instances). The node runs as its own process (`dicomnode serve`), Orthanc as the PACS.
``--quality both`` runs rounds with and without the per-job quality metrics
(``fusion.quality_metrics``), alternating, and prints them side by side with the metrics' share
of the fuse phase.

    .venv/bin/python benchmarks/end_to_end.py [--rounds 3] [--method default] [--mr-slices 200]
        [--quality on|off|both]
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
from datetime import UTC, datetime
from pathlib import Path

import yaml
from sqlalchemy import select

from dicomnode.db import Job, Series, make_sessionmaker
from dicomnode.testing import Grid, default_grids, generate_study
from dicomnode.testing.peers import Orthanc, echoscu, free_port, peer_env, storescu, wait_until

STABLE_SECONDS = 1.0


def one_round(tmp: Path, study_dir: Path, n_mr: int, method: str, quality: bool = True) -> dict[str, float]:
    with Orthanc(tmp / "orthanc") as orthanc:
        port, http = free_port(), free_port()
        cfg = {
            "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port},
            "storage": {"spool_dir": str(tmp / "spool"), "database_url": f"sqlite:///{tmp}/node.db"},
            "assembly": {"series_stable_seconds": STABLE_SECONDS, "poll_seconds": 0.1},
            "rules": [{"name": "mr-ct", "reference": "MR", "moving": "CT"}],
            "destinations": [
                {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
            ],
            "fusion": {
                "device": "auto",
                "batch_size": 16,
                "method": method,
                "poll_seconds": 0.1,
                "quality_metrics": quality,
            },
            "dispatch": {"poll_seconds": 0.1},
            "admin": {"http_port": http},
        }
        (tmp / "node.yaml").write_text(yaml.safe_dump(cfg))
        env = peer_env()
        node = subprocess.Popen(
            [sys.executable, "-m", "dicomnode.cli", "--config", str(tmp / "node.yaml"), "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "node.log", "wb"),  # noqa: SIM115
        )
        try:
            if not wait_until(lambda: echoscu(port).returncode == 0, node, timeout=60, interval=0.1):
                raise RuntimeError(f"the node did not answer C-ECHO; see {tmp / 'node.log'}")
            t_send = time.monotonic()
            res = storescu([study_dir], port)
            assert res.returncode == 0, res.stderr
            t_acked = time.monotonic()
            wall_acked = datetime.now(UTC).replace(tzinfo=None)
            while True:
                series = [
                    s
                    for s in orthanc.rest("/series?expand")
                    if s["MainDicomTags"].get("SeriesDescription", "").startswith("FUSED")
                ]
                if series and len(series[0]["Instances"]) >= n_mr:
                    break
                if time.monotonic() - t_acked > 600:
                    raise TimeoutError("fused series did not arrive")
                time.sleep(0.05)
            t_done = time.monotonic()
            sm = make_sessionmaker(cfg["storage"]["database_url"])
            with sm() as s:
                job = s.scalars(select(Job)).one()
                last_rx = max(s.scalars(select(Series.last_received_at)).all())
                details = json.loads(job.details or "{}")
            # stability wait: from the last instance received until the job existed
            stable = (job.created_at - last_rx).total_seconds()
            lag_ack = (wall_acked - last_rx).total_seconds()
            return {
                "send_s": t_acked - t_send,
                "ack_to_pacs_s": t_done - t_acked,
                "stability_wait_s": max(0.0, stable - lag_ack),
                "e2e_minus_wait_s": t_done - t_acked - max(0.0, stable - lag_ack),
                "fuse_total_s": float(details.get("seconds_total", 0)),
                "resample_s": float(details.get("seconds_resample", 0)),
                "model_s": float(details.get("seconds_fuse", 0)),
                "quality_s": float(details.get("seconds_quality") or 0),
                "output_s": float(details.get("seconds_output", 0)),
                "method": job.method or "",
            }
        finally:
            node.terminate()
            node.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--method", default="default")
    ap.add_argument("--mr-slices", type=int, default=200)
    ap.add_argument("--quality", choices=["on", "off", "both"], default="on", help="per-job quality metrics")
    args = ap.parse_args()
    os.environ["TCP_NODELAY"] = "1"
    grids = default_grids(1.0)
    mr = grids["MR"]
    grids["MR"] = Grid(
        rows=mr.rows,
        columns=mr.columns,
        pixel_spacing=mr.pixel_spacing,
        slice_spacing=1.0,
        n_slices=args.mr_slices,
    )
    with tempfile.TemporaryDirectory(prefix="dn-e2e-") as d:
        root = Path(d)
        study = generate_study(root / "study", modalities=("MR", "CT"), grids=grids, seed=0)
        n_mr, n_ct = len(study.series["MR"].paths), len(study.series["CT"].paths)
        print(f"study: MR {n_mr} slices {mr.rows}x{mr.columns}, CT {n_ct} slices 512x512")
        settings = {"on": [True], "off": [False], "both": [True, False]}[args.quality]
        rows: dict[bool, list[dict[str, float]]] = {q: [] for q in settings}
        for r in range(args.rounds):  # alternating: the shared machine's load falls on both alike
            for q in settings:
                rows[q].append(one_round(root / f"round{r}-{q}", root / "study", n_mr, args.method, q))
                print(f"round {r + 1}, quality metrics {'on' if q else 'off'}: {rows[q][-1]}", flush=True)
    keys = [
        "send_s",
        "stability_wait_s",
        "ack_to_pacs_s",
        "e2e_minus_wait_s",
        "fuse_total_s",
        "resample_s",
        "model_s",
        "quality_s",
        "output_s",
    ]
    method = next(iter(rows.values()))[0]["method"]
    print()
    print(
        f"| metric (median of {args.rounds}, method {method}) | "
        + " | ".join(f"quality metrics {'on' if q else 'off'}" for q in rows)
        + " |"
    )
    print("| --- |" + " ---: |" * len(rows))
    for k in keys:
        print(
            f"| {k} | "
            + " | ".join(f"{statistics.median(r[k] for r in rs):.2f}" for rs in rows.values())
            + " |"
        )
    if True in rows:
        on = rows[True]
        q_s = statistics.median(r["quality_s"] for r in on)
        stage = statistics.median(r["quality_s"] / r["fuse_total_s"] for r in on if r["fuse_total_s"])
        model = statistics.median(r["quality_s"] / r["model_s"] for r in on if r["model_s"])
        print(
            f"\nquality metrics: {q_s:.2f} s per {n_mr}-slice job (median); per round "
            f"{100 * stage:.1f} % of the job's fuse stage time (fuse_total_s), "
            f"{100 * model:.1f} % of the model step alone (model_s); target < 10 % of the fuse stage: "
            f"{'MET' if stage < 0.10 else 'NOT MET'}"
        )
    med = statistics.median(r["e2e_minus_wait_s"] for r in next(iter(rows.values())))
    print(f"target <= 10 s on CPU: {'MET' if med <= 10 else 'NOT MET'} ({med:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
