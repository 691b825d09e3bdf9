"""`kmsgate agent`: keeps a workload's certificate current in a directory.

It makes the key and the CSR on the host (the private key never leaves it), gets a first
certificate with an API or OIDC token (read from its file each time: projected Kubernetes
tokens rotate), then renews over mTLS with the current certificate at a fraction of its
lifetime (default 2/3, never later than 80%, a little earlier at random so that a fleet
does not renew in step), backing off exponentially while the gateway is away. A certificate
that expired (or was revoked) meanwhile, or that was asked for with other options, is
replaced by bootstrapping again. Each swap writes `key.pem`, `cert.pem` (the leaf),
`chain.pem` (leaf and intermediates), `ca.pem` (the root) and `agent.json` (what was asked
for) as one set (0600; `replace_private_files`: the names are symlinks through `..data`,
switched in one rename), then runs the `on_renew` command.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shlex
import signal
import ssl
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from kmsgate.client import ApiError, Client
from kmsgate.durations import parse_duration_setting
from kmsgate.files import foreign_owner
from kmsgate.pki.csr import new_key_and_csr, parse_san
from kmsgate.pki.files import LOCK, NotLinked, asked_before, check_lock, replace_private_files
from kmsgate.pki.issuer import BACKDATE
from kmsgate.secret_files import exposure
from kmsgate.spiffe import is_spiffe_id

__all__ = ["Agent", "AgentOptions"]

log = logging.getLogger("kmsgate.agent")
LATEST_RENEWAL = 0.8
"""A certificate is renewed before this share of its lifetime, whatever `renew_at` says."""
JITTER = 0.05
"""Up to this share of the lifetime earlier, at random."""
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 60.0
MIN_TTL = timedelta(seconds=3)
"""The shortest `ttl` the agent asks for: it renews at a share of the lifetime, and the
gateway gives whole seconds."""
MIN_SWAP_SECONDS = 1.0
"""The least time between two certificates (whatever the lifetime the gateway gave)."""
SET_ROOM_BYTES = 64 * 1024
"""The room the directory must have before a certificate is asked for: a set is five files
of a few KiB, each taking whole 4 KiB pages or blocks (about 20 KiB); the rest is margin (a
long chain, the set's own directory)."""
ON_RENEW_SECONDS = 60.0
"""The longest an `on_renew` command may run; it is stopped after that."""
ON_RENEW_POLL_SECONDS = 0.05
"""How often the agent looks whether an `on_renew` command has ended (its stop event wakes
it at once)."""
ON_RENEW_GRACE_SECONDS = 3.0
"""An `on_renew` command being stopped gets SIGKILL if SIGTERM has not ended it by then."""
VALID_ENOUGH = timedelta(seconds=0.25)
"""A certificate with less left than this is not presented: it could expire in the
handshake."""


@dataclass(frozen=True)
class AgentOptions:
    """What `kmsgate agent` was asked to keep."""

    addr: str | None
    ca: str
    profile: str
    sans: tuple[str, ...]
    directory: Path
    token_file: Path | None
    ttl: str | None = None
    renew_at: float = 2 / 3
    on_renew: str | None = None
    cacert: Path | None = None
    cn: str | None = None
    """The subject's common name (one of `sans`); None: none."""


PERMANENT_STATUSES = frozenset({400, 404, 422})
"""Replies the agent stops on (its options are wrong) instead of retrying for ever."""


def _permanent(exc: Exception) -> bool:
    """Whether asking again cannot mend `exc`: a reply of `PERMANENT_STATUSES`, or a request
    the SDK would not send (`invalid_request` with no reply: an address that is no URL, or
    plain http:// off loopback with a credential)."""
    if not isinstance(exc, ApiError):
        return False
    return exc.status in PERMANENT_STATUSES or (exc.status == 0 and exc.code == "invalid_request")


REQUEST_FILE = "agent.json"
"""In each set: the CA, profile and SANs it was asked for, so that an agent started with
other options gets a new certificate instead of renewing the old one."""


def _check_issued(
    leaf: x509.Certificate, chain: list[x509.Certificate], key: PublicKeyTypes
) -> None:
    """Raises ValueError unless `leaf` certifies `key` and the first certificate of `chain`
    signed it: a reply with another certificate would leave the workload a key and a
    certificate that do not go together (and the agent asking again every second)."""
    if leaf.public_key() != key:
        raise ValueError("the gateway answered with a certificate for another key: not kept")
    try:
        leaf.verify_directly_issued_by(chain[0])
    except (IndexError, ValueError, TypeError, InvalidSignature):
        raise ValueError(
            "the gateway answered with a certificate its chain did not issue: not kept"
        ) from None


def _read_token(path: Path) -> str:
    """The token in `path`, read now; a warning names a file others may read (whoever
    reads it can get certificates). Not refused: a Kubernetes projected service-account
    token, for `--oidc-token-file`, is 0644 unless its volume says otherwise. Raises
    OSError, ValueError (not UTF-8)."""
    with path.open("rb") as file:
        problem = exposure(os.fstat(file.fileno()))
        token = file.read().decode().strip()
    if problem is not None:
        log.warning("token file %s %s: whoever reads it can get certificates", path, problem)
    return token


class NotKept(OSError):
    """A certificate was issued but could not be written to the directory. Each try issues
    one, so `Agent.run` waits its whole backoff, however soon the one on disk ends."""

    def __str__(self) -> str:
        return str(self.strerror)


class NoCredential(ValueError):
    """No valid certificate to renew with and no token file to bootstrap with: asking
    again cannot help."""


def default_common_name(sans: tuple[str, ...]) -> str | None:
    """The first DNS name among `sans` when none is a URI (a SPIFFE ID names the holder
    itself): a client or server certificate then names its holder, which the gateway needs
    to accept it over mTLS. Raises ValueError for a malformed SAN."""
    names = [parse_san(san) for san in sans]
    if any(isinstance(name, x509.UniformResourceIdentifier) for name in names):
        return None
    dns = [name.value for name in names if isinstance(name, x509.DNSName)]
    return dns[0] if dns else None


def authenticates(cert: x509.Certificate) -> bool:
    """Whether `cert` can renew itself over mTLS: the gateway accepts a client certificate
    with the clientAuth usage that names a SPIFFE ID or has a common name."""
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    spiffe = any(map(is_spiffe_id, names.get_values_for_type(x509.UniformResourceIdentifier)))
    named = bool(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME))
    return ExtendedKeyUsageOID.CLIENT_AUTH in usages and (spiffe or named)


class Agent:
    """Keeps `options.directory` holding a valid certificate."""

    def __init__(self, options: AgentOptions, stop: threading.Event | None = None) -> None:
        if not 0 < options.renew_at <= LATEST_RENEWAL:
            raise ValueError(f"renew_at must be in (0, {LATEST_RENEWAL}]")
        if not options.sans:
            raise ValueError("at least one SAN is needed")
        if options.ttl is not None and parse_duration_setting(options.ttl) < MIN_TTL:
            raise ValueError(f"--ttl must be at least {MIN_TTL.seconds}s")
        self.options = options
        self.stop = stop or threading.Event()
        self._issued_at: datetime | None = None

    def run(self, *, once: bool = False) -> None:
        """Bootstrap or renew, then wait for the next renewal, until `stop` is set (once:
        one swap, then return). A certificate in the directory that is not due yet is kept
        until it is (a restarted agent mints nothing). Raises ApiError, OSError or
        ValueError with `once`, and an ApiError that asking again cannot mend
        (`_permanent`: an unknown CA or profile, a request the gateway refuses as such, an
        address the SDK will not send it to); other failures are logged and retried with
        exponential backoff, never waiting long past the certificate's end (`_retry_cap`)
        unless a certificate was issued and could not be written (`NotKept`)."""
        backoff = FIRST_BACKOFF_SECONDS
        if not once:
            self.stop.wait(self._seconds_until_renewal())
        while not self.stop.is_set():
            try:
                leaf = self.swap()
            except (ApiError, OSError, ValueError) as exc:
                if once or _permanent(exc) or isinstance(exc, NoCredential):
                    raise
                wait = backoff if isinstance(exc, NotKept) else min(backoff, self._retry_cap())
                log.warning("certificate not renewed (retrying in %.1f s): %s", wait, exc)
                self.stop.wait(wait)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                continue
            backoff = FIRST_BACKOFF_SECONDS
            if once:
                return
            # from the certificate installed, not from what the names lead to: a name that
            # could not be linked to it (NotLinked) must not make the agent ask every second
            self.stop.wait(max(MIN_SWAP_SECONDS, self._seconds_until_renewal(leaf)))

    def swap(self) -> x509.Certificate:
        """One new certificate in the directory: renewed over mTLS while the current one is
        valid, else bootstrapped with the token. Raises ApiError, OSError (NotKept, naming
        the directory and the certificate's serial, when it was issued but could not be
        written), ValueError (NoCredential when neither is there)."""
        current = self._current()
        if current is not None and not authenticates(current):
            current = None  # it cannot renew itself: the token gets the next one
            if self.options.token_file is None:
                raise NoCredential(
                    f"the certificate in {self.options.directory} cannot authenticate to "
                    "the gateway (no clientAuth usage, or neither a SPIFFE ID nor a common "
                    "name: see --cn); give --token-file or --oidc-token-file to renew it"
                )
        if current is None and self.options.token_file is None:
            raise NoCredential(
                f"no valid certificate in {self.options.directory} to renew, and no "
                "--token-file or --oidc-token-file to get one"
            )
        self._check_writable()  # before a certificate is issued that could not be kept
        key, csr = new_key_and_csr(list(self.options.sans), self.options.cn)
        csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        issued = None
        if current is not None:
            try:
                with self._client(identity=True) as client:
                    issued = client.renew_certificate(csr_pem, ttl=self.options.ttl)
            except ApiError as exc:
                # 401 or a refused handshake: expired, revoked or distrusted meanwhile
                if exc.status != 401 and exc.code != "tls_refused":
                    raise
                log.warning("the current certificate was refused (%s): bootstrapping", exc.code)
        renewed = issued is not None
        if issued is None:
            with self._client(identity=False) as client:
                issued = client.issue_certificate(
                    self.options.ca, csr_pem, self.options.profile, ttl=self.options.ttl
                )
        chain = x509.load_pem_x509_certificates(issued["chain"].encode())
        leaf = x509.load_pem_x509_certificate(issued["certificate"].encode())
        _check_issued(leaf, chain, key.public_key())
        pem = serialization.Encoding.PEM
        key_pem = key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        intermediates = b"".join(c.public_bytes(pem) for c in chain[:-1])
        files = {
            "key.pem": key_pem,
            "cert.pem": leaf.public_bytes(pem),
            "chain.pem": leaf.public_bytes(pem) + intermediates,
            "ca.pem": chain[-1].public_bytes(pem),
            REQUEST_FILE: json.dumps(self._request()).encode(),
        }
        try:
            replace_private_files(self.options.directory, files)
        except NotLinked as exc:  # the set is current: the certificate is kept, in use
            log.error(
                "certificate %s is current in %s, but a link to it failed (%s: %s): mend "
                "the directory",
                issued["serial"],
                self.options.directory,
                exc.filename,
                exc.strerror,
            )
        except OSError as exc:
            serial = issued["serial"]
            raise NotKept(
                exc.errno,
                f"certificate {serial} was issued but not written to {self.options.directory} "
                f"({exc.strerror or exc}): revoke it (kmsgate cert revoke {serial})",
            ) from exc
        self._issued_at = datetime.now(UTC)
        log.info(
            "certificate %s %s, valid until %s",
            issued["serial"],
            "renewed" if renewed else "issued",
            issued["not_after"],
        )
        self._after_swap()
        return leaf

    def _client(self, *, identity: bool) -> Client:
        """A client trusting `cacert`; presenting the current certificate (identity), or
        the token read from its file now."""
        context = ssl.create_default_context(
            cafile=str(self.options.cacert) if self.options.cacert else None
        )
        if identity:
            context.load_cert_chain(self._path("chain.pem"), self._path("key.pem"))
            return Client(self.options.addr, verify=context, anonymous=True)
        token = _read_token(self.options.token_file) if self.options.token_file else None
        return Client(self.options.addr, token, verify=context)

    def _check_writable(self) -> None:
        """Raises OSError if the directory cannot be made or written to (a file by that
        name, a read-only file system, no permission), another user may write to it
        (PermissionError), or it has no room for a set: a file of `SET_ROOM_BYTES` is
        written there, synced and removed."""
        directory = self.options.directory
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except FileExistsError:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(directory)) from None
        held = directory.stat()  # through a link: the directory the files go to
        problem = foreign_owner(held)
        if problem is None and held.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem = "is writable by its group or others"
        if problem is not None:  # whoever may write there could swap what the workload reads
            message = f"{problem}: another user could replace the certificate there"
            raise PermissionError(errno.EPERM, message, str(directory))
        try:
            check_lock(directory)
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror} (its {LOCK})", str(directory)) from exc
        try:
            with tempfile.TemporaryFile(dir=directory) as probe:
                probe.write(os.urandom(SET_ROOM_BYTES))  # random: stored whole if compressed
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as exc:
            kib = SET_ROOM_BYTES // 1024
            why = (
                "no room for a certificate set"
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
                else "cannot write there"
            )
            message = f"{exc.strerror}: {why} (a {kib} KiB test write)"
            raise OSError(exc.errno, message, str(directory)) from exc

    def _on_disk(self) -> x509.Certificate | None:
        """The certificate in the directory, valid or not; None if there is none."""
        try:
            return x509.load_pem_x509_certificate(self._path("cert.pem").read_bytes())
        except (OSError, ValueError):
            return None

    def _current(self) -> x509.Certificate | None:
        """The certificate in the directory if it is valid for a moment still
        (`VALID_ENOUGH`) and goes with the key and chain there (a run stopped between two
        of its writes leaves them apart: the token then gets a new one), else None."""
        cert = self._on_disk()
        if cert is None:
            return None
        try:
            key = serialization.load_pem_private_key(self._path("key.pem").read_bytes(), None)
            chain = x509.load_pem_x509_certificates(self._path("chain.pem").read_bytes())
        except (OSError, ValueError, TypeError):
            return None
        if key.public_key() != cert.public_key() or chain[0] != cert:
            log.warning("the key, certificate and chain in %s do not match", self._path(""))
            return None
        if asked_before(self._path(REQUEST_FILE)) not in (None, self._request()):
            log.warning("the certificate in %s is for other options: replacing it", self._path(""))
            return None
        left = cert.not_valid_after_utc - datetime.now(UTC)
        return cert if left > VALID_ENOUGH else None

    def _request(self) -> dict[str, object]:
        """What this agent asks for, as `REQUEST_FILE` records it."""
        o = self.options
        asked: dict[str, object] = {"ca": o.ca, "profile": o.profile, "sans": sorted(o.sans)}
        return asked | ({"cn": o.cn} if o.cn else {})

    def _seconds_until_renewal(self, cert: x509.Certificate | None = None) -> float:
        """Seconds until `cert` (by default the current certificate) is due (renew_at of its
        lifetime, minus jitter), counting its lifetime from when it arrived; 0 without one."""
        cert = cert or self._current()
        if cert is None:
            return 0.0
        start = self._issued_at or self._issued(cert)
        lifetime = (cert.not_valid_after_utc - start).total_seconds()
        share = self.options.renew_at - random.uniform(0, JITTER)  # noqa: S311 (spreading, not secrecy)
        due = start + timedelta(seconds=lifetime * max(share, 0.01))
        return max(0.0, (due - datetime.now(UTC)).total_seconds())

    @staticmethod
    def _issued(cert: x509.Certificate) -> datetime:
        """When `cert` was issued, for a certificate this run did not get (kmsgate backdates
        not_before by `BACKDATE`)."""
        return min(cert.not_valid_before_utc + BACKDATE, cert.not_valid_after_utc)

    def _retry_cap(self) -> float:
        """The longest wait before trying again: half of what the certificate on disk has
        left; once it has ended, a quarter of its lifetime (between the first and the
        largest backoff), so that a workload with short-lived certificates gets one soon
        after the gateway is back."""
        cert = self._on_disk()
        if cert is None:
            return MAX_BACKOFF_SECONDS
        end = cert.not_valid_after_utc
        left = (end - datetime.now(UTC)).total_seconds()
        if left > 0:
            return max(0.1, left / 2)
        lifetime = (end - (self._issued_at or self._issued(cert))).total_seconds()
        return min(max(lifetime / 4, FIRST_BACKOFF_SECONDS), MAX_BACKOFF_SECONDS)

    def _path(self, name: str) -> Path:
        return self.options.directory / name

    def _after_swap(self) -> None:
        """Run `on_renew` (its failure is logged, not fatal: the files are in place). It is
        stopped (`_end`) once `stop` is set, so that the agent stops promptly, or after
        `ON_RENEW_SECONDS`."""
        if not self.options.on_renew:
            return
        try:
            command = shlex.split(self.options.on_renew)  # the operator's own command line
            # a process group of its own: stopping it stops what it started (`sh -c '...'`)
            hook = subprocess.Popen(command, start_new_session=True)  # noqa: S603
        except OSError as exc:
            log.warning("on-renew command failed: %s", exc)
            return
        deadline = time.monotonic() + ON_RENEW_SECONDS
        while (code := hook.poll()) is None:
            if self.stop.wait(ON_RENEW_POLL_SECONDS) or time.monotonic() > deadline:
                why = "the agent is stopping" if self.stop.is_set() else "it ran too long"
                log.warning("on-renew command stopped: %s", why)
                _end(hook)
                return
        if code != 0:
            log.warning("on-renew command exited with %d", code)


def _end(hook: subprocess.Popen[bytes]) -> None:
    """Stop `hook` (not yet waited for) and its process group: SIGTERM, then SIGKILL to
    what is left of the group (the command or what it started) after
    `ON_RENEW_GRACE_SECONDS`."""
    deadline = time.monotonic() + ON_RENEW_GRACE_SECONDS
    with contextlib.suppress(ProcessLookupError):
        os.killpg(hook.pid, signal.SIGTERM)
    # `poll` reaps the command once it ends: a zombie would keep the group alive
    while (hook.poll() is None or _group_alive(hook.pid)) and time.monotonic() < deadline:
        time.sleep(ON_RENEW_POLL_SECONDS)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(hook.pid, signal.SIGKILL)
    hook.wait()


def _group_alive(group: int) -> bool:
    """Whether process group `group` has a member left."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
