"""A PIN the token refused, remembered by every process of the gateway: a real HSM locks its
user PIN after a few wrong tries, and each worker process (and each restart) would otherwise
try the same wrong PIN once.

The record lives in the gateway's data dir (`<backend>.pin-refused`) and names the PIN file
the refused PIN was read from, as it was then (device, inode, size, times), and the token's
serial, never anything derived from the PIN: a copy of the data dir gives no one a way to
test PINs offline. A PIN from an environment variable has no such identity, so each process
remembers it on its own (as it remembers every refusal). Logins of one backend take turns
across processes (`turn`), so that workers starting together do not each try a wrong PIN.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

__all__ = ["LoginTurnTimeout", "PinRefusals", "pin_file_identity"]

TURN_SECONDS = 10.0
"""The longest a login waits for another process's (a hung HSM holds it)."""
_NO_FOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class LoginTurnTimeout(Exception):
    """Another process of the gateway has been logging in to the token for `TURN_SECONDS`."""


def pin_file_identity(st: os.stat_result) -> bytes:
    """What names a PIN file as it was read (a change to it makes a new try)."""
    facts = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return repr(facts).encode()


class PinRefusals:
    """The refusals of backend `name`'s PIN file, shared through a directory once `keep_in`
    gives one (until then `refused` is always False and `turn` takes no lock)."""

    def __init__(self, name: str) -> None:
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)
        if safe != name:  # two names must not share files
            safe += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
        self._stem = safe
        self._directory: Path | None = None

    def keep_in(self, directory: Path) -> None:
        """Share the refusals through `directory` (the gateway's data dir)."""
        self._directory = directory

    @property
    def mark(self) -> Path | None:
        """The file that records a refusal (delete it to have the PIN tried again)."""
        return None if self._directory is None else self._directory / f"{self._stem}.pin-refused"

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Hold this backend's login turn among the gateway's processes: a lock on a file
        in the directory; nothing without a directory, or where the file cannot be opened
        or locked (a file system without locks). Raises LoginTurnTimeout after
        `TURN_SECONDS` of waiting."""
        fd = None
        if self._directory is not None:
            lock = self._directory / f"{self._stem}.pin-login.lock"
            with suppress(OSError):
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | _NO_FOLLOW, 0o600)
        try:
            if fd is not None and not _locked(fd):
                os.close(fd)
                fd = None
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    def refused(self, serial: bytes, identity: bytes | None) -> bool:
        """Whether the token `serial` refused the PIN file `identity` names."""
        mark = self.mark
        if mark is None or identity is None:
            return False
        try:
            fd = os.open(mark, os.O_RDONLY | _NO_FOLLOW)
            with os.fdopen(fd) as file:
                return file.read() == _record(serial, identity)
        except OSError:
            return False

    def record(self, serial: bytes, identity: bytes | None) -> None:
        """Remember that the token `serial` refused the PIN file `identity` names (a failure
        to write is not an error: the process still remembers it itself)."""
        mark = self.mark
        if mark is None or identity is None:
            return
        temporary = mark.with_name(f".{mark.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_FOLLOW, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(_record(serial, identity))
            os.replace(temporary, mark)
        except OSError:
            with suppress(OSError):
                temporary.unlink()

    def forget(self) -> None:
        """A login succeeded: no refusal stands."""
        mark = self.mark
        if mark is not None:
            with suppress(OSError):
                mark.unlink(missing_ok=True)


def _record(serial: bytes, identity: bytes) -> str:
    return hashlib.sha256(serial + b"\x00" + identity).hexdigest()


def _locked(fd: int) -> bool:
    """Take the lock on `fd` within `TURN_SECONDS`; False if the file system cannot lock.
    Raises LoginTurnTimeout."""
    deadline = time.monotonic() + TURN_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise LoginTurnTimeout() from None
            time.sleep(0.02)
        except OSError:
            return False
