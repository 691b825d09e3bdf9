"""Configuration of a `type: pkcs11` backend: the module (allow-listed, checked on disk), the
token, where the PIN comes from (a PIN is never written in the config) and session limits."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kmsgate.config import BackendSettings
from kmsgate.errors import ConfigError
from kmsgate.secret_files import exposure

DEFAULT_ALLOWED_MODULES: tuple[str, ...] = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/*/softhsm/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib/pkcs11/*.so",
    "/usr/lib/*/pkcs11/*.so",
    "/usr/lib64/pkcs11/*.so",
    "/opt/cloudhsm/lib/libcloudhsm_pkcs11.so",
    "/opt/nfast/toolkits/pkcs11/libcknfast.so",
    "/usr/safenet/lunaclient/lib/libCryptoki2_64.so",
)
"""Glob patterns (a `*` stays within one path segment) a `module` path must match unless
the backend's config sets `allowed_modules`."""

_PIN_KEYS = ("pin", "user_pin", "so_pin", "pin_value", "pin-value")


class Pkcs11Settings(BaseModel):
    """The `pkcs11` backend's config entry (config file or `KMSGATE_BACKENDS__<NAME>__*`,
    never a request)::

        hsm:
          type: pkcs11
          module: /usr/lib/softhsm/libsofthsm2.so   # absolute, must match `allowed_modules`
          token: kmsgate                            # token label, and/or token_serial
          pin_file: /etc/kmsgate/hsm.pin            # or pin_env: HSM_PIN (exactly one)
          sessions: 1                               # worker sessions (1 = serialised)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["pkcs11"] = "pkcs11"
    module: str
    """Absolute path of the PKCS#11 module (.so); must match one of `allowed_modules`."""
    token: str | None = None
    """Token label."""
    token_serial: str | None = None
    """Token serial number (as the token reports it)."""
    pin_file: Path | None = None
    """File holding the user PIN (one line; not accessible by group or others)."""
    pin_env: str | None = None
    """Name of the environment variable holding the user PIN."""
    sessions: int = Field(default=1, ge=1, le=32)
    """Worker sessions. 1 serialises operations on one session; more form a pool (every
    call into the module is serialised either way)."""
    allowed_modules: tuple[str, ...] = DEFAULT_ALLOWED_MODULES
    retry_interval: float = Field(default=1.0, gt=0, le=300)
    """Seconds between attempts to re-open an unavailable token; calls fail fast between."""
    login_attempts: int = Field(default=6, ge=1, le=20)
    """Tries to find the token and log in when SoftHSM answers GeneralError (several
    processes opening or logging in to the token at the same moment)."""

    @model_validator(mode="after")
    def _check(self) -> Pkcs11Settings:
        if not self.token and not self.token_serial:
            raise ValueError("set 'token' (label) or 'token_serial'")
        if (self.pin_file is None) == (self.pin_env is None):
            raise ValueError("set exactly one of 'pin_file' and 'pin_env'")
        return self


def _settings(name: str, cfg: BackendSettings) -> Pkcs11Settings:
    raw = cfg.model_dump()
    for key in _PIN_KEYS:
        if key in raw:
            raise ConfigError(
                f"backend {name!r}: a PIN is never written in the config; use pin_file or pin_env"
            )
    try:
        settings = Pkcs11Settings.model_validate(raw)
    except ValidationError as exc:
        # never echo input values: a misplaced secret would end up in logs
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'entry'}: {err['msg']}"
            for err in exc.errors(include_input=False, include_url=False)
        )
        raise ConfigError(f"backend {name!r} (pkcs11): {problems}") from None
    _check_module(name, settings)
    if settings.pin_file is not None:
        _read_pin_file(settings.pin_file, ConfigError)
    elif settings.pin_env not in os.environ:
        raise ConfigError(f"backend {name!r}: environment variable {settings.pin_env} is not set")
    return settings


def _check_module(name: str, settings: Pkcs11Settings) -> None:
    """The module path is absolute, allow-listed, a regular file nobody else can rewrite."""
    path = PurePosixPath(settings.module)
    if not path.is_absolute() or ".." in path.parts:
        raise ConfigError(f"backend {name!r}: module must be an absolute path without '..'")
    for pattern in settings.allowed_modules:
        if not PurePosixPath(pattern).is_absolute():
            raise ConfigError(f"backend {name!r}: allowed_modules entries must be absolute")
    if not any(path.match(pattern) for pattern in settings.allowed_modules):
        raise ConfigError(
            f"backend {name!r}: module {settings.module} is not allow-listed (see allowed_modules)"
        )
    real = Path(settings.module).resolve()
    try:
        st = real.stat()
    except OSError as exc:
        raise ConfigError(f"backend {name!r}: module {settings.module}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"backend {name!r}: module {settings.module} is not a regular file")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or st.st_uid not in (0, os.geteuid()):
        raise ConfigError(
            f"backend {name!r}: module {settings.module} is writable by others or owned by "
            "another user"
        )


def _read_pin_file(path: Path, error: type[Exception]) -> tuple[str, os.stat_result]:
    """The PIN in `path` (trailing newline removed), and the file it was read from as it
    was then (its identity: a refusal names the file, never the PIN). Raises `error`; never
    shows the PIN."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            st = os.fstat(file.fileno())
            problem = exposure(st)
            data = file.read()
    except OSError as exc:
        raise error(f"cannot read PIN file {path}: {exc.strerror}") from None
    if problem is not None:
        raise error(f"PIN file {path} {problem}")
    try:
        pin = data.decode("utf-8").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise error(f"PIN file {path} is not UTF-8") from None
    if not pin or "\n" in pin:
        raise error(f"PIN file {path} must hold the PIN on one line")
    return pin, st
