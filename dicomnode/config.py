"""Typed configuration: config.yaml plus DICOMNODE_<SECTION>__<KEY> environment overrides.

Validation happens at start; an unknown key or a bad value raises ConfigError naming the key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

MODALITY_CODES = {"MR", "CT", "PT", "NM"}
MAX_SERIES_NUMBER_BASE = 2**31 - 1 - 100_000  # Series Number is an IS (at most 2^31-1); room to count up
DEFAULT_NOTICE = "RESEARCH USE ONLY"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _ae_title(value: str) -> str:
    value = value.strip()
    if not 1 <= len(value) <= 16 or "\\" in value or not value.isascii():
        raise ValueError("an AE title is 1-16 ASCII characters without backslash")
    return value


def _readable_file(value: Path) -> Path:
    if not value.is_file():
        raise ValueError(f"file not found: {value}")
    return value


class NodeTlsConfig(_Section):
    """DICOM TLS on the receive port: the node's certificate and key, the CA of client certificates."""

    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = False

    _check_files = field_validator("cert", "key", "ca")(
        classmethod(lambda cls, v: None if v is None else _readable_file(v))
    )

    @model_validator(mode="after")
    def _ca_for_clients(self) -> NodeTlsConfig:
        if self.require_client_cert and self.ca is None:
            raise ValueError("require_client_cert needs ca (the CA that signs the client certificates)")
        return self


class AllowedPeer(_Section):
    """One allow-list entry: a calling AE title, a peer address or network (CIDR), or both."""

    ae_title: str | None = None
    address: str | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        return None if v is None else _ae_title(v)

    @field_validator("address")
    @classmethod
    def _network(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            return str(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or network: {v!r}") from None

    @model_validator(mode="after")
    def _something(self) -> AllowedPeer:
        if self.ae_title is None and self.address is None:
            raise ValueError("an allowed peer needs ae_title, address or both")
        return self


class NodeConfig(_Section):
    ae_title: str = "DICOMNODE"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)  # 0 = any free port (tests)
    allowed_calling_aets: list[str] = Field(default_factory=list)  # AE titles admitted from any address
    allowed_peers: list[AllowedPeer] = Field(default_factory=list)
    check_called_aet: bool = True  # refuse associations addressed to another AE title
    tls: NodeTlsConfig | None = None
    # The largest P-DATA PDU the node announces and accepts; a longer declared PDU ends the association.
    max_pdu_size: int = Field(1_048_576, ge=4096, le=64 * 1_048_576)
    max_dataset_mb: int = Field(2048, ge=1)  # one C-STORE data set; larger ones end the association
    max_associations: int = Field(32, ge=1, le=4096)  # connections at once, counted from accept
    max_associations_per_address: int = Field(8, ge=1, le=4096)
    acse_timeout_seconds: float = Field(10.0, gt=0, le=3600)  # connect -> A-ASSOCIATE-RQ, and release
    dimse_timeout_seconds: float = Field(600.0, gt=0, le=86400)  # one command or data set, first to last byte
    network_timeout_seconds: float = Field(60.0, gt=0, le=86400)  # idle association, or a PDU stalled
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


class FetchMissingConfig(_Section):
    """Query and retrieve a rule's missing partner series from the ``sources`` (PACS)."""

    enabled: bool = False
    lookback_days: int = Field(365, ge=0, le=36500)  # partner studies at most this many days older
    wait_minutes: float = Field(10, ge=0)  # how long a complete series waits for its partner to arrive
    # Series completed longer ago than this never start a fetch (e.g. when switched on over an old spool).
    max_age_hours: float = Field(24, gt=0)


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
    # First Series Number of this rule's fused series; None = 9100, 9200, ... by the rule's position.
    series_number_base: int | None = Field(None, ge=1, le=MAX_SERIES_NUMBER_BASE)
    fetch_missing: FetchMissingConfig = Field(default_factory=FetchMissingConfig)

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


def _http_url(value: str) -> str:
    value = value.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("put credentials in username/password, not in the URL")
    return value.rstrip("/")


class HttpAuthConfig(_Section):
    """Optional HTTP authentication: a bearer token, or basic auth with username and password."""

    bearer_token: str | None = Field(None, min_length=1)
    username: str | None = Field(None, min_length=1)
    password: str | None = None

    @model_validator(mode="after")
    def _one_scheme(self) -> HttpAuthConfig:
        if self.bearer_token and self.username:
            raise ValueError("give either bearer_token or username/password, not both")
        if self.password is not None and not self.username:
            raise ValueError("password needs a username")
        return self


class OrthancRestConfig(HttpAuthConfig):
    """A destination that is an Orthanc: its REST API, used to look up and delete series."""

    url: str

    _check_url = field_validator("url")(classmethod(lambda cls, v: _http_url(v)))


class DestinationTlsConfig(_Section):
    """DICOM TLS to a destination: the CA of its certificate, and our client certificate if it asks."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    check_hostname: bool = True  # the certificate must name the destination's host

    _check_files = field_validator("ca", "cert", "key")(
        classmethod(lambda cls, v: None if v is None else _readable_file(v))
    )

    @model_validator(mode="after")
    def _pair(self) -> DestinationTlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together (the client certificate and its private key)")
        return self


class DestinationConfig(HttpAuthConfig):
    """A PACS the fused series go to: DIMSE C-STORE (``type: dimse``) or DICOMweb STOW-RS (``dicomweb``).

    The auth keys (bearer_token, username, password) are for ``dicomweb``; ``orthanc`` (optional)
    names the destination's Orthanc REST API, the capability to list and delete series there.
    """

    name: str = Field(min_length=1, max_length=64)
    type: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    url: str | None = None  # dicomweb: the service root, e.g. http://pacs:8042/dicom-web
    orthanc: OrthancRestConfig | None = None
    tls: DestinationTlsConfig | None = None  # dimse: DICOM TLS to this destination

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, v: str | None) -> str | None:
        return None if v is None else _ae_title(v)

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        return None if v is None else _http_url(v)

    @model_validator(mode="after")
    def _keys_for_type(self) -> DestinationConfig:
        if self.type == "dimse":
            missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"a dimse destination needs {', '.join(missing)}")
            if self.url is not None or self.bearer_token or self.username:
                raise ValueError("url and HTTP auth keys are for type: dicomweb")
        elif self.url is None:
            raise ValueError("a dicomweb destination needs url (the DICOMweb service root)")
        return self

    @property
    def where(self) -> str:
        """Where the destination is, for logs and the audit: AE@host:port or the URL."""
        if self.type == "dicomweb":
            return str(self.url)
        return f"{self.ae_title}@{self.host}:{self.port}"


class SourceConfig(_Section):
    """A PACS the node may query (C-FIND) and retrieve from (C-MOVE to ``node.ae_title``, or C-GET)."""

    name: str = Field(min_length=1, max_length=64)
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    retrieve: Literal["c-move", "c-get"] = "c-move"
    timeout_seconds: float = Field(30.0, gt=0)  # per association step and per DIMSE response

    _check_ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae_title(v)))


class RetrieveConfig(_Section):
    """The retrieve stage: polling, retries with backoff, bounds on what a source may answer."""

    poll_seconds: float = Field(1.0, gt=0)
    max_attempts: int = Field(8, ge=1)  # per query round and per retrieve
    backoff_initial_seconds: float = Field(10.0, gt=0)
    backoff_max_seconds: float = Field(300.0, gt=0)
    max_studies: int = Field(50, ge=1, le=1000)  # study matches used per source and query
    max_series: int = Field(200, ge=1, le=10000)  # series matches used per study
    max_retrieve_seconds: float = Field(1800.0, gt=0)  # one C-MOVE / C-GET, all sub-operations


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


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> timedelta:
    """A duration from seconds (number) or text with a unit: ``90s``, ``30m``, ``12h``, ``7d``, ``2w``."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or e.g. 30m, 12h, 7d")
    if isinstance(value, int | float):
        return timedelta(seconds=float(value))
    m = _DURATION.match(str(value))
    if m is None:
        raise ValueError(f"not a duration: {value!r} (use seconds or e.g. 30m, 12h, 7d)")
    return timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[(m.group(2) or "s").lower()])


class DispatchConfig(_Section):
    """Outbox retries: transient failures are retried with capped exponential backoff until
    ``give_up_after`` has passed since the first failed attempt; permanent refusals end at once."""

    give_up_after: timedelta = timedelta(days=7)
    max_attempts: int | None = Field(None, ge=1)  # optional extra cap on attempts; None = time decides
    backoff_initial_seconds: float = Field(2.0, gt=0)
    backoff_max_seconds: float = Field(300.0, gt=0)
    poll_seconds: float = Field(0.5, gt=0)
    timeout_seconds: float = Field(30.0, gt=0)

    @field_validator("give_up_after", mode="before")
    @classmethod
    def _duration(cls, v: object) -> timedelta:
        d = parse_duration(v)
        if d.total_seconds() <= 0:
            raise ValueError("give_up_after must be positive")
        return d


class WorkersConfig(_Section):
    """Leases: every claimed job, delivery and open association carries its worker's id and an expiry
    the worker renews; another worker takes the work over when a lease expires (a dead process)."""

    lease_seconds: float = Field(30.0, ge=1.0, le=3600.0)
    worker_id: str | None = Field(None, min_length=1, max_length=64)  # None = <host>-<pid>-<random>
    max_job_attempts: int = Field(3, ge=1, le=100)  # a job whose worker keeps dying fails after this

    @field_validator("worker_id")
    @classmethod
    def _printable(cls, v: str | None) -> str | None:
        if v is not None and (not v.isprintable() or not v.strip() or not v.isascii()):
            raise ValueError("worker_id must be printable ASCII text")
        return v.strip() if v is not None else None


class OutputConfig(_Section):
    """What the fused series says about itself (notice, replacement) and which IOD carries it."""

    notice: str = Field(DEFAULT_NOTICE, max_length=64)
    notice_in_description: bool = True  # the notice ends the Series Description
    burn_in_notice: bool = True  # the notice is drawn into a corner of every image
    # Ends the Series Description of a re-fusion; {series_number} is the replaced series' number.
    replaces_text: str = Field("REPLACES {series_number}", max_length=32)
    replace_previous: bool = False  # ask destinations that allow it to delete the replaced series
    iod: Literal["sc", "multiframe-sc"] = "sc"

    @field_validator("notice", "replaces_text")
    @classmethod
    def _text(cls, v: str) -> str:
        v = " ".join(v.split())
        if "\\" in v or not v.isprintable():
            raise ValueError("must be printable text without backslash")
        return v

    @field_validator("replaces_text")
    @classmethod
    def _placeholder(cls, v: str) -> str:
        try:
            v.format(series_number=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only the placeholder {{series_number}} is allowed ({exc})") from None
        return v


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
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    sources: list[SourceConfig] = Field(default_factory=list)
    retrieve: RetrieveConfig = Field(default_factory=RetrieveConfig)

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, v: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in v]
        if len(names) != len(set(names)):
            raise ValueError("source names must be unique")
        return v

    @model_validator(mode="after")
    def _fetch_needs_sources(self) -> Settings:
        for n, rule in enumerate(self.rules):
            if rule.fetch_missing.enabled and not self.sources:
                raise ValueError(
                    f"rules.{n}.fetch_missing.enabled: no sources configured to fetch from (add sources:)"
                )
        return self

    @field_validator("rules")
    @classmethod
    def _unique_rules(cls, v: list[RuleConfig]) -> list[RuleConfig]:
        names = [r.name for r in v]
        if len(names) != len(set(names)):
            raise ValueError("rule names must be unique")
        return v

    @field_validator("destinations")
    @classmethod
    def _unique_destinations(cls, v: list[DestinationConfig]) -> list[DestinationConfig]:
        names = [d.name for d in v]
        if len(names) != len(set(names)):
            raise ValueError("destination names must be unique")
        return v

    def series_number_base(self, rule_name: str) -> int:
        """The first Series Number of a rule's fused series (9100, 9200, ... unless configured)."""
        for position, rule in enumerate(self.rules):
            if rule.name == rule_name:
                return rule.series_number_base or 9000 + 100 * (position + 1)
        return 9000

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
