"""Vault authentication: acquiring kmsgate's token (configured, or by AppRole or Kubernetes
login), renewing it before it expires on a background thread, and re-acquiring it after a
403."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hvac.exceptions  # type: ignore[import-untyped]

from kmsgate.backends.hashivault.settings import HashiVaultSettings
from kmsgate.errors import ConfigError
from kmsgate.secret_files import read_secret_file

_log = logging.getLogger(__name__)

_RENEW_AT = 2 / 3
"""Renew (or log in again) when this fraction of the token's TTL has passed."""
_RENEW_RETRY_SECONDS = 5.0
"""Background renewal: wait this long after a failed attempt before trying again."""


def _read_secret_file(path: Path, what: str, *, private: bool = True) -> str:
    """The stripped content of a secret file. Raises ConfigError if unreadable, not UTF-8
    or empty, or, `private`, exposed (another user could read or replace it: `exposure`;
    a Kubernetes service account token is mounted readable by the pod, and is not)."""
    try:
        raw = read_secret_file(path, what) if private else path.read_bytes()
        value = raw.decode("utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} file {path} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{what} file {path} is empty")
    return value


class _Auth:
    """Owns the hvac client's token: reads it or logs in, renews it before expiry.

    `ensure()` is called before every request and is cheap while the token is fresh. A
    background thread calls it too at two thirds of the TTL, so an idle gateway keeps its
    token alive. Never logs a token.
    """

    def __init__(self, backend: str, settings: HashiVaultSettings, client: Any) -> None:
        self._backend = backend
        self._settings = settings
        self._client = client
        self._lock = threading.Lock()
        self._have_token = False
        self._token_value: str | None = None
        self._renewable = False
        self._ttl = 0.0
        self._renew_at = math.inf
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        if settings.auth_method == "token_file":
            assert settings.token_file is not None
            _read_secret_file(settings.token_file, "token")  # fail at start-up, not later
        if settings.approle is not None and settings.approle.secret_id_file is not None:
            _read_secret_file(settings.approle.secret_id_file, "AppRole secret id")

    @property
    def logs_in(self) -> bool:
        return self._settings.auth_method in ("approle", "kubernetes")

    def ensure(self) -> None:
        """Make sure the client holds a live token. Raises hvac / requests errors."""
        if self._have_token and time.monotonic() < self._renew_at:
            return
        with self._lock:
            if not self._have_token:
                self._acquire()
            elif time.monotonic() >= self._renew_at:
                self._renew()

    @property
    def token(self) -> str:
        """The token in use now (to tell `reacquire` which one failed); never log it."""
        return str(self._client.token or "")

    def reacquire(self, failed: str) -> bool:
        """After a 403 with token `failed`: drop it if a new one may help (login methods, a
        changed token file). True if the caller should retry once. Concurrent 403s on the
        same token cause one new login, not one each."""
        with self._lock:
            if self._client.token != failed:
                return True  # another thread already replaced it
            if self.logs_in:
                self._have_token = False
                return True
            if self._settings.token_file is not None:
                fresh = _read_secret_file(self._settings.token_file, "token")
                if fresh != self._token_value:
                    self._have_token = False
                    return True
            return False

    def _acquire(self) -> None:
        s = self._settings
        if s.approle is not None:
            secret = (
                s.approle.secret_id.get_secret_value()
                if s.approle.secret_id is not None
                else _read_secret_file(s.approle.secret_id_file, "AppRole secret id")  # type: ignore[arg-type]
            )
            reply = self._client.auth.approle.login(
                role_id=s.approle.role_id, secret_id=secret, mount_point=s.approle.mount
            )
            self._logged_in(reply)
        elif s.kubernetes is not None:
            jwt = _read_secret_file(s.kubernetes.jwt_file, "service account token", private=False)
            reply = self._client.auth.kubernetes.login(
                role=s.kubernetes.role, jwt=jwt, mount_point=s.kubernetes.mount
            )
            self._logged_in(reply)
        else:
            if s.token is not None:
                value = s.token.get_secret_value()
            else:
                assert s.token_file is not None
                value = _read_secret_file(s.token_file, "token")
            self._client.token = value
            self._lookup()  # raises if Vault is unreachable: the next call tries again
            self._token_value = value
            self._have_token = True
        self._start_thread()

    def _logged_in(self, reply: Mapping[str, Any]) -> None:
        auth = reply["auth"]
        self._client.token = auth["client_token"]
        self._token_value = None
        self._have_token = True
        self._schedule(float(auth.get("lease_duration") or 0), bool(auth.get("renewable")))
        _log.info(
            "hashivault %s: logged in with %s (ttl %ss)",
            self._backend,
            self._settings.auth_method,
            auth.get("lease_duration"),
        )

    def _lookup(self) -> None:
        """TTL and renewability of a configured token (needs the default policy)."""
        try:
            data = self._client.auth.token.lookup_self()["data"]
        except hvac.exceptions.Forbidden:
            _log.warning(
                "hashivault %s: the token may not look itself up; it will not be renewed",
                self._backend,
            )
            self._schedule(0.0, False)
            return
        self._schedule(float(data.get("ttl") or 0), bool(data.get("renewable")))
        if self._ttl and not self._renewable:
            _log.warning(
                "hashivault %s: the token is not renewable and expires in %ss",
                self._backend,
                data.get("ttl"),
            )

    def _schedule(self, ttl: float, renewable: bool) -> None:
        self._ttl, self._renewable = ttl, renewable
        if ttl <= 0 or not (renewable or self.logs_in):
            self._renew_at = math.inf  # no expiry, or nothing we could do about it
        else:
            self._renew_at = time.monotonic() + ttl * _RENEW_AT
        self._wake.set()

    def _renew(self) -> None:
        previous_ttl = self._ttl
        if self._renewable:
            try:
                reply = self._client.auth.token.renew_self()
            except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest):
                if self.logs_in:
                    self._acquire()
                    return
                # a configured token that can no longer be renewed (expired, revoked): stop
                # trying; requests now get 403 (502 to clients) until the token file changes
                _log.error("hashivault %s: the token could not be renewed", self._backend)
                self._renew_at = math.inf
                return
            auth = reply["auth"]
            ttl = float(auth.get("lease_duration") or 0)
            if self.logs_in and ttl < previous_ttl * (1 - _RENEW_AT):
                # the token reached its max TTL: renewing buys little, log in again
                self._acquire()
                return
            self._schedule(ttl, bool(auth.get("renewable")))
            _log.info("hashivault %s: token renewed (ttl %ss)", self._backend, int(ttl))
        elif self.logs_in:
            self._acquire()
        else:
            self._renew_at = math.inf

    def _start_thread(self) -> None:
        if self._thread is not None or self._stop.is_set() or self._renew_at == math.inf:
            return
        self._thread = threading.Thread(
            target=self._run, name=f"kmsgate-vault-renew-{self._backend}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            delay = self._renew_at - time.monotonic()
            if delay > 0:
                self._wake.wait(min(delay, 3600.0))
                continue
            try:
                self.ensure()
            except Exception as exc:  # keep the thread alive; requests will report errors
                _log.warning(
                    "hashivault %s: token renewal failed (%s); retrying in %ss",
                    self._backend,
                    type(exc).__name__,
                    _RENEW_RETRY_SECONDS,
                )
                self._stop.wait(_RENEW_RETRY_SECONDS)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
