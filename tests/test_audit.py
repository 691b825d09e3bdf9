"""Tests for the hash-chained audit log (kmsgate.audit), on real files."""

from __future__ import annotations

import enum
import errno
import hashlib
import json
import multiprocessing
import os
import re
import stat
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from kmsgate.audit import (
    GENESIS_HASH,
    AuditCursor,
    AuditEvent,
    AuditFile,
    AuditPage,
    AuditSink,
    FileSink,
    VerifyReport,
    filereader,
    input_summary,
    iter_records,
)
from kmsgate.audit.headfile import read_head
from kmsgate.errors import AuditUnavailable, ConfigError, InvalidRequest
from tests.gateway import open_gateway

TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def event(n: int = 0, **overrides: object) -> AuditEvent:
    fields: dict[str, object] = {
        "action": "sign",
        "decision": "allow",
        "outcome": "ok",
        "request_id": f"req-{n}",
        "principal": "zoë",
        "principal_kind": "token",
        "resource": {"kind": "key", "name": "k1"},
        "key_version": 2,
        "inputs": input_summary([b"payload %d" % n]),
    }
    fields.update(overrides)
    return AuditEvent(**fields)  # type: ignore[arg-type]


def reference_hash(record: dict[str, object]) -> str:
    """The spec's definition, computed independently of the module."""
    body = {k: v for k, v in record.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_log(path: Path, count: int, **kwargs: float) -> list[dict[str, object]]:
    """Append `count` events through a new sink and return the records as stored."""
    with FileSink(path, **kwargs) as log:
        for i in range(count):
            log.append(event(i))
    return list(iter_records(path))


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def refuses_appends(log: FileSink) -> bool:
    """Whether `log` refuses an append (AuditUnavailable) instead of writing it."""
    try:
        log.append(event(99))
    except AuditUnavailable:
        return True
    return False


def wait_for(condition: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


# --- writing and the chain ---------------------------------------------------------------


def test_round_trip_chain_and_format(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    stored = write_log(path, 5)

    report = AuditFile(path).verify()
    assert report.ok, report.reason
    assert report.records == 5
    assert (report.first_bad_line, report.reason) == (None, None)

    assert [r["request_id"] for r in stored] == [f"req-{i}" for i in range(5)]
    prev = GENESIS_HASH
    for seq, record in enumerate(stored, 1):
        assert record["seq"] == seq
        assert record["prev"] == prev
        assert record["hash"] == reference_hash(record)
        assert TIME_RE.match(str(record["time"]))
        prev = str(record["hash"])
    assert stored[0]["principal"] == "zoë"
    assert stored[0]["resource"] == {"kind": "key", "name": "k1"}


def test_lines_are_canonical_json_with_hash_last(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 1)
    line = path.read_bytes()
    assert line.endswith(b'"}\n') and line.count(b"\n") == 1
    record = json.loads(line)
    digest = record.pop("hash")
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert line == canonical.encode()[:-1] + f',"hash":"{digest}"}}\n'.encode()
    assert "zoë".encode() in line  # UTF-8, not \u escapes


def test_the_records_an_fsync_has_not_covered_yet_are_counted(tmp_path: Path) -> None:
    """`unsynced` (the gauge kmsgate_audit_unsynced_records): the group commit's queue."""
    with FileSink(tmp_path / "audit.log", fsync_interval=0.05) as log:
        assert log.unsynced == 0
        for i in range(3):
            log.append(event(i))
        assert 1 <= log.unsynced <= 3  # the background fsync may have run meanwhile
        deadline = time.monotonic() + 5
        while log.unsynced:
            assert time.monotonic() < deadline, "the fsync never covered the records"
            time.sleep(0.01)
    with FileSink(tmp_path / "audit.log", fsync_interval=3600) as log:
        assert log.unsynced == 0  # what the file held at start is not counted
        log.append(event(3))
        assert log.unsynced == 1  # no fsync for an hour


def test_none_and_empty_fields_are_omitted(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with FileSink(path) as log:
        log.append(
            AuditEvent(
                action="authn",
                decision="deny",
                outcome="unauthenticated",
                request_id="r1",
                principal=None,
            )
        )
    assert set(next(iter_records(path))) == {
        "seq",
        "time",
        "prev",
        "hash",
        "action",
        "decision",
        "outcome",
        "request_id",
    }
    assert AuditFile(path).verify().ok


class Colour(enum.StrEnum):
    RED = "red"


@pytest.mark.parametrize(
    "detail",
    [
        {"floats": [0.1, 1e-05, 1e-7, 1e16, 123.456, -0.0, 2.5e-300, 1.5]},
        {"ints": [0, -1, 2**63 - 1, -(2**63), 2**64, -(2**70)]},
        {"text": 'tab\t nl\n quote" bs\\ nul\x00 del\x7f ü \u2028 😀 \U0010ffff'},
        {"nested": {"b": [True, False, None, ()], "a": {"z": 1, "é": 2, "😀": 3, "Z": 4}}},
        {"enum": Colour.RED, "int_keys": {7: "seven", 1: "one"}},
    ],
    ids=["floats", "ints", "text", "nested", "subclass-and-int-key"],
)
def test_awkward_values_hash_exactly_as_specified(
    tmp_path: Path, detail: dict[object, object]
) -> None:
    path = tmp_path / "audit.log"
    with FileSink(path) as log:
        log.append(event(detail=detail))
        log.append(event(1))
    assert AuditFile(path).verify().ok
    stored = next(iter_records(path))
    assert stored["detail"] == json.loads(json.dumps(detail))
    assert stored["hash"] == reference_hash(stored)


def test_resume_after_reopen_continues_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    first = write_log(path, 3)
    with FileSink(path) as log:
        assert log.head == (3, first[-1]["hash"])
        log.append(event(3))
    fourth = list(iter_records(path))[3]
    assert fourth["seq"] == 4
    assert fourth["prev"] == first[-1]["hash"]
    report = AuditFile(path).verify()
    assert report.ok and report.records == 4


def test_empty_log_head_is_genesis(tmp_path: Path) -> None:
    with FileSink(tmp_path / "audit.log") as log:
        assert log.head == (0, GENESIS_HASH)


def test_new_log_and_head_file_are_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(f"{path}.head").stat().st_mode) == 0o600


def test_concurrent_appends_form_one_valid_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    start = threading.Barrier(8)

    def worker(log: FileSink, t: int) -> None:
        start.wait()
        for i in range(500):
            log.append(event(t * 1000 + i))

    with FileSink(path, fsync_interval=0.001) as log:
        threads = [threading.Thread(target=worker, args=(log, t)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert log.head[0] == 4000

    report = AuditFile(path).verify()
    assert report.ok, report.reason
    assert report.records == 4000
    request_ids = {r["request_id"] for r in iter_records(path)}
    assert len(request_ids) == 4000


def test_background_fsync_writes_head_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    head_file = Path(f"{path}.head")
    log = FileSink(path, fsync_interval=0.01)
    try:
        log.append(event(0))
        log.append(event(1))
        last_hash = log.head[1]

        def head_current() -> bool:
            return head_file.exists() and json.loads(head_file.read_bytes()) == {
                "seq": 2,
                "hash": last_hash,
            }

        assert wait_for(head_current)
    finally:
        log.close()


def test_close_is_idempotent_and_refuses_later_appends(tmp_path: Path) -> None:
    log = FileSink(tmp_path / "audit.log")
    log.append(event())
    log.close()
    log.close()
    with pytest.raises(AuditUnavailable):
        log.append(event())


def test_event_validation() -> None:
    with pytest.raises(ValueError, match="decision"):
        event(decision="maybe")
    with pytest.raises(TypeError, match="reasons"):
        event(reasons="not-a-list")


# --- fail-closed writes ------------------------------------------------------------------


def test_write_error_raises_and_leaves_chain_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.log"
    with FileSink(path, fsync_interval=3600) as log:
        log.append(event(0))
        head, before = log.head, path.read_bytes()

        def failing_write(fd: int, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(os, "write", failing_write)
            with pytest.raises(AuditUnavailable) as caught:
                log.append(event(1))
        assert caught.value.status == 503
        assert log.head == head
        assert path.read_bytes() == before

        log.append(event(2))
    after = list(iter_records(path))[1]
    assert after["request_id"] == "req-2"
    assert after["seq"] == 2 and after["prev"] == head[1]
    assert AuditFile(path).verify().ok


def test_short_write_is_rolled_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.log"
    real_write = os.write
    with FileSink(path, fsync_interval=3600) as log:
        log.append(event(0))
        head, before = log.head, path.read_bytes()

        def half_write(fd: int, data: bytes) -> int:
            return real_write(fd, data[: len(data) // 2])

        with monkeypatch.context() as patch:
            patch.setattr(os, "write", half_write)
            with pytest.raises(AuditUnavailable):
                log.append(event(1))
        assert log.head == head
        assert path.read_bytes() == before
        log.append(event(2))
    report = AuditFile(path).verify()
    assert report.ok and report.records == 2


def test_fsync_failure_makes_later_appends_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    log = FileSink(tmp_path / "audit.log", fsync_interval=0.01)
    try:
        monkeypatch.setattr(os, "fsync", failing_fsync)
        log.append(event(0))
        assert wait_for(lambda: refuses_appends(log))
    finally:
        log.close()


def test_ready_says_no_room_until_the_record_refused_for_want_of_it_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room for the reserve but not for one more record: appends are refused, and `problem`
    (what readiness reports) keeps saying so at every tick until that record fits."""
    path = tmp_path / "audit.log"
    room = {"left": 10_000}
    monkeypatch.setattr(FileSink, "_size_limit", lambda self: self._size + room["left"])
    log = FileSink(path, fsync_interval=0.01, reserve=1000)
    try:
        log.append(event(0))
        room["left"] = 1000 + 20  # the reserve and less than a record
        log._capacity = log._size + room["left"]
        with pytest.raises(AuditUnavailable):
            log.append(event(1))
        time.sleep(0.1)  # several ticks
        assert "no room" in (log.problem() or "")
        room["left"] = 10_000
        assert wait_for(lambda: log.problem() is None)
        log.append(event(2))
    finally:
        log.close()


def test_a_head_file_the_disk_has_no_room_for_is_written_once_there_is_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk (or one out of inodes, where the free space still shows room) fails
    the head file's write (ENOSPC) after the records are durable: the sink refuses appends
    but a change's outcome until the head is written again (said once, not at every tick),
    leaves no temporary file behind, and goes on by itself once the write succeeds."""
    path = tmp_path / "audit.log"
    real_write, full = os.write, threading.Event()
    full.set()

    def write(fd: int, data: bytes) -> int:
        if full.is_set() and data.startswith(b'{"seq"'):  # the head file's one line
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    log = FileSink(path, fsync_interval=0.01)
    try:
        log.append(event(0))
        assert wait_for(lambda: log.problem() is not None)
        assert "no room" in (log.problem() or "")
        time.sleep(0.1)  # several ticks without room
        assert [p.name for p in tmp_path.iterdir()] == ["audit.log"]  # no temporary file
        with pytest.raises(AuditUnavailable):
            log.append(event(8))
        log.append(event(9), reserved=True)  # the outcome of a change under way
        said = [r for r in caplog.records if "no room for its head file" in r.getMessage()]
        assert len(said) == 1
        full.clear()  # room again
        assert wait_for(lambda: log.problem() is None)
        assert wait_for(lambda: read_head(path) == log.head)
        log.append(event(1))
    finally:
        log.close()
    assert AuditFile(path).verify().ok


def test_unencodable_event_raises_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with FileSink(path) as log:
        with pytest.raises(TypeError):
            log.append(event(detail={"raw": b"secret bytes"}))
        assert log.head == (0, GENESIS_HASH)
    assert path.read_bytes() == b""


# --- opening existing files --------------------------------------------------------------


def test_open_rejects_garbage_last_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 2)
    with path.open("ab") as f:
        f.write(b"not json\n")
    with pytest.raises(ConfigError, match="not valid JSON"):
        FileSink(path)


def test_open_rejects_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 2)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="incomplete"):
        FileSink(path)


def test_open_rejects_edited_last_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 2)
    path.write_bytes(path.read_bytes().replace(b'"req-1"', b'"req-X"'))
    Path(f"{path}.head").unlink()
    with pytest.raises(ConfigError, match="hash mismatch"):
        FileSink(path)


def test_open_rejects_log_behind_head_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 3)
    path.write_bytes(b"".join(lines_of(path)[:-1]))
    with pytest.raises(ConfigError, match="deleted"):
        FileSink(path)


def test_open_accepts_head_lagging_behind_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    records = write_log(path, 3)
    Path(f"{path}.head").write_text(json.dumps({"seq": 1, "hash": records[0]["hash"]}))
    with FileSink(path) as log:
        assert log.head == (3, records[2]["hash"])


def test_open_rejects_rewritten_record_named_by_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 3)
    Path(f"{path}.head").write_text(json.dumps({"seq": 2, "hash": "ab" * 32}))
    with pytest.raises(ConfigError, match="head file"):
        FileSink(path)


def test_open_finds_head_record_several_blocks_back(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    records = write_log(path, 600)  # about 250 KiB: several 64 KiB read blocks
    assert path.stat().st_size > 3 * 65536
    head_file = Path(f"{path}.head")
    head_file.write_text(json.dumps({"seq": 5, "hash": records[4]["hash"]}))
    with FileSink(path) as log:
        assert log.head == (600, records[-1]["hash"])
    head_file.write_text(json.dumps({"seq": 5, "hash": records[5]["hash"]}))
    with pytest.raises(ConfigError, match="head file"):
        FileSink(path)


def test_unopenable_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open"):
        FileSink(tmp_path / "missing-dir" / "audit.log")


def test_each_writer_claims_a_chain_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with FileSink(path) as first, FileSink(path) as second:
        assert (first.chain, second.chain) == (path, tmp_path / "audit.1.log")
        for i in range(50):
            (first if i % 3 else second).append(event(i))
    report = AuditFile(path).verify()
    assert report.ok, report.reason
    assert (report.records, report.chains) == (50, 2)
    assert [r["seq"] for r in iter_records(tmp_path / "audit.1.log")] == list(range(1, 18))
    # a writer that comes back later resumes the first free chain
    with FileSink(path) as again:
        assert again.chain == path
        again.append(event(99))
        assert again.head[0] == 34


def _append_in_process(path: str, count: int) -> None:
    with FileSink(Path(path), fsync_interval=0.001) as log:
        for i in range(count):
            log.append(event(i))


def test_worker_processes_each_keep_a_chain_and_readers_see_all(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_in_process, args=(str(path), 300)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    log = AuditFile(path)
    report = log.verify()
    assert report.ok, report.reason
    assert report.records == 900
    chains = sorted(p.name for p in tmp_path.glob("audit*.log"))
    heads = [json.loads((tmp_path / f"{name}.head").read_text())["seq"] for name in chains]
    # which process got which file depends on start order; how many records each holds does not
    assert sum(heads) == 900 and len(chains) in (1, 2, 3)
    assert not list(tmp_path.glob("*.tmp"))
    everything = log.search(limit=1000)
    assert len(everything.records) == 900 and everything.next is None
    newest = log.search(limit=5).records
    times = [str(r["time"]) for r in everything.records]
    assert times == sorted(times) and [str(r["time"]) for r in newest] == times[-5:]


@pytest.mark.parametrize("block_bytes", [1 << 20, 40])
def test_a_search_pages_back_through_every_match_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int
) -> None:
    """`next` leads to the older matches: paging back visits every match exactly once, in
    the order of one search over all, even where records of two chains share a time (a
    cursor is a time, a chain and a line, never a time alone) and where a chain's times
    step back (pages are cut by cursor, not by file order), whether the index holds one
    block of a chain or one per line."""
    monkeypatch.setattr(filereader, "_BLOCK_BYTES", block_bytes)
    times = {  # chain file -> its records' times, as written (a clock stepped back in one)
        "audit.log": ["01", "02", "02", "03", "05"],
        "audit.1.log": ["05", "06", "04", "07"],
    }
    for name, stamps in times.items():
        lines = [
            json.dumps({"time": f"2026-12-07T08:00:00.0000{s}Z", "action": "sign", "n": i})
            for i, s in enumerate(stamps)
        ]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    log = AuditFile(tmp_path / "audit.log")
    whole = log.search(limit=100)
    assert len(whole.records) == 9 and whole.next is None
    pages: list[list[dict[str, object]]] = []
    before = None
    while True:
        page = log.search(limit=2, before=before)
        pages.append(page.records)
        if page.next is None:
            break
        before = AuditCursor.parse(page.next)
    assert [len(p) for p in pages] == [2, 2, 2, 2, 1]
    assert [r for p in reversed(pages) for r in p] == whole.records
    for bad in (
        "",
        "2026-12-07T08:00:00Z~0~1",
        "2026-12-07T08:00:00.000001Z~0~0",
        "x~1~1",
        "2026-99-99T99:99:99.999999Z~0~7",  # the shape of a time, not a time
        "\u0662\u0660\u0662\u0666-12-07T08:00:00.000001Z~0~7",  # digits, but not ASCII ones
    ):
        with pytest.raises(InvalidRequest, match="not a cursor"):
            AuditCursor.parse(bad)


def test_a_verify_names_the_broken_chain_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with FileSink(path) as first, FileSink(path) as second:
        for i in range(4):
            first.append(event(i))
            second.append(event(i))
    other = tmp_path / "audit.1.log"
    lines = lines_of(other)
    other.write_bytes(b"".join(lines[:1] + lines[2:]))
    report = AuditFile(path).verify()
    assert (report.ok, report.chain, report.first_bad_line, report.chains) == (False, other, 2, 2)


def test_a_verify_reports_its_progress_over_every_chain_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`audit verify` of a large log showed nothing for minutes: verify now tells its
    `progress` the bytes read, now and then and at the end of each chain file, so that they
    add up to the files' sizes."""
    monkeypatch.setattr(filereader, "_PROGRESS_BYTES", 2000)
    path = tmp_path / "audit.log"
    with FileSink(path) as first, FileSink(path) as second:
        for i in range(40):
            first.append(event(i))
            second.append(event(i))
    reports: list[int] = []
    assert AuditFile(path).verify(progress=reports.append).ok
    sizes = path.stat().st_size + (tmp_path / "audit.1.log").stat().st_size
    assert sum(reports) == sizes and len(reports) >= sizes // 4000
    assert min(sorted(reports)[2:]) >= 2000  # only each chain's last report is smaller


def test_text_appended_by_someone_else_stops_appends(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with FileSink(path, fsync_interval=0.01) as log:
        log.append(event(1))
        with path.open("ab") as f:
            f.write(b'{"not": "sealed"}\n')
        assert wait_for(lambda: refuses_appends(log))
    assert not AuditFile(path).verify().ok


@pytest.mark.parametrize("how", ["removed", "renamed", "replaced"])
def test_a_chain_file_taken_away_while_in_use_stops_appends(tmp_path: Path, how: str) -> None:
    """Records appended to a file no path names any more would be read by no one: once the
    chain's path no longer names the sink's file, appends are refused (and ready says so),
    even when nothing was written since."""
    path = tmp_path / "audit.log"
    with FileSink(path, fsync_interval=0.01) as log:
        log.append(event(1))
        if how == "removed":
            path.unlink()
        elif how == "renamed":
            path.rename(tmp_path / "elsewhere.log")
        else:
            replacement = tmp_path / "new.log"
            replacement.write_bytes(path.read_bytes())
            replacement.replace(path)
        assert wait_for(lambda: refuses_appends(log))
        assert log.problem() is not None


def test_non_positive_fsync_interval_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        FileSink(tmp_path / "audit.log", fsync_interval=0)


# --- tamper detection --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("audit") / "audit.log"
    write_log(path, 6)
    return path.read_bytes()


@pytest.mark.parametrize("k", [1, 3, 6])
def test_every_single_byte_flip_in_record_k_is_reported_at_line_k(
    tmp_path: Path, pristine: bytes, k: int
) -> None:
    lines = pristine.splitlines(keepends=True)
    start = sum(len(line) for line in lines[: k - 1])
    path = tmp_path / "audit.log"
    for offset in range(start, start + len(lines[k - 1])):
        data = bytearray(pristine)
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))
        report = AuditFile(path).verify()
        assert not report.ok, f"flip at byte {offset} not detected"
        assert report.first_bad_line == k, (offset, report)
        assert report.records == k - 1


def test_edited_value_reports_hash_mismatch(tmp_path: Path, pristine: bytes) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(pristine.replace(b'"req-3"', b'"req-9"'))
    report = AuditFile(path).verify()
    assert (report.first_bad_line, report.reason) == (4, "record 4: hash mismatch (edited)")


def test_deleted_middle_record(tmp_path: Path, pristine: bytes) -> None:
    lines = pristine.splitlines(keepends=True)
    path = tmp_path / "audit.log"
    path.write_bytes(b"".join(lines[:2] + lines[3:]))
    report = AuditFile(path).verify()
    assert not report.ok
    assert report.first_bad_line == 3
    assert report.reason == "record 3: prev does not match record 2 (deleted or reordered)"


def test_deleted_first_record(tmp_path: Path, pristine: bytes) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(b"".join(pristine.splitlines(keepends=True)[1:]))
    report = AuditFile(path).verify()
    assert (report.ok, report.first_bad_line) == (False, 1)
    assert "start of the chain" in str(report.reason)


def test_swapped_records(tmp_path: Path, pristine: bytes) -> None:
    lines = pristine.splitlines(keepends=True)
    lines[3], lines[4] = lines[4], lines[3]
    path = tmp_path / "audit.log"
    path.write_bytes(b"".join(lines))
    report = AuditFile(path).verify()
    assert (report.ok, report.first_bad_line) == (False, 4)
    assert "deleted or reordered" in str(report.reason)


def test_rehashed_record_with_wrong_seq(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    records = write_log(path, 2)
    forged = dict(records[1], seq=7)
    forged["hash"] = reference_hash(forged)
    body = json.dumps(
        {k: v for k, v in forged.items() if k != "hash"},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    lines = lines_of(path)
    lines[1] = body.encode()[:-1] + f',"hash":"{forged["hash"]}"}}\n'.encode()
    path.write_bytes(b"".join(lines))
    Path(f"{path}.head").unlink()
    report = AuditFile(path).verify()
    assert (report.first_bad_line, report.reason) == (2, "record 2: seq 7 expected 2")


@pytest.mark.parametrize("cut", [1, 20])
def test_truncated_last_line(tmp_path: Path, pristine: bytes, cut: int) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(pristine[:-cut])
    report = AuditFile(path).verify()
    assert (report.ok, report.first_bad_line, report.records) == (False, 6, 5)
    assert report.reason == "line 6: incomplete line (truncated)"


def test_non_canonical_line_with_same_values_is_detected(tmp_path: Path, pristine: bytes) -> None:
    # A duplicate key is ignored by json.loads (last wins) but shown by other readers.
    lines = pristine.splitlines(keepends=True)
    lines[2] = b'{"principal":"mallory",' + lines[2][1:]
    path = tmp_path / "audit.log"
    path.write_bytes(b"".join(lines))
    report = AuditFile(path).verify()
    assert (report.first_bad_line, report.reason) == (3, "record 3: not in canonical form (edited)")


def test_garbled_line(tmp_path: Path, pristine: bytes) -> None:
    lines = pristine.splitlines(keepends=True)
    lines[1] = b"\xff\xfe garbage\n"
    path = tmp_path / "audit.log"
    path.write_bytes(b"".join(lines))
    report = AuditFile(path).verify()
    assert (report.first_bad_line, report.reason) == (2, "line 2: not valid JSON")
    lines[1] = b"[1, 2]\n"  # JSON, but no record
    path.write_bytes(b"".join(lines))
    report = AuditFile(path).verify()
    assert (report.first_bad_line, report.reason) == (2, "line 2: not a JSON object")


def test_deleted_last_record_is_caught_by_head_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 4)
    assert AuditFile(path).verify().ok
    path.write_bytes(b"".join(lines_of(path)[:-1]))
    report = AuditFile(path).verify()
    assert (report.ok, report.records, report.first_bad_line) == (False, 3, 3)
    assert "head file says seq 4" in str(report.reason)


def test_all_records_deleted_is_caught_by_head_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 2)
    path.write_bytes(b"")
    report = AuditFile(path).verify()
    assert not report.ok and report.records == 0


def test_rewritten_last_record_is_caught_by_head_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    records = write_log(path, 3)
    forged = dict(records[2], outcome="key_disabled")
    forged["hash"] = reference_hash(forged)
    body = json.dumps(
        {k: v for k, v in forged.items() if k != "hash"},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    lines = lines_of(path)
    lines[2] = body.encode()[:-1] + f',"hash":"{forged["hash"]}"}}\n'.encode()
    path.write_bytes(b"".join(lines))
    report = AuditFile(path).verify()
    assert (report.ok, report.first_bad_line) == (False, 3)
    assert report.reason == "record 3: hash does not match head file (rewritten)"


def test_malformed_head_file_fails_verification(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 2)
    Path(f"{path}.head").write_text("{")
    report = AuditFile(path).verify()
    assert not report.ok and "head file" in str(report.reason)


# --- reading -----------------------------------------------------------------------------


def test_search_and_verify_through_the_sink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.log"
    with FileSink(path) as log:
        sink: AuditSink = log
        sink.append(event(0, principal="alice", action="sign"))
        sink.append(
            event(1, principal="bob", action="sign", resource={"kind": "key", "name": "k2"})
        )
        sink.append(event(2, principal="alice", action="key.create"))
        time.sleep(0.002)
        sink.append(
            event(3, principal="alice", action="sign", resource={"kind": "key", "name": "k2"})
        )
        sink.append(event(4, principal=None, action="authn", decision="deny", resource={}))

        def ids(records: list[dict[str, object]]) -> list[object]:
            return [r["request_id"] for r in records]

        assert sink.verify() == VerifyReport(True, 5, None, None)
        assert ids(sink.search().records) == [f"req-{i}" for i in range(5)]
        assert ids(sink.search(principal="alice").records) == ["req-0", "req-2", "req-3"]
        assert ids(sink.search(key="k2").records) == ["req-1", "req-3"]
        assert ids(sink.search(action="sign").records) == ["req-0", "req-1", "req-3"]
        assert ids(sink.search(principal="alice", key="k2", action="sign").records) == ["req-3"]
        assert ids(sink.search(principal="alice", limit=2).records) == ["req-2", "req-3"]
        assert sink.search(principal="carol").records == []

        t3 = datetime.strptime(str(sink.search().records[3]["time"]), "%Y-%m-%dT%H:%M:%S.%fZ")
        assert ids(sink.search(since=t3.replace(tzinfo=UTC)).records) == ["req-3", "req-4"]
        monkeypatch.setenv("TZ", "EST+5")  # a naive `since` must not be read as local time
        time.tzset()
        try:
            assert ids(sink.search(since=t3).records) == ["req-3", "req-4"]
        finally:
            monkeypatch.undo()
            time.tzset()
        plus_two = timezone(timedelta(hours=2))
        since = t3.replace(tzinfo=UTC).astimezone(plus_two)
        assert ids(sink.search(since=since).records) == ["req-3", "req-4"]
        with pytest.raises(ValueError):
            sink.search(limit=0)


def test_iter_records_names_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    write_log(path, 2)
    with path.open("ab") as f:
        f.write(b"{oops\n")
    with pytest.raises(ValueError, match="line 3"):
        list(iter_records(path))


def test_input_summary() -> None:
    one = input_summary([b"hello"])
    assert one == {"count": 1, "length": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}

    items = [b"a", b"bc", b""]
    batch = input_summary(items)
    digests = b"".join(hashlib.sha256(i).digest() for i in items)
    assert batch == {"count": 3, "length": 3, "sha256": hashlib.sha256(digests).hexdigest()}
    assert batch["sha256"] != hashlib.sha256(b"abc").hexdigest()

    assert input_summary([]) == {"count": 0, "length": 0, "sha256": hashlib.sha256().hexdigest()}


# --- the sink protocol in the service ----------------------------------------------------


class RefusingSink:
    """An AuditSink that can record nothing: every append raises AuditUnavailable."""

    def __init__(self) -> None:
        self.refused: list[AuditEvent] = []

    def append(self, event: AuditEvent, *, reserved: bool = False) -> None:
        self.refused.append(event)
        raise AuditUnavailable("Audit log unavailable: operation refused")

    def problem(self) -> str | None:
        return "refuses every record"

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
        return AuditPage([], None)

    def verify(self) -> VerifyReport:
        return VerifyReport(True, 0, None, None)

    def close(self) -> None:
        pass


def test_a_sink_that_cannot_record_refuses_a_rotation_before_it_runs(tmp_path: Path) -> None:
    """No record, no change, whatever the sink: the rotation's allow record cannot be
    appended, so the rotation does not run (503) and the key keeps its single version."""
    with open_gateway(tmp_path) as (api, admin):
        new_key = {"name": "guarded", "type": "ecdsa-p256", "purpose": "general"}
        assert api.call("POST", "/v1/keys", admin, json=new_key).status_code == 201
        refusing = RefusingSink()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(api.service.gate, "audit", refusing)
            r = api.call("POST", "/v1/keys/guarded/rotate", admin)
        assert (r.status_code, r.json()["code"]) == (503, "audit_unavailable")
        assert r.headers["retry-after"]
        assert [(e.action, e.outcome) for e in refusing.refused] == [("key.rotate", "started")]
        api.service.catalogue.reload()
        assert sorted(api.service.catalogue.get("guarded").versions) == [1]
        assert api.call("GET", "/v1/keys/guarded", admin).json()["primary_version"] == 1


def test_readiness_fails_while_the_audit_log_refuses_records(tmp_path: Path) -> None:
    """A gateway whose audit log refuses every record refuses every operation: a load
    balancer must stop sending it traffic."""
    with open_gateway(tmp_path) as (api, admin):
        ready = api.call("GET", "/v1/sys/ready", None)
        assert ready.json()["audit"] == {"ok": True, "detail": "ok"}
        log = api.service.settings.resolved_audit_path()
        with log.open("ab") as foreign:
            foreign.write(b'{"written": "by someone else"}\n')
        assert api.call("GET", "/v1/keys", admin).status_code == 200  # a record: it syncs
        deadline = time.monotonic() + 5
        while (ready := api.call("GET", "/v1/sys/ready", None)).status_code == 200:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.05)
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
        why = (
            "the audit log cannot be made durable (the gateway's log says why); once that "
            "is mended, restart the gateway"
        )
        assert ready.json()["audit"] == {"ok": False, "detail": why}
        assert ready.json()["detail"] == f"audit: {why}"
        refused = api.call("GET", "/v1/keys", admin)
        assert refused.status_code == 503 and refused.json()["code"] == "audit_unavailable"
        assert refused.json()["detail"] == f"operation refused: {why}"  # what to do about it


@pytest.mark.parametrize("block_bytes", [1 << 20, 3000])
def test_a_search_reads_sealed_lines_as_their_records_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int
) -> None:
    """The search tells a sealed line's time, principal, resource name and action from its
    bytes, without decoding it: the same records as a filter over the decoded records,
    whatever the detail holds (members named `time`, `principal`, `resource`; quotes,
    backslashes, non-ASCII and control characters; a float, which seals through the json
    module), for every filter, a `since` between two records and pages of 7 (the index
    in one block, or in blocks of a few records)."""
    monkeypatch.setattr(filereader, "_BLOCK_BYTES", block_bytes)
    names = ["k1", 'we"ird\\name', "zoë", "k1\n", None]
    principals = ["zoë", "token:ab", 'a"b', None]
    path = tmp_path / "audit.log"
    with FileSink(path) as log:
        for n in range(120):
            log.append(
                event(
                    n,
                    action=("sign", "key.create", "decrypt")[n % 3],
                    principal=principals[n % 4],
                    resource={"kind": "key", "name": names[n % 5]} if names[n % 5] else {},
                    detail={  # a caller's context could name members so
                        "context": {"prev": "f" * 64, "principal": "token:ab"},
                        "time": "9999-12-31T00:00:00.000000Z",
                        "principal": "zoë",
                        "resource": {"kind": "key", "name": "k1"},
                        **({"ratio": n / 7} if n % 6 == 0 else {}),
                    },
                )
            )
    records = list(iter_records(path))
    since = str(records[57]["time"])
    audit = AuditFile(path)
    for principal in [None, *principals[:3], "nobody"]:
        for key in [None, *[k for k in names if k], "nothing"]:
            for action in (None, "sign", "key.create", "nothing"):
                for after in (None, since):
                    found = audit.search(
                        principal=principal,
                        key=key,
                        action=action,
                        since=datetime.fromisoformat(after) if after else None,
                        limit=1000,
                    ).records
                    expected = [
                        r
                        for r in records
                        if (principal is None or r.get("principal") == principal)
                        and (key is None or (r.get("resource") or {}).get("name") == key)
                        and (action is None or r["action"] == action)
                        and (after is None or str(r["time"]) >= after)
                    ]
                    assert found == expected, (principal, key, action, after)
                    if after is None:
                        assert _paged(audit, principal, key, action) == expected[-20:]


def _paged(
    audit: AuditFile, principal: str | None, key: str | None, action: str | None
) -> list[dict[str, object]]:
    """The latest 20 matches (or fewer), read back in pages of 7."""
    pages: list[list[dict[str, object]]] = []
    before = None
    while len(pages) < 3:
        page = audit.search(principal=principal, key=key, action=action, limit=7, before=before)
        pages.append(page.records)
        if page.next is None:
            break
        before = AuditCursor.parse(page.next)
    return [r for page in reversed(pages) for r in page][-20:]


def test_the_latest_page_reads_the_end_of_the_log_and_lines_written_since(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page read every record of every chain file (seconds at a million records, the
    interpreter taken from key operations meanwhile). The index of each chain's blocks
    (kept by the process, extended by what was written since) lets the latest page read
    only its last blocks; a chain file replaced since is indexed anew."""
    monkeypatch.setattr(filereader, "_BLOCK_BYTES", 2000)
    path = tmp_path / "audit.log"
    write_log(path, 200)
    audit = AuditFile(path)
    assert len(audit.search(limit=500).records) == 200  # indexes the whole file
    read: list[int] = []  # the lines whose time is read: to index them, or to match them
    time_and_record = filereader._time_and_record
    monkeypatch.setattr(
        filereader, "_time_and_record", lambda *a: (read.append(a[2]), time_and_record(*a))[1]
    )
    latest = audit.search(limit=5)
    assert [r["request_id"] for r in latest.records] == [f"req-{n}" for n in range(195, 200)]
    assert len(read) < 40 and min(read) > 150 and latest.next is not None, read
    with FileSink(path) as log:
        log.append(event(1000))
    assert audit.search(limit=1).records[0]["request_id"] == "req-1000"
    replaced = tmp_path / "new.log"
    write_log(replaced, 3)
    os.replace(replaced, path)
    assert [r["request_id"] for r in audit.search(limit=10).records] == ["req-0", "req-1", "req-2"]


def test_a_line_that_is_no_record_fails_only_the_searches_that_read_it(tmp_path: Path) -> None:
    """The index reads every line's time: a line that is not JSON made every search fail,
    where a filter that passes it over found the other records before the index."""
    path = tmp_path / "audit.log"
    path.write_text(
        '{"time": "2026-12-07T08:00:00.000001Z", "action": "sign", "principal": "a"}\n'
        "not json\n"
        '{"time": "2026-12-07T08:00:00.000002Z", "action": "sign", "principal": "b"}\n'
    )
    audit = AuditFile(path)
    assert [r["principal"] for r in audit.search(principal="b").records] == ["b"]
    with pytest.raises(ValueError, match=r"chain file audit\.log, line 2: not valid JSON"):
        audit.search()


def test_a_line_too_long_for_a_record_is_named_not_read_whole(tmp_path: Path) -> None:
    """A chain file with a line of 2 MiB (a file with no line break at all, /dev/zero): a
    reader keeps at most 1 MiB of it, and verification and search name the line."""
    path = tmp_path / "audit.log"
    write_log(path, 2)
    with path.open("ab") as log:
        log.write(b"x" * (2 * 1024 * 1024))
    report = AuditFile(path).verify()
    assert (report.ok, report.first_bad_line) == (False, 3), report
    assert "over 1048576 bytes long" in str(report.reason)
    with pytest.raises(ValueError, match=r"chain file audit\.log, line 3: over 1048576 bytes"):
        AuditFile(path).search(limit=1)
