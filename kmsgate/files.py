"""Writing the several output files of one operation all or nothing (a model's signature
files, a certificate and its chain)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["write_all"]


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
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as sink:
            sink.write(data)
            sink.flush()
            os.fsync(sink.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
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
