"""Admin API latency over a large audit: 10,000 jobs and 1,000,000 events in SQLite.

Builds the database once (jobs over 2,500 patients, 20 outputs and deliveries per job, events of
all kinds), then times requests to the admin stage (``dicomnode serve --stage admin``, its own
process) on loopback: ``GET /api/v1/jobs?limit=50`` and the other pages an admin opens. With
``--compare-indexes`` a copy without the indexes the admin views need is served too, and the two
are asked in alternating rounds.

    .venv/bin/python benchmarks/admin_api.py [--jobs 10000] [--events 1000000] [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx
from sqlalchemy import insert

from dicomnode.db import Delivery, Event, Job, Output, Series, make_sessionmaker, utcnow
from dicomnode.testing.peers import free_port, peer_env, stop_process, wait_until

ADDED_INDEXES = (
    "ix_events_entity",
    "ix_jobs_patient",
    "ix_jobs_rule",
    "ix_deliveries_destination_state",
    "ix_deliveries_state",
)
CHUNK = 20000


def build(db: Path, n_jobs: int, n_events: int, outputs_per_job: int) -> None:
    sm = make_sessionmaker(f"sqlite:///{db}")
    rng = random.Random(0)
    now = utcnow()
    n_patients = max(1, n_jobs // 4)
    with sm() as s, s.begin():
        series = []
        for p in range(n_patients):
            for mod in ("MR", "CT"):
                series.append(
                    {
                        "series_instance_uid": f"1.2.3.{p}.{mod == 'CT'}",
                        "study_instance_uid": f"1.2.3.{p}",
                        "patient_key": f"P{p:06d}",
                        "patient_id": f"P{p:06d}",
                        "patient_name": f"Patient^{p}",
                        "modality": mod,
                        "state": "complete",
                        "n_instances": 200,
                    }
                )
        s.execute(insert(Series), series)
        states = ["done"] * 90 + ["failed"] * 5 + ["held"] * 2 + ["superseded"] * 3
        details = json.dumps(
            {
                "alignment": "same frame of reference",
                "seconds_resample": 0.8,
                "seconds_fuse": 9.5,
                "seconds_quality": 0.4,
                "seconds_output": 2.1,
                "seconds_total": 13.0,
            }
        )
        quality = json.dumps({"metrics": {"EN": 5.1, "SD": 50.0, "SSIM": 1.2, "Qabf": 0.55}, "slices": [1]})
        jobs = []
        for j in range(1, n_jobs + 1):
            p = j % n_patients
            jobs.append(
                {
                    "id": j,
                    "rule_name": "mr-ct" if j % 2 else "mr-pet",
                    "patient_key": f"P{p:06d}",
                    "reference_series_uid": f"1.2.3.{p}.False",
                    "moving_series_uid": f"1.2.3.{p}.True",
                    "reference_generation": 1 + j // n_patients,
                    "state": rng.choice(states),
                    "attempts": 1,
                    "method": "li2021-cnn",
                    "details": details,
                    "quality": quality,
                    "output_series_uid": f"1.2.4.{j}",
                    "created_at": now - timedelta(minutes=n_jobs - j),
                }
            )
        s.execute(insert(Job), jobs)
        out_id = 0
        outputs, deliveries = [], []
        for j in range(1, n_jobs + 1):
            for k in range(outputs_per_job):
                out_id += 1
                outputs.append(
                    {
                        "id": out_id,
                        "job_id": j,
                        "sop_instance_uid": f"1.2.4.{j}.{k}",
                        "series_instance_uid": f"1.2.4.{j}",
                        "instance_number": k + 1,
                        "path": f"outgoing/{j}/{k}.dcm",
                        "size_bytes": 70000,
                    }
                )
                deliveries.append(
                    {
                        "output_id": out_id,
                        "destination": "pacs",
                        "state": "sent",
                        "attempts": 1,
                        "sent_at": now,
                    }
                )
            if len(outputs) >= CHUNK:
                s.execute(insert(Output), outputs)
                s.execute(insert(Delivery), deliveries)
                outputs, deliveries = [], []
        if outputs:
            s.execute(insert(Output), outputs)
            s.execute(insert(Delivery), deliveries)
    kinds = [
        ("delivery", "pending", "sent"),
        ("output", None, "written"),
        ("job", "running", "done"),
        ("series", "receiving", "complete"),
        ("association", "open", "released"),
        ("instance", None, "failed"),
    ]
    weights = [60, 25, 3, 4, 4, 4]
    with sm() as s, s.begin():
        batch = []
        for i in range(n_events):
            entity, old, new = rng.choices(kinds, weights)[0]
            entity_id = str(rng.randint(1, n_jobs)) if entity == "job" else str(rng.randint(1, 10 * n_jobs))
            batch.append(
                {
                    "at": now - timedelta(seconds=n_events - i),
                    "stage": "dispatch",
                    "entity": entity,
                    "entity_id": entity_id,
                    "old_state": old,
                    "new_state": new,
                    "reason": "benchmark row",
                }
            )
            if len(batch) >= CHUNK:
                s.execute(insert(Event), batch)
                batch = []
        if batch:
            s.execute(insert(Event), batch)
    sm.kw["bind"].dispose()


def serve(db: Path, spool: Path) -> tuple[subprocess.Popen[bytes], httpx.Client]:
    """The admin stage over ``db`` as its own process (as deployed: no GIL shared with the client)."""
    port = free_port()
    env = peer_env() | {
        "DICOMNODE_STORAGE__DATABASE_URL": f"sqlite:///{db}",
        "DICOMNODE_STORAGE__SPOOL_DIR": str(spool),
        "DICOMNODE_ADMIN__HTTP_PORT": str(port),
        "DICOMNODE_DESTINATIONS": json.dumps(
            [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}]
        ),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicomnode.cli", "serve", "--stage", "admin"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(db.with_suffix(".log"), "wb"),  # noqa: SIM115
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)

    def up() -> bool:
        try:
            return client.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_until(up, proc, timeout=120, interval=0.2):
        raise RuntimeError(f"the admin stage did not start; see {db.with_suffix('.log')}")
    return proc, client


def timed(client: httpx.Client, path: str) -> float:
    t0 = time.perf_counter()
    r = client.get(path)
    elapsed = (time.perf_counter() - t0) * 1000
    r.raise_for_status()
    return elapsed


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) >= 20 else max(values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jobs", type=int, default=10000)
    ap.add_argument("--events", type=int, default=1000000)
    ap.add_argument("--outputs-per-job", type=int, default=20)
    ap.add_argument("--requests", type=int, default=200, help="per endpoint (and per database)")
    ap.add_argument(
        "--compare-indexes", action="store_true", help="also serve a copy without the added indexes"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dn-admin-api-") as d:
        root = Path(d)
        db = root / "with.db"
        t0 = time.perf_counter()
        build(db, args.jobs, args.events, args.outputs_per_job)
        print(
            f"built {args.jobs} jobs, {args.events} events, {args.jobs * args.outputs_per_job} outputs "
            f"and deliveries in {time.perf_counter() - t0:.0f} s ({db.stat().st_size / 1e6:.0f} MB)"
        )
        servers = {"with indexes": serve(db, root / "spool")}
        if args.compare_indexes:
            bare = root / "without.db"
            shutil.copy(db, bare)
            con = sqlite3.connect(bare)
            for name in ADDED_INDEXES:
                con.execute(f"DROP INDEX IF EXISTS {name}")
            con.commit()
            con.close()
            servers["without the added indexes"] = serve(bare, root / "spool2")
        patient = f"P{(args.jobs // 8):06d}"
        endpoints = [
            "/api/v1/jobs?limit=50",
            "/api/v1/jobs?limit=50&state=failed",
            f"/api/v1/jobs?limit=50&patient={patient}",
            f"/api/v1/jobs/{args.jobs // 2}",
            "/api/v1/events?limit=50",
            f"/api/v1/events?limit=50&entity=job&entity_id={args.jobs // 2}",
            "/api/v1/deliveries?limit=50&state=sent",
            "/api/v1/destinations",
            "/api/v1/status",
            "/",
        ]
        results: dict[tuple[str, str], list[float]] = {}
        for name, (_proc, client) in servers.items():
            client.headers["Accept"] = "application/json"
            for path in endpoints:  # warm up: caches and the first request's imports
                timed(client, path)
            t0 = time.perf_counter()
            client.get("/metrics").raise_for_status()
            print(
                f"{name}: first /metrics scrape (reads the whole audit once) {time.perf_counter() - t0:.1f} s"
            )
        rounds = 10
        per_round = max(1, args.requests // rounds)
        for _ in range(
            rounds
        ):  # alternate databases and endpoints so the shared machine's load spreads evenly
            for name, (_proc, client) in servers.items():
                for path in [*endpoints, "/metrics"]:
                    for _ in range(per_round):
                        results.setdefault((name, path), []).append(timed(client, path))
        print()
        names = list(servers)
        head = "| endpoint | " + " | ".join(f"{n}: median ms | p95 ms" for n in names) + " |"
        print(head)
        print("| --- |" + " ---: | ---: |" * len(names))
        for path in [*endpoints, "/metrics"]:
            cells = []
            for n in names:
                v = results[(n, path)]
                cells.append(f"{statistics.median(v):.1f} | {p95(v):.1f}")
            print(f"| `{path}` | " + " | ".join(cells) + " |")
        main_path = ("with indexes", "/api/v1/jobs?limit=50")
        p = p95(results[main_path])
        print(
            f"\nGET /api/v1/jobs?limit=50: p95 {p:.1f} ms, target < 100 ms: {'MET' if p < 100 else 'NOT MET'}"
        )
        for proc, client in servers.values():
            client.close()
            stop_process(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
