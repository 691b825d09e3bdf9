"""Model manifests: every file of a model directory with its SHA-256, hashed locally.

The manifest follows `model_signing` 1.1 "files" serialization exactly, so that its stock
verifier recomputes the same thing: resource names are POSIX paths relative to the model
directory, sorted as `pathlib.PurePosixPath` sorts them (component by component, which is not
plain string order: `a/b` < `a-b`), and a path is ignored when it equals or lies under one of
the recorded `ignore_paths`. Hashing streams each file through a 1 MiB buffer; files are hashed
in parallel threads (hashlib releases the GIL on large updates).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kmsgate.text import shown

HASH_TYPE = "sha256"
GIT_PATHS = (".git", ".gitattributes", ".github", ".gitignore")  # what model_signing ignores
CHUNK = 1 << 20

Progress = Callable[[int], None]


class ManifestError(Exception):
    """The model directory cannot be serialized (symlink, special file, unreadable)."""


@dataclass(frozen=True, order=True)
class FileDigest:
    """One resource: `name` (POSIX path relative to the model) and its SHA-256."""

    sort_key: tuple[str, ...] = field(repr=False, compare=True)
    name: str = field(compare=False)
    digest: bytes = field(compare=False)

    @classmethod
    def of(cls, name: str, digest: bytes) -> FileDigest:
        return cls(PurePosixPath(name).parts, name, digest)


@dataclass(frozen=True)
class Manifest:
    """A model's resources (sorted) and the serialization parameters that produced them."""

    model_name: str
    files: tuple[FileDigest, ...]
    ignore_paths: tuple[str, ...] = ()
    allow_symlinks: bool = False
    hash_type: str = HASH_TYPE

    @classmethod
    def build(
        cls,
        model_name: str,
        files: Iterable[FileDigest],
        ignore_paths: Iterable[str] = (),
        allow_symlinks: bool = False,
    ) -> Manifest:
        return cls(
            model_name, tuple(sorted(files)), tuple(sorted(set(ignore_paths))), allow_symlinks
        )

    def root_digest(self) -> bytes:
        """SHA-256 over the resource digests in order: the in-toto subject digest."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.digest)
        return h.digest()

    def digests(self) -> dict[str, bytes]:
        return {f.name: f.digest for f in self.files}

    def serialization(self) -> dict[str, Any]:
        """The predicate's `serialization` object (model_signing's field names)."""
        out: dict[str, Any] = {
            "method": "files",
            "hash_type": self.hash_type,
            "allow_symlinks": self.allow_symlinks,
        }
        if self.ignore_paths:
            out["ignore_paths"] = list(self.ignore_paths)
        return out

    def total_bytes(self, root: Path) -> int:
        return sum((root / f.name).stat().st_size for f in self.files)


class _Ignored:
    """Ignored paths (model_signing semantics: a path and everything under it), looked up
    by each prefix of a path: as fast with 10,000 of them as with one."""

    def __init__(self, paths: Iterable[str]) -> None:
        self._prefixes = {PurePosixPath(path).parts for path in paths}

    def add(self, path: str) -> None:
        self._prefixes.add(PurePosixPath(path).parts)

    def covers(self, rel: str) -> bool:
        """Whether `rel` equals or lies under one of the paths."""
        parts = PurePosixPath(rel).parts
        return any(parts[:n] in self._prefixes for n in range(1, len(parts) + 1))


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    """Glob match on the whole relative path, or on the last component for a pattern
    without "/" (so `*.log` matches `runs/a.log`)."""
    name = rel.rsplit("/", 1)[-1]
    for pattern in patterns:
        p = pattern.rstrip("/")
        if fnmatch.fnmatchcase(rel, p) or ("/" not in p and fnmatch.fnmatchcase(name, p)):
            return True
    return False


def list_files(
    root: Path,
    ignore_paths: Iterable[str] = (),
    *,
    patterns: Sequence[str] = (),
    allow_symlinks: bool = False,
    symlink_hint: str = "use --allow-symlinks",
) -> tuple[list[str], list[str]]:
    """(files to hash, paths matched by `patterns`) under `root`, both relative POSIX paths.

    `ignore_paths` are literal paths (skipped with everything under them); `patterns` are
    globs, and every path they match is returned so it can be recorded as a literal ignore
    path. A symbolic link to a file is hashed as that file (with `allow_symlinks`). One to a
    directory is refused: model_signing does not follow it, so the files behind it would be
    neither signed nor checked (and one added after signing would go unnoticed). Raises
    ManifestError for a symlink (unless `allow_symlinks`; the message ends with
    `symlink_hint`), a symlink to a directory or a special file.
    """
    try:
        return _walk(root, _Ignored(ignore_paths), patterns, allow_symlinks, symlink_hint)
    except RecursionError:  # os.walk recurses once per level
        raise ManifestError(f"{root}: directories nested too deeply to sign") from None


def _walk(
    root: Path,
    ignored: _Ignored,
    patterns: Sequence[str],
    allow_symlinks: bool,
    symlink_hint: str,
) -> tuple[list[str], list[str]]:
    """`list_files`, with the ignored paths as `_Ignored`. Raises ManifestError."""
    files: list[str] = []
    matched: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_unreadable):
        base = Path(dirpath)
        rel_dir = base.relative_to(root).as_posix()
        for name in sorted([*dirnames, *filenames]):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if ignored.covers(rel):
                continue
            if not _utf8(rel):
                raise ManifestError(
                    f"{shown(rel)}: a file name that is not UTF-8 cannot be signed (a "
                    "model_signing manifest names files in UTF-8): rename it, or ignore it"
                )
            if patterns and _matches(rel, patterns):
                matched.append(rel)
                ignored.add(rel)
                continue
            full = base / name
            try:
                mode = full.lstat().st_mode
            except OSError as exc:
                raise ManifestError(f"cannot read {rel}: {exc.strerror}") from None
            if stat.S_ISLNK(mode):
                if not allow_symlinks:
                    raise ManifestError(f"{rel} is a symbolic link ({symlink_hint})")
                try:
                    mode = full.stat().st_mode
                except OSError:
                    raise ManifestError(f"{rel} is a broken symbolic link") from None
                if stat.S_ISDIR(mode):
                    raise ManifestError(
                        f"{rel} is a symbolic link to a directory, whose files no signature "
                        "covers (replace it with the directory, or ignore it)"
                    )
            if stat.S_ISREG(mode):
                if name in filenames:
                    files.append(rel)
            elif not stat.S_ISDIR(mode):
                raise ManifestError(f"{rel} is neither a file nor a directory")
        dirnames[:] = [d for d in dirnames if not ignored.covers(_join(rel_dir, d))]
    return files, matched


def _unreadable(exc: OSError) -> None:
    """`os.walk`'s error handler: a directory that cannot be listed is refused, not left
    out (the signature would cover fewer files than the model has)."""
    raise ManifestError(f"cannot read {exc.filename}: {exc.strerror}") from None


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # an undecodable byte, as os.fsdecode leaves it
        return False
    return True


def _join(rel_dir: str, name: str) -> str:
    return name if rel_dir == "." else f"{rel_dir}/{name}"


def hash_file(path: Path, progress: Progress | None = None) -> bytes:
    """SHA-256 of a file, streamed in 1 MiB reads. Raises ManifestError."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
                if progress is not None:
                    progress(n)
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror}") from None
    return h.digest()


def hash_files(
    root: Path,
    names: Sequence[str],
    *,
    workers: int | None = None,
    progress: Progress | None = None,
) -> list[FileDigest]:
    """Hash `names` (relative to `root`) in parallel; largest files are started first.
    Raises ManifestError; an interruption (Ctrl-C) stops every hashing thread within one
    chunk and propagates, instead of waiting for the files being hashed to be finished."""
    if not names:
        return []
    sizes = {n: (root / n).stat().st_size for n in names}
    order = sorted(names, key=lambda n: -sizes[n])
    workers = workers or min(32, (os.cpu_count() or 1) + 2)
    stop = threading.Event()

    def step(n: int) -> None:
        if stop.is_set():
            raise _Stopped
        if progress is not None:
            progress(n)

    with ThreadPoolExecutor(max_workers=min(workers, len(order))) as pool:
        try:
            digests = list(pool.map(lambda n: hash_file(root / n, step), order))
        except BaseException:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return [FileDigest.of(n, d) for n, d in zip(order, digests, strict=True)]


class _Stopped(Exception):
    """Raised in a hashing thread once `hash_files` is abandoned."""


def model_name_of(root: Path) -> str:
    """The subject name model_signing uses: the directory's final component, or, for `.`
    and `..`, the final component of the directory they name (as model_signing does).
    Raises ManifestError if it is not UTF-8."""
    name = root.name
    name = root.resolve().name if name in ("", "..") else name
    if not _utf8(name):
        raise ManifestError(
            f"{shown(name)}: a model directory whose name is not UTF-8 cannot be signed (the "
            "signature names the model in UTF-8): rename it"
        )
    return name


def checksums_document(manifest: Manifest) -> bytes:
    """`checksums.json`: `{model, algorithm, files: [{path, sha256}]}` in manifest order."""
    doc = {
        "model": manifest.model_name,
        "algorithm": HASH_TYPE,
        "files": [{"path": f.name, "sha256": f.digest.hex()} for f in manifest.files],
    }
    return (json.dumps(doc, indent=2) + "\n").encode()
