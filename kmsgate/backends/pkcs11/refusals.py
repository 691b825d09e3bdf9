"""A PIN the token refused, remembered by every process of the gateway: a real HSM locks its
user PIN after a few wrong tries, and each worker process (and each restart) would otherwise
try the same wrong PIN once.

The record lives in the gateway's data dir (`<name>.pin-refused`) and names the PIN file as
it was (device, inode, size, times) and the token's serial, never anything derived from the
PIN: a copy of the data dir gives no one a way to test PINs offline. A PIN from an
environment variable has no such identity, so each process remembers it on its own (as it
remembers every refusal). Logins of one backend take turns across processes (`turn`), so
that two workers starting together do not both try a wrong PIN.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

__all__ = ["PinRefusals"]


class PinRefusals:
    """The refusals of backend `name`'s PIN file, shared through `directory` (none: not
    shared, `refused` is always False)."""

    def __init__(self, name: str, pin_file: Path | None) -> None:
        self._name = name
        self._pin_file = pin_file
        self._directory: Path | None = None

    def keep_in(self, directory: Path) -> None:
        """Share the refusals through `directory` (the gateway's data dir)."""
        self._directory = directory

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Hold this backend's login turn among the gateway's processes (a lock on a file in
        the directory; nothing without one, or if the file cannot be opened)."""
        fd = None
        if self._directory is not None:
            lock = self._directory / f"{self._name}.pin-login.lock"
            with suppress(OSError):
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if fd is None:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def refused(self, serial: bytes) -> bool:
        """Whether the token `serial` refused the PIN file as it is now."""
        mark = self._mark()
        identity = self._identity(serial)
        if mark is None or identity is None:
            return False
        try:
            return mark.read_text() == identity
        except OSError:
            return False

    def record(self, serial: bytes) -> None:
        """Remember that the token `serial` refused the PIN file as it is now (a failure to
        write is not an error: the process still remembers it itself)."""
        mark, identity = self._mark(), self._identity(serial)
        if mark is None or identity is None:
            return
        temporary = mark.with_name(f".{mark.name}.{os.getpid()}.tmp")
        with suppress(OSError):
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(identity)
            os.replace(temporary, mark)

    def forget(self) -> None:
        """A login succeeded: no refusal stands."""
        mark = self._mark()
        if mark is not None:
            with suppress(OSError):
                mark.unlink(missing_ok=True)

    def _mark(self) -> Path | None:
        return None if self._directory is None else self._directory / f"{self._name}.pin-refused"

    def _identity(self, serial: bytes) -> str | None:
        """The PIN file as it is now, and the token: a change to either makes a new try."""
        if self._pin_file is None:
            return None
        try:
            st = self._pin_file.stat()
        except OSError:
            return None
        facts = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        return hashlib.sha256(serial + b"\x00" + repr(facts).encode()).hexdigest()
