"""Writing files that are whole or absent: a new file synced before it is used (a key, a
passphrase), and the several output files of one operation all or nothing (a model's
signature files, a certificate and its chain)."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

__all__ = ["foreign_owner", "write_all", "write_new"]

ROOT_UID = 0


def foreign_owner(st: os.stat_result) -> str | None:
    """Why a file or directory that holds the gateway's secrets is not the gateway's to
    trust, or None: its owner must be the user the gateway runs as (the effective uid) or
    root (a mounted Kubernetes Secret). Another user could read or replace what it holds."""
    if st.st_uid in (os.geteuid(), ROOT_UID):
        return None
    return (
        f"is owned by uid {st.st_uid}, not by the user the gateway runs as "
        f"(uid {os.geteuid()}) or root"
    )


def write_new(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write `data` to the new file `path` (mode `mode`, whatever the umask) and sync it;
    nothing is left behind if that fails. Raises FileExistsError if `path` exists,
    OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as sink:
            os.fchmod(sink.fileno(), mode)
            sink.write(data)
            sink.flush()
            os.fsync(sink.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def rename_new(source: Path, path: Path) -> None:
    """Move the file `source` to `path`, which must not exist: a file made at `path`
    meanwhile is kept (a hard link fails on an existing name; then `source` is removed).
    On a file system without hard links, `path` is checked once more just before a rename.
    Raises FileExistsError, `source` left where it is; OSError."""
    try:
        os.link(source, path, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(source, path)
        return
    source.unlink()


_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK})
"""What `link` fails with on a file system without hard links (FAT, some network shares)."""


def write_all(files: Sequence[tuple[Path, bytes]], *, mode: int) -> None:
    """Write each `(path, data)` of `files` (distinct paths, each absent or a file), all or
    nothing: every `data` goes to a temporary file beside its path (mode `mode`, synced)
    first, then each temporary file is renamed onto its path, so a reader sees a path's
    earlier file or the new one whole.

    If any step fails, every path is left as it was: the temporary files are removed, and
    a path already renamed onto gets its earlier file back (a hard link to it, or a copy
    on a file system without them, taken before the first rename), or is removed if it had
    none.

    Raises OSError whose `filename` is the path being written when it failed (a failure
    to put a path back is not raised over it)."""
    if len({path for path, _ in files}) != len(files):
        raise ValueError("write_all: a path is given twice")
    temporaries: list[Path] = []
    earlier: dict[Path, Path] = {}
    renamed: list[Path] = []
    path: Path | None = None
    try:
        for path, data in files:
            temporaries.append(_written_beside(path, data, mode))
        for path, _ in files:
            if (kept := _keep_earlier(path)) is not None:
                earlier[path] = kept
        for (path, _), temporary in zip(files, temporaries, strict=True):
            os.replace(temporary, path)
            renamed.append(path)
    except BaseException as exc:
        for done in renamed:
            with contextlib.suppress(OSError):
                if done in earlier:
                    os.replace(earlier.pop(done), done)
                else:
                    done.unlink()
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and path is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        for kept in earlier.values():
            kept.unlink(missing_ok=True)


def _written_beside(path: Path, data: bytes, mode: int) -> Path:
    """A new temporary file beside `path` holding `data`, mode `mode`, synced. Raises
    OSError, leaving nothing behind."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    write_new(temporary, data, mode=mode)
    return temporary


def _keep_earlier(path: Path) -> Path | None:
    """A hard link (or a copy) beside `path` of what is there now (a symbolic link itself,
    not what it points to), to put back; None when there is nothing, or a directory (the
    rename refuses it). Raises OSError, leaving nothing behind."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            return None
    except FileNotFoundError:
        return None
    kept = path.with_name(f".{path.name}.{secrets.token_hex(6)}.old")
    try:
        os.link(path, kept, follow_symlinks=False)
    except OSError:  # a file system without hard links (FAT, some network shares)
        try:
            shutil.copy2(path, kept, follow_symlinks=False)
        except BaseException:
            kept.unlink(missing_ok=True)
            raise
    return kept
