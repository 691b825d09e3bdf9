"""OIDC authentication: a JWT from a configured issuer (`auth.oidc`) as the bearer token,
such as a CI job's ID token or a Kubernetes service-account token.

The token's unverified `iss` picks the issuer's settings; then PyJWT checks the signature
with the issuer's key named by `kid` (from its JWKS file or URL: read at start, then again by
a background thread every `PERIOD_SECONDS`, and soon after a token names an unknown `kid`,
at most every `REFRESH_SECONDS`; a request never waits for a fetch, so a slow or silent JWKS
server cannot hold requests up: a token whose key has not been fetched yet is refused until
it is), the algorithm against the issuer's allow-list
(asymmetric algorithms only: never `none`, never an HMAC a public key could pose as the
secret of), `aud`, `exp`, `nbf` and `iat` (with the issuer's leeway). The principal is
`<issuer name>:<subject claim>`, kind `oidc`, its claims the verified JWT claims; roles are
the policy's business.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, Final, NamedTuple
from urllib.parse import urlsplit

import httpx
import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from kmsgate.auth.authenticator import Credentials
from kmsgate.auth.principal import Principal
from kmsgate.config import OidcIssuer
from kmsgate.errors import Unauthenticated

__all__ = ["OidcAuthenticator"]

log = logging.getLogger("kmsgate.auth")
REFRESH_SECONDS = 30.0
"""The least time between two fetches of an issuer's keys."""
PERIOD_SECONDS = 300.0
"""How often an issuer's keys are fetched when no token names an unknown `kid`."""
FETCH_TIMEOUT_SECONDS = 5.0
MAX_JWKS_BYTES = 1 << 20
MIN_RSA_BITS = 2048
"""RFC 7518 3.3: an RSA key signing JWTs has at least 2048 bits."""
_REFUSED = "invalid, expired or untrusted OIDC token"
_SECRET_MEMBERS = ("d", "k", "p", "q", "dp", "dq", "qi")
"""JWK members of private or symmetric keys: a JWKS holding one is published wrongly."""


class _Key(NamedTuple):
    """A signing key of an issuer, and the one algorithm its JWK allows (`alg`), if any."""

    jwk: jwt.PyJWK
    alg: str | None


class _IssuerKeys:
    """One issuer's signing keys: loaded by `start`, then kept fresh by a background thread."""

    def __init__(self, issuer: OidcIssuer) -> None:
        self._issuer = issuer
        self._keys: dict[str | None, _Key] = {}
        self._wanted = threading.Event()
        self._source = (
            str(issuer.jwks_file) if issuer.jwks_file is not None else _shown(issuer.jwks_url or "")
        )
        """The JWKS as logs name it."""

    def start(self) -> None:
        """Load the keys (a JWKS that cannot be read leaves none, and is asked for again
        soon), then keep them fresh."""
        self._fetch()
        name = f"kmsgate-jwks-{self._issuer.name}"
        threading.Thread(target=self._keep_fresh, name=name, daemon=True).start()

    def find(self, kid: str | None) -> _Key | None:
        """The key named `kid` (or the only key, for a token without `kid`); None, and a
        fetch soon, if there is none. Never waits for a fetch."""
        key = self._lookup(kid)
        if key is None:
            self._wanted.set()
        return key

    def _keep_fresh(self) -> None:
        while True:
            time.sleep(REFRESH_SECONDS)
            self._wanted.wait(PERIOD_SECONDS - REFRESH_SECONDS)
            self._wanted.clear()
            self._fetch()

    def _lookup(self, kid: str | None) -> _Key | None:
        keys = self._keys
        if kid is None and len(keys) == 1:
            return next(iter(keys.values()))
        return keys.get(kid)

    def _fetch(self) -> None:
        """Replace the keys from the JWKS; a JWKS that cannot be read, or holds no usable
        key, keeps the old keys. Never raises (the keys' thread must go on)."""
        source = self._source
        try:
            if self._issuer.jwks_file is not None:
                text = self._issuer.jwks_file.read_bytes()
            else:
                assert self._issuer.jwks_url is not None  # OidcIssuer requires one of them
                text = _download(self._issuer.jwks_url)
            keys = _signing_keys(text, f"OIDC issuer {self._issuer.name}: JWKS {source}")
        except Exception as exc:  # what a foreign document makes a parser raise is open-ended
            log.warning(
                "OIDC issuer %s: JWKS %s not loaded: %s", self._issuer.name, source, _why(exc)
            )
            return
        self._keys = keys


def _signing_keys(text: bytes, where: str) -> dict[str | None, _Key]:
    """The signature keys of the JWKS `text` by `kid`: public keys only (a member of a
    private or symmetric key leaves that key out, logged), each with its JWK's own `alg`.
    Raises ValueError if `text` is no JWKS or holds no such key."""
    document = orjson.loads(text)  # deep nesting is a JSONDecodeError (a ValueError)
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError("not a JWK set")
    keys: dict[str | None, _Key] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        kid, alg = entry.get("kid"), entry.get("alg")
        if not isinstance(kid, str | None) or not isinstance(alg, str | None):
            continue
        if any(member in entry for member in _SECRET_MEMBERS):
            log.warning("%s: key %r holds private or secret key material: left out", where, kid)
            continue
        try:
            keys[kid] = _Key(jwt.PyJWK(entry), alg)
        except Exception:  # noqa: S112 (a key PyJWT cannot read is left out, as an unknown kty)
            continue
    if not keys:  # an empty set published by mistake must not lock every caller out
        raise ValueError("no usable signature key")
    return keys


def _download(url: str) -> bytes:
    """The JWKS at `url`, read within `FETCH_TIMEOUT_SECONDS` in all, the status line and
    headers too (a server that sends a byte now and then does not keep the fetch going),
    and `MAX_JWKS_BYTES`. Raises httpx.HTTPError, TimeoutError, ValueError."""
    return asyncio.run(asyncio.wait_for(_read(url), FETCH_TIMEOUT_SECONDS))


async def _read(url: str) -> bytes:
    body = bytearray()
    async with (
        httpx.AsyncClient(timeout=FETCH_TIMEOUT_SECONDS) as client,
        client.stream("GET", url) as reply,
    ):
        reply.raise_for_status()
        async for chunk in reply.aiter_bytes():
            body += chunk
            if len(body) > MAX_JWKS_BYTES:
                raise ValueError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
    return bytes(body)


def _why(exc: Exception) -> str:
    """Why a JWKS was not loaded, for the log: an HTTP error's status or type only (its
    text quotes the URL, where a token could be), else the exception's own text."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, httpx.HTTPError) or not str(exc):
        return type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def _shown(url: str) -> str:
    """`url` as logs name it: scheme, host, port and path, never user info or a query
    (where a token could be)."""
    parts = urlsplit(url)
    port = ""
    with suppress(ValueError):  # a port beyond 65535 fails the fetch, not the naming
        port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or '?'}{port}{parts.path}"


_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "RS": (rsa.RSAPublicKey,),
    "PS": (rsa.RSAPublicKey,),
    "ES": (ec.EllipticCurvePublicKey,),
    "Ed": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}


def _not_numeric(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int | float)


def _fits(algorithm: str, key: _Key) -> bool:
    """Whether `key` is of the type `algorithm` signs with and allows it (a token may not
    pick a verification the issuer's key was not made for: RFC 8725 3.1), RSA keys of
    `MIN_RSA_BITS` at least."""
    public = key.jwk.key
    if key.alg is not None and key.alg != algorithm:
        return False
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < MIN_RSA_BITS:
        return False
    return isinstance(public, _KEY_TYPES.get(algorithm[:2], ()))


class OidcAuthenticator:
    """Authenticates JWTs of the configured issuers."""

    kind: Final = "oidc"

    def __init__(self, issuers: Sequence[OidcIssuer]) -> None:
        """Loads every issuer's JWKS at once (a slow or hung one delays the start by its
        own timeout, not by the sum of them)."""
        self._issuers = {issuer.issuer: issuer for issuer in issuers}
        self._keys = {issuer.issuer: _IssuerKeys(issuer) for issuer in issuers}
        if self._keys:
            with ThreadPoolExecutor(len(self._keys), thread_name_prefix="kmsgate-jwks") as pool:
                list(pool.map(_IssuerKeys.start, self._keys.values()))

    def authenticate(self, credentials: Credentials) -> Principal | None:
        """The token's principal; None for a bearer that is not a JWT (an API token) or no
        bearer. Raises Unauthenticated (one message for every failure; the log says which
        check failed, never the token)."""
        token = credentials.bearer
        if token is None or token.count(".") != 2 or token.startswith("kmg."):
            return None
        try:
            return self._verify(token)
        except jwt.PyJWTError as exc:
            raise _refused(type(exc).__name__) from None

    def _verify(self, token: str) -> Principal:
        """Raises Unauthenticated, or a jwt.PyJWTError."""
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
        named = unverified.get("iss")
        if not isinstance(named, str):  # PyJWT checks the header's types, not the claims'
            raise _refused("the issuer claim is not a string")
        issuer = self._issuers.get(named)
        if issuer is None:
            raise _refused("unknown issuer")
        algorithm = header.get("alg")
        if algorithm not in issuer.algorithms:
            raise _refused(f"algorithm {algorithm!r} not allowed")
        key = self._keys[issuer.issuer].find(header.get("kid"))
        if key is None or not _fits(algorithm, key):
            raise _refused("unknown signing key, or one of another type or algorithm")
        claims: dict[str, Any] = jwt.decode(
            token,
            key.jwk.key,
            algorithms=[algorithm],
            audience=issuer.audiences,
            issuer=issuer.issuer,
            leeway=issuer.leeway.total_seconds(),
            options={"require": ["exp", "iat", "iss", "aud", issuer.subject_claim]},
        )
        subject = claims.get(issuer.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise _refused(f"the {issuer.subject_claim} claim is not a non-empty string")
        if any(_not_numeric(claims.get(name, 0)) for name in ("exp", "nbf", "iat")):
            raise _refused("a time claim is not a JSON number")  # RFC 7519 2
        try:
            orjson.dumps(claims)  # as the policy input will be: numbers within 64 bits
        except TypeError:
            raise _refused("a claim holds a number beyond 64 bits") from None
        tenant = None
        if issuer.tenant_claim:
            tenant = claims.get(issuer.tenant_claim)
            if not isinstance(tenant, str) or not tenant:
                # without one, the token would be of no tenant: out of tenant isolation's reach
                raise _refused(f"the {issuer.tenant_claim} claim is not a non-empty string")
        return Principal(
            id=f"{issuer.name}:{subject}",
            kind="oidc",
            roles=(),
            claims=claims,
            tenant=tenant,
        )


def _refused(why: str) -> Unauthenticated:
    """The one refusal every OIDC failure gets, to the caller; which check failed (`why`,
    never the token) goes to the log and, as `reason`, to the audit record."""
    log.info("OIDC token refused: %s", why)
    return Unauthenticated(_REFUSED, reason=why)
