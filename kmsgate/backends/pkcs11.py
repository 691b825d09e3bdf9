"""pkcs11: keys generated and held by a PKCS#11 token (an HSM; SoftHSM2 in the tests).

Configuration (config file or `KMSGATE_BACKENDS__<NAME>__*`, never a request)::

    hsm:
      type: pkcs11
      module: /usr/lib/softhsm/libsofthsm2.so   # absolute, must match `allowed_modules`
      token: kmsgate                            # token label, and/or token_serial
      pin_file: /etc/kmsgate/hsm.pin            # or pin_env: HSM_PIN (exactly one)
      sessions: 1                               # worker sessions (1 = serialised)

Keys are generated on the token (CKA_TOKEN, CKA_SENSITIVE, not extractable, a label
`<name>.v<version>` and a random 16-byte CKA_ID) and referenced by RFC 7512 URIs
(`pkcs11:token=kmsgate;object=k.v1;id=%8F...;type=private`), so `BackendKey.material` is
None: nothing secret leaves the token. Operations:

- ECDSA P-256/P-384: the message is hashed in software and signed with CKM_ECDSA (SoftHSM
  has no CKM_ECDSA_SHA256); the raw r||s is returned as DER.
- RSA-3072/4096: CKM_RSA_PKCS_PSS over the digest (MGF1 with the message hash, salt = hash
  length) or CKM_RSA_PKCS over a DigestInfo (PKCS#1 v1.5).
- Ed25519: CKM_EDDSA, where the token offers it (else 501 not_supported).
- HMAC: generic secret keys with CKM_SHA{256,384,512}_HMAC.
- AES-256-GCM (`wrap`/`unwrap` for envelope encryption): CKM_AES_GCM with a random 96-bit
  nonce and the AAD; output `nonce || ciphertext || tag`.

Concurrency. python-pkcs11 calls `C_Initialize(NULL)`, which tells the module that the
application will not call it from several threads at once (SoftHSM then turns its mutexes
off, and concurrent calls fail at random). So every call into a module holds that module's
lock (`_Module.lock`, one per loaded module in the process, shared by every backend that uses
it). The backend logs in once (one long-lived login session) and runs operations on `sessions`
worker sessions, each with its own cache of object handles. To scale, run several worker
processes: each loads the module and logs in itself (opening the token and C_Login are
retried briefly: SoftHSM's file store answers GeneralError, or hides the token for a moment,
when processes open it at the same moment). A process forked after C_Initialize initialises
the module again before its first call.

Failures. A wrong PIN is a 502 `backend_error`; the same PIN is not tried again on the same
token (so a real HSM does not lock the user out) until the PIN source or the token changes.
A token or module that has gone (removed, deleted, device error) is a 503
`backend_unavailable`; the connection is dropped and re-opened lazily on a later call (the
module is re-initialised when the token cannot be found, as SoftHSM only sees tokens created
by other processes after C_Initialize). Between attempts, calls fail fast for
`retry_interval` seconds. An operation that failed because the connection went stale is
retried once on a fresh connection (key generation and destruction are not retried).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import queue
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Literal, TypeVar

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import MGF, Attribute, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import KeyType as P11KeyType
from pkcs11 import exceptions as p11e
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kmsgate.algorithms import (
    HashName,
    KeyType,
    KeyUsage,
    Scheme,
    SignAlg,
    mac_algorithm,
    sign_algorithm,
    verify_with_public_key,
)
from kmsgate.backends.base import (
    AdoptCapable,
    BackendKey,
    BackendStatus,
    KeyBackend,
    KeySpec,
    MacCapable,
    SignMessage,
    WrapCapable,
)
from kmsgate.config import BackendSettings
from kmsgate.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    DecryptionFailed,
    InvalidRequest,
    KmsgateError,
    NotFound,
    NotSupported,
)
from kmsgate.uri import Pkcs11Uri

__all__ = ["DEFAULT_ALLOWED_MODULES", "Pkcs11Backend", "Pkcs11Settings"]

log = logging.getLogger(__name__)
T = TypeVar("T")

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
_NONCE_BYTES = 12
_TAG_BYTES = 16
_ID_BYTES = 16
_BATCH_CHUNK = 32
"""Batch signs hold the module lock for at most this many signatures at a time."""


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


class Pkcs11Settings(BaseModel):
    """The `pkcs11` backend's config entry."""

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


def _read_pin_file(path: Path, error: type[Exception]) -> str:
    """The PIN in `path` (trailing newline removed). Raises `error`; never shows the PIN."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read PIN file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise error(f"PIN file {path} must not be accessible by group or others")
    try:
        pin = data.decode("utf-8").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise error(f"PIN file {path} is not UTF-8") from None
    if not pin or "\n" in pin:
        raise error(f"PIN file {path} must hold the PIN on one line")
    return pin


# --------------------------------------------------------------------------------------------
# the module, shared by every backend in the process
# --------------------------------------------------------------------------------------------


class _Gone(Exception):
    """The module or the token cannot be reached (mapped to BackendUnavailable)."""


class _Module:
    """One PKCS#11 module loaded in this process. Every call into it holds `lock`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.generation = 0
        """Bumped on every (re)initialisation: handles of older generations are dead."""
        self._lib: Any = None
        self._pid = 0

    def lib(self) -> Any:
        """The initialised library (lock held). Raises _Gone."""
        if self._lib is not None and self._pid != os.getpid():
            self.reinitialize()  # forked after C_Initialize: the child starts over
        if self._lib is None:
            try:
                self._lib = pkcs11.lib(self.path)
            except p11e.PKCS11Error as exc:
                raise _Gone(f"cannot load the PKCS#11 module ({type(exc).__name__})") from exc
            self._pid = os.getpid()
            self.generation += 1
        elif not self._lib.initialized:
            self._initialize()
        return self._lib

    def current(self, generation: int) -> bool:
        """Whether handles made in `generation` are still valid (lock held). A process forked
        after C_Initialize must initialise the module again (PKCS#11 section 6.6.1): that
        happens here, and makes every inherited handle stale."""
        if self._lib is not None and self._pid != os.getpid():
            with suppress(_Gone):  # a failure surfaces when the caller re-opens
                self.reinitialize()
        return generation == self.generation

    def reinitialize(self) -> None:
        """C_Finalize then C_Initialize (lock held): ends every session on this module.
        Raises _Gone."""
        self.generation += 1
        if self._lib is None:
            return
        with suppress(p11e.PKCS11Error):  # not initialised, or broken: initialise below
            self._lib.finalize()
        self._initialize()

    def _initialize(self) -> None:
        self.generation += 1
        try:
            self._lib.initialize()
        except p11e.PKCS11Error as exc:
            raise _Gone(f"C_Initialize failed ({type(exc).__name__})") from exc
        self._pid = os.getpid()


_MODULES: dict[str, _Module] = {}
_MODULES_LOCK = threading.Lock()


def _module(path: str) -> _Module:
    """The process-wide `_Module` for `path` (by real path: two spellings of one library
    would otherwise be initialised twice)."""
    real = str(Path(path).resolve())
    with _MODULES_LOCK:
        module = _MODULES.get(real)
        if module is None:
            module = _MODULES[real] = _Module(real)
        return module


# --------------------------------------------------------------------------------------------
# connection: one login, worker sessions, handle caches
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    """One worker session and the key objects found through it."""

    session: Any
    keys: dict[tuple[str, int], Any] = field(default_factory=dict)
    """(ref, object class) -> python-pkcs11 key object bound to `session`."""


@dataclass(eq=False)
class _Connection:
    """A logged-in token, valid while `generation` is the module's and not `dead`."""

    generation: int
    token: Any
    label: str
    serial: bytes
    login: Any
    """The session C_Login ran on (None: this process was logged in already)."""
    workers: list[_Worker]
    mechanisms: frozenset[int]
    idle: queue.SimpleQueue[_Worker] = field(default_factory=queue.SimpleQueue)
    dead: bool = False

    def __post_init__(self) -> None:
        for worker in self.workers:
            self.idle.put(worker)

    @contextmanager
    def worker(self) -> Iterator[_Worker]:
        """An idle worker session (blocks while all are in use)."""
        taken = self.idle.get()
        try:
            yield taken
        finally:
            self.idle.put(taken)

    def forget(self, ref: str) -> None:
        for worker in self.workers:
            for key in [k for k in worker.keys if k[0] == ref]:
                worker.keys.pop(key, None)


# python-pkcs11 errors, by what they say about the connection
_GONE_ERRORS: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.DeviceError,
    p11e.DeviceMemory,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.SessionClosed,
    p11e.SessionHandleInvalid,
    p11e.SessionCount,
    p11e.SlotIDInvalid,
    p11e.UserNotLoggedIn,
    p11e.NoSuchToken,
    p11e.HostMemory,
)
"""The session, the token or the module is gone: re-open."""
_AMBIGUOUS_ERRORS: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.GeneralError,
    p11e.FunctionFailed,
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
    p11e.NoSuchKey,
)
"""Either the token is gone or the key is: decided by probing the token."""
_PIN_ERRORS: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.PinIncorrect,
    p11e.PinInvalid,
    p11e.PinLenRange,
    p11e.PinLocked,
    p11e.PinExpired,
    p11e.UserPinNotInitialized,
)
_DECRYPT_ERRORS: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.GeneralError,  # SoftHSM's answer to a wrong GCM tag
    p11e.FunctionFailed,
    p11e.EncryptedDataInvalid,
    p11e.EncryptedDataLenRange,
    p11e.DataInvalid,
    p11e.DataLenRange,
)
_ITEM_ERRORS: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.DataInvalid,
    p11e.DataLenRange,
    p11e.MechanismInvalid,
    p11e.MechanismParamInvalid,
    p11e.KeyTypeInconsistent,
)
"""Errors that concern one batch item only."""


# --------------------------------------------------------------------------------------------
# key types and signature encodings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Kind:
    """How one kmsgate key type lives on a token."""

    p11_type: P11KeyType
    object_class: ObjectClass
    bits: int | None
    """RSA modulus or secret key length in bits."""
    curve: str | None
    """Named curve (EC) or OID (Edwards) of CKA_EC_PARAMS."""
    mechanisms: frozenset[Mechanism]
    """What the token must offer to create and use such a key."""

    @property
    def uri_type(self) -> str:
        return "private" if self.object_class == ObjectClass.PRIVATE_KEY else "secret-key"


_PRIVATE, _SECRET = ObjectClass.PRIVATE_KEY, ObjectClass.SECRET_KEY
_EC_GEN = {Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA}
_RSA_GEN = {Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.RSA_PKCS_PSS, Mechanism.RSA_PKCS}
_KINDS: dict[KeyType, _Kind] = {
    KeyType.ED25519: _Kind(
        P11KeyType.EC_EDWARDS,
        _PRIVATE,
        None,
        "1.3.101.112",
        frozenset({Mechanism.EC_EDWARDS_KEY_PAIR_GEN, Mechanism.EDDSA}),
    ),
    KeyType.ECDSA_P256: _Kind(P11KeyType.EC, _PRIVATE, None, "secp256r1", frozenset(_EC_GEN)),
    KeyType.ECDSA_P384: _Kind(P11KeyType.EC, _PRIVATE, None, "secp384r1", frozenset(_EC_GEN)),
    KeyType.RSA_3072: _Kind(P11KeyType.RSA, _PRIVATE, 3072, None, frozenset(_RSA_GEN)),
    KeyType.RSA_4096: _Kind(P11KeyType.RSA, _PRIVATE, 4096, None, frozenset(_RSA_GEN)),
    KeyType.HMAC_SHA256: _Kind(
        P11KeyType.GENERIC_SECRET,
        _SECRET,
        256,
        None,
        frozenset({Mechanism.GENERIC_SECRET_KEY_GEN, Mechanism.SHA256_HMAC}),
    ),
    KeyType.HMAC_SHA384: _Kind(
        P11KeyType.GENERIC_SECRET,
        _SECRET,
        384,
        None,
        frozenset({Mechanism.GENERIC_SECRET_KEY_GEN, Mechanism.SHA384_HMAC}),
    ),
    KeyType.HMAC_SHA512: _Kind(
        P11KeyType.GENERIC_SECRET,
        _SECRET,
        512,
        None,
        frozenset({Mechanism.GENERIC_SECRET_KEY_GEN, Mechanism.SHA512_HMAC}),
    ),
    KeyType.AES_256_GCM: _Kind(
        P11KeyType.AES,
        _SECRET,
        256,
        None,
        frozenset({Mechanism.AES_KEY_GEN, Mechanism.AES_GCM}),
    ),
}
_HMAC_KEY_TYPES = frozenset(
    {
        P11KeyType.GENERIC_SECRET,
        P11KeyType.SHA256_HMAC,
        P11KeyType.SHA384_HMAC,
        P11KeyType.SHA512_HMAC,
    }
)
_HMAC_MECHANISMS = {
    HashName.SHA256: Mechanism.SHA256_HMAC,
    HashName.SHA384: Mechanism.SHA384_HMAC,
    HashName.SHA512: Mechanism.SHA512_HMAC,
}
_PSS_HASHES = {
    HashName.SHA256: (Mechanism.SHA256, MGF.SHA256),
    HashName.SHA384: (Mechanism.SHA384, MGF.SHA384),
    HashName.SHA512: (Mechanism.SHA512, MGF.SHA512),
}
# DER DigestInfo prefixes of RFC 8017 section 9.2, note 1.
_DIGEST_INFO = {
    HashName.SHA256: bytes.fromhex("3031300d060960864801650304020105000420"),
    HashName.SHA384: bytes.fromhex("3041300d060960864801650304020205000430"),
    HashName.SHA512: bytes.fromhex("3051300d060960864801650304020305000440"),
}
_EC_CURVES: dict[KeyType, tuple[ec.EllipticCurve, int]] = {
    KeyType.ECDSA_P256: (ec.SECP256R1(), 32),
    KeyType.ECDSA_P384: (ec.SECP384R1(), 48),
}
# CKA_EC_PARAMS of Ed25519: the OID 1.3.101.112 or the PrintableString "edwards25519".
_ED25519_PARAMS = (bytes.fromhex("06032b6570"), b"\x13\x0cedwards25519")


@dataclass(frozen=True, slots=True)
class _SignInput:
    """What to hand the token for one signature, and how to encode its answer."""

    mechanism: Mechanism
    param: Any
    payload: bytes
    ec_size: int = 0
    """Bytes of r (and of s) for ECDSA; 0 for other schemes."""

    def finish(self, raw: bytes) -> bytes:
        """The signature in kmsgate's encoding (ECDSA: DER). Raises BackendError."""
        if not self.ec_size:
            return raw
        if len(raw) != 2 * self.ec_size:
            raise BackendError("the token returned a malformed ECDSA signature")
        r = int.from_bytes(raw[: self.ec_size], "big")
        s = int.from_bytes(raw[self.ec_size :], "big")
        return encode_dss_signature(r, s)


def _sign_input(key_type: KeyType, alg: SignAlg, data: bytes, prehashed: bool) -> _SignInput:
    """Raises InvalidRequest if `alg` does not fit the key or the digest is malformed."""
    alg = sign_algorithm(key_type, alg.name)
    if alg.scheme is Scheme.ED25519:
        if prehashed:
            raise InvalidRequest("ed25519 signs whole messages; send 'input', not 'digest'")
        return _SignInput(Mechanism.EDDSA, None, data)
    assert alg.hash is not None
    if prehashed:
        if len(data) != alg.hash.digest_size:
            raise InvalidRequest(f"digest for {alg.name} must be {alg.hash.digest_size} bytes")
        digest = data
    else:
        digest = hashlib.new(alg.hash.value, data).digest()
    if alg.scheme is Scheme.ECDSA:
        # CKM_ECDSA signs the digest as given (truncated to the order's length if longer)
        return _SignInput(Mechanism.ECDSA, None, digest, _EC_CURVES[key_type][1])
    if alg.scheme is Scheme.RSA_PSS:
        mech, mgf = _PSS_HASHES[alg.hash]
        return _SignInput(Mechanism.RSA_PKCS_PSS, (mech, mgf, alg.hash.digest_size), digest)
    return _SignInput(Mechanism.RSA_PKCS, None, _DIGEST_INFO[alg.hash] + digest)


def _unwrap_point(value: bytes, size: int) -> bytes:
    """A CKA_EC_POINT as the raw point of `size` bytes: DER OCTET STRING or raw."""
    if len(value) == size:
        return value
    if len(value) >= 2 and value[0] == 0x04:
        length, offset = value[1], 2
        if length & 0x80:
            count = length & 0x7F
            length, offset = int.from_bytes(value[2 : 2 + count], "big"), 2 + count
        if length == size and len(value) == offset + size:
            return value[offset:]
    raise BackendError("the token returned a malformed EC point")


def _public_key(key_type: KeyType, public: Any, private: Any) -> PublicKeyTypes:
    """The public key of a pair, from the public object (or, for RSA, the private one).
    Raises BackendError (and python-pkcs11 errors)."""
    if key_type in (KeyType.RSA_3072, KeyType.RSA_4096):
        source = public if public is not None else private
        n = int.from_bytes(source[Attribute.MODULUS], "big")
        e = int.from_bytes(source[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    if public is None:
        raise BackendError("no public key object")
    if key_type is KeyType.ED25519:
        return ed25519.Ed25519PublicKey.from_public_bytes(
            _unwrap_point(public[Attribute.EC_POINT], 32)
        )
    curve, size = _EC_CURVES[key_type]
    point = _unwrap_point(public[Attribute.EC_POINT], 1 + 2 * size)
    return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)


def _pem(public: PublicKeyTypes) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@lru_cache(maxsize=4096)
def _parse_ref(ref: str) -> Pkcs11Uri:
    """A stored key reference. Raises BackendError (the catalogue holds something odd)."""
    try:
        return Pkcs11Uri.parse_key_reference(ref)
    except InvalidRequest as exc:
        raise BackendError(f"malformed pkcs11 key reference: {exc.detail}") from None


def _attr(obj: Any, attribute: Attribute) -> Any:
    """An attribute's value, or None if the object does not have or show it."""
    try:
        return obj[attribute]
    except (p11e.AttributeTypeInvalid, p11e.AttributeSensitive):
        return None


# --------------------------------------------------------------------------------------------
# the backend
# --------------------------------------------------------------------------------------------


class Pkcs11Backend(KeyBackend, MacCapable, WrapCapable, AdoptCapable):
    """Keys on one PKCS#11 token, referenced by RFC 7512 URIs. Thread-safe."""

    scheme: ClassVar[str] = "pkcs11"

    def __init__(self, name: str, settings: Pkcs11Settings) -> None:
        super().__init__(name)
        self.settings = settings
        self._module = _module(settings.module)
        self._conn: _Connection | None = None
        self._down_until = 0.0
        self._pin_key = secrets.token_bytes(32)
        self._bad_pin: bytes | None = None
        """HMAC of (token serial, PIN) the token rejected: not tried again."""

    @classmethod
    def from_config(cls, name: str, cfg: BackendSettings) -> Pkcs11Backend:
        """Check the config (module allow-listed, PIN source readable). The token is opened
        lazily on first use. Raises ConfigError."""
        return cls(name, _settings(name, cfg))

    # -- connection management (every method here runs with the module lock held) ---------

    def _retry_after(self) -> int:
        return max(1, math.ceil(self.settings.retry_interval))

    def _unavailable(self) -> BackendUnavailable:
        return BackendUnavailable("the HSM token is unavailable", retry_after=self._retry_after())

    def _connection(self) -> _Connection:
        """The live connection, opened if needed. Raises BackendUnavailable, BackendError."""
        conn = self._conn
        if conn is not None and not conn.dead:
            return conn
        with self._module.lock:
            conn = self._conn
            if conn is not None and not conn.dead:
                return conn
            if time.monotonic() < self._down_until:
                raise self._unavailable()
            try:
                conn = self._open()
            except _Gone as exc:
                self._down_until = time.monotonic() + self.settings.retry_interval
                log.warning("pkcs11 backend %r unavailable: %s", self.name, exc)
                raise self._unavailable() from None
            except BackendError as exc:
                log.error("pkcs11 backend %r: %s", self.name, exc.detail)
                raise
            self._conn = conn
            self._down_until = 0.0
            log.info("pkcs11 backend %r: logged in to token %r", self.name, conn.label)
            return conn

    def _open(self) -> _Connection:
        """Find the token, log in, open the worker sessions. Raises _Gone, BackendError.

        SoftHSM's file store is racy when several processes initialise or log in at the same
        moment: a token may then be missing from the slot list, show an empty label, or
        answer GeneralError. So GeneralError is retried `login_attempts` times and a missing
        token three times (after re-initialising the module), with a short back-off.
        """
        problem = f"no token matches {self._token_description()}"
        misses = 0
        for attempt in range(self.settings.login_attempts):
            try:
                token = self._find_token(self._module.lib())
                if token is None:
                    # SoftHSM sees tokens made (or re-made) by other processes only after
                    # C_Initialize; other backends on this module re-open their sessions.
                    self._module.reinitialize()
                    token = self._find_token(self._module.lib())
                if token is not None:
                    return self._log_in(token)
                misses += 1
                if misses >= 3:
                    break
            except p11e.GeneralError:
                problem = "the token keeps failing (GeneralError)"
            except p11e.PKCS11Error as exc:
                raise _Gone(f"cannot open the token ({type(exc).__name__})") from exc
            time.sleep(0.02 * 2**attempt)
        raise _Gone(problem)

    def _token_description(self) -> str:
        parts = []
        if self.settings.token is not None:
            parts.append(f"label {self.settings.token!r}")
        if self.settings.token_serial is not None:
            parts.append(f"serial {self.settings.token_serial!r}")
        return " and ".join(parts)

    def _find_token(self, lib: Any) -> Any:
        """The configured token, or None. Raises BackendError if several tokens match."""
        found = []
        for slot in lib.get_slots(token_present=True):
            try:
                token = slot.get_token()
            except p11e.PKCS11Error:
                continue  # one broken slot (a deleted SoftHSM token) must not hide the rest
            if self.settings.token is not None and token.label != self.settings.token:
                continue
            serial = token.serial.decode("ascii", errors="replace").strip()
            if self.settings.token_serial is not None and serial != self.settings.token_serial:
                continue
            found.append(token)
        if len(found) > 1:
            raise BackendError(f"several tokens match {self._token_description()}")
        return found[0] if found else None

    def _pin(self) -> str:
        if self.settings.pin_file is not None:
            return _read_pin_file(self.settings.pin_file, BackendError)
        assert self.settings.pin_env is not None
        pin = os.environ.get(self.settings.pin_env)
        if not pin:
            raise BackendError(f"environment variable {self.settings.pin_env} is not set")
        return pin

    def _log_in(self, token: Any) -> _Connection:
        serial: bytes = token.serial
        pin = self._pin()
        fingerprint = hmac.digest(self._pin_key, serial + b"\x00" + pin.encode(), "sha256")
        if self._bad_pin is not None and hmac.compare_digest(self._bad_pin, fingerprint):
            raise BackendError(
                "the token rejected the configured PIN; not retried until the PIN or the "
                "token changes"
            )
        login = None
        try:
            login = token.open(rw=True, user_pin=pin)
        except p11e.UserAlreadyLoggedIn:
            # another backend in this process is logged in to this token: login state
            # belongs to the application, so our sessions are logged in too. (The session
            # python-pkcs11 opened for the refused C_Login stays open.)
            pass
        except _PIN_ERRORS as exc:
            self._bad_pin = fingerprint
            raise BackendError(
                f"the token rejected the configured PIN ({type(exc).__name__})"
            ) from None
        del pin
        workers: list[_Worker] = []
        try:
            for _ in range(self.settings.sessions):
                workers.append(_Worker(token.open(rw=True)))
            mechanisms = frozenset(int(m) for m in token.slot.get_mechanisms())
        except p11e.PKCS11Error:
            for worker in workers:
                _close_quietly(worker.session)
            if login is not None:
                _close_quietly(login)
            raise
        return _Connection(
            generation=self._module.generation,
            token=token,
            label=token.label,
            serial=serial,
            login=login,
            workers=workers,
            mechanisms=mechanisms,
        )

    def _drop(self, conn: _Connection) -> None:
        """Forget `conn`; close its sessions if their handles are still this module's."""
        if self._conn is conn:
            self._conn = None
        if conn.dead:
            return
        conn.dead = True
        if conn.generation != self._module.generation:
            return  # the module was re-initialised: the handles may now name other sessions
        for worker in conn.workers:
            _close_quietly(worker.session)
        if conn.login is not None:
            _close_quietly(conn.login)  # C_Logout, then C_CloseSession

    def _healthy(self, conn: _Connection) -> bool:
        """Whether `conn`'s token still answers and is the same token (serial)."""
        try:
            token = conn.token.slot.get_token()
        except p11e.PKCS11Error:
            return False
        return bool(token.serial == conn.serial)

    # -- running operations ----------------------------------------------------------------

    def _call(
        self,
        what: str,
        op: Callable[[_Connection, _Worker], T],
        *,
        retry: bool = True,
        decrypting: bool = False,
    ) -> T:
        """Run `op` on a worker session with the module lock held, mapping token errors.

        A stale connection is re-opened and `op` retried once (if `retry`). Raises
        BackendUnavailable, BackendError, DecryptionFailed (if `decrypting`), or the
        KmsgateError `op` raised.
        """
        failures = 0
        stale = 0
        while True:
            conn = self._connection()
            with conn.worker() as worker, self._module.lock:
                if conn.dead or not self._module.current(conn.generation):
                    self._drop(conn)  # the module was re-initialised (or we were forked)
                    stale += 1
                    if stale > 3:
                        raise self._unavailable()
                    continue
                try:
                    return op(conn, worker)
                except p11e.PKCS11Error as exc:
                    if_exhausted = self._settle(conn, worker, what, exc, decrypting)
            failures += 1
            if not retry or failures > 1:
                raise if_exhausted

    def _settle(
        self,
        conn: _Connection,
        worker: _Worker,
        what: str,
        exc: p11e.PKCS11Error,
        decrypting: bool,
    ) -> KmsgateError:
        """React to a failed call (lock held): raise the final error, or prepare a retry and
        return the error to raise if none is left."""
        verdict = self._classify(conn, exc, decrypting)
        log.debug("pkcs11 backend %r: %s: %s -> %s", self.name, what, type(exc).__name__, verdict)
        if verdict == "decrypt":
            raise DecryptionFailed() from None
        if verdict == "missing":
            raise BackendError("the key is not on the token (destroyed?)") from None
        if verdict == "error":
            log.warning("pkcs11 backend %r: %s failed: %s", self.name, what, type(exc).__name__)
            raise BackendError(f"the HSM failed to {what}") from None
        if verdict == "stale-handle":
            worker.keys.clear()  # found again on the retry, or reported missing
            return BackendError("the key is not on the token (destroyed?)")
        if verdict == "transient":
            return BackendError(f"the HSM failed to {what}")
        log.warning(
            "pkcs11 backend %r: token lost during %s (%s)", self.name, what, type(exc).__name__
        )
        self._drop(conn)
        return self._unavailable()

    def _classify(
        self, conn: _Connection, exc: p11e.PKCS11Error, decrypting: bool
    ) -> Literal["gone", "stale-handle", "transient", "missing", "decrypt", "error"]:
        if isinstance(exc, _GONE_ERRORS) or type(exc) is p11e.PKCS11Error:
            return "gone"  # a bare PKCS11Error: CKR_CRYPTOKI_NOT_INITIALIZED and the like
        if isinstance(exc, _AMBIGUOUS_ERRORS) or (decrypting and isinstance(exc, _DECRYPT_ERRORS)):
            if not self._healthy(conn):
                return "gone"
            if decrypting and isinstance(exc, _DECRYPT_ERRORS):
                return "decrypt"
            if isinstance(exc, (p11e.ObjectHandleInvalid, p11e.KeyHandleInvalid)):
                return "stale-handle"
            if isinstance(exc, p11e.NoSuchKey):
                return "missing"
            return "transient"  # GeneralError on a token that answers: try once more
        return "error"

    def _object(self, conn: _Connection, worker: _Worker, ref: str, cls: ObjectClass) -> Any:
        """The key object `ref` names, found once per worker session. Raises BackendError,
        python-pkcs11 errors (NoSuchKey)."""
        cached = worker.keys.get((ref, int(cls)))
        if cached is not None:
            return cached
        parsed = _parse_ref(ref)
        if parsed.token is not None and parsed.token != conn.label:
            raise BackendError(
                f"the key reference names token {parsed.token!r}; this backend uses {conn.label!r}"
            )
        try:
            found = worker.session.get_key(object_class=cls, id=parsed.id, label=parsed.object)
        except p11e.MultipleObjectsReturned:
            raise BackendError("the key reference matches several objects") from None
        worker.keys[(ref, int(cls))] = found
        return found

    # -- KeyBackend ------------------------------------------------------------------------

    def create_key(self, spec: KeySpec) -> BackendKey:
        kind = _KINDS[spec.key_type]
        label = f"{spec.name}.v{spec.version}"
        key_id = secrets.token_bytes(_ID_BYTES)

        def generate(conn: _Connection, worker: _Worker) -> tuple[str, str | None]:
            missing = sorted(m.name for m in kind.mechanisms if int(m) not in conn.mechanisms)
            if missing:
                raise NotSupported(
                    f"the token of backend {self.name!r} cannot hold {spec.key_type} keys "
                    f"(no {', '.join(missing)})"
                )
            if kind.object_class == _SECRET:
                worker.session.generate_key(
                    kind.p11_type,
                    kind.bits,
                    id=key_id,
                    label=label,
                    store=True,
                    capabilities=MechanismFlag(0),
                    template=_secret_template(spec.key_type),
                )
                return conn.label, None
            public_template: dict[Attribute, Any] = {
                Attribute.PRIVATE: False,
                Attribute.VERIFY: True,
                Attribute.ENCRYPT: False,
                Attribute.WRAP: False,
            }
            if kind.curve is not None:
                public_template[Attribute.EC_PARAMS] = pkcs11.util.ec.encode_named_curve_parameters(
                    kind.curve
                )
            public, private = worker.session.generate_keypair(
                kind.p11_type,
                kind.bits,
                id=key_id,
                label=label,
                store=True,
                capabilities=MechanismFlag(0),
                public_template=public_template,
                private_template={
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.SIGN: True,
                    Attribute.DECRYPT: False,
                    Attribute.UNWRAP: False,
                    Attribute.DERIVE: False,
                },
            )
            try:
                return conn.label, _pem(_public_key(spec.key_type, public, private))
            except Exception:
                for obj in (private, public):
                    with suppress(p11e.PKCS11Error):
                        obj.destroy()
                raise

        token_label, pem = self._call(f"create a {spec.key_type} key", generate, retry=False)
        ref = Pkcs11Uri(
            {
                "token": token_label.encode(),
                "object": label.encode(),
                "id": key_id,
                "type": kind.uri_type.encode(),
            }
        ).format()
        return BackendKey(ref, spec.key_type, spec.name, spec.version, None, pem)

    def sign(self, key: BackendKey, data: bytes, alg: SignAlg, *, prehashed: bool) -> bytes:
        prepared = _sign_input(key.key_type, alg, data, prehashed)

        def run(conn: _Connection, worker: _Worker) -> bytes:
            private = self._object(conn, worker, key.ref, _PRIVATE)
            raw: bytes = private.sign(
                prepared.payload, mechanism=prepared.mechanism, mechanism_param=prepared.param
            )
            return raw

        return prepared.finish(self._call("sign", run))

    def sign_many(
        self, key: BackendKey, messages: Sequence[SignMessage]
    ) -> list[bytes | KmsgateError]:
        """Hash every message first, then sign chunks of `_BATCH_CHUNK` per lock hold."""
        results: list[bytes | KmsgateError] = [BackendError()] * len(messages)
        pending: list[tuple[int, _SignInput]] = []
        for index, message in enumerate(messages):
            try:
                pending.append(
                    (index, _sign_input(key.key_type, message.alg, message.data, message.prehashed))
                )
            except KmsgateError as exc:
                results[index] = exc
        for start in range(0, len(pending), _BATCH_CHUNK):
            chunk = pending[start : start + _BATCH_CHUNK]

            def run(
                conn: _Connection, worker: _Worker, chunk: list[tuple[int, _SignInput]] = chunk
            ) -> list[bytes | KmsgateError]:
                private = self._object(conn, worker, key.ref, _PRIVATE)
                signed: list[bytes | KmsgateError] = []
                for _, prepared in chunk:
                    try:
                        signed.append(
                            private.sign(
                                prepared.payload,
                                mechanism=prepared.mechanism,
                                mechanism_param=prepared.param,
                            )
                        )
                    except _ITEM_ERRORS as exc:
                        log.warning("pkcs11 backend %r: sign failed: %s", self.name, exc)
                        signed.append(BackendError("the HSM failed to sign"))
                return signed

            try:
                raws = self._call("sign", run)
            except BackendUnavailable:
                raise
            except KmsgateError as exc:
                raws = [exc] * len(chunk)
            for (index, prepared), raw in zip(chunk, raws, strict=True):
                try:
                    results[index] = raw if isinstance(raw, KmsgateError) else prepared.finish(raw)
                except KmsgateError as exc:
                    results[index] = exc
        return results

    def destroy(self, key: BackendKey) -> None:
        """Destroy the key's objects on the token (private/secret and public). Idempotent."""
        kind = _KINDS[key.key_type]
        parsed = _parse_ref(key.ref)
        template: dict[Attribute, Any] = {}
        if parsed.id is not None:
            template[Attribute.ID] = parsed.id
        if parsed.object is not None:
            template[Attribute.LABEL] = parsed.object

        def run(conn: _Connection, worker: _Worker) -> None:
            conn.forget(key.ref)
            classes = [kind.object_class]
            if kind.object_class == _PRIVATE:
                classes.append(ObjectClass.PUBLIC_KEY)
            for cls in classes:
                objects = list(worker.session.get_objects({Attribute.CLASS: cls, **template}))
                if len(objects) > 1:
                    raise BackendError("the key reference matches several objects")
                for obj in objects:
                    obj.destroy()

        self._call("destroy the key", run, retry=False)

    def status(self) -> BackendStatus:
        try:
            conn = self._connection()
            with self._module.lock:
                if not conn.dead and self._module.current(conn.generation):
                    if self._healthy(conn):
                        return BackendStatus(True, f"token {conn.label!r}")
                    self._drop(conn)
                    return BackendStatus(False, "the HSM token is unavailable")
            return BackendStatus(True, "re-opening the token")
        except BackendUnavailable:
            return BackendStatus(False, "the HSM token is unavailable")
        except BackendError as exc:
            return BackendStatus(False, exc.detail)

    def close(self) -> None:
        with self._module.lock:
            conn = self._conn
            if conn is not None:
                self._drop(conn)

    # -- MacCapable ------------------------------------------------------------------------

    def mac(self, key: BackendKey, data: bytes, hash_name: HashName) -> bytes:
        if mac_algorithm(key.key_type, None) is not hash_name:
            raise InvalidRequest(f"a {key.key_type} key cannot compute hmac-{hash_name}")
        mechanism = _HMAC_MECHANISMS[hash_name]

        def run(conn: _Connection, worker: _Worker) -> bytes:
            secret = self._object(conn, worker, key.ref, _SECRET)
            tag: bytes = secret.sign(data, mechanism=mechanism)
            return tag

        return self._call("compute a MAC", run)

    def verify_mac(self, key: BackendKey, data: bytes, mac: bytes, hash_name: HashName) -> bool:
        return hmac.compare_digest(self.mac(key, data, hash_name), mac)

    # -- WrapCapable -----------------------------------------------------------------------

    def _require_aes(self, key: BackendKey) -> None:
        if key.key_type is not KeyType.AES_256_GCM:
            raise InvalidRequest(f"a {key.key_type} key cannot encrypt or decrypt")

    def wrap(self, key: BackendKey, plaintext: bytes, aad: bytes) -> bytes:
        self._require_aes(key)
        nonce = secrets.token_bytes(_NONCE_BYTES)
        params = pkcs11.GCMParams(nonce, aad, _TAG_BYTES * 8)

        def run(conn: _Connection, worker: _Worker) -> bytes:
            secret = self._object(conn, worker, key.ref, _SECRET)
            sealed: bytes = secret.encrypt(
                plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=params
            )
            return sealed

        return nonce + self._call("encrypt", run)

    def unwrap(self, key: BackendKey, ciphertext: bytes, aad: bytes) -> bytes:
        self._require_aes(key)
        if len(ciphertext) < _NONCE_BYTES + _TAG_BYTES:
            raise DecryptionFailed()
        params = pkcs11.GCMParams(ciphertext[:_NONCE_BYTES], aad, _TAG_BYTES * 8)
        body = ciphertext[_NONCE_BYTES:]

        def run(conn: _Connection, worker: _Worker) -> bytes:
            secret = self._object(conn, worker, key.ref, _SECRET)
            plain: bytes = secret.decrypt(body, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            return plain

        return self._call("decrypt", run, decrypting=True)

    # -- AdoptCapable ----------------------------------------------------------------------

    def adopt_key(self, spec: KeySpec, uri: str) -> BackendKey:
        """Take over a key a ceremony tool made on this backend's token.

        The URI names one object (`id` and/or `object`; `token`, `serial`, `manufacturer`,
        `model` must match the configured token if given; `type` must be `private` for
        asymmetric types and `secret-key` for the others). The key must be sensitive, not
        extractable, of `spec.key_type`, and allowed to sign (or MAC, or encrypt+decrypt);
        an asymmetric key needs a public key object with the same id, which must match the
        private key (checked by signing a random challenge).
        Raises InvalidRequest, NotFound, BackendError, BackendUnavailable.
        """
        kind = _KINDS[spec.key_type]
        parsed = Pkcs11Uri.parse_key_reference(uri)
        if parsed.type is not None and parsed.type != kind.uri_type:
            raise InvalidRequest(
                f"a {spec.key_type} key is a type={kind.uri_type} object, not {parsed.type}"
            )

        def run(conn: _Connection, worker: _Worker) -> tuple[str, str | None]:
            self._check_token_attributes(conn, parsed)
            template: dict[Attribute, Any] = {Attribute.CLASS: kind.object_class}
            if parsed.id is not None:
                template[Attribute.ID] = parsed.id
            if parsed.object is not None:
                template[Attribute.LABEL] = parsed.object
            found = list(worker.session.get_objects(template))
            if not found:
                raise NotFound("no such key on the token")
            if len(found) > 1:
                raise InvalidRequest("the URI matches several keys; add 'id' or 'object'")
            obj = found[0]
            _check_adoptable(spec.key_type, kind, obj)
            key_id: bytes = _attr(obj, Attribute.ID) or b""
            label: str = _attr(obj, Attribute.LABEL) or ""
            if not key_id and not label:
                raise InvalidRequest("the key has neither a label nor an id to refer to it by")
            canonical: dict[str, bytes] = {"token": conn.label.encode()}
            exact: dict[Attribute, Any] = {Attribute.CLASS: kind.object_class}
            if label:
                canonical["object"] = label.encode()
                exact[Attribute.LABEL] = label
            if key_id:
                canonical["id"] = key_id
                exact[Attribute.ID] = key_id
            canonical["type"] = kind.uri_type.encode()
            if len(list(worker.session.get_objects(exact))) != 1:
                raise InvalidRequest("the key's label and id do not identify it uniquely")
            pem = None
            if kind.object_class == _PRIVATE:
                pem = self._adopted_public_key(worker, spec.key_type, obj, key_id)
            return Pkcs11Uri(canonical).format(), pem

        ref, pem = self._call("adopt the key", run)
        return BackendKey(ref, spec.key_type, spec.name, spec.version, None, pem)

    def _check_token_attributes(self, conn: _Connection, parsed: Pkcs11Uri) -> None:
        info = conn.token
        expected = {
            "token": conn.label,
            "serial": conn.serial.decode("ascii", errors="replace").strip(),
            "manufacturer": info.manufacturer_id,
            "model": info.model,
        }
        for name, value in expected.items():
            given = parsed.text(name)
            if given is not None and given != value:
                raise InvalidRequest(f"the URI's {name} does not match this backend's token")
        if parsed.path.keys() - {
            "token",
            "serial",
            "manufacturer",
            "model",
            "object",
            "id",
            "type",
        }:
            raise InvalidRequest(
                "only token, serial, manufacturer, model, object, id and type may select a key"
            )

    def _adopted_public_key(
        self, worker: _Worker, key_type: KeyType, private: Any, key_id: bytes
    ) -> str:
        public = None
        if key_id:
            publics = list(
                worker.session.get_objects(
                    {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: key_id}
                )
            )
            if len(publics) > 1:
                raise InvalidRequest("several public key objects share the key's id")
            public = publics[0] if publics else None
        if public is None and key_type not in (KeyType.RSA_3072, KeyType.RSA_4096):
            raise InvalidRequest("no public key object with the key's id on the token")
        try:
            public_key = _public_key(key_type, public, private)
        except (BackendError, ValueError, p11e.PKCS11Error):
            raise InvalidRequest(
                f"the public key object cannot be read as a {key_type} key"
            ) from None
        # proof of possession: the pair must match
        challenge = secrets.token_bytes(32)
        alg = sign_algorithm(key_type, None)
        prepared = _sign_input(key_type, alg, challenge, False)
        raw = private.sign(
            prepared.payload, mechanism=prepared.mechanism, mechanism_param=prepared.param
        )
        try:
            signature = prepared.finish(raw)
        except BackendError:
            signature = b""
        if not verify_with_public_key(public_key, alg, challenge, signature, prehashed=False):
            raise InvalidRequest("the public key object does not match the private key")
        return _pem(public_key)


def _secret_template(key_type: KeyType) -> dict[Attribute, Any]:
    aes = key_type is KeyType.AES_256_GCM
    return {
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.ENCRYPT: aes,
        Attribute.DECRYPT: aes,
        Attribute.SIGN: not aes,
        Attribute.VERIFY: not aes,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }


def _check_adoptable(key_type: KeyType, kind: _Kind, obj: Any) -> None:
    """Raises InvalidRequest unless `obj` is a protected key of `key_type` fit for its use."""
    p11_type = _attr(obj, Attribute.KEY_TYPE)
    if key_type.usage is KeyUsage.MAC:
        type_ok = p11_type in _HMAC_KEY_TYPES
    else:
        type_ok = p11_type == kind.p11_type
    if not type_ok:
        raise InvalidRequest(f"the key on the token is not a {key_type} key")
    if (
        _attr(obj, Attribute.SENSITIVE) is not True
        or _attr(obj, Attribute.EXTRACTABLE) is not False
    ):
        raise InvalidRequest("only sensitive, non-extractable keys can be adopted")
    if kind.p11_type == P11KeyType.RSA:
        modulus = _attr(obj, Attribute.MODULUS) or b""
        if len(modulus) * 8 != kind.bits:
            raise InvalidRequest(f"the RSA key on the token is not {kind.bits} bits")
    elif kind.curve is not None:
        params = _attr(obj, Attribute.EC_PARAMS)
        wanted = (
            _ED25519_PARAMS
            if key_type is KeyType.ED25519
            else (pkcs11.util.ec.encode_named_curve_parameters(kind.curve),)
        )
        if params not in wanted:
            raise InvalidRequest(f"the key on the token is not on the curve of {key_type}")
    else:
        length = _attr(obj, Attribute.VALUE_LEN)
        assert kind.bits is not None
        if key_type is KeyType.AES_256_GCM and length != 32:
            raise InvalidRequest("the AES key on the token is not 256 bits")
        if key_type is not KeyType.AES_256_GCM and (length is None or length * 8 < kind.bits):
            raise InvalidRequest(f"the HMAC key is shorter than {kind.bits} bits")
    if key_type is KeyType.AES_256_GCM:
        usage_ok = _attr(obj, Attribute.ENCRYPT) and _attr(obj, Attribute.DECRYPT)
    else:
        usage_ok = _attr(obj, Attribute.SIGN)
    if not usage_ok:
        raise InvalidRequest("the key on the token is not allowed to do what its type needs")


def _close_quietly(session: Any) -> None:
    with suppress(p11e.PKCS11Error):
        session.close()
