"""Typed configuration: config.yaml plus DICOMNODE_<SECTION>__<KEY> environment overrides.

Validation happens at start; an unknown key or a bad value raises ConfigError naming the key.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

MODALITY_CODES = {"MR", "CT", "PT", "NM"}


class ConfigError(Exception):
    """The configuration cannot be used; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _ae_title(value: str) -> str:
    value = value.strip()
    if not 1 <= len(value) <= 16 or "\\" in value or not value.isascii():
        raise ValueError("an AE title is 1-16 ASCII characters without backslash")
    return value


class NodeConfig(_Section):
    ae_title: str = "DICOMNODE"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)  # 0 = any free port (tests)
    allowed_calling_aets: list[str] = Field(default_factory=list)
    max_pdu_size: int = Field(0, ge=0, description="0 = unlimited")
    # Receive processes sharing the port (SO_REUSEPORT; the kernel spreads connections over them).
    receive_processes: int = Field(1, ge=1, le=64)
    # Let other receive processes of this user bind the same port (implied by receive_processes > 1).
    reuse_port: bool = False

    _check_ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae_title(v)))

    @field_validator("allowed_calling_aets")
    @classmethod
    def _check_allowed(cls, v: list[str]) -> list[str]:
        return [_ae_title(a) for a in v]

    @model_validator(mode="after")
    def _shared_port(self) -> NodeConfig:
        if self.receive_processes > 1 and self.port == 0:
            raise ValueError("receive_processes > 1 needs a fixed node.port (0 picks a port per process)")
        return self


_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _default_node_id() -> str:
    """The host name, as a file-name component (at most 64 characters)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-._")[:64]
    return name or "node"


class StorageConfig(_Section):
    spool_dir: Path = Path("./var/spool")
    database_url: str = "sqlite:///./var/dicomnode.db"
    fsync: bool = True
    # Upgrade an older schema at start. None: yes on SQLite, no on a server database (there,
    # run `dicomnode db upgrade` once). A newer schema is always refused.
    auto_migrate: bool | None = None
    # This node's name in spool file names where nodes sharing one spool could collide.
    node_id: str = Field(default_factory=_default_node_id)
    # Database connections kept per process (as many again at peak); server databases only.
    pool_size: int = Field(5, ge=1, le=100)

    @field_validator("database_url")
    @classmethod
    def _url(cls, v: str) -> str:
        from sqlalchemy.engine import make_url  # noqa: PLC0415
        from sqlalchemy.exc import ArgumentError  # noqa: PLC0415

        try:
            make_url(v)
        except ArgumentError:
            raise ValueError(
                "not a database URL (e.g. sqlite:///var/dicomnode.db, postgresql+psycopg://...)"
            ) from None
        return v

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, v: str) -> str:
        if not _NODE_ID.match(v):
            raise ValueError(
                "1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return v


class AssemblyConfig(_Section):
    series_stable_seconds: float = Field(30, ge=0)
    pair_window_hours: float = Field(24, ge=0)
    poll_seconds: float = Field(1.0, gt=0)


# Series selection defaults (regular expressions, case-insensitive, searched in
# "Series Description | Protocol Name | Sequence Name"); the first matching pattern ranks highest.
DEFAULT_PREFER: dict[str, list[str]] = {
    "MR": [
        r"t1.*(3d|mprage|spgr|bravo|tfe|vibe|space)|(3d|mprage|spgr|bravo|tfe|vibe).*t1|mprage|bravo",
        r"\bt1",
        r"3d",
    ],
    "CT": [r"brain|soft|standard|\bstd\b|\bh[23]\d|\bj[34]\d", r"head"],
    "PT": [r"^(?!.*\b(nac|non[- ]?ac|noac|uncorrected)\b)"],  # attenuation-corrected first
    "NM": [r"^(?!.*\b(nac|uncorrected|raw|projection)\b)"],
}
DEFAULT_EXCLUDE = [r"locali[sz]er|scout|survey|\bloc\b|3[- ]?plane|topogram|calibration|b1map|dose report"]


class RuleConfig(_Section):
    """A modality set: fuse a ``reference`` series (MR) with a ``moving`` series of one patient."""

    name: str = Field(min_length=1, max_length=64)
    reference: str = "MR"
    moving: str
    reference_prefer: list[str] | None = None  # None = DEFAULT_PREFER[reference]
    moving_prefer: list[str] | None = None  # None = DEFAULT_PREFER[moving]
    exclude: list[str] | None = None  # None = DEFAULT_EXCLUDE
    body_part: str | None = None  # e.g. HEAD: skip series whose Body Part Examined says otherwise
    min_slices: int = Field(8, ge=1)  # fewer slices is not a volume (a localizer, a single slice)

    @field_validator("reference", "moving")
    @classmethod
    def _modality(cls, v: str) -> str:
        v = v.strip().upper()
        if v not in MODALITY_CODES:
            raise ValueError(f"modality must be one of {sorted(MODALITY_CODES)}, got {v!r}")
        return v

    @field_validator("reference_prefer", "moving_prefer", "exclude")
    @classmethod
    def _regexes(cls, v: list[str] | None) -> list[str] | None:
        for pattern in v or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {pattern!r} ({exc})") from None
        return v

    def patterns(self, which: str) -> list[re.Pattern[str]]:
        """Compiled patterns: ``reference``, ``moving`` (preferences) or ``exclude``."""
        if which == "exclude":
            raw = DEFAULT_EXCLUDE if self.exclude is None else self.exclude
        else:
            mod = self.reference if which == "reference" else self.moving
            own = self.reference_prefer if which == "reference" else self.moving_prefer
            raw = DEFAULT_PREFER.get(mod, []) if own is None else own
        return [re.compile(p, re.IGNORECASE) for p in raw]


class DestinationConfig(_Section):
    name: str = Field(min_length=1, max_length=64)
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    _check_ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae_title(v)))


class FusionConfig(_Section):
    device: str = "auto"
    batch_size: int = Field(16, ge=1, le=1024)
    method: str = "default"
    poll_seconds: float = Field(1.0, gt=0)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.strip().lower()
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("device must be auto, cpu, cuda or cuda:N")


class DispatchConfig(_Section):
    max_attempts: int = Field(10, ge=1)
    backoff_initial_seconds: float = Field(2.0, gt=0)
    backoff_max_seconds: float = Field(300.0, gt=0)
    poll_seconds: float = Field(0.5, gt=0)
    timeout_seconds: float = Field(30.0, gt=0)


class AdminConfig(_Section):
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)


def _default_rules() -> list[RuleConfig]:
    return [
        RuleConfig(name="mr-ct", reference="MR", moving="CT"),
        RuleConfig(name="mr-pet", reference="MR", moving="PT"),
        RuleConfig(name="mr-spect", reference="MR", moving="NM"),
    ]


class Settings(BaseSettings):
    """The whole node configuration."""

    model_config = SettingsConfigDict(
        env_prefix="DICOMNODE_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    node: NodeConfig = Field(default_factory=NodeConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    assembly: AssemblyConfig = Field(default_factory=AssemblyConfig)
    rules: list[RuleConfig] = Field(default_factory=_default_rules)
    destinations: list[DestinationConfig] = Field(default_factory=list)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)

    @field_validator("rules")
    @classmethod
    def _unique_rules(cls, v: list[RuleConfig]) -> list[RuleConfig]:
        names = [r.name for r in v]
        if len(names) != len(set(names)):
            raise ValueError("rule names must be unique")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the YAML file (passed as init kwargs).
        return (env_settings, init_settings)


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read config.yaml (or defaults when path is None), apply env overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
        data = loaded
    data.update(overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
