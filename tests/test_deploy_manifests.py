"""The deployment files say only what the code reads: every DICOMNODE_* variable they set is a config
key (DICOMNODE_<SECTION>__<KEY>) and its value passes validation, every command line parses with
the real CLI, every stage named exists, and the scaled-out layouts have the stages they promise."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from dicomnode.cli import build_parser
from dicomnode.config import Settings, load_settings
from dicomnode.node import STAGES

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PREFIX = "DICOMNODE_"
READ_OUTSIDE_CONFIG = {"DICOMNODE_DEBUG_NET"}  # read by the CLI itself, not a config key
COMPOSE_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


def config_key(env_name: str) -> str | None:
    """The dotted config key a DICOMNODE_* variable sets, or None when the config has no such key."""
    if env_name in READ_OUTSIDE_CONFIG:
        return env_name
    parts = env_name[len(PREFIX) :].lower().split("__")
    model: type[BaseModel] = Settings
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif depth != len(parts) - 1:
            return None
    return ".".join(parts)


def check_environment(env: dict[str, str], where: str, monkeypatch: pytest.MonkeyPatch, config: Path | None):
    """Every DICOMNODE_* key is a config key and the whole environment validates."""
    unknown = [k for k in env if k.startswith(PREFIX) and config_key(k) is None]
    assert unknown == [], f"{where}: not config keys: {unknown}"
    with monkeypatch.context() as m:
        for k in [k for k in os.environ if k.startswith(PREFIX)]:
            m.delenv(k)
        for k, v in env.items():
            if k.startswith(PREFIX) and k not in READ_OUTSIDE_CONFIG:
                m.setenv(k, v)
        load_settings(config)  # raises ConfigError naming the key when a value is bad


def check_command(argv: list[str], where: str) -> str:
    """The command parses with the CLI; returns the stage (or the subcommand)."""
    try:
        args = build_parser(with_train=False).parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `dicomnode {' '.join(argv)}` does not parse")
    if args.command == "serve":
        stages = args.stage or list(STAGES)
        assert set(stages) <= set(STAGES), where
        return ",".join(stages)
    return f"{args.command} {getattr(args, 'db_command', '')}".strip()


def dockerfile_env() -> dict[str, str]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(pair.split("=", 1) for pair in line[4:].split()))
    return env


def test_dockerfile_environment_is_config(monkeypatch: pytest.MonkeyPatch):
    check_environment(dockerfile_env(), "Dockerfile", monkeypatch, DEPLOY.parent / "config.yaml")


def _compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: COMPOSE_DEFAULT.sub(lambda m: m.group(2), str(v)) for k, v in env.items()}


@pytest.mark.parametrize("name", ["compose.yaml", "compose.scale.yaml"])
def test_compose_files(name: str, monkeypatch: pytest.MonkeyPatch):
    compose = yaml.safe_load((DEPLOY / name).read_text())
    roles: list[str] = []
    for svc_name, svc in compose["services"].items():
        if "build" not in svc and not str(svc.get("image", "")).startswith("dicomnode"):
            continue  # PostgreSQL, Orthanc, the port holder
        env = {**dockerfile_env(), **_compose_env(svc)}
        check_environment(env, f"{name}:{svc_name}", monkeypatch, DEPLOY.parent / "config.yaml")
        roles.append(check_command(list(svc.get("command") or ["serve"]), f"{name}:{svc_name}"))
    if name == "compose.scale.yaml":
        assert sorted(roles) == sorted(
            ["db upgrade", "receive", "receive", "assemble", "fuse", "fuse", "dispatch", "admin"]
        )
        services = compose["services"]
        assert services["postgres"]["image"].startswith("postgres:")
        assert "orthanc" in services["orthanc"]["image"]
        for receiver in ("receive-1", "receive-2"):  # one port, one network namespace, SO_REUSEPORT
            assert services[receiver]["network_mode"] == "service:dicom-port"
            assert services[receiver]["environment"]["DICOMNODE_NODE__REUSE_PORT"] == "true"
        assert services["dicom-port"]["ports"] == ["11112:11112"]
        url = services["migrate"]["environment"]["DICOMNODE_STORAGE__DATABASE_URL"]
        assert url.startswith("postgresql+psycopg://") and "@postgres:5432/" in url


def _k8s_documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / "k8s" / resource).read_text()) if d]
    return docs


def test_kubernetes_manifests(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    docs = _k8s_documents()
    listed = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == listed  # nothing shipped that apply -k would skip
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    secret = by_kind["Secret"]["dicomnode-db"]["stringData"]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(by_kind["ConfigMap"]["dicomnode-config"]["data"]["config.yaml"])
    pvc = by_kind["PersistentVolumeClaim"]["dicomnode-spool"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    replicas: dict[str, int] = {}
    workloads = list(by_kind["Deployment"].values()) + list(by_kind["Job"].values())
    for w in workloads:
        where = f"k8s {w['kind']} {w['metadata']['name']}"
        pod = w["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"][:3] == ["dicomnode", "--config", "/etc/dicomnode/config.yaml"]
        role = check_command(container["command"][1:] + container["args"], where)
        env: dict[str, str] = {}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
            elif "secretKeyRef" in item["valueFrom"]:
                ref = item["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "dicomnode-db", where
                env[item["name"]] = secret[ref["key"]]
            else:  # the pod's name, e.g. as storage.node_id
                assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", where
                env[item["name"]] = "dicomnode-receive-5d9f7c9b8-x2x7q"
        assert env["DICOMNODE_STORAGE__DATABASE_URL"].startswith("postgresql+psycopg://"), where
        check_environment(env, where, monkeypatch, config_file)
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert (
            volumes["config"]["configMap"]["name"] == "dicomnode-config"
            and mounts["config"] == "/etc/dicomnode"
        )
        if w["kind"] == "Deployment":  # every stage sees the one spool
            assert volumes["spool"]["persistentVolumeClaim"]["claimName"] == "dicomnode-spool", where
            spool_dir = load_settings(config_file).storage.spool_dir
            assert Path(spool_dir).is_relative_to(mounts["spool"]), where
            labels = w["spec"]["template"]["metadata"]["labels"]
            assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), where
            replicas[role] = replicas.get(role, 0) + w["spec"]["replicas"]
        else:
            assert role == "db upgrade"
    assert replicas == {"receive": 2, "assemble": 1, "fuse": 2, "dispatch": 1, "admin": 1}

    dicom = by_kind["Service"]["dicomnode-dicom"]
    receive = by_kind["Deployment"]["dicomnode-receive"]
    assert dicom["spec"]["selector"].items() <= receive["spec"]["template"]["metadata"]["labels"].items()
    (port,) = dicom["spec"]["ports"]
    (container,) = receive["spec"]["template"]["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    assert {p["containerPort"] for p in container["ports"]} == {load_settings(config_file).node.port}


def test_config_key_check_can_fail():
    assert config_key("DICOMNODE_STORAGE__DATABASE_URL") == "storage.database_url"
    assert config_key("DICOMNODE_DESTINATIONS") == "destinations"
    assert config_key("DICOMNODE_STORAGE__DATABASE") is None
    assert config_key("DICOMNODE_NODE__PORT__X") is None
    assert config_key("DICOMNODE_NOSUCH__KEY") is None
