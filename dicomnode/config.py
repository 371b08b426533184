"""Typed configuration: config.yaml plus DICOMNODE_<SECTION>__<KEY> environment overrides.

Validation happens at start; an unknown key or a bad value raises ConfigError naming the key.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import types
import typing
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
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


def check_database_url(url: str) -> str:
    """A usable SQLAlchemy URL whose driver is installed (the message never repeats the URL: passwords)."""
    from sqlalchemy.engine import make_url  # noqa: PLC0415
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError  # noqa: PLC0415

    example = "write e.g. sqlite:///./var/dicomnode.db or postgresql+psycopg://USER@HOST/DBNAME"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"not a database URL; {example}") from None
    pg_fix = "write postgresql+psycopg://USER@HOST/DBNAME (psycopg 3, installed with dicomnode)"
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        fix = pg_fix if parsed.drivername.startswith("postgres") else example
        raise ValueError(f"unknown database backend {parsed.drivername!r}; {fix}") from None
    try:
        dialect.import_dbapi()
    except ImportError:
        fix = pg_fix if parsed.get_backend_name() == "postgresql" else example
        raise ValueError(
            f"{parsed.drivername!r} needs the Python driver {dialect.driver!r}, which is not installed; {fix}"
        ) from None
    return url


class StorageConfig(_Section):
    spool_dir: Path = Path("./var/spool")
    database_url: str = "sqlite:///./var/dicomnode.db"
    fsync: bool = True
    # Retention: spool files of patients whose jobs are all finished and delivered are deleted
    # after this many days (None = keep), oldest first whenever the spool is over max_spool_gb.
    retention_days: float | None = Field(None, gt=0)
    max_spool_gb: float | None = Field(None, gt=0)
    clean_interval_seconds: float = Field(300, gt=0)

    _check_url = field_validator("database_url")(classmethod(lambda cls, v: check_database_url(v)))
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


def _metric_name(name: str) -> str:
    from dicomnode.fusion.metrics import METRIC_NAMES  # noqa: PLC0415

    for known in METRIC_NAMES:
        if name.strip().lower() == known.lower():
            return known
    raise ValueError(f"unknown metric {name!r}; metrics: {', '.join(METRIC_NAMES)}")


class QualityGate(_Section):
    """Thresholds on a job's mean quality metrics; a job below them is held for an admin."""

    min: dict[str, float] = Field(default_factory=dict)  # metric -> lowest accepted mean
    # metrics on which the job must score at least what pixel max scores on the same slices
    not_worse_than_pixel_max: list[str] = Field(default_factory=list)

    @field_validator("min")
    @classmethod
    def _min_names(cls, v: dict[str, float]) -> dict[str, float]:
        return {_metric_name(k): float(x) for k, x in v.items()}

    @field_validator("not_worse_than_pixel_max")
    @classmethod
    def _max_names(cls, v: list[str]) -> list[str]:
        return [_metric_name(k) for k in v]


class FusionConfig(_Section):
    device: str = "auto"
    batch_size: int = Field(16, ge=1, le=1024)
    method: str = "default"
    poll_seconds: float = Field(1.0, gt=0)
    quality_metrics: bool = True  # the nine metrics on a sample of slices after each job
    quality_slices: int = Field(8, ge=1, le=10000)  # sample size (all slices when fewer)
    quality_gate: dict[str, QualityGate] = Field(default_factory=dict)  # rule name -> gate

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


def _unique_names(names: list[str], what: str) -> None:
    """Refuse a list whose entries share a name, naming the first such name."""
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{what} name {dup[0]!r} is used twice; give each {what} its own name")


class AdminToken(_Section):
    """A bearer token for the admin API and dashboard: ``read`` sees, ``admin`` also acts."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")
    token: SecretStr
    role: Literal["read", "admin"] = "read"

    @field_validator("token")
    @classmethod
    def _long_enough(cls, v: SecretStr) -> SecretStr:
        if len(v.get_secret_value()) < 16:
            raise ValueError("a token must be at least 16 characters (e.g. `openssl rand -hex 24`)")
        return v


class AdminConfig(_Section):
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)  # 0 = no HTTP server
    tokens: list[AdminToken] = Field(default_factory=list)  # none: open, allowed on loopback only
    open_endpoints: list[Literal["healthz", "metrics"]] = Field(
        default_factory=lambda: ["healthz", "metrics"]
    )
    session_hours: float = Field(12, gt=0, le=24 * 30)
    # HTTP hardening: a request must arrive whole within these times; bounded connections and threads
    http_header_timeout_seconds: float = Field(10, gt=0)
    http_body_timeout_seconds: float = Field(30, gt=0)
    http_keepalive_seconds: float = Field(5, gt=0)
    http_max_connections: int = Field(64, ge=1, le=100000)
    http_workers: int = Field(8, ge=1, le=256)
    http_max_body_bytes: int = Field(65536, ge=1024)

    @field_validator("tokens")
    @classmethod
    def _unique_tokens(cls, v: list[AdminToken]) -> list[AdminToken]:
        _unique_names([t.name for t in v], "token")
        secrets = [t.token.get_secret_value() for t in v]
        if len(set(secrets)) != len(secrets):
            raise ValueError("two entries share one token; give each name its own token")
        return v

    def on_loopback(self) -> bool:
        """True when the HTTP server listens on a loopback address only."""
        host = self.http_host.strip().strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def exposure_problem(self) -> str | None:
        """Why the admin HTTP server must not start as configured, or None."""
        if self.http_port and not self.tokens and not self.on_loopback():
            return (
                f"admin.http_host is {self.http_host!r}, not a loopback address, and admin.tokens is empty: "
                "the admin API would be open to the network. Add admin.tokens (or DICOMNODE_ADMIN__TOKENS "
                "as JSON) or set admin.http_host to 127.0.0.1"
            )
        return None


class LoggingConfig(_Section):
    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v


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

    environment_overrides: ClassVar[bool] = True

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
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    sources: list[SourceConfig] = Field(default_factory=list)
    retrieve: RetrieveConfig = Field(default_factory=RetrieveConfig)

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, v: list[SourceConfig]) -> list[SourceConfig]:
        _unique_names([s.name for s in v], "source")
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
        seen: dict[str, int] = {}
        for i, rule in enumerate(v):
            if rule.name in seen:
                raise ValueError(
                    f"rule name {rule.name!r} is used by rules {seen[rule.name]} and {i}; "
                    "give each rule its own name"
                )
            seen[rule.name] = i
        return v

    @field_validator("destinations")
    @classmethod
    def _unique_destinations(cls, v: list[DestinationConfig]) -> list[DestinationConfig]:
        _unique_names([d.name for d in v], "destination")
        return v

    @model_validator(mode="after")
    def _gates_name_rules(self) -> Settings:
        names = [r.name for r in self.rules]
        for rule_name in self.fusion.quality_gate:
            if rule_name not in names:
                raise ValueError(
                    f"fusion.quality_gate: {rule_name!r} is not a rule name; rules: {', '.join(names)}"
                )
        return self

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
        return (env_settings, init_settings) if cls.environment_overrides else (init_settings,)


class _DataOnlySettings(Settings):
    """Settings from the given data alone: DICOMNODE_* environment overrides do not apply."""

    environment_overrides: ClassVar[bool] = False


def isolated_settings(**data: Any) -> Settings:
    """Settings exactly as given, ignoring the environment (the demo must never reach a real PACS)."""
    try:
        return _DataOnlySettings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, "built-in settings")) from None


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """The model class inside ``X``, ``list[X]``, ``dict[str, X]`` or ``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (list, dict, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _inner_model(arg)
            if found is not None:
                return found
    return None


def _valid_keys(loc: tuple[Any, ...]) -> tuple[str, list[str]]:
    """(the section's dotted name, its valid keys) for the parent of ``loc``."""
    model: type[BaseModel] | None = Settings
    mapping_key_next = False
    for part in loc[:-1]:
        if model is None:
            break
        if isinstance(part, int) or mapping_key_next:  # a list index or a mapping key (a rule name)
            mapping_key_next = False
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return "", []
        mapping_key_next = typing.get_origin(field.annotation) is dict
        model = _inner_model(field.annotation)
    section = ".".join(str(p) for p in loc[:-1])
    return section, list(model.model_fields) if model is not None else []


def _unknown_key_message(loc: tuple[Any, ...]) -> str:
    section, keys = _valid_keys(loc)
    name = str(loc[-1])
    close = difflib.get_close_matches(name.lower(), keys, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    where = f" of {section}" if section else ""
    return f"unknown key; {hint}valid keys{where}: {', '.join(keys)}"


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = _unknown_key_message(tuple(e["loc"]))
        else:
            msg = e["msg"].removeprefix("Value error, ")
        if key == "(top level)" and ": " in msg and msg.split(": ", 1)[0].count(".") >= 1:
            key, msg = msg.split(": ", 1)  # a cross-section check names its own key
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
