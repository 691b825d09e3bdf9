"""Settings: a YAML config file plus `KMSGATE_*` environment variables, read once at start-up.

Precedence, highest first: explicit overrides (CLI flags), environment, config file, defaults.
Nested values use `__` in the environment (`KMSGATE_LIMITS__MAX_BATCH=500`).
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import os
import re
import socket
import sys
import types
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from kmsgate.config_file import read_config_file
from kmsgate.durations import Duration
from kmsgate.errors import ConfigError
from kmsgate.loopback import https_or_loopback, plain_http_refused


def _shipped_policy_dir() -> Path:
    """The default policies: `policies/` of a source checkout (editable install), else the
    copy a wheel installs under `<prefix>/share/kmsgate/policies`."""
    checkout = Path(__file__).resolve().parent.parent / "policies"
    installed = Path(sys.prefix) / "share" / "kmsgate" / "policies"
    return checkout if checkout.is_dir() or not installed.is_dir() else installed


_REPLICA_UNSAFE = re.compile(r"[^A-Za-z0-9._-]|^[._-]+")


def dev_data_dir() -> Path:
    """The default dev data dir, `~/.kmsgate/dev` (resolved when used, not at import)."""
    return Path.home() / ".kmsgate" / "dev"


ROOT_TOKEN_FILE = "root-token"  # noqa: S105 (a file name, not a secret)
ROOT_KEY_FILE = "root.key"
DEV_AUDIT_KEY = "audit.dev"
"""The key that signs the audit log's checkpoints in dev mode (created at start)."""


class BackendSettings(BaseModel):
    """One configured backend: its `type` plus type-specific connection settings (each
    backend type checks its own; softkms has none)."""

    model_config = ConfigDict(extra="allow")

    type: str

    @model_validator(mode="after")
    def _softkms_takes_none(self) -> BackendSettings:
        if self.type == "softkms" and self.model_extra:
            names = ", ".join(sorted(self.model_extra))
            raise ValueError(f"a softkms backend takes no settings but its type (given: {names})")
        return self


class RootKeyWrap(BaseModel):
    """Auto-unseal: the softkms root key is kept wrapped by a key of another backend (an HSM
    or Vault Transit key) and unwrapped at start-up; no plaintext root key on disk."""

    model_config = ConfigDict(extra="forbid")

    backend: str
    kek: str = Field(description="the wrapping key in that backend: Transit name, PKCS#11 URI")
    file: Path = Field(description="the wrapped root key, written by `kmsgate root-key init`")


class Limits(BaseModel):
    """Size limits on every input (over one: 413 `too_large`), request rates (over one: 429
    `rate_limited`) and the time a client has to send its request body (408)."""

    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    max_input_bytes: int = Field(default=64 * 1024, gt=0)
    max_batch: int = Field(default=1000, gt=0)
    principal_rate: float | None = Field(default=None, ge=0)
    """Requests per second of one principal, per process; None: 1000 (off in dev); 0: off."""
    key_rate: float | None = Field(default=None, ge=0)
    """Key operations per second on one key, per process; None: 5000 (off in dev); 0: off."""
    failed_auth_rate: float = Field(default=20.0, ge=0)
    """Failed authentications per second from one client address, per process, each audited
    and answered 401; past it (after a burst of `burst_seconds` of it), 429 and no record
    but the first of the run; 0: off."""
    burst_seconds: float = Field(default=2.0, gt=0)
    """A bucket holds this many seconds of its rate (the burst allowed after a quiet time)."""
    body_read_seconds: float = Field(default=30.0, gt=0)
    """The time a client has to send its request head (from the connection's opening or the
    request's first byte), then its whole body."""
    min_rotation_seconds: int = Field(default=60, ge=1)
    """The shortest `rotation_period` a key may have (a key rotated every second piles up
    versions)."""

    def rates(self, dev: bool) -> tuple[float, float]:
        """(per principal, per key) requests per second, 0.0 for off."""
        principal = 0.0 if dev else 1000.0
        key = 0.0 if dev else 5000.0
        return (
            self.principal_rate if self.principal_rate is not None else principal,
            self.key_rate if self.key_rate is not None else key,
        )


EkuName = Literal["server_auth", "client_auth"]
SIGNING_KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-3072", "rsa-4096")


class ProfileSettings(BaseModel):
    """One certificate profile: what a certificate issued through it may name and carry.

    The shape only; `kmsgate.pki.profiles.load_profiles` checks the patterns and key types.
    """

    model_config = ConfigDict(extra="forbid")

    ekus: list[EkuName] = Field(min_length=1)
    dns: list[str] = Field(default_factory=list, description="exact names, `*.x` or `**.x`")
    ip: list[str] = Field(default_factory=list, description="addresses or CIDR networks")
    uri: list[str] = Field(default_factory=list, description="exact URIs or `prefix/*`")
    exactly_one_uri: bool = False
    max_ttl: Duration
    default_ttl: Duration
    key_types: list[str] = Field(default_factory=lambda: list(SIGNING_KEY_TYPES), min_length=1)

    @model_validator(mode="after")
    def _default_within_max(self) -> ProfileSettings:
        if self.default_ttl > self.max_ttl:
            raise ValueError("default_ttl exceeds max_ttl")
        return self


def _dev_profiles() -> dict[str, ProfileSettings]:
    hours = timedelta(hours=1)
    return {
        "server": ProfileSettings(
            ekus=["server_auth"],
            dns=["*.lab", "localhost"],
            ip=["127.0.0.1"],
            default_ttl=24 * hours,
            max_ttl=7 * 24 * hours,
        ),
        "client": ProfileSettings(
            ekus=["client_auth"], dns=["*.lab"], default_ttl=8 * hours, max_ttl=24 * hours
        ),
        "workload": ProfileSettings(
            ekus=["server_auth", "client_auth"],
            uri=["spiffe://dev.lab/*"],
            exactly_one_uri=True,
            default_ttl=hours,
            max_ttl=24 * hours,
        ),
    }


class PkiSettings(BaseModel):
    """Certificate profiles, and the base URL put in issued certificates' CRL distribution
    point, OCSP and caIssuers extensions (none of them when `public_url` is unset)."""

    model_config = ConfigDict(extra="forbid")

    public_url: str | None = None
    profiles: dict[str, ProfileSettings] = Field(default_factory=_dev_profiles)

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^/?#\s]+(/[^?#\s]*)?$", value):
            raise ValueError("public_url must be an http:// or https:// URL without query")
        return value.rstrip("/")


ClientAuth = Literal["none", "optional", "required"]


class TlsSettings(BaseModel):
    """HTTPS: the gateway's certificate from files (`cert_file`, `key_file`), or issued and
    renewed by the gateway from its CA `ca`; client certificates (mTLS) requested per
    `client_auth` and checked against `client_cas` (kmsgate CA names or PEM bundle paths).
    `trusted_proxies` (addresses or networks) may forward a client certificate they verified
    (Envoy `x-forwarded-client-cert`); with them and no certificate source, a proxy
    terminates TLS and the gateway serves plain HTTP."""

    model_config = ConfigDict(extra="forbid")

    cert_file: Path | None = None
    key_file: Path | None = None
    ca: str | None = None
    profile: str = "server"
    sans: list[str] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1"],
        description="the names of a certificate issued from `ca`",
    )
    ttl: Duration | None = None
    client_auth: ClientAuth = "none"
    client_cas: list[str] = Field(default_factory=list)
    trusted_proxies: list[str] = Field(default_factory=list)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"tls.trusted_proxies: {entry!r} is not an IP address or network"
                ) from None
        return value

    @model_validator(mode="after")
    def _one_source(self) -> TlsSettings:
        from_files = self.cert_file is not None or self.key_file is not None
        if from_files and self.ca is not None:
            raise ValueError("tls needs either cert_file and key_file, or ca, not both")
        if not from_files and self.ca is None and not self.trusted_proxies:
            raise ValueError("tls needs either cert_file and key_file, or ca")
        if from_files and (self.cert_file is None or self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together")
        if self.client_auth != "none" and not self.client_cas:
            raise ValueError(f"tls.client_auth {self.client_auth} needs tls.client_cas")
        if self.client_auth != "none" and not self.serves_https:
            raise ValueError("tls.client_auth needs a certificate (cert_file and key_file, or ca)")
        if self.trusted_proxies and not self.client_cas:
            raise ValueError(
                "tls.trusted_proxies needs tls.client_cas (what they forward is "
                "checked against them)"
            )
        return self

    @property
    def serves_https(self) -> bool:
        """Whether the gateway itself terminates TLS (else a trusted proxy does)."""
        return self.ca is not None or self.cert_file is not None


JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")
"""Signature algorithms an OIDC issuer may be configured with: asymmetric only (no `none`,
no HMAC, whose secret a public key could be passed off as)."""


def validation_problems(exc: ValidationError) -> str:
    """Each problem as `where: what`, on one line, without the values given (a value may be
    a secret: a PIN, a token)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'config'}: "
        + error["msg"].removeprefix("Value error, ")
        for error in exc.errors(include_url=False, include_input=False)
    )


RESERVED_ISSUER_NAMES = frozenset({"token", "local", "cn", "spiffe", "system"})
"""What an OIDC issuer may not be named: its principals (`<name>:<subject>`) would take the
ids of API tokens (`token:`), local operators (`local:`), certificates (`cn:`, `spiffe://`)
or the gateway itself (`system`)."""


class OidcIssuer(BaseModel):
    """One trusted OIDC issuer whose JWTs authenticate as bearer tokens."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    issuer: str = Field(min_length=1)
    audiences: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    jwks_file: Path | None = None
    jwks_url: str | None = None
    """https://, or http:// to a loopback address only (the keys must not be tampered with
    on the way)."""
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"], min_length=1)
    leeway: Duration = Field(default=timedelta(seconds=30), le=timedelta(minutes=5))
    subject_claim: str = "sub"
    tenant_claim: str | None = None

    @model_validator(mode="after")
    def _one_jwks(self) -> OidcIssuer:
        if self.name in RESERVED_ISSUER_NAMES:
            raise ValueError(
                f"oidc issuer {self.name}: the name is reserved (its principals would take "
                "ids that name API tokens, local operators, certificates or the gateway)"
            )
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError(f"oidc issuer {self.name}: give exactly one of jwks_file, jwks_url")
        if self.jwks_file is not None and not self.jwks_file.is_file():
            raise ValueError(f"oidc issuer {self.name}: jwks_file {self.jwks_file} is no file")
        if self.jwks_url is not None and not https_or_loopback(self.jwks_url):
            plain = plain_http_refused(self.jwks_url, "the issuer's keys")
            raise ValueError(f"oidc issuer {self.name}: jwks_url: {plain}")
        refused = sorted(set(self.algorithms) - set(JWT_ALGORITHMS))
        if refused:
            raise ValueError(
                f"oidc issuer {self.name}: algorithms {refused} refused; allowed: "
                + ", ".join(JWT_ALGORITHMS)
            )
        return self


class ExceptionSettings(BaseModel):
    """JIT exceptions: how long a grant may last, how many other principals approve it,
    how long a request waits for them."""

    model_config = ConfigDict(extra="forbid")

    max_duration: Duration = Field(default=timedelta(hours=8))
    approvals: int = Field(default=1, ge=1, le=10)
    pending_for: Duration = Field(
        default=timedelta(hours=24), description="a request nobody approved in time expires"
    )


class AuthSettings(BaseModel):
    """How long ended API tokens are kept, and the credentials besides API tokens: OIDC
    issuers (mTLS is configured under `tls`)."""

    model_config = ConfigDict(extra="forbid")

    oidc: list[OidcIssuer] = Field(default_factory=list)
    token_retention: Duration = Field(
        default=timedelta(days=30),
        ge=timedelta(hours=1),
        description="how long a revoked or expired token stays listed; then it is deleted",
    )

    @model_validator(mode="after")
    def _unique(self) -> AuthSettings:
        names = [issuer.name for issuer in self.oidc]
        issuers = [issuer.issuer for issuer in self.oidc]
        if len(set(names)) != len(names) or len(set(issuers)) != len(issuers):
            raise ValueError("auth.oidc: names and issuers must be unique")
        return self


def dev_tls() -> TlsSettings:
    """`serve --dev --tls`: a certificate from the dev CA, client certificates optional."""
    return TlsSettings(ca="dev", client_auth="optional", client_cas=["dev"])


_POSTGRES_SCHEMES = ("postgres://", "postgresql://")
POSTGRES_DRIVER_SCHEME = "postgresql+psycopg://"


def with_database_driver(url: str) -> str:
    """`url` with the PostgreSQL driver kmsgate installs (psycopg 3) named: a `postgres://`
    URL (common in DATABASE_URL secrets; SQLAlchemy knows no such dialect) or a
    `postgresql://` one (psycopg2 for SQLAlchemy 2.0) becomes `postgresql+psycopg://`.
    Any other URL is returned as it is."""
    for scheme in _POSTGRES_SCHEMES:
        if url[: len(scheme)].lower() == scheme:
            return POSTGRES_DRIVER_SCHEME + url[len(scheme) :]
    return url


class Settings(BaseSettings):
    """Everything the gateway reads from its environment. Built by `load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="KMSGATE_", env_nested_delimiter="__", extra="forbid"
    )

    dev: bool = False
    env: str = "prod"
    host: str = "127.0.0.1"
    port: int = Field(default=8200, ge=1, le=65535)
    data_dir: Path | None = None
    database_url: str | None = None
    root_key_file: Path | None = None
    root_key_wrap: RootKeyWrap | None = None
    policy_dir: Path = Field(default_factory=_shipped_policy_dir)
    audit_path: Path | None = None
    audit_fsync_interval: float = Field(default=0.05, gt=0)
    audit_reserve_bytes: int = Field(
        default=64 * 1024,
        ge=0,
        description="room the audit log keeps for the outcome records of changes under way: "
        "once its disk (or file size limit) leaves less, every other operation is refused "
        "(503 audit_unavailable), so a change never starts unless its outcome can be recorded",
    )
    audit_checkpoint_key: str | None = Field(
        default=None,
        description="the key (purpose `audit`) that signs the audit log's checkpoints; "
        "none: no checkpoints (dev mode: `audit.dev`, created at start)",
    )
    audit_checkpoint_records: int = Field(default=1000, gt=0)
    audit_checkpoint_seconds: float = Field(default=60.0, gt=0)
    replica_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="named in every audit record this gateway writes, and the key of its "
        "checkpoints in the store: unique per gateway (default: the host name and a digest of "
        "the audit log's path, see resolved_replica_id)",
    )
    cache_refresh_seconds: float = Field(default=1.0, gt=0)
    max_staleness_seconds: float = Field(
        default=30.0,
        gt=0,
        description="how long key operations go on from the caches while the store is down",
    )
    backends: dict[str, BackendSettings] = Field(
        default_factory=lambda: {"local": BackendSettings(type="softkms")}
    )
    default_backend: str = "local"
    limits: Limits = Field(default_factory=Limits)
    pki: PkiSettings = Field(default_factory=PkiSettings)
    tls: TlsSettings | None = None
    auth: AuthSettings = Field(default_factory=AuthSettings)
    exceptions: ExceptionSettings = Field(default_factory=ExceptionSettings)

    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL (see `with_database_driver`). Raises ConfigError if neither it
        nor a data dir is set."""
        if self.database_url:
            return with_database_driver(self.database_url)
        return f"sqlite:///{self._require_data_dir() / 'kmsgate.db'}"

    def resolved_audit_path(self) -> Path:
        """The audit log path. Raises ConfigError if neither it nor a data dir is set."""
        return self.audit_path or self._require_data_dir() / "audit.log"

    def resolved_replica_id(self) -> str:
        """`replica_id`, or by default the host name and the first 6 hex digits of the
        SHA-256 of the audit log's absolute path: gateways on one host (each with its own
        data dir) keep apart in the store's checkpoints, and a gateway keeps its id across
        restarts. Raises ConfigError if no audit path can be resolved."""
        if self.replica_id:
            return self.replica_id
        host = _REPLICA_UNSAFE.sub("-", socket.gethostname())[:57] or "kmsgate"
        where = str(self.resolved_audit_path().absolute()).encode()
        return f"{host}-{hashlib.sha256(where).hexdigest()[:6]}"

    def resolved_root_key_file(self) -> Path:
        """The softkms root key file. Raises ConfigError if neither it nor a data dir is set."""
        if self.root_key_file:
            return self.root_key_file
        if not self.dev:
            raise ConfigError("root_key_file must be configured outside dev mode")
        return self._require_data_dir() / ROOT_KEY_FILE

    def _require_data_dir(self) -> Path:
        if self.data_dir is None:
            raise ConfigError("data_dir is not set (use --data-dir or KMSGATE_DATA_DIR)")
        return self.data_dir

    def check_production(self) -> None:
        """Refuse a root key file beside a wrapped root key; outside dev mode, a data dir
        that is not a directory (the dev gateway makes its own) and dev-only state. Raises
        ConfigError."""
        if self.default_backend not in self.backends:
            raise ConfigError(f"default_backend {self.default_backend!r} is not configured")
        if self.root_key_wrap is not None and self.root_key_file is not None:
            raise ConfigError(
                "root_key_file and root_key_wrap are both set, and only the wrapped key would "
                "be used: remove root_key_file (see root-key-init --from-file)"
            )
        if self.dev:
            return
        if self.data_dir and not self.data_dir.is_dir():
            if self.data_dir.exists():
                raise ConfigError(f"the data dir {self.data_dir} is not a directory")
            raise ConfigError(
                f"the data dir {self.data_dir} does not exist: create it, owned by the user "
                f"the gateway runs as (mkdir -m 700 {self.data_dir})"
            )
        if self.data_dir and (self.data_dir / ROOT_TOKEN_FILE).exists():
            raise ConfigError(
                f"{self.data_dir / ROOT_TOKEN_FILE} exists: a dev root token file is refused "
                "outside dev mode; revoke the token and delete the file"
            )
        if self.root_key_wrap is not None:
            if self.root_key_wrap.backend not in self.backends:
                raise ConfigError(f"root_key_wrap.backend {self.root_key_wrap.backend!r} unknown")
            return
        root_key = self.resolved_root_key_file()
        if self.data_dir and root_key.resolve().parent == self.data_dir.resolve():
            raise ConfigError(
                "the root key file lies in the data dir: outside dev mode keep it apart "
                "from the store (or wrap it with another backend: root_key_wrap)"
            )


_OTHER_VARIABLES = frozenset(
    {"addr", "token", "cacert", "config", "log_level", "metrics_dir", "builder_id"}
    | {"container_digest", "dataset_snapshot", "root_token_pin"}
)
"""The lower-case names of the KMSGATE_* variables that are not settings (the client's,
model signing's, the workers')."""


def misspelt_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each KMSGATE_* variable that names no setting but nearly names one
    (`KMSGATE_DATABSE_URL`): it is ignored, and the gateway would start without what it
    meant. Others are left alone (a PIN may be kept in `KMSGATE_HSM_PIN`)."""
    known = sorted(set(Settings.model_fields) | _OTHER_VARIABLES)
    warnings = []
    for variable in sorted(environ):
        if not variable.startswith("KMSGATE_"):
            continue
        name = variable.removeprefix("KMSGATE_").split("__")[0].lower()
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if name not in known and close:
            meant = f"KMSGATE_{close[0].upper()}"
            warnings.append(f"{variable} names no setting and is ignored (did you mean {meant}?)")
    return warnings


def unknown_nested_variables(environ: Mapping[str, str]) -> list[str]:
    """A problem for each KMSGATE_<SETTING>__<NAME> variable whose <NAME> is no setting of
    <SETTING> (`KMSGATE_LIMITS__MAX_BACH`): the file refuses such a key, and the variable
    would be ignored. Variables whose first part names no setting are `misspelt_variables`'."""
    problems = []
    for variable in sorted(environ):
        if variable.startswith("KMSGATE_") and "__" in variable:
            problem = _nested_problem(variable.removeprefix("KMSGATE_").lower().split("__"))
            if problem:
                problems.append(f"{variable}: {problem}")
    return problems


def _nested_problem(parts: list[str]) -> str | None:
    """What is wrong with the setting path `parts`, as far as models name their fields."""
    model: type[BaseModel] = Settings
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            if depth == 0:
                return None
            close = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]}?)" if close else ""
            return f"{'.'.join(parts[:depth])} has no setting {part!r}{hint}"
        annotation = fields[part].annotation
        union = isinstance(annotation, types.UnionType) or get_origin(annotation) is Union
        inner = [
            kind
            for kind in (get_args(annotation) if union else (annotation,))
            if isinstance(kind, type) and issubclass(kind, BaseModel)
        ]
        if len(inner) != 1 or inner[0].model_config.get("extra") == "allow":
            return None  # a value, a mapping of names (backends) or free-form settings
        model = inner[0]
    return None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from defaults < config file < KMSGATE_* env < `overrides` (None values ignored).

    Raises ConfigError if the file is unreadable or a value is invalid.
    """
    unknown = unknown_nested_variables(os.environ)
    if unknown:
        raise ConfigError(f"invalid configuration: {'; '.join(unknown)}")
    file_values = read_config_file(config_file) if config_file else {}
    init_values = {k: v for k, v in overrides.items() if v is not None}

    class KmsgateSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, InitSettingsSource(settings_cls, file_values))

    try:
        layered = KmsgateSettings(**init_values)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {validation_problems(exc)}") from None
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
    if layered.dev:
        layered.backends.setdefault("local", BackendSettings(type="softkms"))
        if "audit_checkpoint_key" not in layered.model_fields_set:
            layered.audit_checkpoint_key = DEV_AUDIT_KEY
        if "env" not in layered.model_fields_set:
            layered.env = "dev"
    return layered
