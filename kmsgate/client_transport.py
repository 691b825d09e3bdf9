"""The SDK's connection to a gateway: its address, the bearer token, TLS verification, and
each failure (an error reply, an unreachable or refusing gateway) as `ApiError`."""

from __future__ import annotations

import os
import ssl
import urllib.parse
from typing import Any, Self

import httpx

DEFAULT_ADDR = "http://127.0.0.1:8200"


class ApiError(Exception):
    """A failed call: HTTP `status` (0 if unreachable), problem `code` and `detail`;
    `token_sent` says whether the request carried a bearer token."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        request_id: str | None = None,
        *,
        token_sent: bool = True,
    ) -> None:
        super().__init__(f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.request_id = request_id
        self.token_sent = token_sent


class Transport:
    """Sends requests to one gateway and raises `ApiError` for what fails (`Client`, its
    subclass, has a method per API call)."""

    def __init__(
        self,
        addr: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        verify: bool | str | ssl.SSLContext = True,
        anonymous: bool = False,
    ) -> None:
        """`verify`: check the gateway's certificate against the system's CAs (True), a CA
        file (its path; by default `KMSGATE_CACERT` if set) or a context. `anonymous`: send
        no token, not even `KMSGATE_TOKEN` (a client that authenticates with the certificate
        in its `verify` context). Raises OSError or ssl.SSLError if a CA file cannot be
        loaded."""
        self.addr = (addr or os.environ.get("KMSGATE_ADDR") or DEFAULT_ADDR).rstrip("/")
        cafile = verify if isinstance(verify, str) else None
        if verify is True:
            cafile = os.environ.get("KMSGATE_CACERT") or None
        if cafile is not None:
            verify = ssl.create_default_context(cafile=cafile)
        token = None if anonymous else token or os.environ.get("KMSGATE_TOKEN")
        token = token.strip() if token else None  # a token file's line end, a pasted space
        self._token_sent = bool(token)
        # a token is printable ASCII: anything else is never sent, nor shown (`request`)
        self._token_unsendable = bool(token) and not all(" " < c < "\x7f" for c in token or "")
        headers = (
            {"authorization": f"Bearer {token}"} if token and not self._token_unsendable else {}
        )
        self._http = httpx.Client(
            base_url=self.addr, headers=headers, timeout=timeout, verify=verify
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request. Raises ApiError on a non-2xx reply, a connection failure or a
        token that cannot be sent."""
        if self._token_unsendable:
            raise ApiError(
                0, "invalid_token", "the token holds a space or a control character inside it"
            )
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.LocalProtocolError:  # its text may quote a header: the token
            raise ApiError(
                0,
                "invalid_request",
                f"cannot send the request to {_without_credentials(self.addr)}: a header "
                "value is not valid HTTP",
                token_sent=self._token_sent,
            ) from None
        except httpx.TransportError as exc:
            if _refused_by_peer(exc):
                raise ApiError(
                    0,
                    "tls_refused",
                    f"{_without_credentials(self.addr)} refused the TLS connection: {exc}",
                    token_sent=self._token_sent,
                ) from None
            raise ApiError(
                0,
                "unreachable",
                f"cannot reach {_without_credentials(self.addr)}: {exc}",
                token_sent=self._token_sent,
            ) from None
        if response.is_success:
            return response
        try:
            body = response.json()
        except ValueError:
            raise ApiError(
                response.status_code, "error", response.reason_phrase, token_sent=self._token_sent
            ) from None
        if not isinstance(body, dict):
            body = {}
        raise ApiError(
            response.status_code,
            str(body.get("code", "error")),
            str(body.get("detail", response.reason_phrase)),
            body.get("request_id"),
            token_sent=self._token_sent,
        )

    def _json(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.request(method, path, json=body, **kwargs).json()


def _without_credentials(addr: str) -> str:
    """`addr` with a user name and password in it replaced by `***` (for messages)."""
    parts = urllib.parse.urlsplit(addr)
    if "@" not in parts.netloc:
        return addr
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


_CERTIFICATE_ALERTS = ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED")
"""What the alerts a server sends about a client certificate are named with (bad,
unsupported, revoked, expired, unknown, required; unknown CA; access denied)."""


def _refused_by_peer(exc: BaseException) -> bool:
    """Whether a transport failure is the gateway refusing this client's certificate in the
    TLS handshake (an alert about it), not a network failure, another alert (one a
    middlebox could inject) or this side refusing the gateway's certificate."""
    seen: BaseException | None = exc
    while seen is not None:
        reason = str(getattr(seen, "reason", "") or "")
        if isinstance(seen, ssl.SSLError) and "ALERT" in reason:
            return any(name in reason for name in _CERTIFICATE_ALERTS)
        seen = seen.__cause__ or seen.__context__
    return False
