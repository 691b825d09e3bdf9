"""The connection to Vault: an hvac client on a pooled HTTP session, one request at a time with
the token kept fresh and failures turned into kmsgate errors (Vault's text is logged only),
and a cache of Transit key descriptions."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import hvac  # type: ignore[import-untyped]
import hvac.exceptions  # type: ignore[import-untyped]
import requests
import requests.adapters

from kmsgate.backends.hashivault.auth import _Auth
from kmsgate.backends.hashivault.settings import HashiVaultSettings
from kmsgate.backends.hashivault.transit import _KeyInfo, _Ref, _strip_prefix
from kmsgate.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    KeyDestroyed,
    KmsgateError,
)
from kmsgate.secret_files import read_secret_file

INFO_MAX_AGE_SECONDS = 60.0
"""How long a Transit key's description serves before it is read again: a key deleted or
made exportable outside kmsgate is seen within that time in every process."""
_log = logging.getLogger(__name__)


class _VaultClient:
    """One backend's requests to Vault (`name` is the backend's). Thread-safe; every call
    may block (HTTP)."""

    def __init__(self, backend: str, settings: HashiVaultSettings) -> None:
        self.name = backend
        self.settings = settings
        session = requests.Session()
        session.trust_env = False  # connection settings come from config only (no env)
        pool = requests.adapters.HTTPAdapter(
            pool_connections=1, pool_maxsize=settings.max_connections
        )
        session.mount("http://", pool)
        session.mount("https://", pool)
        verify: bool | str = str(settings.ca_cert) if settings.ca_cert else True
        cert = None
        if settings.client_cert and settings.client_key:
            read_secret_file(settings.client_key, "client_key")  # another user's copy: refused
            cert = (str(settings.client_cert), str(settings.client_key))
        session.verify = verify
        session.cert = cert
        self.hvac = hvac.Client(
            url=settings.addr,
            token="",  # set by _Auth; "" keeps hvac from reading VAULT_TOKEN or ~/.vault-token
            verify=verify,
            cert=cert,
            timeout=settings.timeout,
            namespace=settings.namespace,
            session=session,
        )
        self._session = session
        self._auth = _Auth(backend, settings, self.hvac)
        self._info_cache: dict[tuple[str, str], tuple[_KeyInfo, float]] = {}
        """(mount, name) -> (description, when it was read: the monotonic clock)."""
        self._info_lock = threading.Lock()

    def health(self) -> requests.Response:
        """`GET /v1/sys/health`, without the namespace header (Vault serves it in the root
        namespace only: in another, it answers 400) and without the token. Raises
        requests.RequestException."""
        url = self.settings.addr.rstrip("/") + "/v1/sys/health"
        return self._session.get(url, timeout=self.settings.timeout, allow_redirects=False)

    def _unavailable(self, why: str) -> BackendUnavailable:
        return BackendUnavailable(
            f"backend {self.name!r} is {why}", retry_after=self.settings.retry_after
        )

    def _translate(
        self,
        exc: Exception,
        what: str,
        on_invalid: Callable[[str], KmsgateError] | None,
    ) -> KmsgateError:
        """A kmsgate error for an hvac/requests failure; Vault's text goes to the log only."""
        level = logging.INFO if isinstance(exc, hvac.exceptions.InvalidRequest) else logging.WARNING
        _log.log(
            level, "hashivault %s: %s failed: %s: %s", self.name, what, type(exc).__name__, exc
        )
        if isinstance(exc, requests.exceptions.SSLError):
            return BackendError(f"backend {self.name!r} failed TLS verification")
        if isinstance(exc, requests.RequestException):
            return self._unavailable("unreachable")
        if isinstance(exc, hvac.exceptions.VaultDown):
            return self._unavailable("sealed or down")
        if isinstance(
            exc,
            hvac.exceptions.RateLimitExceeded
            | hvac.exceptions.BadGateway
            | hvac.exceptions.VaultNotInitialized,
        ):
            return self._unavailable("not ready")
        if isinstance(exc, hvac.exceptions.Forbidden | hvac.exceptions.Unauthorized):
            return BackendError(
                f"backend {self.name!r} refused kmsgate's credentials (permission denied)"
            )
        if isinstance(exc, hvac.exceptions.InvalidRequest):
            message = " ".join(str(e) for e in (exc.errors or [])) or str(exc)
            if "key not found" in message:
                return KeyDestroyed("the Transit key behind this key version no longer exists")
            if on_invalid is not None:
                return on_invalid(message)
            return BackendError(f"backend {self.name!r} rejected the request to {what}")
        if isinstance(exc, hvac.exceptions.InternalServerError):
            message = " ".join(str(e) for e in (exc.errors or []))
            if "not active" in message or "standby" in message:
                return self._unavailable("not ready (no active node)")
        return BackendError(f"backend {self.name!r} failed to {what}")

    def call(
        self,
        method: str,
        path: str,
        what: str,
        body: Mapping[str, object] | None = None,
        *,
        on_invalid: Callable[[str], KmsgateError] | None = None,
        not_found: Callable[[], KmsgateError] | None = None,
        mount_known: bool = False,
    ) -> dict[str, Any]:
        """One Vault request (`path` under /v1/); the reply's JSON ({} if none).

        A 403 makes the token be re-acquired and the request retried once. Raises
        BackendUnavailable, BackendError, KeyDestroyed, or what `on_invalid` / `not_found`
        make of a 400 / 404 (with `mount_known`, a 404 for a mount that has no engine is
        the BackendError that says so, not `not_found`'s).
        """
        for attempt in (1, 2):
            token = ""
            try:
                self._auth.ensure()
                token = self._auth.token
                reply = self.hvac.adapter.request(method, f"/v1/{path}", json=body)
            except hvac.exceptions.Forbidden as exc:
                if attempt == 1 and token and self._reacquired(token):
                    continue
                raise self._translate(exc, what, on_invalid) from None
            except hvac.exceptions.InvalidPath as exc:
                no_engine = "no handler for route" in str(exc)
                if not_found is not None and not (no_engine and mount_known):
                    raise not_found() from None
                if no_engine:  # nothing mounted there: not a key gone
                    _log.warning("hashivault %s: %s failed: %s", self.name, what, exc)
                    mount = path.partition("/")[0]
                    raise BackendError(
                        f"backend {self.name!r}: Vault has no secrets engine at {mount}/ "
                        f"(for keys: bao secrets enable -path={mount} transit)"
                    ) from None
                raise self._translate(exc, what, on_invalid) from None
            except ConfigError as exc:  # a secret file gone or exposed after start-up
                raise self._cannot_authenticate(exc) from None
            except (hvac.exceptions.VaultError, requests.RequestException) as exc:
                raise self._translate(exc, what, on_invalid) from None
            if isinstance(reply, dict):
                return reply
            if isinstance(reply, requests.Response) and reply.status_code == 204:
                return {}
            raise BackendError(f"backend {self.name!r} sent an unexpected reply to {what}")
        raise AssertionError("unreachable")

    def _reacquired(self, token: str) -> bool:
        """`_Auth.reacquire` after a 403 to `token`. Raises BackendError if a secret file
        cannot be used any more (`_cannot_authenticate`)."""
        try:
            return self._auth.reacquire(token)
        except ConfigError as exc:
            raise self._cannot_authenticate(exc) from None

    def _cannot_authenticate(self, exc: ConfigError) -> BackendError:
        """The 502 for a token or secret file that is gone, empty or exposed after
        start-up (the log says which and why; the reply does not)."""
        _log.error("hashivault %s: %s", self.name, exc)
        return BackendError(f"backend {self.name!r} cannot authenticate")

    def read_info(self, mount: str, name: str) -> _KeyInfo | None:
        """The Transit key's description, or None if it does not exist (uncached)."""
        try:
            reply = self.call(
                "GET", f"{mount}/keys/{name}", "read a key", not_found=_Missing, mount_known=True
            )
        except _Missing:
            return None
        return self._remember(mount, name, _KeyInfo.parse(reply))

    def described(self, mount: str, name: str, reply: Mapping[str, Any]) -> _KeyInfo | None:
        """The Transit key's description in `reply` (to a create or a rotation; read if it
        has none), kept as `info` gives it. Raises BackendUnavailable, BackendError."""
        if not reply.get("data"):
            return self.read_info(mount, name)
        return self._remember(mount, name, _KeyInfo.parse(reply))

    def _remember(self, mount: str, name: str, info: _KeyInfo) -> _KeyInfo:
        """Keep `info` as the description `info` serves (read now); return it."""
        with self._info_lock:
            self._info_cache[(mount, name)] = (info, time.monotonic())
        return info

    def forget(self, mount: str, name: str) -> None:
        with self._info_lock:
            self._info_cache.pop((mount, name), None)

    def info(self, ref: _Ref) -> _KeyInfo:
        """The (cached) description of the Transit key of `ref`: read at its first use in
        this process, after each change kmsgate makes to it, and once it is older than
        `INFO_MAX_AGE_SECONDS`. Raises KeyDestroyed; BackendError for a key made exportable
        (outside kmsgate, which creates none); BackendUnavailable."""
        with self._info_lock:
            cached = self._info_cache.get((ref.mount, ref.name))
        fresh = cached is not None and time.monotonic() - cached[1] < INFO_MAX_AGE_SECONDS
        info = cached[0] if cached is not None and fresh else self.read_info(ref.mount, ref.name)
        if info is None:
            raise KeyDestroyed("the Transit key behind this key version no longer exists")
        if info.exportable:
            raise BackendError(
                f"Transit key {ref.name!r} was made exportable outside kmsgate (its material "
                "can leave Vault): kmsgate uses it no more"
            )
        return info

    def batch_results(
        self,
        reply: Mapping[str, Any],
        ref: _Ref,
        count: int,
        attribute: str,
        what: str,
        *,
        expected_size: int | None = None,
    ) -> list[bytes | KmsgateError]:
        """The `attribute` values of a reply's `batch_results`, prefix stripped and version checked;
        a failed item becomes a BackendError in its place (Vault's text is logged only).
        Raises BackendError if the reply itself is malformed."""
        try:
            items = reply["data"]["batch_results"]
            if not isinstance(items, list) or len(items) != count:
                raise TypeError
        except (KeyError, TypeError):
            raise BackendError(f"backend {self.name!r} sent an unexpected {what} reply") from None
        results: list[bytes | KmsgateError] = []
        for item in items:
            if not isinstance(item, Mapping) or item.get("error"):
                error = item.get("error") if isinstance(item, Mapping) else item
                _log.warning("hashivault %s: %s item failed: %s", self.name, what, error)
                results.append(BackendError(f"backend {self.name!r} could not make this {what}"))
                continue
            try:
                value = _strip_prefix(item.get(attribute), ref.version, what)
                if expected_size is not None and len(value) != expected_size:
                    raise BackendError(f"backend {self.name!r} returned a {what} of wrong length")
                results.append(value)
            except BackendError as exc:
                results.append(exc)
        return results

    def close(self) -> None:
        self._auth.close()
        self.hvac.adapter.close()
        with self._info_lock:
            self._info_cache.clear()


class _Missing(KmsgateError):
    """Internal: a 404 from a key read (the key does not exist); never leaves this module."""
