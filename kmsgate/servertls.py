"""HTTPS for `kmsgate serve` (settings `tls`, DESIGN §11b).

The gateway presents a certificate from files (`tls.cert_file`, `tls.key_file`), or one it
issues itself from its CA `tls.ca` (profile `tls.profile`, names `tls.sans`) into
`<data_dir>/tls/`, renewed by the jobs leader once two thirds of its lifetime have passed
(and at start when it was issued for other settings).
Every worker watches its certificate files and loads a changed pair into its live
`SSLContext`: new connections get the new certificate without a restart (a certificate
rotated by another tool, such as cert-manager, too). TLS 1.2 is the minimum. Client
certificates are requested when `tls.client_auth` is `optional` or `required`, and checked
against `tls.client_cas`: kmsgate CA names (each CA's own certificate, not the root above
it) or PEM bundle files, each certificate a trust anchor by itself, resolved when the
gateway starts. Without a certificate source (only
`tls.trusted_proxies`), a proxy terminates TLS and the gateway serves plain HTTP.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmsgate.config import Settings, TlsSettings
from kmsgate.durations import format_duration
from kmsgate.errors import ConfigError, KmsgateError
from kmsgate.pki.files import asked_before, replace_private_file
from kmsgate.pki.issuer import BACKDATE
from kmsgate.secret_files import read_secret_file
from kmsgate.service import Ctx, Service

__all__ = ["ServerTls", "provision", "renew_if_due"]

log = logging.getLogger("kmsgate.tls")
TLS_DIR = "tls"
REQUEST_FILE = "server.json"
"""Next to the gateway's own certificate: the settings it was issued for, so that a change
to them gets a new certificate at the next start (or renewal check)."""
RENEW_AFTER = 2 / 3
"""The share of a certificate's lifetime after which the gateway renews its own."""
WATCH_SECONDS = 1.0
RELOAD_WAIT_SECONDS = 10.0
"""How long the watcher waits for the event loop to load a new pair (then it tries again)."""
REFUSAL_LOG_SECONDS = 1.0
"""The least time between two log lines about refused handshakes (`_Refusals`)."""
GATEWAY = Ctx(request_id="gateway-tls")
_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True)
class ServerTls:
    """What each worker's TLS context is made of; passed to uvicorn as its
    `ssl_context_factory` (and pickled to worker processes)."""

    cert_file: Path
    """The certificate the gateway presents, followed by its chain (PEM)."""
    key_file: Path
    client_auth: str
    client_cas: str
    """The trusted client CA certificates (PEM), each an anchor by itself; empty when none
    are requested."""

    def context(self) -> ssl.SSLContext:
        """A server context over the current files. Raises ConfigError naming the file
        that does not load."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.sslobject_class = _LoggedHandshake
        _load_pair(context, self.cert_file, self.key_file)
        context.verify_mode = _VERIFY[self.client_auth]
        if self.client_cas:
            # each of client_cas is an anchor by itself: a kmsgate CA's own certificate,
            # not the root that also signs its siblings (`trusted_certificates`)
            context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
            try:
                context.load_verify_locations(cadata=self.client_cas)
            except ssl.SSLError as exc:
                raise ConfigError(f"cannot load tls.client_cas: {exc}") from None
        return context

    def __call__(self, _config: Any, _default: Any) -> ssl.SSLContext:
        """uvicorn's hook (called on the worker's event loop): this worker's context, kept
        current by a watcher thread."""
        context = self.context()
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        watcher = threading.Thread(
            target=self._watch, args=(context, loop), name="kmsgate-tls-watch", daemon=True
        )
        watcher.start()
        return context

    def _watch(self, context: ssl.SSLContext, loop: asyncio.AbstractEventLoop | None) -> None:
        """Load the certificate and key into `context` whenever their files change; a pair
        that does not load (caught mid-rotation, or broken) is logged and tried again.

        The load runs on `loop`, the thread that makes every TLS connection: OpenSSL takes
        the certificate and the key in two steps, and a connection begun between them would
        get the new certificate with the old key (its handshake fails)."""
        seen = self._stamp()
        while True:
            time.sleep(WATCH_SECONDS)
            stamp = self._stamp()
            if stamp == seen:
                continue
            try:
                self._reload(context, loop)
            except ConfigError as exc:
                log.warning("TLS certificate not reloaded: %s", exc)
                continue
            except TimeoutError:  # the event loop is busy: the next look tries again
                continue
            except RuntimeError:  # the event loop is closed: the worker is stopping
                return
            seen = stamp
            log.info("TLS certificate reloaded from %s", self.cert_file)

    def _reload(self, context: ssl.SSLContext, loop: asyncio.AbstractEventLoop | None) -> None:
        """`_load_pair` into `context`, on `loop` if there is one. Raises ConfigError,
        RuntimeError (`loop` is closed), TimeoutError (it did not get to it)."""

        async def load() -> None:
            _load_pair(context, self.cert_file, self.key_file)

        if loop is None:
            _load_pair(context, self.cert_file, self.key_file)
        else:
            asyncio.run_coroutine_threadsafe(load(), loop).result(timeout=RELOAD_WAIT_SECONDS)

    def _stamp(self) -> tuple[int, int]:
        try:
            return (self.cert_file.stat().st_mtime_ns, self.key_file.stat().st_mtime_ns)
        except OSError:
            return (0, 0)


class _Refusals:
    """Logs refused TLS handshakes at one level, at most one line per `REFUSAL_LOG_SECONDS`
    (a scanner must not flood the log). The refusals a line could not show are counted by
    reason and told on the next line, or by a line of their own once the second is over."""

    def __init__(self, level: int) -> None:
        self._level = level
        self._lock = threading.Lock()
        self._next = 0.0
        self._unlogged: Counter[str] = Counter()
        self._tail: threading.Timer | None = None

    def note(self, reason: str) -> None:
        if not log.isEnabledFor(self._level):
            return
        with self._lock:
            moment = time.monotonic()
            if moment < self._next:
                self._unlogged[reason] += 1
                if self._tail is None:
                    self._tail = threading.Timer(self._next - moment, self._tell_the_rest)
                    self._tail.daemon = True
                    self._tail.start()
                return
            self._next = moment + REFUSAL_LOG_SECONDS
            earlier = self._take()
        more = f" (and since the last line: {earlier})" if earlier else ""
        log.log(self._level, "TLS handshake refused: %s%s", reason, more)

    def _tell_the_rest(self) -> None:
        with self._lock:
            self._tail = None
            earlier = self._take()
            self._next = time.monotonic() + REFUSAL_LOG_SECONDS
        if earlier:
            log.log(self._level, "TLS handshake refused: %s", earlier)

    def _take(self) -> str:
        """The refusals not logged yet, as `N x reason` by reason (most first), forgotten."""
        told = ", ".join(f"{n} x {why}" for why, n in self._unlogged.most_common())
        self._unlogged.clear()
        return told


_UNTRUSTED = _Refusals(logging.WARNING)
"""A client certificate that does not verify, or none where one is required."""
_OTHER_REFUSALS = _Refusals(logging.INFO)
"""An old protocol version, plain HTTP on the HTTPS port, no shared cipher."""


class _LoggedHandshake(ssl.SSLObject):
    """The server side of one TLS connection, which logs why its handshake was refused
    (`_UNTRUSTED`, `_OTHER_REFUSALS`): the event loop's TLS layer drops these errors
    silently (an `ssl.SSLError` is an `OSError`).

    It also lets the client learn why: OpenSSL writes a TLS alert (unknown CA, certificate
    expired, certificate required) when it refuses, but the event loop closes the
    connection on the error without sending what is pending. So when an alert is pending,
    the refusal is first reported as "need more data", which makes the event loop send
    it; the error itself is raised when the client answers or closes (or at the handshake
    timeout). A refusal with nothing to send (plain HTTP) closes at once, as before."""

    _refused: ssl.SSLError | None = None
    _outgoing: ssl.MemoryBIO

    @classmethod
    def _create(  # CPython's private constructor (3.7 to 3.13), extended
        cls, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, *args: Any, **kwargs: Any
    ) -> _LoggedHandshake:
        self: _LoggedHandshake = super()._create(incoming, outgoing, *args, **kwargs)  # type: ignore[misc]
        self._outgoing = outgoing
        return self

    def _refuse(self, exc: ssl.SSLError) -> ssl.SSLError:
        """What to raise for the refusal `exc`: "need more data" while its alert waits to
        be sent (`exc` comes at the next call), else `exc`."""
        if self._outgoing.pending == 0:
            return exc
        self._refused = exc
        return ssl.SSLWantReadError("the alert goes out first")

    def do_handshake(self) -> None:
        if self._refused is not None:
            raise self._refused
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLCertVerificationError as exc:
            _UNTRUSTED.note(f"client certificate not trusted: {exc.verify_message}")
            raise self._refuse(exc) from None
        except ssl.SSLError as exc:
            reason = (exc.reason or type(exc).__name__).lower()
            (_UNTRUSTED if "certificate" in reason else _OTHER_REFUSALS).note(reason)
            raise self._refuse(exc) from None


def _load_pair(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    """Load the pair into `context` as it is at one moment: both files are read once, and
    the copies are checked in a scratch context before `context` is touched (a live
    context that took a new certificate and a key that does not match it, caught between
    a rotation's two renames, would fail every handshake until the next reload). Raises
    ConfigError if the pair cannot be read or does not match, or if another user could
    read or replace the key file (`exposure`)."""
    key = read_secret_file(key_file, "TLS key")
    try:
        pair = (cert_file.read_bytes(), key)
        # a private (0700) directory: the key directory may be read-only (a mounted Secret)
        with tempfile.TemporaryDirectory(prefix="kmsgate-tls-") as private:
            copies = (Path(private) / "cert.pem", Path(private) / "key.pem")
            for path, data in zip(copies, pair, strict=True):
                path.touch(mode=0o600)
                path.write_bytes(data)
            for target in (ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), context):
                target.load_cert_chain(certfile=copies[0], keyfile=copies[1])
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert_file}: {exc}") from None


def _tls_dir(settings: Settings) -> Path:
    if settings.data_dir is None:
        raise ConfigError("tls.ca needs a data_dir")
    return settings.data_dir / TLS_DIR


def _own_pair(settings: Settings) -> tuple[Path, Path]:
    """The certificate and key files of the gateway's own certificate (`tls.ca`)."""
    directory = _tls_dir(settings)
    return directory / "server.pem", directory / "server.key"


def _require_tls(settings: Settings) -> TlsSettings:
    if settings.tls is None:
        raise ConfigError("no tls settings")
    return settings.tls


def provision(service: Service, settings: Settings) -> ServerTls | None:
    """What the workers' contexts load: the gateway's own certificate, issued when it has
    none yet or its renewal is due (`tls.ca`), and the client CAs. Checks that a context
    loads; None when a trusted proxy terminates TLS (after checking `tls.client_cas`).
    Raises ConfigError (with what to fix, also when the gateway's certificate cannot be
    issued)."""
    tls = _require_tls(settings)
    client_cas = service.pki.trusted_certificates(tls.client_cas)
    if not tls.serves_https:
        return None
    if tls.ca is not None:
        cert_file, key_file = _own_pair(settings)
        try:
            renew_if_due(service, settings)
        except KmsgateError as exc:  # a CA, profile, name or lifetime it cannot have
            raise ConfigError(
                f"tls: CA {tls.ca!r} cannot issue the gateway's certificate (profile "
                f"{tls.profile!r}, sans {list(tls.sans)}, ttl {tls.ttl}): {exc.detail}"
            ) from None
    else:
        assert tls.cert_file is not None and tls.key_file is not None  # TlsSettings checks
        cert_file, key_file = tls.cert_file, tls.key_file
    server = ServerTls(
        cert_file=cert_file,
        key_file=key_file,
        client_auth=tls.client_auth,
        client_cas="".join(_pem(c).decode() for c in client_cas if tls.client_auth != "none"),
    )
    server.context()
    return server


def renew_if_due(service: Service, settings: Settings) -> bool:
    """Issue the gateway a new certificate (`tls.ca`) if it has none, two thirds of the
    current one's lifetime have passed, or it was issued for other settings (`tls.ca`,
    `profile`, `sans`, `ttl`: `REQUEST_FILE`); True if it did. Raises KmsgateError,
    ConfigError."""
    tls = settings.tls
    if tls is None or tls.ca is None:
        return False
    cert_file, key_file = _own_pair(settings)
    asked = _request(tls)
    if not _renewal_due(cert_file, key_file):
        if asked_before(cert_file.with_name(REQUEST_FILE)) == asked:
            return False
        log.info("the gateway's TLS settings changed: issuing it a new certificate")
    key, issued = asyncio.run(
        service.pki.gateway_certificate(GATEWAY, tls.ca, tls.profile, tls.sans, tls.ttl)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    chain = (issued.certificate, *issued.chain[:-1])  # the root stays with the clients
    # the key first: a worker reloads when the certificate file changes
    _write_atomically(key_file, key_pem)
    _write_atomically(cert_file, b"".join(_pem(c) for c in chain))
    _write_atomically(cert_file.with_name(REQUEST_FILE), json.dumps(asked).encode())
    log.info(
        "gateway TLS certificate %s issued by %s, valid until %s",
        issued.serial,
        tls.ca,
        issued.not_after,
    )
    return True


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _request(tls: TlsSettings) -> dict[str, object]:
    """What the gateway's certificate is asked for, as `REQUEST_FILE` records it."""
    ttl = format_duration(tls.ttl) if tls.ttl is not None else None
    return {"ca": tls.ca, "profile": tls.profile, "sans": sorted(tls.sans), "ttl": ttl}


def _renewal_due(cert_file: Path, key_file: Path) -> bool:
    """Whether the certificate in `cert_file` is missing, unreadable, not for the key in
    `key_file` (a renewal cut short between writing the two) or past `RENEW_AFTER` of its
    lifetime."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return True
    if key.public_key() != cert.public_key():
        return True
    # kmsgate backdates not_before by BACKDATE (clock skew): the lifetime starts at issuance
    end = cert.not_valid_after_utc
    start = min(cert.not_valid_before_utc + BACKDATE, end)
    return datetime.now(UTC) >= start + (end - start) * RENEW_AFTER


def _write_atomically(path: Path, data: bytes) -> None:
    """`replace_private_file`. Raises ConfigError."""
    try:
        replace_private_file(path, data)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None


def renewal_job(service: Service, settings: Settings) -> None:
    """`renew_if_due` for the jobs leader: failures are logged (by code) and retried."""
    try:
        renew_if_due(service, settings)
    except (KmsgateError, ConfigError) as exc:
        log.warning("gateway TLS certificate renewal failed: %s", getattr(exc, "code", exc))
