"""Large CRLs built in a child process.

cryptography builds and encodes a CRL in two calls that hold the interpreter lock for as long
as the encoding takes: 0.2-0.4 s each for 100,000 entries, during which the process answers
nothing (OCSP included). `build_crl_apart` runs `build_crl` (the one implementation) in a
child process instead. The CA key never leaves the parent, nor its backend: the child builds
with a stand-in whose `sign` sends the to-be-signed bytes back, and the parent signs them
with the real key. The entries travel as three flat arrays (pickling 100,000 objects would
hold the lock too). One child serves every build of the process, one at a time. It starts
in the background when a large CRL is first built (`ready`), which that build does not
wait for, and again after a failure.
"""

from __future__ import annotations

import array
import multiprocessing
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmsgate.algorithms import SignAlg
from kmsgate.backends.base import BackendKey, KeyBackend, KeySpec
from kmsgate.errors import BackendError, InvalidRequest, KmsgateError, NotSupported
from kmsgate.pki.crl import CrlHash, KeptEntries, RevokedEntry, build_crl
from kmsgate.pki.remote_key import RemotePrivateKey, remote_private_key

__all__ = ["APART_FROM", "build_crl_apart", "ready"]

APART_FROM = 10_000
"""Entries from which a CRL is built apart; a smaller one takes tens of milliseconds."""
TIMEOUT_SECONDS = 120.0
"""How long the parent waits for any message of the child."""
_SERIAL_BYTES = 20  # RFC 5280: at most 20 octets
_NO_REASON = 255
_FLAGS = list(x509.ReasonFlags)
_builder_lock = threading.Lock()
_builder: tuple[Any, Connection] | None = None  # (the child process, the parent's end)


@dataclass(frozen=True, slots=True)
class _Job:
    """What the child needs: the CRL's fields, the entries as flat arrays, the public half
    and the reference (no material) of the CA key."""

    issuer: bytes
    public_key: bytes
    key: BackendKey
    serials: bytes
    times: array.array[int]
    reasons: bytes
    fields: dict[str, Any]


def build_crl_apart(
    *,
    issuer: x509.Certificate,
    key: RemotePrivateKey,
    revoked: Sequence[RevokedEntry],
    number: int,
    this_update: datetime,
    next_update: datetime,
    delta_base: int | None = None,
    freshest_url: str | None = None,
    hash_alg: CrlHash | None,
) -> bytes:
    """`build_crl` with these arguments, in a child process. Raises InvalidRequest (what
    `build_crl` refuses), what the key's backend raises, and BackendError if the child
    fails, dies or stays silent for `TIMEOUT_SECONDS`."""
    job = _Job(
        issuer=issuer.public_bytes(serialization.Encoding.DER),
        public_key=key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        key=BackendKey(key.backend_key.ref, key.backend_key.key_type, "", 0),
        serials=b"".join(_serial_bytes(entry.serial) for entry in revoked),
        times=array.array("q", (int(entry.revoked_at.timestamp()) for entry in revoked)),
        reasons=bytes(_NO_REASON if e.reason is None else _FLAGS.index(e.reason) for e in revoked),
        fields={
            "number": number,
            "this_update": this_update,
            "next_update": next_update,
            "delta_base": delta_base,
            "freshest_url": freshest_url,
            "hash_alg": hash_alg,
        },
    )
    with _builder_lock:
        conn = _running_builder()[1]
        try:
            conn.send(job)
            return _serve(conn, key)
        except BaseException:
            _stop_builder()  # its state is unknown: the next build starts a fresh one
            raise


def ready() -> bool:
    """Whether the builder child is up; if not, start it in the background (a build now
    would wait for it: 0.5-2 s, the interpreter and its imports). Never waits: while a
    start is under way (it holds the lock) the answer is False."""
    if not _builder_lock.acquire(blocking=False):
        return False
    try:
        if _builder is not None and _builder[0].is_alive():
            return True
    finally:
        _builder_lock.release()
    threading.Thread(target=_start_builder, name="kmsgate-crl-builder-start", daemon=True).start()
    return False


def _start_builder() -> None:
    with _builder_lock:
        _running_builder()


def _running_builder() -> tuple[Any, Connection]:
    """The builder child, started if there is none alive; the caller holds the lock."""
    global _builder
    if _builder is not None and _builder[0].is_alive():
        return _builder
    _stop_builder()
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    child = context.Process(
        target=_child, args=(child_end,), name="kmsgate-crl-builder", daemon=True
    )
    child.start()
    child_end.close()
    _builder = (child, parent_end)
    return _builder


def _stop_builder() -> None:
    global _builder
    if _builder is None:
        return
    child, conn = _builder
    _builder = None
    conn.close()
    child.join(timeout=5)
    if child.is_alive():
        child.kill()
        child.join()


def _serve(conn: Connection, key: RemotePrivateKey) -> bytes:
    """Answer the child's signature requests until it sends the CRL."""
    failure: KmsgateError | None = None
    while True:
        if not conn.poll(TIMEOUT_SECONDS):
            raise BackendError(f"the CRL build sent nothing for {TIMEOUT_SECONDS:g} s")
        try:
            kind, *rest = conn.recv()
        except (EOFError, OSError):
            raise BackendError("the CRL build process ended without a CRL") from None
        if kind == "sign":
            data, alg, prehashed = rest
            try:
                answer: tuple[str, bytes | None] = (
                    "signature",
                    key.sign_as(data, alg, prehashed=prehashed),
                )
            except KmsgateError as exc:
                failure, answer = exc, ("refused", None)
            try:
                conn.send(answer)
            except OSError:
                raise BackendError("the CRL build process ended without a CRL") from None
        elif kind == "crl":
            return bytes(rest[0])
        else:  # "failed": what build_crl refused, or a signature the parent refused
            if failure is not None:
                raise failure
            invalid, detail = rest
            raise (InvalidRequest if invalid else BackendError)(detail)


def _serial_bytes(serial: int) -> bytes:
    if not 0 < serial < 1 << (8 * _SERIAL_BYTES):
        raise InvalidRequest(f"serial {serial} out of range (1 to 2^159 - 1)")
    return serial.to_bytes(_SERIAL_BYTES, "big")


# -- the child ----------------------------------------------------------------------------


class _AskParent(KeyBackend):
    """The stand-in's backend: a signature is made by the parent, with the real key."""

    scheme = "parent"

    def __init__(self, conn: Connection) -> None:
        super().__init__("parent")
        self._conn = conn

    def sign(self, key: BackendKey, data: bytes, alg: SignAlg, *, prehashed: bool) -> bytes:
        self._conn.send(("sign", data, alg, prehashed))
        kind, signature = self._conn.recv()
        if kind != "signature":
            raise BackendError("the CA key did not sign the CRL")
        return bytes(signature)

    def create_key(self, spec: KeySpec) -> BackendKey:
        raise NotSupported("a CRL build's stand-in key holds no keys")

    def destroy(self, key: BackendKey) -> None:
        raise NotSupported("a CRL build's stand-in key holds no keys")


def _child(conn: Connection) -> None:
    """Build the CRL of each job the parent sends, and send it (or why not), until the
    parent closes its end. Each CA's entries are kept from one build to its next, by the
    CA's name (which its renewed certificate keeps: an entry does not depend on the issuer)."""
    kept: dict[bytes, KeptEntries] = {}
    while True:
        try:
            job: _Job = conn.recv()
        except (EOFError, OSError):
            return
        try:
            public_key = serialization.load_der_public_key(job.public_key)
            key = remote_private_key(_AskParent(conn), job.key, public_key)
            issuer = x509.load_der_x509_certificate(job.issuer)
            der = build_crl(
                issuer=issuer,
                key=key,
                revoked=_entries(job),
                kept=kept.setdefault(issuer.subject.public_bytes(), KeptEntries()),
                **job.fields,
            )
            conn.send(("crl", der))
        except KmsgateError as exc:
            conn.send(("failed", isinstance(exc, InvalidRequest), exc.detail))
        except Exception as exc:  # the parent logs what the build raised, by type
            conn.send(("failed", False, f"the CRL build failed: {type(exc).__name__}"))


def _entries(job: _Job) -> list[RevokedEntry]:
    serials, reasons, size = job.serials, job.reasons, _SERIAL_BYTES
    return [
        RevokedEntry(
            int.from_bytes(serials[i * size : (i + 1) * size], "big"),
            datetime.fromtimestamp(at, UTC),
            None if reasons[i] == _NO_REASON else _FLAGS[reasons[i]],
        )
        for i, at in enumerate(job.times)
    ]
