"""The SDK's connection to a gateway: its address, the bearer token, TLS verification, and
each failure (an error reply, an unreachable or refusing gateway, a reply that is not a
gateway's, a value that cannot be sent, a credential that would cross the network in
cleartext) as `ApiError`."""

from __future__ import annotations

import functools
import os
import ssl
from typing import Any, Self, TypeVar

import httpx

from kmsgate.encoding import b64decode_strict
from kmsgate.loopback import is_loopback_host, plain_http_refused

DEFAULT_ADDR = "http://127.0.0.1:8200"
_T = TypeVar("_T")


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
        loaded (an address that is no URL fails each request, as an unreachable one does, and
        so does a plain http:// address off loopback when a credential would be sent:
        `_cleartext_credential`)."""
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
        self._unusable_addr: ApiError | None = None
        # plain HTTP goes straight to the gateway (a loopback one, with a credential), never
        # through a proxy named in the environment (HTTP_PROXY), which would see the token
        client = functools.partial(
            httpx.Client,
            headers=headers,
            timeout=timeout,
            verify=verify,
            mounts={"http://": httpx.HTTPTransport()},
        )
        try:
            self._http = client(base_url=self.addr)
        except (httpx.InvalidURL, ValueError) as exc:  # a bad port, an unclosed "["
            why = "" if "@" in self.addr else f": {exc}"  # it may quote a password's part
            self._unusable_addr = ApiError(
                0,
                "invalid_request",
                f"the gateway address {_without_credentials(self.addr)} is not a valid URL{why}",
                token_sent=self._token_sent,
            )
            self._http = client()
        else:
            self._unusable_addr = self._cleartext_credential(bool(headers))

    def _cleartext_credential(self, token_in_headers: bool) -> ApiError | None:
        """The `invalid_request` error for a plain http:// address whose host is not loopback
        (`is_loopback_host`, a name resolved: it is connected to now) when the requests would
        carry a credential: the bearer token, or a user name and password in the address
        (httpx sends those as Basic auth). None for any other address: a request without a
        credential (`health`) may go over plain HTTP anywhere."""
        url = self._http.base_url
        if url.scheme != "http" or not (token_in_headers or url.userinfo):
            return None
        if is_loopback_host(url.raw_host.decode("ascii"), resolve=True):
            return None
        what = "the API token" if token_in_headers else "the password in the address"
        netloc = url.netloc.decode("ascii")  # host and port, without the user info
        return ApiError(
            0,
            "invalid_request",
            plain_http_refused(f"http://{netloc}", what),
            token_sent=self._token_sent,
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
        if self._unusable_addr is not None:
            raise self._unusable_addr
        if self._token_unsendable:
            raise ApiError(
                0,
                "invalid_token",
                "the token holds a space or a control character (or one beyond ASCII) inside it",
            )
        try:
            response = self._http.request(method, path, **kwargs)
        except UnicodeEncodeError:  # an argument's undecodable bytes (surrogate escapes)
            raise ApiError(
                0,
                "invalid_request",
                "a value of the request is not text (UTF-8): a file name or argument with "
                "undecodable bytes?",
                token_sent=self._token_sent,
            ) from None
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
                response.status_code,
                "http_error",
                f"HTTP {response.status_code} {response.reason_phrase} from "
                f"{_without_credentials(self.addr)}, not a kmsgate problem reply (a proxy in "
                "front of the gateway, or no gateway there)",
                token_sent=self._token_sent,
            ) from None
        if not isinstance(body, dict):
            body = {}
        raise ApiError(
            response.status_code,
            str(body.get("code", "http_error")),
            str(body.get("detail", response.reason_phrase)),
            body.get("request_id"),
            token_sent=self._token_sent,
        )

    def _json(self, method: str, path: str, body: Any = None, **kwargs: Any) -> dict[str, Any]:
        """The JSON object a request answers. Raises ApiError as `request` does, and
        `bad_reply` for a success that is no JSON object."""
        return self.reply_object(self.request(method, path, json=body, **kwargs))

    def reply_object(self, response: httpx.Response) -> dict[str, Any]:
        """`response`'s JSON object. Raises ApiError `bad_reply` for anything else (an HTML
        page from a proxy, another service's JSON)."""
        try:
            value = response.json()
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise self.bad_reply(f"{response.request.method} {response.request.url.path}")
        return value

    def reply_field(self, reply: dict[str, Any], name: str, kind: type[_T]) -> _T:
        """`reply[name]`, which must be a `kind`. Raises ApiError `bad_reply`."""
        value = reply.get(name)
        if not isinstance(value, kind):
            raise self.bad_reply(f"its {name!r}")
        return value

    def reply_bytes(self, reply: dict[str, Any], name: str) -> bytes:
        """`reply[name]` decoded from base64. Raises ApiError `bad_reply`."""
        try:
            return b64decode_strict(self.reply_field(reply, name, str))
        except ValueError:
            raise self.bad_reply(f"its {name!r}") from None

    def bad_reply(self, what: str) -> ApiError:
        """The error for a reply no kmsgate gateway gives (`what` of it is wrong)."""
        return ApiError(
            0,
            "bad_reply",
            f"the reply from {_without_credentials(self.addr)} is not what a kmsgate gateway "
            f"answers ({what}): is the address right?",
            token_sent=self._token_sent,
        )


def _without_credentials(addr: str) -> str:
    """`addr` with whatever precedes its last `@` after the scheme (a user name and password,
    however malformed the address) replaced by `***` (for messages)."""
    scheme, sep, rest = addr.rpartition("://")
    if "@" not in rest:
        return addr
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"


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
