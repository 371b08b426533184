"""Every command line the README shows, run literally (README changes are picked up: nothing is listed here).

Each line of the README's ``bash`` blocks runs as a user would type it, in a scratch folder that
holds ``.venv`` and ``config.yaml``; the environment moves ports, the database and the spool
into the scratch folder (``DICOMNODE_*`` overrides, as the README documents), and the documented
ports in arguments (11112, 4242, 8080) point at the test's own peers. Placeholders (``JOB_ID``,
``MR_DIR``...) stand for rows and folders the test makes; ``[--flag]`` runs with and without.

Commands that run until stopped are started, checked ready and stopped: ``serve`` (health check or
C-ECHO), ``status --watch`` (a first report), ``scripts/demo.sh`` (the node listening; the whole
demo takes minutes) and ``train`` (hours on the benchmark data: started, running or ended by its
own message, stopped after a few seconds). ``bash scripts/test.sh`` is not run: it is CI itself
and would run this test again. Everything else must end with exit code 0.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from admin_rows import add_patient
from PIL import Image

from dicomnode.db import make_sessionmaker
from dicomnode.spool import Spool
from dicomnode.testing import generate_study
from dicomnode.testing.peers import (
    echoscu,
    free_port,
    have_dcmtk,
    peer_env,
    port_open,
    start_storescp,
    stop_process,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "readme-token-0123456789abcdef"
DOCUMENTED_PORTS = {"11112": "node", "4242": "pacs", "8080": "admin"}
NOT_PLACEHOLDERS = {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"}  # HTTP methods after curl -X
SKIPPED = {"bash scripts/test.sh": "CI itself: it runs the whole suite, this test included"}

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not have_dcmtk(), reason="needs dcmtk (storescp answers the README's C-ECHO)"),
]


def readme_commands(text: str) -> list[list[str]]:
    """The command lines of the README's bash blocks, as argument lists (comments dropped)."""
    out = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            args = shlex.split(line, comments=True)
            if args:
                out.append(args)
    return out


def variants(args: list[str]) -> list[list[str]]:
    """``[--json]`` optional parts: the line without them and with each."""
    optional = [a for a in args if a.startswith("[") and a.endswith("]")]
    plain = [a for a in args if a not in optional]
    return [plain] + [
        [a[1:-1] if a == o else a for a in args if a not in optional or a == o] for o in optional
    ]


@dataclass
class World:
    """The scratch folder, the environment, peers and rows the README's commands act on."""

    tmp: Path
    work: Path
    env: dict[str, str]
    ports: dict[str, int]
    placeholders: dict[str, str]
    jobs: dict[str, list[int]] = field(default_factory=dict)
    admin: subprocess.Popen | None = None  # type: ignore[type-arg]

    def take_job(self, state: str) -> str:
        pool = self.jobs[state]
        return str(pool.pop(0) if len(pool) > 1 else pool[0])


def _pngs(folder: Path, rgb: bool) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        img = rng.integers(0, 255, (64, 64, 3) if rgb else (64, 64), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("readme")
    work = tmp / "work"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    shutil.copy(ROOT / "config.yaml", work / "config.yaml")
    if (ROOT.parent / "shared").is_dir():  # the benchmark data, where `train` looks for it (../shared/eval)
        (tmp / "shared").symlink_to(ROOT.parent / "shared")
    pacs = start_storescp(tmp, aet="ORTHANC")
    ports = {"node": free_port(), "admin": free_port(), "pacs": pacs.port}
    spool, db = tmp / "spool", f"sqlite:///{tmp}/node.db"
    env = peer_env() | {
        "DICOMNODE_NODE__PORT": str(ports["node"]),
        "DICOMNODE_ADMIN__HTTP_PORT": str(ports["admin"]),
        "DICOMNODE_STORAGE__SPOOL_DIR": str(spool),
        "DICOMNODE_STORAGE__DATABASE_URL": db,
        "DICOMNODE_DESTINATIONS": json.dumps(
            [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.port}]
        ),
        "DICOMNODE_ADMIN__TOKENS": json.dumps([{"name": "readme", "token": TOKEN, "role": "admin"}]),
        "DICOMNODE_FUSION__DEVICE": "cpu",
    }
    study = generate_study(tmp / "study", modalities=("MR", "CT"), scale=0.15, seed=2)
    _pngs(tmp / "mri-png", rgb=False)
    _pngs(tmp / "pet-png", rgb=True)
    Spool(spool)
    sm = make_sessionmaker(db)
    w = World(
        tmp=tmp,
        work=work,
        env=env,
        ports=ports,
        placeholders={
            "MR_DIR": str(study.series["MR"].paths[0].parent),
            "CT_DIR": str(study.series["CT"].paths[0].parent),
            "MRI_PNGS": str(tmp / "mri-png"),
            "PET_PNGS": str(tmp / "pet-png"),
            "PATIENT_ID": "README-PATIENT",
        },
    )
    w.jobs = {
        "done": [add_patient(sm, spool, "README-PATIENT")],
        "failed": [add_patient(sm, spool, f"R-FAILED-{i}", job_state="failed", error="x") for i in range(3)],
        "held": [
            add_patient(sm, spool, f"R-HELD-{i}", job_state="held", delivery_state="held") for i in range(2)
        ],
        "pending": [add_patient(sm, spool, f"R-PENDING-{i}", job_state="pending") for i in range(2)],
    }
    yield w
    stop_process(w.admin)
    pacs.stop()


def _substitute(w: World, args: list[str]) -> list[str]:
    """Placeholders to the world's folders and rows; documented ports to the test's peers."""
    action = next((a for a in args if a in ("retry", "release", "cancel")), None)
    action = action or next(
        (a.rsplit("/", 1)[-1] for a in args if a.startswith("http") and "/jobs/" in a), None
    )
    job_state = {"retry": "failed", "release": "held", "cancel": "pending"}.get(action or "", "done")
    out = []
    for a in args:
        a = re.sub(r"\$\{?(\w+)\}?", lambda m: w.env.get(m.group(1), m.group(0)), a)  # as bash expands
        for port, peer in DOCUMENTED_PORTS.items():
            a = re.sub(rf":{port}\b", f":{w.ports[peer]}", a)
        if "OUT_DIR" == a:
            a = str(w.tmp / f"out-{len(list(w.tmp.glob('out-*')))}")
        elif a in w.placeholders:
            a = w.placeholders[a]
        elif "JOB_ID" in a:
            a = a.replace("JOB_ID", w.take_job(job_state))
        elif re.fullmatch(r"[A-Z][A-Z0-9_]{2,}", a) and a not in NOT_PLACEHOLDERS:
            pytest.fail(f"the README uses the placeholder {a}; tell this test what it stands for")
        out.append(a)
    return out


def _start(w: World, args: list[str], cwd: Path) -> subprocess.Popen:  # type: ignore[type-arg]
    return subprocess.Popen(
        args,
        cwd=cwd,
        env=w.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _interrupt(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 60) -> int:  # type: ignore[type-arg]
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=30)


def _healthz(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:  # noqa: S310
            return r.status == 200
    except OSError:
        return False


def _own_storage(w: World) -> dict[str, str]:
    """The world's environment with a spool and database of their own (a serve line starts empty)."""
    env = dict(w.env)
    own = w.tmp / f"serve-{len(list(w.tmp.glob('serve-*')))}"
    env["DICOMNODE_STORAGE__SPOOL_DIR"] = str(own / "spool")
    env["DICOMNODE_STORAGE__DATABASE_URL"] = f"sqlite:///{own}/node.db"
    return env


def _run_serve(w: World, args: list[str]) -> None:
    """Start a `serve` line on its own empty database, wait until it answers, stop it (exit 0)."""
    env = _own_storage(w)
    stages = [args[i + 1] for i, a in enumerate(args) if a == "--stage"] or ["receive", "admin"]
    proc = subprocess.Popen(args, cwd=w.work, env=env, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        if "admin" in stages:
            ready = wait_until(lambda: _healthz(w.ports["admin"]), proc, timeout=120, interval=0.3)
        elif "receive" in stages:
            echo_ok = lambda: echoscu(w.ports["node"]).returncode == 0  # noqa: E731
            ready = wait_until(echo_ok, proc, timeout=120, interval=0.3)
        else:  # no port to ask: it said it started its stages and is still running
            ready = wait_until(
                lambda: any("starting stages" in x for x in log), proc, timeout=120, interval=0.3
            )
            ready = ready and not wait_until(lambda: proc.poll() is not None, None, timeout=3)
        assert ready, f"{shlex.join(args)} did not come up:\n{''.join(log)[-3000:]}"
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=90)
        reader.join(timeout=10)
    assert rc == 0, f"{shlex.join(args)} ended with {rc}:\n{''.join(log)[-3000:]}"


def _run_until_output(w: World, args: list[str], cwd: Path, ready: str, timeout: float) -> None:
    """Start a line that runs until stopped, wait for ``ready`` in its output, then Ctrl-C it."""
    proc = _start(w, args, cwd)
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            if ready in line:
                return
        pytest.fail(f"{shlex.join(args)} never printed {ready!r}:\n{''.join(seen)[-3000:]}")
    finally:
        _interrupt(proc)


def _run_train(w: World, lines: list[list[str]]) -> None:
    """Hours of work each: they must start (no usage error) and run, or end with their own message.

    They run side by side for a few seconds (one may find another's output half written: it
    then says so itself) and are stopped.
    """
    procs = [(args, _start(w, args, w.work)) for args in lines]
    time.sleep(8)
    for args, proc in procs:
        running = proc.poll() is None
        rc = _interrupt(proc) if running else proc.returncode
        out = proc.stdout.read() if proc.stdout else ""
        assert "usage: dicomnode" not in out and "unrecognized arguments" not in out, out[-2000:]
        assert running or rc == 0 or out.strip(), f"{shlex.join(args)} ended with {rc} and said nothing"
        print(f"  {'ran' if running else f'ended ({rc})'}  {shlex.join(args)}")


def _admin_server(w: World) -> None:
    """An admin stage on the world's database for the README's API calls."""
    if w.admin is None or w.admin.poll() is not None:
        w.admin = _start(w, [str(ROOT / ".venv/bin/dicomnode"), "serve", "--stage", "admin"], w.work)
        assert wait_until(lambda: _healthz(w.ports["admin"]), w.admin, timeout=120, interval=0.3)


def _stop_admin(w: World) -> None:
    if w.admin is not None:
        _interrupt(w.admin, signal.SIGTERM)
        w.admin = None
        wait_until(lambda: not port_open(w.ports["admin"]), None, timeout=30)


def _assignments(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """``NAME=value command ...``: the leading assignments bash puts in the command's environment."""
    assigned: dict[str, str] = {}
    while args and re.fullmatch(r"[A-Za-z_]\w*=.*", args[0]):
        name, _, value = args[0].partition("=")
        assigned[name] = value
        args = args[1:]
    return assigned, args


def _refuses_missing_gpu(w: World, args: list[str], assigned: dict[str, str]) -> bool:
    """``DICOMNODE_FUSION__DEVICE=cuda:N ... serve`` on a host without that GPU: refused at start
    with one message naming the key (exit 2), not run quietly on the CPU. False where the GPU is
    there (the line then runs as any other serve line)."""
    from dicomnode.fusion.resample import device_problem  # noqa: PLC0415

    device = assigned.get("DICOMNODE_FUSION__DEVICE")
    if "serve" not in args or not device or not device_problem(device):
        return False
    env = _own_storage(w)
    res = subprocess.run(args, cwd=w.work, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.startswith("error: fusion.device: ") and "Traceback" not in res.stderr
    return True


def test_every_readme_command_line_runs(world: World):
    lines = readme_commands((ROOT / "README.md").read_text())
    assert len(lines) >= 20
    ran = 0
    train: list[list[str]] = []
    for raw in lines:
        text = shlex.join(raw)
        if text in SKIPPED:
            continue
        if raw[0] == "export":
            name, _, value = raw[1].partition("=")
            world.env[name] = value
            if name == "DICOMNODE_TOKEN":  # the README's example token is the one the node knows
                world.env[name] = TOKEN
            continue
        for args in variants(raw):
            args = _substitute(world, args)
            what = shlex.join(args)
            t0 = time.monotonic()
            assigned, args = _assignments(args)
            if args[-1:] == ["&"]:  # started in the background: it runs until stopped, as serve does
                args = args[:-1]
            saved_env = dict(world.env)
            world.env.update(assigned)  # NAME=value before a command: that command's environment
            if _refuses_missing_gpu(world, args, assigned):
                pass
            elif args[:2] == ["bash", "scripts/demo.sh"]:
                _stop_admin(world)
                _run_until_output(world, args, ROOT, "[demo] dicomnode listening", timeout=600)
            elif "serve" in args:
                _stop_admin(world)
                _run_serve(world, args)
            elif "--watch" in args:
                _run_until_output(world, args, world.work, "dicomnode status", timeout=120)
            elif len(args) > 1 and args[1] == "train":
                train.append(args)  # at the end, side by side
            else:
                cwd = world.work
                if args[0] == "curl":
                    _admin_server(world)
                elif args[0] in (".venv/bin/ruff", ".venv/bin/python"):
                    cwd = ROOT  # the development commands run in the checkout
                res = subprocess.run(
                    args, cwd=cwd, env=world.env, capture_output=True, text=True, timeout=600
                )
                assert res.returncode == 0, (
                    f"{what}: exit {res.returncode}\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
                )
                if args[0] == "curl" and "/api/" in what:
                    answer = json.loads(res.stdout)
                    assert "detail" not in answer, f"{what}: {answer}"
            world.env.clear()
            world.env.update(saved_env)
            print(f"{time.monotonic() - t0:6.1f} s  {what}")
            ran += 1
    if train:
        _run_train(world, train)
    assert ran >= 20
