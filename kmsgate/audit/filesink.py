"""The audit log's file sink: a hash-chained JSON-lines file per writer process, group-commit
fsync.

Each line is one sealed record (see `kmsgate.audit.chain`); a ``<file>.head`` file, rewritten
at each fsync, also catches records deleted from the end. Every writer process (a uvicorn
worker, a replica on a shared volume) claims a chain file of its own for its whole life
(an exclusive `flock`: the first of `audit.log`, `audit.1.log`, ... that no other process
holds; a crashed writer's file is claimed again on restart) and appends to it without
further locking or reading: appends never wait for another process. Readers see the set
(`AuditFile`). A 2-worker gateway signs 28% faster than with one chain shared under a
per-append lock (docs/benchmarks.md). Once `start_checkpoints` is called, a second
background thread signs the chain now and then (`kmsgate.audit.checkpoint`); appends never
wait for it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import math
import os
import resource
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from kmsgate.audit.chain import GENESIS_HASH, canonical, decode, seal_problem, sealed_line
from kmsgate.audit.checkpoint import (
    CHECKPOINT_ACTION,
    CheckpointPolicy,
    checkpoint_fields,
    signed_payload,
)
from kmsgate.audit.events import AuditEvent, record_fields
from kmsgate.audit.filereader import AuditFile, chain_path
from kmsgate.audit.headfile import head_path, read_head, write_head
from kmsgate.errors import AuditUnavailable, ConfigError, KmsgateError
from kmsgate.store.checkpoints import AuditAnchor

__all__ = ["FileSink"]

_log = logging.getLogger("kmsgate.audit")
MAX_CHAINS = 1024
"""Chain files one audit log may have (writer processes at once)."""
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
_NO_ROOM_LEFT = (
    "the audit log has no room left (disk or file size limit): free some, and the gateway "
    "goes on by itself"
)
_NOT_WRITTEN = "operation refused: the audit log could not be written (the gateway's log says why)"
RESERVE_BYTES = 64 * 1024
"""Room kept free for the outcome records of changes already under way (by default)."""


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


def _resume(path: Path, fd: int, size: int) -> tuple[int, str, str | None]:
    """The (seq, hash) to chain onto, checked against the head file, and, when the last
    record is a final checkpoint (the chain was closed by a checkpointing sink), the name of
    the key that signed it (else None).

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
        return 0, GENESIS_HASH, None
    if os.pread(fd, 1, size - 1) != b"\n":
        raise ConfigError(f"audit log {path}: last line is incomplete (torn write?)")
    lines = _lines_from_end(fd, size - 1)
    last_raw = next(lines)
    try:
        last = decode(last_raw)
    except ValueError as exc:
        raise ConfigError(f"audit log {path}: last line is {exc}") from exc
    problem = seal_problem(last_raw, last)
    if problem is not None:
        raise ConfigError(f"audit log {path}: last record: {problem}")
    seq, digest = last["seq"], last["hash"]
    assert isinstance(seq, int) and isinstance(digest, str)  # checked by seal_problem
    if head is not None and head[0] > 0:
        _check_head(path, head, seq, digest, lines)
    detail = last.get("detail")
    if (
        last.get("action") == CHECKPOINT_ACTION
        and isinstance(detail, dict)
        and detail.get("final") is True
    ):
        return seq, digest, str(detail.get("key"))
    return seq, digest, None


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


class _Claimed(NamedTuple):
    """A chain file this process holds: its path, descriptor and size, and what `_resume`
    found in it."""

    chain: Path
    fd: int
    size: int
    seq: int
    digest: str
    closed_by: str | None


def _claim_chain(path: Path, replica: str, anchors: Sequence[AuditAnchor]) -> _Claimed:
    """The first chain file of the audit log at `path` that no other process holds and that
    the store knows, opened (created 0600 if missing) for append, locked for this process's
    life and resumed (`_resume`). When the store keeps checkpoints (`anchors`, of every
    replica), a chain file with records was written by no gateway of this store (each
    checkpoints its chain from the start) unless the store keeps a checkpoint of it as
    `replica` (which `FileSink.start_checkpoints` requires it to hold) or it holds one kept
    as another replica (this host's earlier name): else it is left alone (logged; `audit
    verify --data-dir` fails on it), never continued and vouched for.

    Raises ConfigError if no file can be opened or resumed, or all `MAX_CHAINS` are held.
    """
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    for number in range(MAX_CHAINS):
        chain = chain_path(path, number)
        existed = chain.exists()
        try:
            fd = os.open(chain, flags, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open audit log {chain}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # another writer's chain
            continue
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"cannot lock audit log {chain}: {exc.strerror}") from exc
        try:
            if not existed:
                _fsync_dir(chain.parent)
            size = os.fstat(fd).st_size
            claimed = _Claimed(chain, fd, size, *_resume(chain, fd, size))
            named = [anchor for anchor in anchors if anchor.chain == chain.name]
            known = (
                not anchors
                or not claimed.seq
                or any(anchor.replica == replica for anchor in named)
                or any(_holds(fd, size, claimed.seq, claimed.digest, a) for a in named)
            )
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"cannot read audit log {chain}: {exc.strerror}") from exc
        except BaseException:
            os.close(fd)
            raise
        if known:
            return claimed
        os.close(fd)
        _log.error(
            "audit log %s holds %d records and the store has no checkpoint of it: written by "
            "no gateway of this store; left alone (`kmsgate audit verify --data-dir` names it)",
            chain,
            claimed.seq,
        )
    raise ConfigError(f"audit log {path}: all {MAX_CHAINS} chain files are held by writers")


def _holds(fd: int, size: int, seq: int, digest: str, anchor: AuditAnchor) -> bool:
    """Whether the chain file open at `fd` (`size` bytes, its last record `seq` with hash
    `digest`) holds the record `anchor` names (its sequence number and hash), reading back
    from the end as far as that record. Raises OSError."""
    if anchor.record_seq == seq:
        return digest == anchor.record_hash
    if anchor.record_seq > seq:
        return False
    return _hash_at(_lines_from_end(fd, size - 1), anchor.record_seq) == anchor.record_hash


def _fsync_dir(directory: Path) -> None:
    """Make a new directory entry durable. Raises OSError."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the sink --------------------------------------------------------------------------


class FileSink(AuditFile):
    """An audit log's chain file for this process, append-only and hash-chained, with
    group-commit fsync and, given a `CheckpointPolicy`, signed checkpoints: an `AuditSink`.

    `search` and `verify` read every chain of the log in place (see `AuditFile`).
    """

    def __init__(
        self,
        path: Path,
        *,
        fsync_interval: float = 0.05,
        replica: str | None = None,
        reserve: int = RESERVE_BYTES,
        anchors: Sequence[AuditAnchor] = (),
    ) -> None:
        """Claim a chain file of the audit log at `path` (see `_claim_chain`) and resume
        its chain from the last record. `replica`: the id every record names (a replica's
        records stay its own once shipped elsewhere). `reserve`: bytes kept free for
        reserved records (see `append`). `anchors`: the store's checkpoints (of every
        replica's chains), by which a chain file no gateway of the store wrote is left alone.

        Raises ConfigError if no chain file can be opened and locked, the claimed file's
        last line is torn or not a sealed record, or its head file shows records deleted or
        rewritten.
        """
        if not fsync_interval > 0:
            raise ConfigError("audit fsync_interval must be positive")
        super().__init__(path)
        self._interval = fsync_interval
        self._replica_id = replica or ""
        self._replica = {"replica": replica} if replica else {}
        self.fsyncs = 0
        self.fsync_seconds = 0.0
        """Group commits so far and the time they took (for /metrics)."""
        claimed = _claim_chain(self._path, replica or "", anchors)
        self._chain, self._fd, self._size = claimed.chain, claimed.fd, claimed.size
        seq, digest, closed_by = claimed.seq, claimed.digest, claimed.closed_by
        self._head = (seq, digest)
        self._found = seq  # the records the file held when this process claimed it
        self._synced = seq  # the last record an fsync covered (at start: the file's last)
        self._reserve = reserve
        self._capacity = self._size_limit()
        self._cramped = False
        self._wanted = 0
        """The size of the last record refused for want of room: `ready` says the log has
        room again only once that much (and the reserve) fits."""
        self._head_behind = False
        """The head file could not be written for want of room (blocks, or inodes where
        the free space still shows room): appends but a change's outcome are refused."""
        self._lock = threading.Lock()
        self._clock = _UtcClock()
        self._dirty = False
        self._closed = False
        self._failed = False
        self._policy: CheckpointPolicy | None = None
        self._reopened = closed_by is not None  # the chain ended with a final checkpoint
        self.closed_by = closed_by
        """The key whose final checkpoint ended the chain as it was opened, else None:
        appending after it needs checkpoints (`start_checkpoints`) to reopen the chain."""
        self._checkpointed = seq  # the last record a checkpoint took into account
        self._unsigned_since: float | None = None
        self._unsigned_why: str | None = None
        """Why the last checkpoint could not be signed."""
        self._retry_at = 0.0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._fsync_loop, name="kmsgate-audit-fsync", daemon=True)
        ]
        self._threads[0].start()

    @property
    def chain(self) -> Path:
        """The chain file this sink appends to."""
        return self._chain

    @property
    def head(self) -> tuple[int, str]:
        """(last seq, last hash); (0, GENESIS_HASH) for an empty log."""
        return self._head

    def append(self, event: AuditEvent, *, reserved: bool = False) -> None:
        """Seal `event` into the chain with one write (fsynced within `fsync_interval`).
        Thread-safe. Only a `reserved` record (the outcome of a change whose `started`
        record is in the log) may use the last `reserve` bytes the file can grow by (its
        file system's free space, the process's file size limit): a change never starts
        unless its outcome can be recorded.

        Raises AuditUnavailable if the log is closed, has failed, has no room for the
        record, or the write fails (the chain is then unchanged); TypeError/ValueError if
        the event holds values JSON cannot encode.
        """
        fields = record_fields(event)
        with self._lock:
            if self._closed or self._failed:
                raise AuditUnavailable(f"operation refused: {self.problem()}")
            self._seal(fields, reserved=reserved)

    def problem(self) -> str | None:
        """Why appends are refused now, or None: the log could not be made durable (or
        something else wrote to it), it has no room left, or it is closed."""
        if self._failed:
            return (
                "the audit log cannot be made durable (the gateway's log says why); once "
                "that is mended, restart the gateway"
            )
        if self._cramped or self._head_behind:
            return _NO_ROOM_LEFT
        if self._closed:
            return "the audit log is closed"
        return None

    def _seal(self, fields: dict[str, object], *, reserved: bool = False) -> None:
        """Append the next record made of `fields`; the caller holds the lock. Raises
        AuditUnavailable, TypeError, ValueError (see `append`)."""
        seq, prev = self._head
        record: dict[str, object] = {
            "seq": seq + 1,
            "time": self._clock.now(),
            "prev": prev,
            **self._replica,
            **fields,
        }
        body = canonical(record)
        digest = hashlib.sha256(body).hexdigest()
        line = sealed_line(body, digest) + b"\n"
        cramped = self._size + len(line) + (0 if reserved else self._reserve) > self._capacity
        if cramped:
            self._wanted = len(line)
        if cramped and not self._cramped:  # once per episode, not once per refused request
            _log.error("audit log %s: no room left (disk or file size limit)", self._chain)
        self._cramped = cramped
        if cramped or (self._head_behind and not reserved):  # no room for the head: inodes?
            raise AuditUnavailable(f"operation refused: {_NO_ROOM_LEFT}")
        self._write(line)
        self._head = (seq + 1, digest)
        self._dirty = True

    def _write(self, line: bytes) -> None:
        """One os.write; a short write is truncated away. Raises AuditUnavailable."""
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            _log.error("audit log write failed: %s", exc)
            raise AuditUnavailable(_NOT_WRITTEN) from exc
        if written != len(line):
            self._undo_short_write()
            raise AuditUnavailable(_NOT_WRITTEN)
        self._size += written

    def _undo_short_write(self) -> None:
        try:
            os.ftruncate(self._fd, self._size)
        except OSError as exc:
            _log.critical("audit log has a torn last line and cannot be repaired: %s", exc)
            self._failed = True
        else:
            _log.error("audit log short write (disk full?); partial line removed")

    def _size_limit(self) -> float:
        """The size the chain file can grow to, as far as can be told now: its size plus
        its file system's free space, at most the file size limit (RLIMIT_FSIZE). Other
        writers may take space before the next look: a write can still fail (ENOSPC)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        limit = math.inf if soft == resource.RLIM_INFINITY else float(soft)
        try:
            stats = os.fstatvfs(self._fd)
        except OSError:
            return limit
        return min(limit, self._size + stats.f_bavail * stats.f_frsize)

    def _fsync_loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._capacity = self._size_limit()
            if self._cramped and self._size + self._wanted + self._reserve <= self._capacity:
                self._cramped = False  # room again: ready says so before the next append
            try:
                self._check_in_place()
                self._sync()
            except (OSError, ValueError) as exc:
                self._fail(exc)
                return

    def _check_in_place(self) -> None:
        """Raise ValueError if the chain's path no longer names the file this sink writes:
        removed, renamed or replaced, its records would go where no reader (nor `audit
        verify`) looks for them."""
        written = os.fstat(self._fd)
        try:
            named = os.stat(self._chain)
        except FileNotFoundError:
            named = None
        if written.st_nlink == 0 or named is None or not os.path.samestat(named, written):
            raise ValueError(f"audit log {self._chain} was removed, renamed or replaced")

    def _fail(self, exc: Exception) -> None:
        _log.critical("audit log cannot be made durable, refusing appends: %s", exc)
        self._failed = True

    def _sync(self) -> None:
        """fsync if anything was written, then record the last record written before it in
        the head file. Raises OSError, or ValueError if something else wrote to the file
        (its size is not what this sink wrote)."""
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            seq, digest = self._head
            if os.fstat(self._fd).st_size != self._size:
                raise ValueError(f"audit log {self._chain} was written outside its sink")
        started = time.perf_counter()
        os.fsync(self._fd)  # covers every record up to (seq, digest)
        self.fsync_seconds += time.perf_counter() - started
        self.fsyncs += 1
        self._synced = seq
        try:
            write_head(self._chain, seq, digest)
        except OSError as exc:
            if exc.errno not in _NO_ROOM:
                raise
            # the records are durable; only their head is behind: retried at the next tick
            if not self._head_behind:  # once per episode
                _log.error("audit log %s: no room for its head file: %s", self._chain, exc)
            self._head_behind = True
            with self._lock:
                self._dirty = True
            return
        if self._head_behind:
            _log.warning("audit log %s: its head file is written again", self._chain)
            self._head_behind = False

    @property
    def unsynced(self) -> int:
        """Records written and not yet made durable by an fsync (the group commit's queue:
        at most `fsync_interval` old while the disk keeps up)."""
        return self._head[0] - self._synced

    # -- checkpoints ---------------------------------------------------------------------

    def start_checkpoints(
        self, policy: CheckpointPolicy, stored: AuditAnchor | None = None
    ) -> None:
        """Sign the chain from now on (see `kmsgate.audit.checkpoint`), from a background
        thread. If the chain ended with a final checkpoint, first append a checkpoint
        covering it, so call this before anything is appended. `stored`: the chain's last
        checkpoint as the store keeps it, which the chain file must hold.

        A chain file that was new (empty) when this process claimed it gets a checkpoint at
        once, covering what this process wrote so far (seq 0: nothing), when the policy
        keeps checkpoints in the store (`anchor`): the store then knows every chain from its
        start, and a chain file with records it has no checkpoint of is no gateway's of
        this store (`_claim_chain` leaves it alone, `audit verify` fails on it).

        Raises ConfigError if the chain file does not hold `stored` (another gateway writes
        as this replica, or the file was cut, replaced or edited) or the reopening
        checkpoint cannot be made (an opening one that cannot is logged); RuntimeError if
        checkpoints were started already or the sink is closed.
        """
        if stored is not None:
            self._require(stored)
        with self._lock:
            if self._policy is not None or self._closed:
                raise RuntimeError("audit checkpoints already started, or the log is closed")
            self._policy = policy
        if self._reopened:
            if not self._checkpoint(final=False):
                why = f": {self._unsigned_why}" if self._unsigned_why else ""
                raise ConfigError(
                    f"audit log {self._chain}: cannot sign the checkpoint reopening it{why}"
                )
        elif stored is None and policy.anchor is not None and not self._found:
            # the chain's opening; unsigned (logged), the store learns of the chain with its
            # next checkpoint, and the gateway starts all the same
            self._checkpoint(final=False)
        thread = threading.Thread(
            target=self._checkpoint_loop, name="kmsgate-audit-checkpoint", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _require(self, stored: AuditAnchor) -> None:
        """Raises ConfigError unless this chain file holds the record `stored` names (its
        sequence number and hash), reading back from the end as far as that record."""
        seq, digest = self._head
        try:
            held = _holds(self._fd, self._size, seq, digest, stored)
        except OSError as exc:
            raise ConfigError(f"cannot read audit log {self._chain}: {exc.strerror}") from exc
        if not held:
            raise ConfigError(
                f"audit log {self._chain} does not hold the last checkpoint the store keeps for "
                f"replica {stored.replica!r}, chain {stored.chain} (record {stored.record_seq}, "
                f"signed {stored.signed_at}; the log ends at record {seq}): another gateway "
                "writes as this replica_id (give each gateway its own), or this log was cut, "
                "replaced or edited (`kmsgate audit verify --data-dir` says which)"
            )

    def _checkpoint_loop(self) -> None:
        """Checkpoint when `every_records` records or a record `every_seconds` old wait
        unsigned (checked every `fsync_interval`); after a failure, again `every_seconds`
        later."""
        assert self._policy is not None
        while not self._stop.wait(self._interval):
            due = self._checkpoint_due() and time.monotonic() >= self._retry_at
            if due and not self._checkpoint(final=False):
                self._retry_at = time.monotonic() + self._policy.every_seconds

    def _checkpoint_due(self) -> bool:
        assert self._policy is not None
        waiting = self._head[0] - self._checkpointed
        if waiting <= 0:
            return False
        now = time.monotonic()
        if self._unsigned_since is None:
            self._unsigned_since = now
        return (
            waiting >= self._policy.every_records
            or now - self._unsigned_since >= self._policy.every_seconds
        )

    def _checkpoint(self, *, final: bool) -> bool:
        """Sign the chain's head, append the checkpoint record, fsync it, then keep it in the
        policy's anchor. True if the checkpoint was written; a failure is logged, never
        raised (the records stay unsigned until the next checkpoint)."""
        assert self._policy is not None
        seq, digest = self._head
        signed_at = _UtcClock().now()
        payload = signed_payload(
            chain=self._chain.name,
            replica=self._replica_id,
            seq=seq,
            digest=digest,
            time=signed_at,
            final=final,
        )
        try:
            signed = self._policy.sign(payload)
        except KmsgateError as exc:
            _log.error("audit checkpoint not signed (%s): %s", exc.code, exc.detail)
            self._unsigned_why = exc.detail
            return False
        fields = checkpoint_fields(
            chain=self._chain.name,
            seq=seq,
            digest=digest,
            time=signed_at,
            final=final,
            signed=signed,
        )
        with self._lock:
            if self._failed:
                return False
            try:
                self._seal(fields, reserved=final)  # a final checkpoint may use the reserve
            except AuditUnavailable:
                return False
            record_seq, record_hash = self._head
        self._checkpointed, self._unsigned_since = record_seq, None
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._fail(exc)
            return False
        if self._policy.anchor is not None:
            anchor = AuditAnchor(
                replica=self._replica_id,
                chain=self._chain.name,
                record_seq=record_seq,
                record_hash=record_hash,
                seq=seq,
                hash=digest,
                signed_at=signed_at,
                final=final,
                key_name=signed.key,
                key_version=signed.key_version,
            )
            try:
                self._policy.anchor(anchor)
            except KmsgateError as exc:
                _log.warning("audit checkpoint not kept in the store: %s", exc.detail)
        return True

    def close(self) -> None:
        """Stop the background threads, write the final checkpoint (with a policy, if
        anything was written), fsync and rewrite the head file, close. Idempotent.

        Raises AuditUnavailable if the final fsync or head write fails (the file is closed
        anyway).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._dirty = self._head[0] > 0
        self._stop.set()
        for thread in self._threads:
            thread.join()
        try:
            if self._policy is not None and self._head[0] > 0 and not self._failed:
                self._checkpoint(final=True)
            if not self._failed:
                self._sync()
        except (OSError, ValueError) as exc:
            _log.critical("audit log final fsync failed: %s", exc)
            raise AuditUnavailable("Audit log unavailable: final fsync failed") from exc
        finally:
            os.close(self._fd)  # releases the chain file

    def __enter__(self) -> FileSink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
