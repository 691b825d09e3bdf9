"""Key and certificate files that are replaced while others read them (the gateway's own
TLS certificate, the agent's workload certificate)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from kmsgate.files import write_new

__all__ = [
    "CURRENT",
    "LOCK",
    "NotLinked",
    "asked_before",
    "check_lock",
    "replace_private_file",
    "replace_private_files",
]

CURRENT = "..data"
"""The symlink, in a directory `replace_private_files` keeps, to the current set's own
directory."""
LOCK = "..lock"
"""In a directory `replace_private_files` keeps, the file its writers take turns on (an
exclusive flock): two agents on one directory never remove the set the other one has just
made current."""
LOCK_WAIT_SECONDS = 10.0
"""How long a writer waits for another one's `LOCK` (a replacement takes milliseconds)."""
_LOCK_POLL_SECONDS = 0.05
_SET_ID_BYTES = 8
_SET_NAME = re.compile(rf"\.\.[0-9a-f]{{{2 * _SET_ID_BYTES}}}")
"""A set's own directory: `..` and a random hexadecimal id."""


def asked_before(record: Path) -> object:
    """What a certificate kept here was asked for, as the JSON file `record` beside it says
    (CA, profile, names, ...); None if it says nothing (an older writer, a cut-short write):
    a certificate asked for with other options is replaced, not renewed."""
    try:
        return json.loads(record.read_bytes())
    except (OSError, ValueError):
        return None


def replace_private_file(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (mode 0600; the directory is made 0700 if missing): a
    reader sees the old file or the new one, never a part (temporary file, fsync, rename).
    Raises OSError, leaving no temporary file behind."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write_new(temporary, data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def replace_private_files(directory: Path, files: Mapping[str, bytes]) -> None:
    """Replace the files `files` names in `directory` as one set (0600 each; the directory
    is made 0700 if missing). The set is written to a new hidden directory of its own, then
    `CURRENT`, a symlink to it, switches to it in one rename; each name is a symlink through
    `CURRENT`. A reader that resolves `CURRENT` once reads one set, never a new key with an
    old certificate; the set before stays until the next replacement, so a reader that
    resolved it just before the switch can still read it. Writers of one directory take
    turns (`LOCK`: another agent's replacement is waited for, `LOCK_WAIT_SECONDS` at most).
    Raises NotLinked (an OSError, naming the first failure) if the new set is current but a
    link to it or the removal of older sets failed (every other name is linked, and older
    sets removed, all the same); any other OSError leaves the current set as it was."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _writing(directory):
        current = directory / CURRENT
        previous = os.readlink(current) if current.is_symlink() else None
        version = directory / f"..{secrets.token_hex(_SET_ID_BYTES)}"
        version.mkdir(mode=0o700)
        try:
            for name, data in files.items():
                write_new(version / name, data)
            _fsync_directory(version)
            _point(current, version.name)
        except BaseException:
            shutil.rmtree(version, ignore_errors=True)
            raise
        # every name is tried and older sets go whatever failed: one name in the way must
        # not leave the others on the old set, nor the directory filling with sets
        failed = [exc for name in files if (exc := _link(directory, name)) is not None]
        kept = {CURRENT, version.name, previous}
        try:
            for entry in directory.iterdir():  # only sets of ours: no other `..name`
                if _SET_NAME.fullmatch(entry.name) and entry.name not in kept:
                    shutil.rmtree(entry, ignore_errors=True)
            _fsync_directory(directory)
        except OSError as exc:
            failed.append(exc)
        if failed:
            first = failed[0]
            raise NotLinked(first.errno, first.strerror, first.filename) from first


def _link(directory: Path, name: str) -> OSError | None:
    """Make `name` in `directory` a symlink through `CURRENT` (also replacing an older
    agent's file); the OSError if that failed, else None."""
    link = directory / name
    try:
        if not link.is_symlink() or os.readlink(link) != f"{CURRENT}/{name}":
            _point(link, f"{CURRENT}/{name}")
    except OSError as exc:
        return exc
    return None


class NotLinked(OSError):
    """`replace_private_files` made the new set current, but a name's link to it (or the
    removal of older sets) failed: `CURRENT` holds the new set, a name may still lead to
    the old one or to nothing."""


def check_lock(directory: Path) -> None:
    """Raises OSError if `replace_private_files` could not take `directory`'s `LOCK` now: it
    cannot be opened for writing (another user's, immutable, a read-only file system), or
    another writer has held it for over `LOCK_WAIT_SECONDS`."""
    with _writing(directory):
        pass


def _open_lock(directory: Path) -> int:
    # never through a link planted there: it would make the file it points to
    return os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


@contextlib.contextmanager
def _writing(directory: Path) -> Iterator[None]:
    """Hold `directory`'s `LOCK`, once another writer has let it go (a writer that dies lets
    it go with its process). Raises OSError, also (EAGAIN) when it is held for over
    `LOCK_WAIT_SECONDS`."""
    fd = _open_lock(directory)
    try:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # not a blocking wait: a signal (SIGTERM) must get through
                if time.monotonic() > deadline:
                    held = f"held by another writer for over {LOCK_WAIT_SECONDS:g} s"
                    raise OSError(errno.EAGAIN, held, str(directory / LOCK)) from None
                time.sleep(_LOCK_POLL_SECONDS)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the flock


def _point(link: Path, target: str) -> None:
    """Make `link` a symlink to `target` in one rename (whatever `link` was). Raises
    OSError naming `link` (not the temporary link renamed over it)."""
    temporary = link.with_name(f".{link.name}.{secrets.token_hex(4)}.tmp")
    os.symlink(target, temporary)
    try:
        os.replace(temporary, link)
    except BaseException as exc:
        temporary.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror, str(link)) from exc
        raise


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
