"""The PKCS#11 modules (libraries) loaded in this process: one `_Module` per library, shared by
every backend using it, with the lock every call into the library holds and its
(re)initialisation, also after a fork."""

from __future__ import annotations

import os
import secrets
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import pkcs11
from pkcs11 import exceptions as p11e


class _Gone(Exception):
    """The module or the token cannot be reached (mapped to BackendUnavailable)."""


class _Unloadable(_Gone):
    """The module file could not be loaded as a PKCS#11 library."""


class _Module:
    """One PKCS#11 module loaded in this process. Every call into it holds `lock`.

    python-pkcs11 calls `C_Initialize(NULL)`, which tells the module that the application will
    not call it from several threads at once (SoftHSM then turns its mutexes off, and
    concurrent calls fail at random). So there is one `_Module` per loaded library in the
    process, shared by every backend that uses it, and its lock serialises every call. A
    process forked after C_Initialize initialises the module again before its first call.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.generation = 0
        """Bumped on every (re)initialisation: handles of older generations are dead."""
        self.logins: dict[bytes, bytes] = {}
        """Token serial -> HMAC (`pin_key`) of the PIN a backend of this process logged in to
        it with: login state belongs to the application, so a second backend on the same
        token is logged in already, and its own PIN is checked against this instead."""
        self.pin_key = secrets.token_bytes(32)
        self._lib: Any = None
        self._pid = 0
        self._initialized_at = 0.0

    def lib(self) -> Any:
        """The initialised library (lock held). Raises _Gone."""
        if self._lib is not None and self._pid != os.getpid():
            self.reinitialize()  # forked after C_Initialize: the child starts over
        if self._lib is None:
            try:
                self._lib = pkcs11.lib(self.path)
            except p11e.PKCS11Error as exc:
                # the loader's message names a file and a symbol, never a secret: the log has it
                raise _Unloadable(
                    f"cannot load the PKCS#11 module ({type(exc).__name__}: {exc})"
                ) from exc
            self._pid = os.getpid()
            self._initialized_at = time.monotonic()
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
        self._initialized_at = time.monotonic()

    def refresh(self, older_than: float) -> bool:
        """Re-initialise (lock held) if the module was last initialised more than
        `older_than` seconds ago: SoftHSM shows a process the objects other processes made
        since only after C_Finalize and C_Initialize. Returns whether it did. Raises _Gone."""
        if self._lib is None or time.monotonic() - self._initialized_at < older_than:
            return False
        self.reinitialize()
        return True


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
