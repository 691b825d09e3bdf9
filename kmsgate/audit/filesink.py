"""The hash-chained JSON-lines file as an audit sink: locked appends, group-commit fsync.

Each line is one sealed record (see `kmsgate.audit.chain`); a ``<log>.head`` file, rewritten
at each fsync, also catches records deleted from the end. Several processes (uvicorn
workers, replicas on a shared volume) may append to one file: each append takes an
exclusive `flock` and first catches up with records that other processes wrote, so the
file stays one chain.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from kmsgate.audit.chain import GENESIS_HASH, canonical, decode, seal_problem, sealed_line
from kmsgate.audit.events import AuditEvent, record_fields
from kmsgate.audit.filereader import AuditFile
from kmsgate.audit.headfile import head_path, read_head, write_head
from kmsgate.errors import AuditUnavailable, ConfigError

__all__ = ["FileSink"]

_log = logging.getLogger("kmsgate.audit")


class _UtcClock:
    """RFC 3339 UTC timestamps with microseconds, caching the formatted second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        second, micros = divmod(time.time_ns() // 1000, 1_000_000)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{micros:06d}Z"


# --- resuming an existing log ----------------------------------------------------------


def _lines_from_end(fd: int, end: int, block: int = 1 << 16) -> Iterator[bytes]:
    """Lines of the file region [0, end) from last to first (end excludes the last newline).

    Raises OSError.
    """
    pos, carry = end, b""
    while True:
        start = max(0, pos - block)
        parts = (os.pread(fd, pos - start, start) + carry).split(b"\n")
        pos = start
        if start > 0:
            carry = parts.pop(0)
        yield from reversed(parts)
        if start == 0:
            return


def _hash_at(lines: Iterator[bytes], seq: int) -> object:
    """The hash of the record with `seq` among `lines` (descending), None if absent."""
    for raw in lines:
        try:
            record = decode(raw)
        except ValueError:
            return None
        found = record.get("seq")
        if found == seq:
            return record.get("hash")
        if type(found) is not int or found < seq:
            return None
    return None


def _resume(path: Path, fd: int, size: int) -> tuple[int, str]:
    """The (seq, hash) to chain onto, checked against the head file.

    Raises ConfigError if the last line is torn or not a sealed record, or if the head file
    shows that records were deleted or rewritten; OSError if reading fails.
    """
    try:
        head = read_head(path)
    except ValueError as exc:
        raise ConfigError(f"audit head file {head_path(path)} is malformed") from exc
    if size == 0:
        if head is not None and head[0] > 0:
            raise ConfigError(f"audit log {path} is empty but its head file says seq {head[0]}")
        return 0, GENESIS_HASH
    if os.pread(fd, 1, size - 1) != b"\n":
        raise ConfigError(f"audit log {path}: last line is incomplete (torn write?)")
    lines = _lines_from_end(fd, size - 1)
    last_raw = next(lines)
    try:
        last = decode(last_raw)
    except ValueError as exc:
        raise ConfigError(f"audit log {path}: last line is not valid JSON") from exc
    problem = seal_problem(last_raw, last)
    if problem is not None:
        raise ConfigError(f"audit log {path}: last record: {problem}")
    seq, digest = last["seq"], last["hash"]
    assert isinstance(seq, int) and isinstance(digest, str)  # checked by seal_problem
    if head is not None and head[0] > 0:
        _check_head(path, head, seq, digest, lines)
    return seq, digest


def _check_head(
    path: Path, head: tuple[int, str], seq: int, digest: str, lines: Iterator[bytes]
) -> None:
    """Raises ConfigError unless the log holds the head file's record."""
    if head[0] > seq:
        raise ConfigError(
            f"audit log {path} ends at seq {seq} but its head file says seq {head[0]}: "
            "records were deleted"
        )
    found = digest if head[0] == seq else _hash_at(lines, head[0])
    if found != head[1]:
        raise ConfigError(f"audit log {path}: record seq {head[0]} does not match head file")


def _open_log(path: Path) -> int:
    """Open (creating 0600) for append. Raises ConfigError."""
    existed = path.exists()
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
        if not existed:
            _fsync_dir(path.parent)
    except OSError as exc:
        raise ConfigError(f"cannot open audit log {path}: {exc.strerror}") from exc
    return fd


@contextlib.contextmanager
def _file_lock(fd: int) -> Iterator[None]:
    """Exclusive flock: serialises writers in every process sharing the file. Raises OSError."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _fsync_dir(directory: Path) -> None:
    """Make a new directory entry durable. Raises OSError."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the sink --------------------------------------------------------------------------


class FileSink(AuditFile):
    """Append-only, hash-chained audit file with group-commit fsync: an `AuditSink`.

    `search` and `verify` read the file in place (see `AuditFile`).
    """

    def __init__(self, path: Path, *, fsync_interval: float = 0.05) -> None:
        """Open (create 0600 if missing) and resume the chain from the last record.

        Raises ConfigError if the file cannot be opened or locked, its last line is torn or
        not a sealed record, or the head file shows records deleted or rewritten.
        """
        if not fsync_interval > 0:
            raise ConfigError("audit fsync_interval must be positive")
        super().__init__(path)
        self._interval = fsync_interval
        self._fd = _open_log(self._path)
        try:
            with _file_lock(self._fd):
                self._size = os.fstat(self._fd).st_size
                self._head = _resume(self._path, self._fd, self._size)
        except OSError as exc:
            os.close(self._fd)
            raise ConfigError(f"cannot read audit log {path}: {exc.strerror}") from exc
        except BaseException:
            os.close(self._fd)
            raise
        self._sync_fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._clock = _UtcClock()
        self._dirty = False
        self._closed = False
        self._failed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fsync_loop, name="kmsgate-audit-fsync", daemon=True
        )
        self._thread.start()

    @property
    def head(self) -> tuple[int, str]:
        """(last seq, last hash); (0, GENESIS_HASH) for an empty log."""
        return self._head

    def append(self, event: AuditEvent) -> None:
        """Seal `event` into the chain with one write (fsynced within `fsync_interval`).
        Thread-safe.

        Raises AuditUnavailable if the log is closed, has failed, or the write fails (the
        chain is then unchanged); TypeError/ValueError if the event holds values JSON cannot
        encode.
        """
        fields = record_fields(event)
        with self._lock:
            if self._closed or self._failed:
                raise AuditUnavailable("Audit log unavailable: operation refused")
            try:
                with _file_lock(self._fd):
                    self._catch_up()
                    seq, prev = self._head
                    record: dict[str, object] = {
                        "seq": seq + 1,
                        "time": self._clock.now(),
                        "prev": prev,
                        **fields,
                    }
                    body = canonical(record)
                    digest = hashlib.sha256(body).hexdigest()
                    self._write(sealed_line(body, digest) + b"\n")
            except OSError as exc:
                _log.error("audit log lock or read failed: %s", exc)
                raise AuditUnavailable("Audit log unavailable: operation refused") from exc
            self._head = (seq + 1, digest)
            self._dirty = True

    def _catch_up(self) -> None:
        """Adopt the last record if another process appended since our last write.

        Called under the file lock. Raises AuditUnavailable (and stops appending) if that
        record is torn or not sealed; OSError if reading fails.
        """
        size = os.fstat(self._fd).st_size
        if size == self._size:
            return
        problem = "the log shrank" if size < self._size else None
        if problem is None:
            raw = next(_lines_from_end(self._fd, size - 1))
            try:
                last = decode(raw)
                problem = seal_problem(raw, last)
            except ValueError:
                problem = "last line is not valid JSON"
        if problem is not None:
            self._failed = True
            _log.critical("audit log changed under us (%s): refusing appends", problem)
            raise AuditUnavailable("Audit log unavailable: operation refused")
        seq, digest = last["seq"], last["hash"]
        assert isinstance(seq, int) and isinstance(digest, str)  # checked by seal_problem
        self._size, self._head = size, (seq, digest)

    def _write(self, line: bytes) -> None:
        """One os.write; a short write is truncated away. Raises AuditUnavailable."""
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            _log.error("audit log write failed: %s", exc)
            raise AuditUnavailable("Audit log unavailable: operation refused") from exc
        if written != len(line):
            self._undo_short_write()
            raise AuditUnavailable("Audit log unavailable: operation refused")
        self._size += written

    def _undo_short_write(self) -> None:
        try:
            os.ftruncate(self._fd, self._size)
        except OSError as exc:
            _log.critical("audit log has a torn last line and cannot be repaired: %s", exc)
            self._failed = True
        else:
            _log.error("audit log short write (disk full?); partial line removed")

    def _fsync_loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._sync()
            except (OSError, ValueError) as exc:
                _log.critical("audit log fsync failed, refusing further appends: %s", exc)
                self._failed = True
                return

    def _sync(self) -> None:
        """fsync if anything was written, then record the file's last record in the head
        file. The file lock is held only to read that record (through a descriptor of its
        own: flock locks belong to an open file, so sharing the appenders' descriptor would
        let one thread release the other's lock); the slow fsyncs run without it.
        Raises OSError, or ValueError if the last line is not a record.
        """
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
        with _file_lock(self._sync_fd):
            size = os.fstat(self._sync_fd).st_size
            last_line = next(_lines_from_end(self._sync_fd, size - 1)) if size else None
        os.fsync(self._sync_fd)  # covers the record read above
        if last_line is not None:
            last = decode(last_line)
            seq, digest = last.get("seq"), last.get("hash")
            if type(seq) is not int or not isinstance(digest, str):
                raise ValueError("last line is not a sealed record")
            write_head(self._path, seq, digest)

    def close(self) -> None:
        """Stop the fsync thread, fsync and rewrite the head file, close. Idempotent.

        Raises AuditUnavailable if the final fsync or head write fails (the file is closed
        anyway).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._dirty = self._head[0] > 0
        self._stop.set()
        self._thread.join()
        try:
            if not self._failed:
                self._sync()
        except (OSError, ValueError) as exc:
            _log.critical("audit log final fsync failed: %s", exc)
            raise AuditUnavailable("Audit log unavailable: final fsync failed") from exc
        finally:
            os.close(self._fd)
            os.close(self._sync_fd)

    def __enter__(self) -> FileSink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
