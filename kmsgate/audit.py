"""Tamper-evident, hash-chained JSONL audit log.

Each line is one record: the canonical JSON of the record (sorted keys, no spaces, UTF-8)
with a final ``"hash"`` member added, where ``hash = sha256(canonical record without hash)``
and every record's ``prev`` is the previous record's hash. Editing, deleting, reordering or
truncating records breaks the chain and `verify_file` reports the first broken line; a
``<log>.head`` file, rewritten at each fsync, also catches records deleted from the end.

The log writes only what it is given: callers pass digests and lengths of inputs (see
`input_summary`), never plaintext, keys or tokens. Writes are fail-closed: `AuditLog.append`
raises `AuditUnavailable` and the caller must not return the operation's result.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import orjson

from kmsgate.errors import AuditUnavailable, ConfigError

__all__ = [
    "GENESIS_HASH",
    "AuditEvent",
    "AuditLog",
    "VerifyReport",
    "input_summary",
    "iter_records",
    "search",
    "verify_file",
]

GENESIS_HASH = "0" * 64
"""The ``prev`` of the first record."""

_log = logging.getLogger(__name__)
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
_ORJSON_OPTIONS = (
    orjson.OPT_SORT_KEYS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
)
_DECISIONS = frozenset({"allow", "deny"})


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One decision or operation to record. Holds facts and digests only, never secrets.

    Raises ValueError if `decision` is not "allow" or "deny"; TypeError if `reasons` is a str.
    """

    action: str
    decision: str
    outcome: str
    request_id: str
    principal: str | None
    principal_kind: str | None = None
    resource: Mapping[str, object] = field(default_factory=dict)
    key_version: int | None = None
    reasons: Sequence[str] = ()
    exception_id: str | None = None
    inputs: Mapping[str, object] | None = None
    policy_digest: str | None = None
    detail: Mapping[str, object] | None = None

    def __post_init__(self) -> None:
        if self.decision not in _DECISIONS:
            raise ValueError(f"decision must be 'allow' or 'deny', not {self.decision!r}")
        if isinstance(self.reasons, str):
            raise TypeError("reasons must be a sequence of strings, not a str")


def input_summary(items: Sequence[bytes]) -> dict[str, object]:
    """Summarise inputs as ``{"count", "length", "sha256"}`` without keeping any data.

    For one item, sha256 is that item's digest; otherwise it is the sha256 of the
    concatenated per-item digests, so a batch summary has a fixed size.
    """
    if len(items) == 1:
        digest = hashlib.sha256(items[0]).hexdigest()
    else:
        outer = hashlib.sha256()
        for item in items:
            outer.update(hashlib.sha256(item).digest())
        digest = outer.hexdigest()
    return {"count": len(items), "length": sum(len(i) for i in items), "sha256": digest}


# --- record encoding -------------------------------------------------------------------


def _is_plain(values: Iterable[object]) -> bool:
    """True if only str, int, bool, None, dict, list and tuple occur (exact types, any depth)."""
    for value in values:
        kind = type(value)
        if kind is str or kind is int or kind is bool or value is None:
            continue
        if type(value) is dict:
            if not _is_plain(value.values()):
                return False
        elif type(value) is list or type(value) is tuple:
            if not _is_plain(value):
                return False
        else:
            return False
    return True


def _canonical(obj: Mapping[str, object]) -> bytes:
    """``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()``.

    For plain values orjson emits the same bytes about ten times faster, so it is used
    for them; floats (formatted differently), subclasses, non-str keys and ints beyond 64
    bits go through the json module. Raises TypeError/ValueError if JSON cannot encode obj.
    """
    if _is_plain(obj.values()):
        try:
            return orjson.dumps(obj, option=_ORJSON_OPTIONS)
        except TypeError:
            pass
    return _ENCODER.encode(obj).encode()


def _sealed_line(body: bytes, digest: str) -> bytes:
    """The stored line (without newline): canonical body with ``"hash"`` appended last."""
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}'


def _event_fields(event: AuditEvent) -> dict[str, object]:
    """The event as record members, leaving out None and empty values."""
    fields: dict[str, object] = {
        "action": event.action,
        "decision": event.decision,
        "outcome": event.outcome,
        "request_id": event.request_id,
    }
    if event.principal:
        fields["principal"] = event.principal
    if event.principal_kind:
        fields["principal_kind"] = event.principal_kind
    if event.resource:
        fields["resource"] = dict(event.resource)
    if event.key_version is not None:
        fields["key_version"] = event.key_version
    if event.reasons:
        fields["reasons"] = list(event.reasons)
    if event.exception_id:
        fields["exception_id"] = event.exception_id
    if event.inputs:
        fields["inputs"] = dict(event.inputs)
    if event.policy_digest:
        fields["policy_digest"] = event.policy_digest
    if event.detail:
        fields["detail"] = dict(event.detail)
    return fields


def _decode(raw: bytes) -> dict[str, object]:
    """Parse one line (newline stripped). Raises ValueError if it is not a JSON object."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ValueError("not valid JSON") from exc
    if not isinstance(obj, dict):
        raise ValueError("not valid JSON")
    return obj


def _seal_problem(raw: bytes, record: Mapping[str, object]) -> str | None:
    """Why `raw` (newline stripped) is not a correctly sealed record, or None if it is."""
    seq, prev, digest = record.get("seq"), record.get("prev"), record.get("hash")
    if type(seq) is not int or not isinstance(prev, str) or not isinstance(digest, str):
        return "missing or malformed seq/prev/hash"
    try:
        body = _canonical({k: v for k, v in record.items() if k != "hash"})
    except (TypeError, ValueError):
        return "not in canonical form (edited)"
    if hashlib.sha256(body).hexdigest() != digest:
        return "hash mismatch (edited)"
    if _sealed_line(body, digest) != raw:
        return "not in canonical form (edited)"
    return None


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


# --- head file -------------------------------------------------------------------------


def _head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def _read_head(path: Path) -> tuple[int, str] | None:
    """The (seq, hash) stored in the head file, None if there is none.

    Raises ValueError if the head file is malformed, OSError if it cannot be read.
    """
    try:
        raw = _head_path(path).read_bytes()
    except FileNotFoundError:
        return None
    obj = _decode(raw.strip())
    seq, digest = obj.get("seq"), obj.get("hash")
    if type(seq) is not int or not isinstance(digest, str):
        raise ValueError("head file lacks seq/hash")
    return seq, digest


def _write_head(path: Path, seq: int, digest: str) -> None:
    """Atomically replace the head file (write, fsync, rename). Raises OSError."""
    target = _head_path(path)
    # unique per call: several writers (processes, or logs in one process) sync concurrently
    tmp = target.with_name(f"{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps({"seq": seq, "hash": digest}).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)


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
            record = _decode(raw)
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
        head = _read_head(path)
    except ValueError as exc:
        raise ConfigError(f"audit head file {_head_path(path)} is malformed") from exc
    if size == 0:
        if head is not None and head[0] > 0:
            raise ConfigError(f"audit log {path} is empty but its head file says seq {head[0]}")
        return 0, GENESIS_HASH
    if os.pread(fd, 1, size - 1) != b"\n":
        raise ConfigError(f"audit log {path}: last line is incomplete (torn write?)")
    lines = _lines_from_end(fd, size - 1)
    last_raw = next(lines)
    try:
        last = _decode(last_raw)
    except ValueError as exc:
        raise ConfigError(f"audit log {path}: last line is not valid JSON") from exc
    problem = _seal_problem(last_raw, last)
    if problem is not None:
        raise ConfigError(f"audit log {path}: last record: {problem}")
    seq, digest = last["seq"], last["hash"]
    assert isinstance(seq, int) and isinstance(digest, str)  # checked by _seal_problem
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


# --- the writer ------------------------------------------------------------------------


class AuditLog:
    """Append-only, hash-chained audit log with group-commit fsync.

    Several processes (uvicorn workers, replicas on a shared volume) may append to one
    file: each append takes an exclusive `flock` and first catches up with records that
    other processes wrote, so the file stays one chain.
    """

    def __init__(self, path: Path, *, fsync_interval: float = 0.05) -> None:
        """Open (create 0600 if missing) and resume the chain from the last record.

        Raises ConfigError if the file cannot be opened or locked, its last line is torn or
        not a sealed record, or the head file shows records deleted or rewritten.
        """
        if not fsync_interval > 0:
            raise ConfigError("audit fsync_interval must be positive")
        self._path = Path(path)
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
    def path(self) -> Path:
        return self._path

    @property
    def head(self) -> tuple[int, str]:
        """(last seq, last hash); (0, GENESIS_HASH) for an empty log."""
        return self._head

    def append(self, event: AuditEvent) -> dict[str, object]:
        """Seal `event` into the chain with one write and return the record. Thread-safe.

        Raises AuditUnavailable if the log is closed, has failed, or the write fails (the
        chain is then unchanged); TypeError/ValueError if the event holds values JSON cannot
        encode.
        """
        fields = _event_fields(event)
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
                    body = _canonical(record)
                    digest = hashlib.sha256(body).hexdigest()
                    self._write(_sealed_line(body, digest) + b"\n")
            except OSError as exc:
                _log.error("audit log lock or read failed: %s", exc)
                raise AuditUnavailable("Audit log unavailable: operation refused") from exc
            self._head = (seq + 1, digest)
            self._dirty = True
        record["hash"] = digest
        return record

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
                last = _decode(raw)
                problem = _seal_problem(raw, last)
            except ValueError:
                problem = "last line is not valid JSON"
        if problem is not None:
            self._failed = True
            _log.critical("audit log changed under us (%s): refusing appends", problem)
            raise AuditUnavailable("Audit log unavailable: operation refused")
        seq, digest = last["seq"], last["hash"]
        assert isinstance(seq, int) and isinstance(digest, str)  # checked by _seal_problem
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
            last = _decode(last_line)
            seq, digest = last.get("seq"), last.get("hash")
            if type(seq) is not int or not isinstance(digest, str):
                raise ValueError("last line is not a sealed record")
            _write_head(self._path, seq, digest)

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

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- reading ---------------------------------------------------------------------------


def iter_records(path: Path) -> Iterator[dict[str, object]]:
    """Yield each record, oldest first, without checking the chain (see `verify_file`).

    Raises ValueError naming the line if a line is not a JSON object; OSError on read errors.
    """
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield _decode(raw.rstrip(b"\n"))
            except ValueError as exc:
                raise ValueError(f"line {lineno}: not valid JSON") from exc


def _rfc3339(moment: datetime) -> str:
    """The record time format; a naive datetime is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    utc = moment.astimezone(UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds") + "Z"


def _matches(
    record: Mapping[str, object],
    since: str | None,
    principal: str | None,
    key: str | None,
    action: str | None,
) -> bool:
    if since is not None and not str(record.get("time", "")) >= since:
        return False
    if principal is not None and record.get("principal") != principal:
        return False
    if action is not None and record.get("action") != action:
        return False
    if key is not None:
        resource = record.get("resource")
        return isinstance(resource, dict) and resource.get("name") == key
    return True


def search(
    path: Path,
    *,
    since: datetime | None = None,
    principal: str | None = None,
    key: str | None = None,
    action: str | None = None,
    limit: int = 1000,
) -> list[dict[str, object]]:
    """The most recent `limit` matching records, oldest first. `key` matches resource.name.

    A naive `since` is taken as UTC. Raises ValueError if `limit` < 1 or a line is not
    valid JSON; OSError on read errors.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    after = _rfc3339(since) if since is not None else None
    found: collections.deque[dict[str, object]] = collections.deque(maxlen=limit)
    for record in iter_records(path):
        if _matches(record, after, principal, key, action):
            found.append(record)
    return list(found)


# --- verification ----------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyReport:
    """Result of `verify_file`: ok, records checked, and the first broken line and why."""

    ok: bool
    records: int
    first_bad_line: int | None
    reason: str | None


def _line_problem(raw: bytes, lineno: int, prev: str) -> tuple[dict[str, object] | None, str]:
    """(record, "") if line `lineno` is sealed and links to `prev`, else (None, reason)."""
    if not raw.endswith(b"\n"):
        return None, f"line {lineno}: incomplete line (truncated)"
    raw = raw[:-1]
    try:
        record = _decode(raw)
    except ValueError:
        return None, f"line {lineno}: not valid JSON"
    problem = _seal_problem(raw, record)
    if problem is not None:
        return None, f"record {lineno}: {problem}"
    if record["prev"] != prev:
        if lineno == 1:
            return None, "record 1: prev is not the start of the chain (records deleted)"
        return None, (
            f"record {lineno}: prev does not match record {lineno - 1} (deleted or reordered)"
        )
    if record["seq"] != lineno:
        return None, f"record {lineno}: seq {record['seq']} expected {lineno}"
    return record, ""


def _head_problem(path: Path, hashes: Sequence[str]) -> tuple[int, str] | None:
    """(line, reason) if the head file contradicts the log's `hashes`, else None."""
    last_line = max(len(hashes), 1)
    try:
        head = _read_head(path)
    except ValueError:
        return last_line, f"head file {_head_path(path).name}: malformed"
    if head is None or head[0] < 1:
        return None
    seq, digest = head
    if seq > len(hashes):
        return last_line, (
            f"record {len(hashes)}: log ends at seq {len(hashes)} but head file says seq {seq}"
            " (records deleted from the end)"
        )
    if hashes[seq - 1] != digest:
        return seq, f"record {seq}: hash does not match head file (rewritten)"
    return None


def verify_file(path: Path) -> VerifyReport:
    """Recompute every hash and check prev links, seq continuity and the head file.

    Reports the first broken line. Raises OSError if the log cannot be read.
    """
    path = Path(path)
    hashes: list[str] = []
    prev = GENESIS_HASH
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            record, reason = _line_problem(raw, lineno, prev)
            if record is None:
                return VerifyReport(False, len(hashes), lineno, reason)
            prev = str(record["hash"])
            hashes.append(prev)
    head_problem = _head_problem(path, hashes)
    if head_problem is not None:
        return VerifyReport(False, len(hashes), head_problem[0], head_problem[1])
    return VerifyReport(True, len(hashes), None, None)
