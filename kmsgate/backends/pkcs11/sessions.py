"""The connection to a token: the login, the pool of worker sessions with their caches of key
objects, and running operations on them, with python-pkcs11's errors classified (token gone,
stale handle, missing key, bad ciphertext) and turned into kmsgate errors."""

from __future__ import annotations

import hmac
import logging
import math
import os
import queue
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Literal, TypeVar

from pkcs11 import Attribute
from pkcs11 import exceptions as p11e

from kmsgate.backends.base import BackendKey, BackendStatus
from kmsgate.backends.pkcs11.keys import _key_template, _parse_ref
from kmsgate.backends.pkcs11.module import _Gone, _module, _Unloadable
from kmsgate.backends.pkcs11.refusals import (
    TURN_SECONDS,
    LoginTurnTimeout,
    PinRefusals,
    pin_file_identity,
)
from kmsgate.backends.pkcs11.settings import Pkcs11Settings, _read_pin_file
from kmsgate.errors import (
    BackendError,
    BackendUnavailable,
    DecryptionFailed,
    KeyDestroyed,
    KmsgateError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
REFRESH_INTERVAL = 1.0
"""Seconds between re-initialisations of a module to look again for a missing key object."""
SEVERAL_OBJECTS = "the key reference matches several objects on the token"
MISSING = "the key object behind this key version is not on the token"


class _MissingKey(p11e.NoSuchKey):
    """No object matches the key reference `ref` (on a token that answers)."""

    def __init__(self, ref: str) -> None:
        super().__init__("no object matches the key reference")
        self.ref = ref


PUBLIC_OBJECT = (
    "the token's object for this key version is public (CKA_PRIVATE false): any program "
    "reaching the token can use it without the PIN, so it is not used; copy it as a "
    "private object and delete the public one (docs/backends/pkcs11.md)"
)

_NOT_RETRIED = (
    "the token rejected the configured PIN; not retried until the PIN or the token changes"
)


@dataclass(eq=False)
class _Worker:
    """One worker session and the key objects found through it."""

    session: Any
    keys: dict[str, Any] = field(default_factory=dict)
    """ref -> its private or secret key object, bound to `session`."""


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
            worker.keys.pop(ref, None)


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


class _SessionPool:
    """One backend's connection to its token: one login, `sessions` worker sessions (each with
    its own cache of object handles), and operations run on them with the module lock held.
    Thread-safe.

    To scale, run several worker processes: each loads the module and logs in itself (opening
    the token and C_Login are retried briefly: SoftHSM's file store answers GeneralError, or
    hides the token for a moment, when processes open it at the same moment).

    A wrong PIN is a 502 `backend_error`; the same PIN is not tried again on the same token
    (so a real HSM does not lock the user out) until the PIN source or the token changes. A
    token or module that has gone (removed, deleted, device error) is a 503
    `backend_unavailable`; the connection is dropped and re-opened lazily on a later call
    (the module is re-initialised when the token cannot be found, as SoftHSM only sees tokens
    created by other processes after C_Initialize). Between attempts, calls fail fast for
    `retry_interval` seconds. An operation that failed because the connection went stale is
    retried once on a fresh connection (key generation and destruction are not retried).
    """

    def __init__(self, backend: str, settings: Pkcs11Settings) -> None:
        self.name = backend
        self.settings = settings
        self._module = _module(settings.module)
        self._conn: _Connection | None = None
        self._down_until = 0.0
        self._unloadable = False
        """Whether the last attempt failed to load the module itself."""
        self._pin_key = secrets.token_bytes(32)
        self._bad_pin: bytes | None = None
        """HMAC of (token serial, PIN) the token rejected: not tried again."""
        self._missing: set[str] = set()
        """Key references still not found after a re-initialisation: kmsgate never makes a
        reference again, so they are answered KeyDestroyed at once, without re-initialising
        the module (which ends every session of every backend on it) once a second."""
        self.refusals = PinRefusals(backend)
        """The refusals of the PIN file, shared by the gateway's processes once it has a
        data dir (`keep_in`)."""

    def _retry_after(self) -> int:
        return max(1, math.ceil(self.settings.retry_interval))

    def _unavailable(self) -> BackendUnavailable:
        return BackendUnavailable(
            f"backend {self.name!r} is {self._down()}", retry_after=self._retry_after()
        )

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
                self._unloadable = isinstance(exc, _Unloadable)
                log.warning("pkcs11 backend %r unavailable: %s", self.name, exc)
                raise self._unavailable() from None
            except BackendError as exc:
                log.error("pkcs11 backend %r: %s", self.name, exc.detail)
                raise
            self._conn = conn
            self._down_until = 0.0
            self._unloadable = False
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

    def _pin(self) -> tuple[str, bytes | None]:
        """The PIN, read again from its source, and the identity of the PIN file it came
        from (None for a variable). Raises BackendError saying only that it could not be
        read: where and why go to the log (readiness is public, and API callers have no
        business with the gateway's files)."""
        try:
            if self.settings.pin_file is not None:
                pin, st = _read_pin_file(self.settings.pin_file, BackendError)
                return pin, pin_file_identity(st)
            assert self.settings.pin_env is not None
            value = os.environ.get(self.settings.pin_env)
            if not value:
                raise BackendError(f"environment variable {self.settings.pin_env} is not set")
            return value, None
        except BackendError as exc:
            log.warning("pkcs11 %s: %s", self.name, exc.detail)
            raise BackendError("the PIN could not be read (the gateway's log says why)") from None

    def _log_in(self, token: Any) -> _Connection:
        serial: bytes = token.serial
        try:
            with self.refusals.turn():  # the PIN is read in turn: its file may change meanwhile
                pin, identity = self._pin()
                fingerprint = hmac.digest(self._pin_key, serial + b"\x00" + pin.encode(), "sha256")
                if self._bad_pin is not None and hmac.compare_digest(self._bad_pin, fingerprint):
                    raise BackendError(_NOT_RETRIED)
                if self.refusals.refused(serial, identity):  # by another process of the gateway
                    self._bad_pin = fingerprint
                    log.warning(
                        "pkcs11 %s: the token refused this PIN file before; it is not tried "
                        "again until it changes (if the token's PIN was changed to it, delete %s)",
                        self.name,
                        self.refusals.mark,
                    )
                    raise BackendError(_NOT_RETRIED)
                ours = hmac.digest(self._module.pin_key, serial + b"\x00" + pin.encode(), "sha256")
                login = self._log_in_once(token, pin, serial, ours, fingerprint, identity)
        except LoginTurnTimeout:
            raise _Gone(
                f"another process of the gateway has been logging in for {TURN_SECONDS:g} s"
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

    def _log_in_once(
        self,
        token: Any,
        pin: str,
        serial: bytes,
        ours: bytes,
        fingerprint: bytes,
        identity: bytes | None,
    ) -> Any:
        """C_Login with `pin` (in a session of its own); None when the token was logged in
        already with this PIN by another backend of this process. A refused PIN is
        remembered (`_bad_pin`, `refusals`). Raises BackendError."""
        login = None
        try:
            login = token.open(rw=True, user_pin=pin)
            self._module.logins[serial] = ours
        except p11e.UserAlreadyLoggedIn:
            # another backend in this process is logged in to this token: login state
            # belongs to the application, so our sessions are logged in too. (The session
            # python-pkcs11 opened for the refused C_Login stays open.) Our PIN was not
            # checked by the token: it must be the one that logged in.
            theirs = self._module.logins.get(serial)
            if theirs is None or not hmac.compare_digest(theirs, ours):
                self._bad_pin = fingerprint  # not tried again (each try leaves a session)
                raise BackendError(
                    "the token is logged in already with another PIN, or by a session this "
                    "gateway does not know, so this backend's PIN was never checked: give "
                    "every backend on one token its PIN"
                ) from None
        except _PIN_ERRORS as exc:
            self._bad_pin = fingerprint
            self.refusals.record(serial, identity)
            raise BackendError(
                f"the token rejected the configured PIN ({type(exc).__name__})"
            ) from None
        self.refusals.forget()
        return login

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
            try:
                conn.login.close()  # C_Logout, then C_CloseSession
            except p11e.PKCS11Error:
                return  # still logged in, maybe: the PIN that logged in stays on record
            self._module.logins.pop(conn.serial, None)

    def _healthy(self, conn: _Connection) -> bool:
        """Whether `conn`'s token still answers and is the same token (serial)."""
        try:
            token = conn.token.slot.get_token()
        except p11e.PKCS11Error:
            return False
        return bool(token.serial == conn.serial)

    def call(
        self,
        what: str,
        op: Callable[[_Connection, _Worker], T],
        *,
        retry: bool = True,
        decrypting: bool = False,
        refresh_after: float = REFRESH_INTERVAL,
    ) -> T:
        """Run `op` on a worker session with the module lock held, mapping token errors.

        A stale connection is re-opened and `op` retried once (if `retry`). A key object
        not found makes the module re-initialise, if it was initialised more than
        `refresh_after` seconds ago (another process may have made the object since), and
        `op` run once more on fresh sessions, whatever `retry` says (nothing was done).
        Raises BackendUnavailable, BackendError, KeyDestroyed, DecryptionFailed (if
        `decrypting`), or the KmsgateError `op` raised.
        """
        failures = 0
        stale = 0
        refresh: float | None = refresh_after
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
                    if_exhausted = self._settle(conn, worker, what, exc, decrypting, refresh)
            if if_exhausted is None:  # re-initialised: look again, once
                refresh = None
                continue
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
        refresh: float | None,
    ) -> KmsgateError | None:
        """React to a failed call (lock held): raise the final error, or prepare a retry and
        return the error to raise if none is left; None: the module was re-initialised to
        look for a missing key object again (`refresh`: as in `call`, None once done)."""
        verdict = self._classify(conn, exc, decrypting)
        log.debug("pkcs11 backend %r: %s: %s -> %s", self.name, what, type(exc).__name__, verdict)
        if verdict == "decrypt":
            raise DecryptionFailed() from None
        if verdict == "missing":  # no object matches on a token that answers
            if refresh is not None and self._refresh(conn, refresh):
                return None
            if refresh is None and isinstance(exc, _MissingKey):  # looked again: gone
                self._missing.add(exc.ref)
            raise KeyDestroyed(MISSING)
        if verdict == "error":
            log.warning("pkcs11 backend %r: %s failed: %s", self.name, what, type(exc).__name__)
            raise BackendError(f"the HSM failed to {what}") from None
        if verdict == "stale-handle":
            worker.keys.clear()  # found again on the retry, or reported missing
            return BackendError("the token keeps refusing the key's object handle")
        if verdict == "transient":
            return BackendError(f"the HSM failed to {what}")
        log.warning(
            "pkcs11 backend %r: token lost during %s (%s)", self.name, what, type(exc).__name__
        )
        self._drop(conn)
        return self._unavailable()

    def _refresh(self, conn: _Connection, older_than: float) -> bool:
        """Re-initialise the module (lock held) unless that was done in the last
        `older_than` seconds, and drop `conn` (every session of the module has ended).
        Returns whether it did. Raises BackendUnavailable."""
        try:
            if not self._module.refresh(older_than):
                return False
        except _Gone as exc:
            log.warning("pkcs11 backend %r unavailable: %s", self.name, exc)
            self._drop(conn)
            raise self._unavailable() from None
        log.info("pkcs11 backend %r: a key object was not found; looking again", self.name)
        self._drop(conn)
        return True

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

    def key_object(
        self, conn: _Connection, worker: _Worker, key: BackendKey, check: Callable[[Any], None]
    ) -> Any:
        """The private or secret key object of `key` (`_key_template`), found once per worker
        session and passed to `check` (which raises to refuse it) before its first use.
        Raises BackendError (several objects match, or only a public one: `PUBLIC_OBJECT`,
        such as a key adopted before only private keys were), KeyDestroyed (a reference
        found missing after a re-initialisation already), what `check` raises,
        python-pkcs11 errors (NoSuchKey)."""
        cached = worker.keys.get(key.ref)
        if cached is not None:
            return cached
        if key.ref in self._missing:
            raise KeyDestroyed(MISSING)
        parsed = _parse_ref(key.ref)
        if parsed.token is not None and parsed.token != conn.label:
            raise BackendError(
                f"the key reference names token {parsed.token!r}; this backend uses {conn.label!r}"
            )
        template = _key_template(key)
        found = find_objects(worker.session, template)
        if not found:
            if find_objects(worker.session, {**template, Attribute.PRIVATE: False}):
                raise BackendError(PUBLIC_OBJECT)
            raise _MissingKey(key.ref)
        if len(found) > 1:
            raise BackendError(SEVERAL_OBJECTS)
        check(found[0])
        worker.keys[key.ref] = found[0]
        return found[0]

    def status(self) -> BackendStatus:
        try:
            conn = self._connection()
            with self._module.lock:
                if not conn.dead and self._module.current(conn.generation):
                    if self._healthy(conn):
                        return BackendStatus(True, f"ok (token {conn.label!r})")
                    self._drop(conn)
                    return BackendStatus(False, self._down())
            return BackendStatus(True, f"ok (re-opening token {self._token_description()})")
        except BackendUnavailable:
            return BackendStatus(False, self._down())
        except BackendError as exc:
            return BackendStatus(False, exc.detail)

    def _down(self) -> str:
        """The readiness detail of a token that cannot be reached (the backend's name is
        the key it is reported under)."""
        if self._unloadable:
            return "unavailable: its module cannot be loaded as a PKCS#11 library"
        return f"unavailable (token {self._token_description()})"

    def close(self) -> None:
        with self._module.lock:
            conn = self._conn
            if conn is not None:
                self._drop(conn)


def find_objects(session: Any, template: dict[Attribute, Any]) -> list[Any]:
    """The first two objects of `session` matching `template`. The search is closed
    (C_FindObjectsFinal) here, on this thread, whatever happens: a search left open keeps
    the session busy (OperationActive) and holds python-pkcs11's session lock until the
    garbage collector ends it, maybe on another thread, which cannot release that lock.
    Raises python-pkcs11 errors."""
    search = session.get_objects(template)
    try:
        return list(islice(search, 2))
    finally:
        search.close()


def _close_quietly(session: Any) -> None:
    with suppress(p11e.PKCS11Error):
        session.close()
