"""Reading an audit log in place: its chains' records, search, verification.

An audit log at `path` is a set of hash-chained JSON-lines files, one per writer process
(a uvicorn worker, a replica): `path` itself and `<stem>.<n><suffix>` beside it (for
`audit.log`: `audit.1.log`, `audit.2.log`, ...). Each file is one chain with its own head
file; a writer holds its file for its whole life (see `FileSink`).
"""

from __future__ import annotations

import heapq
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, overload

import orjson

from kmsgate.audit.chain import GENESIS_HASH, decode, seal_problem
from kmsgate.audit.checkpoint import (
    CHECKPOINT_ACTION,
    ChainCheckpoints,
    ChainIdentity,
    PublicKeys,
    check_checkpoints,
)
from kmsgate.audit.headfile import head_path, read_head
from kmsgate.audit.sink import AuditCursor, AuditPage, VerifyReport
from kmsgate.store.checkpoints import AuditAnchor
from kmsgate.text import utc_timestamp

__all__ = ["AuditFile", "chain_path", "chain_paths", "iter_records", "log_of_chain"]

UNKNOWN_WRITER = ChainIdentity()
"""Neither the log's own file name nor its replica known (a log verified alone)."""


def chain_path(path: Path, number: int) -> Path:
    """The file of chain `number` of the audit log at `path` (0: `path` itself)."""
    if number == 0:
        return path
    return path.with_name(f"{path.stem}.{number}{path.suffix}")


def chain_paths(path: Path) -> list[Path]:
    """The existing chain files of the audit log at `path`, by chain number. Raises OSError
    if the directory cannot be listed."""
    return [chain for _, chain in _numbered_chains(path)]


def _numbered_chains(path: Path) -> list[tuple[int, Path]]:
    """(chain number, file) of each existing chain file of the log at `path`, in order.
    Raises OSError if the directory cannot be listed."""
    numbered = sorted(
        (number, entry)
        for entry in path.parent.iterdir()
        if (number := _chain_number(path, entry.name)) and entry.is_file()
    )
    return ([(0, path)] if path.is_file() else []) + numbered


def log_of_chain(path: Path) -> Path:
    """The audit log whose chain file `path` is (`audit.log` for `audit.1.log`, when it is
    a file beside it), else `path` itself: a chain file is verified with its log."""
    match = re.fullmatch(r"(.+)\.[1-9][0-9]*((?:\.[^.]*)?)", path.name)
    if match is None:
        return path
    log = path.with_name(match.group(1) + match.group(2))
    chain = path.is_file() and log.is_file() and _chain_number(log, path.name)
    return log if chain else path


def _chain_number(path: Path, name: str) -> int | None:
    """N if `name` is chain N >= 1 of the audit log at `path` (`audit.N.log`), else None."""
    pattern = re.escape(path.stem) + r"\.([1-9][0-9]*)" + re.escape(path.suffix) + r"\Z"
    match = re.match(pattern, name)
    return int(match.group(1)) if match else None


MAX_LINE_BYTES = 1024 * 1024
"""The longest line a chain file may hold (a record is a few KiB at most): a reader keeps
one line in memory, and a file without line breaks would otherwise be read whole."""


class _LongLine(ValueError):
    """A line longer than `MAX_LINE_BYTES`."""

    reason = f"over {MAX_LINE_BYTES} bytes long: no record is"

    def __init__(self, line: int) -> None:
        super().__init__(f"line {line}: {self.reason}")
        self.line = line


def _lines(file: BinaryIO, first: int = 1) -> Iterator[tuple[int, bytes]]:
    """(number, line with its line break) of each line of `file` from where it stands, the
    first numbered `first`. Raises _LongLine (a ValueError naming the line) for a line
    longer than `MAX_LINE_BYTES`."""
    number = first - 1
    while raw := file.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(raw) > MAX_LINE_BYTES:
            raise _LongLine(number)
        yield number, raw


def iter_records(path: Path) -> Iterator[dict[str, object]]:
    """Yield each record, oldest first, without checking the chain (see `AuditFile.verify`).

    Raises ValueError naming the line if a line is not a JSON object; OSError on read errors.
    """
    with Path(path).open("rb") as f:
        for lineno, raw in _lines(f):
            try:
                yield decode(raw.rstrip(b"\n"))
            except ValueError as exc:
                raise ValueError(f"line {lineno}: {exc}") from exc


class AuditFile:
    """An audit log read where it is (all its chains): searched and verified, never written
    or created."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)

    @property
    def path(self) -> Path:
        return self._path

    def search(
        self,
        *,
        since: datetime | None = None,
        principal: str | None = None,
        key: str | None = None,
        action: str | None = None,
        limit: int = 1000,
        before: AuditCursor | None = None,
    ) -> AuditPage:
        """The most recent `limit` matching records, oldest first, and the cursor of the
        older matches left out (`before` for the next page), if any. `key` matches
        resource.name; `before`: only records older than that cursor's.

        A naive `since` is taken as UTC. Raises ValueError if `limit` < 1 or a line is not
        valid JSON; OSError on read errors.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        after = _rfc3339(since) if since is not None else None
        wanted = _LineFilter(principal, key, action)
        since_ = after.encode() if after is not None else None
        before_ = (before.time.encode(), before.chain, before.line) if before else None
        blocks = [
            (block, number, chain)
            for number, chain in _numbered_chains(self._path)
            for block in _indexed(chain)
        ]
        blocks.sort(key=lambda entry: entry[0].latest, reverse=True)
        found: list[_Found] = []  # a heap of the latest limit + 1 matches read so far
        for block, number, chain in blocks:
            # by cursor, not file order (a chain's times step back with a clock set back):
            # the blocks not read hold no line later than the heap's earliest
            if (since_ is not None and block.latest < since_) or (
                len(found) > limit and block.latest < found[0][0]
            ):
                break
            if before_ is not None and block.earliest > before_[0]:
                continue
            for match in _matching(chain, number, block, wanted, since_, before_):
                if len(found) <= limit:  # one more than a page: are older matches left out?
                    heapq.heappush(found, match)
                elif match > found[0]:
                    heapq.heapreplace(found, match)
        found.sort()
        page = found[-limit:]
        more = _cursor(page[0]).text() if len(found) > limit else None
        return AuditPage([decode(raw) for *_, raw in page], more)

    def verify(
        self,
        *,
        keys: PublicKeys | None = None,
        anchors: Sequence[AuditAnchor] = (),
        written_as: ChainIdentity = UNKNOWN_WRITER,
        progress: Callable[[int], None] | None = None,
    ) -> VerifyReport:
        """Check every chain: recompute every hash, check prev links, seq continuity, the
        head file and the checkpoints (see `check_checkpoints`: their signatures with
        `keys`; against the store's `anchors`, which must also name no missing chain file).
        `written_as`: the log's own file name and replica, when known (a gateway's config);
        else chain 0's checkpoints name the log (a copy under another name verifies), and,
        with `keys`, the replica a chain's checkpoints signed is that of the log's other
        chains too (one gateway's worker processes write them: an idle worker's chain
        without a checkpoint is its replica's, not held to another replica's checkpoint).
        Reports the first broken line (and its file). `progress` is told the bytes read, now
        and then. Raises OSError if the log cannot be read, FileNotFoundError if it has no
        chain file.
        """
        chains = _numbered_chains(self._path)
        if not chains:
            raise FileNotFoundError(2, "No such file or directory", str(self._path))
        records = 0
        checked: list[tuple[int, ChainCheckpoints]] = []
        log_name, replica = written_as.name, written_as.replica
        unplaced: list[tuple[int, Path, str | None, VerifyReport]] = []
        for number, chain in chains:
            name = chain_path(Path(log_name), number).name if log_name else None
            identity = ChainIdentity(name, replica)
            report, summary = _verify_chain(chain, identity, keys, anchors, progress)
            if summary is None and replica is None and keys is not None:
                unplaced.append((number, chain, name, report))  # again once the replica is known
                continue
            records += report.records
            if summary is not None and log_name is None:
                report, summary = _misplaced(chain, summary, report)
            if summary is None:
                return replace(report, records=records, chains=len(chains))
            checked.append((number, summary))
            log_name = log_name or summary.name  # chain 0's: what the others are named by
            if replica is None and keys is not None and summary.checkpoints:
                replica = summary.replica  # signed by its checkpoints
        for number, chain, name, report in unplaced:
            summary = None
            if replica is not None:
                report, summary = _verify_chain(chain, ChainIdentity(name, replica), keys, anchors)
            records += report.records
            if summary is None:
                return replace(report, records=records, chains=len(chains))
            checked.append((number, summary))
        summaries = [summary for _, summary in sorted(checked, key=lambda pair: pair[0])]
        missing = _missing_chain(self._path, summaries, anchors, replica)
        missing = missing or _unknown_chain(summaries, anchors, replica)
        if missing is not None:
            return VerifyReport(False, records, 1, missing[1], missing[0], chains=len(chains))
        return VerifyReport(
            True, records, None, None, chains=len(chains), checkpoints=tuple(summaries)
        )


# --- search ----------------------------------------------------------------------------


_Found = tuple[bytes, int, int, bytes]
"""A matching line: its cursor (time as the line writes it, chain, line) and the line."""


def _cursor(found: _Found) -> AuditCursor:
    return AuditCursor(found[0].decode("utf-8", "replace"), found[1], found[2])


def _matching(
    chain: Path,
    number: int,
    block: _Block,
    wanted: _LineFilter,
    since: bytes | None,
    before: tuple[bytes, int, int] | None,
) -> Iterator[_Found]:
    """The lines of `block` of chain file `chain` (chain `number` of its log) that `wanted`
    takes, at or after the time `since` and before the cursor `before`: told from the
    line's bytes, never decoded (a search of a log of millions of records decoded every
    one of them, for each page). Raises ValueError naming the file and line of a line that
    is not a JSON object; OSError on read errors."""
    needles = wanted.needles
    with chain.open("rb") as file:
        file.seek(block.start)
        lines = file.read(block.end - block.start).split(b"\n")[:-1]
    for line, raw in enumerate(lines, block.first_line):
        if needles and not all(needle in raw for needle in needles):
            continue  # the usual line of a filtered search: one substring test
        time, record = _time_and_record(raw, chain, line)
        if since is not None and time < since:
            continue
        if before is not None and not (time, number, line) < before:
            continue
        if needles and not (wanted.takes(raw) if record is None else wanted.holds(record)):
            continue
        yield time, number, line, raw


def _time_and_record(raw: bytes, chain: Path, line: int) -> tuple[bytes, dict[str, object] | None]:
    """The time of line `line` of `chain` (`raw`, without its line break), and, for a line
    not as kmsgate seals records, the record read as JSON. Raises ValueError naming the
    file and line of a line that is not a JSON object."""
    time = _time_of(raw)
    if time is not None:
        return time, None
    try:
        record = decode(raw)
    except ValueError as exc:
        raise ValueError(f"chain file {chain.name}, line {line}: {exc}") from None
    return str(record.get("time", "")).encode(), record


_BLOCK_BYTES = 1 << 20
"""About how much of a chain file one block of its index covers."""


@dataclass(frozen=True, slots=True)
class _Block:
    """Whole lines of a chain file, and the earliest and latest time they hold."""

    start: int
    end: int
    """The offset after its last line break."""
    first_line: int
    lines: int
    earliest: bytes
    latest: bytes


@dataclass(frozen=True, slots=True)
class _ChainIndex:
    """The blocks of a chain file's lines read so far, for the file (device, inode) whose
    last indexed bytes were `tail`."""

    file: tuple[int, int]
    blocks: list[_Block]
    tail: bytes


_TAIL_BYTES = 64
"""How much of the end of a chain file's indexed lines the index keeps, to tell that the
file was not rewritten since."""
_INDEXES: dict[Path, _ChainIndex] = {}
_INDEXES_LOCK = threading.Lock()


def _indexed(chain: Path) -> list[_Block]:
    """The blocks of chain file `chain` as it is now, to its last line break (a line being
    appended is not there yet): what an earlier search of this process indexed, and the
    lines written since, read now. A file replaced since, or cut and written again (shorter,
    or its indexed end changed), is indexed anew; one edited within (what `verify` finds) is
    trusted as appended to. Raises ValueError naming the file and line of a line too long;
    OSError."""
    with _INDEXES_LOCK, chain.open("rb") as file:
        st = os.fstat(file.fileno())
        known = _INDEXES.get(chain)
        blocks = known.blocks if known is not None and _still_indexed(file, st, known) else []
        if blocks and blocks[-1].end - blocks[-1].start < _BLOCK_BYTES:
            blocks = blocks[:-1]  # a short last block grows rather than a new one being cut
        start, first = (blocks[-1].end, _next_line(blocks[-1])) if blocks else (0, 1)
        file.seek(start)
        try:
            blocks = blocks + list(_blocks(file, start, first))
        except _LongLine as long:
            raise ValueError(f"chain file {chain.name}, {long}") from None
        end = blocks[-1].end if blocks else 0
        file.seek(end - min(end, _TAIL_BYTES))
        _INDEXES[chain] = _ChainIndex(
            (st.st_dev, st.st_ino), blocks, file.read(min(end, _TAIL_BYTES))
        )
        return blocks


def _still_indexed(file: BinaryIO, st: os.stat_result, index: _ChainIndex) -> bool:
    """Whether `file` is still the one `index` was made of: the same file, at least as long,
    and ending its indexed part as it did."""
    end = index.blocks[-1].end if index.blocks else 0
    if (st.st_dev, st.st_ino) != index.file or st.st_size < end:
        return False
    file.seek(end - len(index.tail))
    return file.read(len(index.tail)) == index.tail


def _next_line(block: _Block) -> int:
    """The number of the line after `block`'s last."""
    return block.first_line + block.lines


def _indexed_time(raw: bytes) -> bytes:
    """The time of a line (`raw`, without its line break) as its block counts it: a line
    that is no record counts as earliest of all (a search that reads it says so, one that
    filters it out never reads it, as before the index)."""
    time = _time_of(raw)
    if time is not None:
        return time
    try:
        return str(decode(raw).get("time", "")).encode()
    except ValueError:
        return b""


def _blocks(file: BinaryIO, start: int, first: int) -> Iterator[_Block]:
    """The blocks of `file`'s whole lines from offset `start` (line `first`) on. Raises
    _LongLine."""
    block_start, block_first, earliest, latest = start, first, b"", b""
    offset, line = start, first - 1
    for line, raw in _lines(file, first):
        if not raw.endswith(b"\n"):
            line -= 1
            break  # being appended: in the index once it is whole
        time = _indexed_time(raw[:-1])
        earliest = min(earliest, time) if line > block_first else time
        latest = max(latest, time)
        offset += len(raw)
        if offset - block_start >= _BLOCK_BYTES:
            yield _Block(block_start, offset, block_first, line + 1 - block_first, earliest, latest)
            block_start, block_first, latest = offset, line + 1, b""
    if offset > block_start:
        yield _Block(block_start, offset, block_first, line + 1 - block_first, earliest, latest)


_TIME = b'"time":"'
_HASH = b',"hash":"'
_HASH_AT = -len(_HASH) - 64 - 2
"""Where a sealed line's hash member begins: `,"hash":"<64 hex>"}` ends it."""
_HASH_ENDS = _HASH_AT + len(_HASH)
_TIME_LENGTH = len(_TIME)


def _time_of(raw: bytes) -> bytes | None:
    """The time of a sealed record's line: its last member but the hash (members are in
    key order, `time` the last of them; `chain.sealed_line` appends the hash); None for
    a line that is not a sealed record's."""
    if raw[:1] != b"{" or raw[_HASH_AT:_HASH_ENDS] != _HASH or raw[-2:] != b'"}':
        return None
    at = raw.rfind(_TIME)
    if at < 0:
        return None
    return raw[at + _TIME_LENGTH : raw.find(b'"', at + _TIME_LENGTH)]


_PREV = b'"prev":"'
_RESOURCE = b'"resource":{'


class _LineFilter:
    """Whether a sealed record's line has the given top-level `principal`, resource name
    (`key`) and `action`, told from its canonical JSON (members in key order, no spaces,
    each string as orjson writes it, a quote in a string escaped: a key's bytes `"name":`
    are a member's name, never the inside of a string) without decoding it. `action` is
    always the first member; the top-level `prev` is the line's last member so named (what
    follows it, `principal` to `time`, holds no object with names a caller chose, where the
    detail before it may: an encryption context, labels); `principal` comes right after
    `prev`, and the top-level `resource` (`{kind, name}`) after it."""

    def __init__(self, principal: str | None, key: str | None, action: str | None) -> None:
        self._wanted = (principal, key, action)
        self.needles = tuple(orjson.dumps(value) for value in self._wanted if value is not None)
        """What a line that holds the values given holds, each as its JSON string: lines
        without them are passed over at once (read as JSON or not)."""
        self._action = b'{"action":' + orjson.dumps(action) + b"," if action else None
        self._principal = (
            re.compile(
                _PREV + rb'[0-9a-f]{64}","principal":' + re.escape(orjson.dumps(principal)) + b","
            )
            if principal is not None
            else None
        )
        self._resource = (
            re.compile(
                rb'"resource":\{(?:"kind":"(?:[^"\\]|\\.)*",)?"name":'
                + re.escape(orjson.dumps(key))
                + rb"\}"
            )
            if key is not None
            else None
        )

    def holds(self, record: Mapping[str, object]) -> bool:
        """`takes` for a record read as JSON."""
        principal, key, action = self._wanted
        if action is not None and record.get("action") != action:
            return False
        if principal is not None and record.get("principal") != principal:
            return False
        if key is not None:
            resource = record.get("resource")
            return isinstance(resource, dict) and resource.get("name") == key
        return True

    def takes(self, raw: bytes) -> bool:
        """Whether the sealed record's line `raw` has the values given."""
        if self._action is not None and not raw.startswith(self._action):
            return False
        prev = raw.rfind(_PREV)  # every sealed record has one
        if prev < 0 and (self._principal is not None or self._resource is not None):
            return False
        if self._principal is not None and self._principal.match(raw, prev) is None:
            return False
        if self._resource is not None:
            at = raw.find(_RESOURCE, prev)
            return at >= 0 and self._resource.match(raw, at) is not None
        return True


def _rfc3339(moment: datetime) -> str:
    """The record time format; a naive datetime is taken as UTC."""
    return utc_timestamp(moment if moment.tzinfo else moment.replace(tzinfo=UTC))


# --- verification ----------------------------------------------------------------------

_PROGRESS_BYTES = 1 << 22
"""How much of a chain file `verify` reads between two reports to its `progress`."""


def _verify_chain(
    path: Path,
    expected: ChainIdentity,
    keys: PublicKeys | None,
    anchors: Sequence[AuditAnchor],
    progress: Callable[[int], None] | None = None,
) -> tuple[VerifyReport, ChainCheckpoints | None]:
    """`AuditFile.verify` for one chain file (`expected`: what it should be, as far as
    known), and what its checkpoints prove (None when the chain is broken); `progress` is
    told the bytes read every `_PROGRESS_BYTES` and at the end. Raises OSError."""
    hashes = _Hashes()
    checkpoints: dict[int, dict[str, object]] = {}
    replica: str | None = None
    prev = GENESIS_HASH
    unreported = 0
    with path.open("rb") as f:
        try:
            for lineno, raw in _lines(f):
                unreported += len(raw)
                if progress is not None and unreported >= _PROGRESS_BYTES:
                    progress(unreported)
                    unreported = 0
                record, reason = _line_problem(raw, lineno, prev)
                if record is None:
                    return VerifyReport(False, len(hashes), lineno, reason, path), None
                prev = str(record["hash"])
                hashes.append(prev)
                if record.get("action") == CHECKPOINT_ACTION:
                    checkpoints[lineno] = record
                replica = str(record.get("replica", ""))  # the last writer's, for the store
        except _LongLine as long:
            return VerifyReport(False, len(hashes), long.line, long.reason, path), None
    if progress is not None:
        progress(unreported)
    problem = _head_problem(path, hashes)
    summary, checkpoint_problem = check_checkpoints(
        path, expected, replica or "", hashes, checkpoints, keys, anchors
    )
    problem = problem or checkpoint_problem
    if problem is not None:
        return VerifyReport(False, len(hashes), problem[0], problem[1], path), None
    return VerifyReport(True, len(hashes), None, None), summary


class _Hashes(Sequence[str]):
    """A chain's record hashes, by line (from 0), 32 bytes each (a list of hex strings
    took 190 bytes a record: 2 GB for 10 million)."""

    def __init__(self) -> None:
        self._digests = bytearray()

    def append(self, digest: str) -> None:
        self._digests += bytes.fromhex(digest)

    def __len__(self) -> int:
        return len(self._digests) // 32

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._digests[index * 32 : index * 32 + 32].hex()


def _misplaced(
    chain: Path, summary: ChainCheckpoints, report: VerifyReport
) -> tuple[VerifyReport, ChainCheckpoints | None]:
    """`report` and `summary` of a log's first chain file whose name is not known, unless
    its checkpoints were signed in another chain file of a log of the same name (`audit.log`
    holding what was written as `audit.1.log`): a broken report then."""
    if summary.name == chain.name or _chain_number(chain, summary.name) is None:
        return report, summary
    line = summary.last_line or 1
    reason = (
        f"record {line}: a checkpoint signed in chain file {summary.name}, in {chain.name}: "
        "chain files swapped or renamed"
    )
    return VerifyReport(False, summary.records, line, reason, chain), None


def _missing_chain(
    path: Path,
    summaries: Sequence[ChainCheckpoints],
    anchors: Sequence[AuditAnchor],
    replica: str | None,
) -> tuple[Path, str] | None:
    """(file, reason) if the store has a checkpoint of a chain file of this log's replica
    (`replica` when known, else those its chains name; any when none does) that does not
    exist."""
    present = {summary.name for summary in summaries}
    if replica is not None:
        replicas = {replica}
    else:
        replicas = {summary.replica for summary in summaries if summary.records}
    for anchor in anchors:
        if anchor.chain not in present and (not replicas or anchor.replica in replicas):
            return path.with_name(anchor.chain), (
                f"chain file {anchor.chain} is missing but the store's last checkpoint of it "
                f"is record {anchor.record_seq} (deleted)"
            )
    return None


def _unknown_chain(
    summaries: Sequence[ChainCheckpoints], anchors: Sequence[AuditAnchor], replica: str | None
) -> tuple[Path, str] | None:
    """(file, reason) for a chain file with records of which the store, which keeps
    checkpoints of this log (of `replica`, when known), has none: a gateway keeping them
    there checkpoints each chain from its start, so no gateway of this store wrote it."""
    if not any(replica is None or anchor.replica == replica for anchor in anchors):
        return None  # the store keeps no checkpoint of this log: nothing to compare
    for summary in summaries:
        if summary.records and not summary.anchored:
            return summary.chain, (
                f"chain file {summary.chain.name} holds {summary.records} records and the "
                "store has no checkpoint of it: written by no gateway of this store (made up, "
                "or another store's), or by one older than kmsgate's opening checkpoints that "
                "stopped before its first checkpoint"
            )
    return None


def _line_problem(raw: bytes, lineno: int, prev: str) -> tuple[dict[str, object] | None, str]:
    """(record, "") if line `lineno` is sealed and links to `prev`, else (None, reason)."""
    if not raw.endswith(b"\n"):
        return None, f"line {lineno}: incomplete line (truncated)"
    raw = raw[:-1]
    try:
        record = decode(raw)
    except ValueError as exc:
        return None, f"line {lineno}: {exc}"
    problem = seal_problem(raw, record)
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
        head = read_head(path)
    except ValueError:
        return last_line, f"head file {head_path(path).name}: malformed"
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
