"""Signed audit checkpoints: written by the sink every N records or T seconds and on close
(final), signed through the service's backend signing with a key of purpose `audit`, kept
in the store, and checked by `kmsgate audit verify` against tampering the hash chain alone
cannot show (records appended to a closed log, a truncated tail with its head file
rewritten, a forged signature, a log that disagrees with the store)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from kmsgate.audit import CHECKPOINT_ACTION, AuditEvent, AuditFile, CheckpointPolicy, FileSink
from kmsgate.audit.chain import GENESIS_HASH, canonical, sealed_line
from kmsgate.audit.checkpoint import (
    ChainIdentity,
    CheckpointSignature,
    checkpoint_fields,
    signed_payload,
)
from kmsgate.audit.filereader import UNKNOWN_WRITER, chain_path, log_of_chain
from kmsgate.audit.headfile import head_path, write_head
from kmsgate.auth import Principal
from kmsgate.bootstrap import build_service, ensure_dev_audit_key
from kmsgate.cli.auditcheck import checkpoint_lines, stored_anchors
from kmsgate.config import DEV_AUDIT_KEY, Settings
from kmsgate.errors import ConfigError, InvalidRequest, Unavailable
from kmsgate.service import Ctx
from kmsgate.service.requests import SignInput
from kmsgate.store import Store
from kmsgate.store.checkpoints import AuditAnchor
from tests.test_cli import Gateway, Run, clean_env, run_cli, running_gateway

# -- helpers ------------------------------------------------------------------------------


def event(n: int) -> AuditEvent:
    return AuditEvent("sign", "allow", "ok", f"req-{n}", "alice")


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def checkpoints(path: Path) -> list[dict[str, object]]:
    return [r for r in records(path) if r["action"] == CHECKPOINT_ACTION]


def detail(record: dict[str, object]) -> dict[str, object]:
    found = record["detail"]
    assert isinstance(found, dict)
    return found


def rewrite(path: Path, chain: list[dict[str, object]]) -> None:
    """Write `chain` as a correctly sealed chain (seq, prev and hash recomputed) and its
    head file: what someone who can write the files (but not sign) can do."""
    lines, prev = [], GENESIS_HASH
    for seq, record in enumerate(chain, 1):
        body = canonical(
            {**{k: v for k, v in record.items() if k != "hash"}, "seq": seq, "prev": prev}
        )
        prev = hashlib.sha256(body).hexdigest()
        lines.append(sealed_line(body, prev) + b"\n")
    path.write_bytes(b"".join(lines))
    write_head(path, len(chain), prev)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class LocalSigner:
    """An Ed25519 checkpoint signer for the sink's own tests (the gateway's goes through
    the backend: tested below)."""

    def __init__(self) -> None:
        self.key = ed25519.Ed25519PrivateKey.generate()
        self.calls = 0

    def __call__(self, payload: bytes) -> CheckpointSignature:
        self.calls += 1
        return CheckpointSignature("audit-test", 1, "ed25519", self.key.sign(payload))

    def public_keys(self, name: str, version: int) -> tuple[ed25519.Ed25519PublicKey, ...]:
        return (self.key.public_key(),) if (name, version) == ("audit-test", 1) else ()


@pytest.fixture
def signer() -> LocalSigner:
    return LocalSigner()


def open_sink(
    path: Path,
    signer: LocalSigner,
    anchors: list[AuditAnchor],
    every_records: int = 1000,
    every_seconds: float = 60.0,
    replica: str = "r1",
) -> FileSink:
    """A sink on `path` signing checkpoints with `signer`, each appended to `anchors` (the
    store keeps the last of each chain: `kept`), and held to the last of them for its
    chain, as the gateway holds a chain to the store's."""
    sink = FileSink(path, fsync_interval=0.01, replica=replica, anchors=anchors)
    stored = kept(anchors).get((replica, sink.chain.name))
    policy = CheckpointPolicy(signer, every_records, every_seconds, anchors.append)
    sink.start_checkpoints(policy, stored)
    return sink


def kept(anchors: list[AuditAnchor]) -> dict[tuple[str, str], AuditAnchor]:
    """What the store keeps of `anchors`: the last one of each (replica, chain)."""
    return {(anchor.replica, anchor.chain): anchor for anchor in anchors}


class KeptAnchors(list[AuditAnchor]):
    """Checkpoints as the store keeps them: appending one replaces the one before of its
    replica and chain (the last is last)."""

    def append(self, anchor: AuditAnchor) -> None:
        self[:] = [a for a in self if (a.replica, a.chain) != (anchor.replica, anchor.chain)]
        super().append(anchor)


# -- the sink ---------------------------------------------------------------------------


def test_a_checkpoint_follows_n_records(tmp_path: Path, signer: LocalSigner) -> None:
    log, anchors = tmp_path / "audit.log", KeptAnchors()
    with open_sink(log, signer, anchors, every_records=10, every_seconds=3600) as sink:
        (opening,) = checkpoints(log)  # the chain's start (seq 0), for the store to know it
        assert opening["seq"] == 1 and detail(opening)["seq"] == 0
        assert detail(opening)["hash"] == GENESIS_HASH and anchors[-1].record_seq == 1
        for n in range(9):
            sink.append(event(n))
        time.sleep(0.2)
        assert len(checkpoints(log)) == 1  # 9 < 10 and an hour is far
        sink.append(event(9))
        wait_for(lambda: len(checkpoints(log)) == 2)
        mark = checkpoints(log)[1]
        assert mark["seq"] == 12 and detail(mark)["seq"] == 11 and detail(mark)["final"] is False
        assert detail(mark)["hash"] == records(log)[10]["hash"]
        assert anchors[-1].record_seq == 12 and anchors[-1].seq == 11
    report = AuditFile(log).verify(keys=signer.public_keys, anchors=anchors[-1:])
    assert report.ok, report
    (chain,) = report.checkpoints
    assert (chain.checkpoints, chain.last_final, chain.unsigned) == (3, True, 0)
    assert chain.signatures_checked == 3 and chain.anchored


def test_a_checkpoint_follows_t_seconds(tmp_path: Path, signer: LocalSigner) -> None:
    log, anchors = tmp_path / "audit.log", KeptAnchors()
    with open_sink(log, signer, anchors, every_records=1000, every_seconds=0.3) as sink:
        started = time.monotonic()
        sink.append(event(0))
        wait_for(lambda: len(checkpoints(log)) == 2)  # the opening one, then this one
        assert time.monotonic() - started >= 0.3
        time.sleep(0.5)
        assert len(checkpoints(log)) == 2  # an idle log is not checkpointed again
    assert signer.calls == 3  # the opening one, the one above and the final one


def test_close_writes_a_final_checkpoint_and_reopening_covers_it(
    tmp_path: Path, signer: LocalSigner
) -> None:
    log, anchors = tmp_path / "audit.log", KeptAnchors()
    with open_sink(log, signer, anchors) as sink:
        sink.append(event(0))
    last = records(log)[-1]
    assert last["action"] == CHECKPOINT_ACTION and detail(last)["final"] is True
    assert detail(last)["seq"] == 2 and anchors[-1].final  # after the opening one and event 0
    with open_sink(log, signer, anchors, replica="r2") as sink:  # the host was renamed
        reopening = records(log)[-1]
        assert reopening["action"] == CHECKPOINT_ACTION and detail(reopening)["seq"] == 3
        sink.append(event(1))
    assert {(a.replica, a.final) for a in anchors} == {("r1", True), ("r2", True)}
    report = AuditFile(log).verify(keys=signer.public_keys, anchors=anchors)
    assert report.ok, report
    assert report.checkpoints[0].checkpoints == 4
    assert report.checkpoints[0].signatures_checked == 4 and report.checkpoints[0].anchored


def test_a_closed_chain_is_not_reopened_without_a_signature(
    tmp_path: Path, signer: LocalSigner
) -> None:
    log = tmp_path / "audit.log"
    with open_sink(log, signer, []) as sink:
        sink.append(event(0))

    def refuse(payload: bytes) -> CheckpointSignature:
        raise InvalidRequest("no key")

    with FileSink(log) as sink, pytest.raises(ConfigError, match="reopening"):
        sink.start_checkpoints(CheckpointPolicy(refuse))
    assert records(log)[-1]["action"] == CHECKPOINT_ACTION  # nothing appended


def test_a_new_chain_whose_opening_checkpoint_cannot_be_signed_is_written_all_the_same(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The audit key's backend is down as a gateway starts on a new chain: the opening
    checkpoint is logged as not signed and the chain is written (the store learns of it
    with its next checkpoint), rather than the gateway refusing to start."""
    log, anchors = tmp_path / "audit.log", KeptAnchors()

    def refuse(payload: bytes) -> CheckpointSignature:
        raise Unavailable("the audit key's backend is down")

    with FileSink(log, anchors=anchors) as sink:
        sink.start_checkpoints(CheckpointPolicy(refuse, anchor=anchors.append))
        sink.append(event(0))
    assert [r["action"] for r in records(log)] == ["sign"] and anchors == []
    assert "audit checkpoint not signed" in caplog.text


def test_records_appended_after_the_final_checkpoint_fail_verify(
    tmp_path: Path, signer: LocalSigner
) -> None:
    log = tmp_path / "audit.log"
    with open_sink(log, signer, []) as sink:
        sink.append(event(0))
    with FileSink(log) as sink:  # no signer: what a forger can write
        sink.append(event(1))
    for keys in (None, signer.public_keys):
        report = AuditFile(log).verify(keys=keys)
        assert not report.ok and report.first_bad_line == 4, report
        assert "follows the final checkpoint" in str(report.reason)


def test_a_checkpoint_signed_by_another_key_fails_verify(
    tmp_path: Path, signer: LocalSigner
) -> None:
    log, forger = tmp_path / "audit.log", LocalSigner()
    with open_sink(log, forger, []) as sink:
        sink.append(event(0))
    assert AuditFile(log).verify().ok  # structure alone cannot tell
    report = AuditFile(log).verify(keys=signer.public_keys)
    assert not report.ok and "signature does not verify" in str(report.reason), report


def test_a_renamed_copy_verifies_and_swapped_chain_files_do_not(
    tmp_path: Path, signer: LocalSigner
) -> None:
    """A checkpoint signs its chain file's name: an archived copy of the log under another
    name (each chain file renamed alike) still verifies, against the key and the store's
    checkpoints; a chain's records in another chain's file do not."""
    log, anchors = tmp_path / "audit.log", KeptAnchors()
    second = chain_path(log, 1)
    for path in (log, second):
        with open_sink(path, signer, anchors) as sink:
            sink.append(event(0))
    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copy(log, archive / "2026-12-06.log")
    shutil.copy(second, archive / "2026-12-06.1.log")
    report = AuditFile(archive / "2026-12-06.log").verify(keys=signer.public_keys, anchors=anchors)
    assert report.ok and report.chains == 2, report
    assert [chain.name for chain in report.checkpoints] == ["audit.log", "audit.1.log"]
    assert all(chain.anchored and chain.signatures_checked for chain in report.checkpoints)
    gateway = ChainIdentity("audit.log", "r1")  # what a config with replica_id says
    report = AuditFile(archive / "2026-12-06.log").verify(
        keys=signer.public_keys, anchors=anchors, written_as=gateway
    )
    assert report.ok, report
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copy(log, swapped / "audit.1.log")
    shutil.copy(second, swapped / "audit.log")
    for written_as, reason in (
        (gateway, "in audit.log, where audit.log belongs: chain files swapped"),
        (UNKNOWN_WRITER, "signed in chain file audit.1.log, in audit.log: chain files swapped"),
    ):  # the log's name unknown: the first chain file cannot be another chain file of it
        report = AuditFile(swapped / "audit.log").verify(
            keys=signer.public_keys, written_as=written_as
        )
        assert not report.ok, report
        assert reason in str(report.reason) and report.chain == swapped / "audit.log", report


def test_a_chain_file_given_to_verify_is_verified_with_its_log(
    tmp_path: Path, signer: LocalSigner
) -> None:
    """`audit verify audit.1.log` (a worker's chain file, the one a user of --workers picks)
    verifies the log it belongs to, every chain file of it: verified alone, the store's
    checkpoint of audit.log made it look deleted. A copy without its log stays one log."""
    log, anchors = tmp_path / "audit.log", KeptAnchors()
    second = chain_path(log, 1)
    for path in (log, second):
        with open_sink(path, signer, anchors) as sink:
            sink.append(event(0))
    assert log_of_chain(second) == log and log_of_chain(log) == log
    result = verify(str(second))
    assert result.rc == 0, str(result)
    assert "in 2 chains, every chain intact" in result.out, str(result)
    assert f"{second} is a chain file of {log}" in result.err, str(result)
    both = verify(str(log), str(second))  # one log, verified once
    assert both.rc == 0 and both.out.count("every chain intact") == 1, str(both)
    missing = verify(str(chain_path(log, 7)))  # no such chain file: not its log's verdict
    assert missing.rc == 2 and "cannot read" in missing.err, str(missing)
    alone = tmp_path / "elsewhere" / "audit.1.log"
    alone.parent.mkdir()
    shutil.copy(second, alone)
    assert log_of_chain(alone) == alone


def test_an_idle_workers_chain_is_held_to_its_own_replicas_checkpoints(
    tmp_path: Path, signer: LocalSigner
) -> None:
    """Replica r1's two workers both checkpointed their chains; replica r2's second worker
    never got a request (an empty `audit.1.log`). r2's log verifies against the store (it
    used to be held to r1's checkpoint of `audit.1.log`: "records deleted from the end"),
    and r2's second chain emptied after it was checkpointed is still caught."""
    anchors = KeptAnchors()
    for replica in ("r1", "r2"):
        log = tmp_path / replica / "audit.log"
        log.parent.mkdir()
        for path in (log, chain_path(log, 1)):
            with open_sink(path, signer, anchors, replica=replica) as sink:
                sink.append(event(0))
    idle = chain_path(tmp_path / "r2" / "audit.log", 1)
    r2_anchors = [a for a in anchors if (a.replica, a.chain) != ("r2", "audit.1.log")]
    idle.write_bytes(b"")
    head_path(idle).unlink()  # (a worker that never appended has none)
    report = AuditFile(tmp_path / "r2" / "audit.log").verify(
        keys=signer.public_keys, anchors=r2_anchors
    )
    assert report.ok and report.chains == 2, report
    assert [(c.replica, c.records) for c in report.checkpoints] == [("r2", 3), ("", 0)]
    # the same empty chain, where the store holds r2's checkpoint of it: cut
    report = AuditFile(tmp_path / "r2" / "audit.log").verify(
        keys=signer.public_keys, anchors=anchors
    )
    assert not report.ok and "records deleted from the end" in str(report.reason), report
    assert report.chain == idle


def test_a_cut_log_is_caught_whatever_replica_its_last_record_claims(
    tmp_path: Path, signer: LocalSigner
) -> None:
    """The store's checkpoint is looked up by the replica a checkpoint signed (or the
    config's), never by the unsigned `replica` of the log's last record: records cut
    from the end, one forged record naming another replica in their place, is caught."""
    log, anchors = tmp_path / "audit.log", KeptAnchors()
    with open_sink(log, signer, anchors, every_records=2) as sink:
        for n in range(6):
            sink.append(event(n))
    chain = records(log)
    cut = chain[:4]
    forged = {**cut[-1], "replica": "zz", "request_id": "forged"}
    rewrite(log, [*cut, forged])
    for keys in (signer.public_keys, None):
        report = AuditFile(log).verify(keys=keys, anchors=anchors[-1:])
        assert not report.ok, (keys, report)
        assert "records deleted from the end" in str(report.reason), report


def test_a_new_replicas_log_before_its_first_checkpoint_says_how_to_place_it(
    tmp_path: Path, signer: LocalSigner
) -> None:
    """r2's log has no checkpoint yet, and nothing signed says it is r2's (it could be r1's
    log cut and rewritten): against the store, where r1 checkpointed `audit.log`, it fails,
    saying it may be another replica's log, and verifies once its writer is given."""
    anchors = KeptAnchors()
    for replica in ("r1", "r2"):
        (tmp_path / replica).mkdir()
    with open_sink(tmp_path / "r1" / "audit.log", signer, anchors) as sink:
        for n in range(5):
            sink.append(event(n))
    fresh = tmp_path / "r2" / "audit.log"
    with FileSink(fresh, fsync_interval=0.01, replica="r2") as sink:
        sink.append(event(0))
    report = AuditFile(fresh).verify(keys=signer.public_keys, anchors=anchors)
    assert not report.ok, report
    assert "this is not replica 'r1''s log" in str(report.reason), report
    assert "--config" in str(report.reason), report
    placed = AuditFile(fresh).verify(
        keys=signer.public_keys, anchors=anchors, written_as=ChainIdentity("audit.log", "r2")
    )
    assert placed.ok and not placed.checkpoints[0].anchored, placed
    # r1's own log, its writer given, fails without the hint: its records were cut
    rewrite(tmp_path / "r1" / "audit.log", records(tmp_path / "r1" / "audit.log")[:2])
    cut = AuditFile(tmp_path / "r1" / "audit.log").verify(
        keys=signer.public_keys, anchors=anchors, written_as=ChainIdentity("audit.log", "r1")
    )
    assert not cut.ok and "records deleted from the end" in str(cut.reason), cut
    assert "not replica" not in str(cut.reason)


def test_a_chain_file_the_store_never_knew_is_left_alone_and_fails_verify(
    tmp_path: Path, signer: LocalSigner
) -> None:
    """Whoever can write the log's directory (not the store, nor the audit key) writes
    `audit.1.log`, a well-sealed chain of made-up records with its head file. A writer that
    finds `audit.log` held claims the next chain file: it leaves that one alone (before, it
    continued it, and its checkpoints vouched for the made-up records) and writes
    `audit.2.log`, whose opening checkpoint tells the store about it; verify against the
    store fails on the made-up chain, signed or not."""
    log, anchors = tmp_path / "audit.log", KeptAnchors()
    with open_sink(log, signer, anchors) as first:
        first.append(event(0))
        made_up = chain_path(log, 1)
        rewrite(made_up, [{**records(log)[1], "request_id": "made-up"}] * 2)
        planted = made_up.read_bytes()
        with open_sink(log, signer, anchors) as second:
            assert second.chain == chain_path(log, 2)
            second.append(event(1))
    assert made_up.read_bytes() == planted
    assert {a.chain for a in anchors} == {"audit.log", "audit.2.log"}
    for keys in (None, signer.public_keys):
        report = AuditFile(log).verify(keys=keys, anchors=anchors)
        assert not report.ok and report.chain == made_up, report
        assert "holds 2 records and the store has no checkpoint of it" in str(report.reason)
    made_up.unlink()
    head_path(made_up).unlink()
    assert AuditFile(log).verify(keys=signer.public_keys, anchors=anchors).ok


# -- through the service: the backend signs, the store keeps the checkpoint ---------------


def test_the_dev_audit_key_signs_through_its_backend_and_the_store_keeps_it(
    gateway_settings: Settings,
) -> None:
    assert gateway_settings.audit_checkpoint_key == DEV_AUDIT_KEY
    service = build_service(gateway_settings)
    try:
        assert ensure_dev_audit_key(service)
        key = service.catalogue.get(DEV_AUDIT_KEY)
        assert key.purpose == "audit" and key.backend == "local"
        admin = Principal(id="token:admin", kind="token", roles=("admin",))
        with pytest.raises(InvalidRequest, match="is an audit key: it signs the audit log"):
            target = service.gate.target(DEV_AUDIT_KEY)
            service.crypto.sign(admin, Ctx(request_id="t"), target, [SignInput(b"m")], False)
        service.audit.append(event(0))
    finally:
        service.close()
    log = gateway_settings.resolved_audit_path()
    last = records(log)[-1]
    assert last["action"] == CHECKPOINT_ACTION and detail(last)["final"] is True
    assert detail(last)["key"] == DEV_AUDIT_KEY and last["key_version"] == 1


def start_record_and_stop(settings: Settings) -> None:
    """A gateway's service started on `settings` (its dev audit key made), one record
    appended, stopped (a final checkpoint, kept in the store)."""
    service = build_service(settings)
    try:
        ensure_dev_audit_key(service)
        service.audit.append(event(0))
    finally:
        service.close()


def test_gateways_on_one_host_and_one_store_keep_their_checkpoints_apart(
    gateway_settings: Settings, tmp_path: Path
) -> None:
    """Each data dir is its own replica by default: two gateways on one host used to share
    the host name, and each overwrote the other's checkpoint in the store."""
    other = gateway_settings.model_copy(
        update={
            "data_dir": tmp_path / "other",
            "root_key_file": gateway_settings.resolved_root_key_file(),
        }
    )
    (tmp_path / "other").mkdir(mode=0o700)
    ids = {gateway_settings.resolved_replica_id(), other.resolved_replica_id()}
    assert len(ids) == 2
    assert gateway_settings.model_copy(update={"replica_id": "r9"}).resolved_replica_id() == "r9"
    for settings in (gateway_settings, other):
        start_record_and_stop(settings)
        store = Store(settings.resolved_database_url())
        stored = {(a.replica, a.chain): a for a in store.audit_anchors.all()}
        store.close()
        last = checkpoints(settings.resolved_audit_path())[-1]
        assert last["replica"] == settings.resolved_replica_id()
        assert stored[(last["replica"], "audit.log")].record_seq == last["seq"]
    assert {replica for replica, _ in stored} == ids
    # each log verifies against its own replica's checkpoint; the report names that replica
    # and the other one the store knows a chain of that name of (a sibling's log, swapped
    # in, would pass as well)
    anchors = [stored[key] for key in sorted(stored)]
    report = AuditFile(other.resolved_audit_path()).verify(anchors=anchors)
    assert report.ok, report.reason
    lines = list(checkpoint_lines(report, False, anchors))
    assert f"(replica {other.resolved_replica_id()})" in lines[0], lines
    also = [line for line in lines if "the store also holds" in line]
    assert also and gateway_settings.resolved_replica_id() in also[0], lines
    # verified in place on this host with its config, a log is held to its own replica
    # (the default id, which the store knows): a sibling's log swapped in fails
    config = tmp_path / "other.yaml"
    config.write_text(f"data_dir: {tmp_path / 'other'}\ndatabase_url: {other.database_url}\n")
    found, written_as = stored_anchors(None, config, None, None)
    own = other.resolved_audit_path()
    assert written_as(own) == ChainIdentity("audit.log", other.resolved_replica_id())
    assert AuditFile(own).verify(anchors=found, written_as=written_as(own)).ok
    for name in ("audit.log", "audit.log.head"):
        shutil.copy(gateway_settings.resolved_audit_path().with_name(name), own.with_name(name))
    assert AuditFile(own).verify(anchors=found).ok  # the writer unknown: it passes
    swapped = AuditFile(own).verify(anchors=found, written_as=written_as(own))
    assert not swapped.ok and "store" in str(swapped.reason), swapped


def test_a_closed_log_is_not_appended_to_by_a_gateway_that_cannot_reopen_it(
    gateway_settings: Settings,
) -> None:
    """A dev data dir moved to production without `audit_checkpoint_key`: its log ends with
    a final checkpoint, and a record after it would fail `audit verify` for good. The
    gateway refuses to start, names the key, and appends nothing; with the key, it starts."""
    start_record_and_stop(gateway_settings)
    log = gateway_settings.resolved_audit_path()
    before = log.read_bytes()
    unkeyed = gateway_settings.model_copy(update={"audit_checkpoint_key": None})
    with pytest.raises(ConfigError, match=f"signed by key '{DEV_AUDIT_KEY}'"):
        build_service(unkeyed)
    assert log.read_bytes() == before
    start_record_and_stop(gateway_settings)
    assert AuditFile(log).verify().ok


def test_a_gateway_whose_log_lacks_the_stores_checkpoint_does_not_start(
    gateway_settings: Settings, tmp_path: Path
) -> None:
    """At start the chain file must hold the last checkpoint the store keeps for it: a
    second gateway given the same replica_id (its own, shorter log) is refused, and so is
    this gateway once its log was cut with its head file (which the head file alone cannot
    show); restored, it starts again."""
    named = gateway_settings.model_copy(update={"replica_id": "r1"})
    start_record_and_stop(named)
    start_record_and_stop(named)  # its own log holds the checkpoint: starts
    (tmp_path / "twin").mkdir(mode=0o700)
    twin = named.model_copy(
        update={"data_dir": tmp_path / "twin", "root_key_file": named.resolved_root_key_file()}
    )
    with pytest.raises(ConfigError, match="another gateway writes as this replica_id"):
        build_service(twin)

    log = named.resolved_audit_path()
    whole, head = log.read_bytes(), head_path(log).read_bytes()
    rewrite(log, records(log)[:2])
    with pytest.raises(ConfigError, match="or this log was cut, replaced or edited"):
        build_service(named)
    log.write_bytes(whole)
    head_path(log).write_bytes(head)
    start_record_and_stop(named)


# -- a real dev gateway, then `kmsgate audit verify` on its log and on tampered copies ------


def verify(*args: str) -> Run:
    return run_cli(("audit", "verify", *args), clean_env())


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Path]]:
    """A dev gateway that checkpointed after half a second of records and was stopped
    (final checkpoint), and the PEM public key of its audit key."""
    base = tmp_path_factory.mktemp("checkpointed")
    with running_gateway(base, KMSGATE_AUDIT_CHECKPOINT_SECONDS="0.5") as gw:
        log = gw.data_dir / "audit.log"
        gw.ok("keys", "create", "cp-k", "--type", "ecdsa-p256")
        gw.ok("sign", "-", "-k", "cp-k", stdin=b"hello")
        wait_for(lambda: any(not detail(r)["final"] for r in checkpoints(log)))
        refused = gw.run("sign", "-", "-k", DEV_AUDIT_KEY, stdin=b"forged checkpoint")
        assert refused.rc != 0 and "is an audit key" in refused.err, str(refused)
        live = verify(str(log), "--gateway", gw.addr, "--token", gw.root_token)
        assert live.rc == 0 and re.search(r"\d+ signatures? verified", live.out), str(live)
        assert "matches the store" in live.out, str(live)  # the store, through the gateway
        cut = base / "cut" / "audit.log"  # the live chain cut to its first record
        cut.parent.mkdir()
        rewrite(cut, records(log)[:1])
        truncated = verify(str(cut), "--gateway", gw.addr, "--token", gw.root_token)
        assert truncated.rc == 1, str(truncated)
        assert "log ends at seq 1 but the store's last checkpoint is record" in truncated.err
        forged = base / "forged" / "audit.log"  # a checkpoint signed with an ordinary key
        forged.parent.mkdir()
        rewrite(forged, [*records(log), _checkpoint_signed_by(gw, "cp-k", records(log))])
        untrusted = verify(str(forged), "--gateway", gw.addr, "--token", gw.root_token)
        assert untrusted.rc == 1, str(untrusted)
        assert "checkpoint signed with key 'cp-k', of purpose" in untrusted.err, str(untrusted)
        assert "not 'audit': forged" in untrusted.err, str(untrusted)
        pem = base / "audit-key.pem"
        gw.ok("keys", "public-key", DEV_AUDIT_KEY, "-o", str(pem))
    yield gw, pem


def _checkpoint_signed_by(
    gw: Gateway, key: str, chain: list[dict[str, object]]
) -> dict[str, object]:
    """A checkpoint record over the end of `chain` whose signature is good, made through
    the ordinary sign API with `key`: what any caller allowed to sign could forge."""
    last, at = chain[-1], "2026-12-06T00:00:00.000000Z"
    replica = str(last["replica"])
    payload = signed_payload(
        chain="audit.log", replica=replica, seq=len(chain), digest=str(last["hash"]), time=at,
        final=False,
    )  # fmt: skip
    auth = {"authorization": f"Bearer {gw.root_token}"}
    body = {"input": base64.b64encode(payload).decode()}
    signed = httpx.post(f"{gw.addr}/v1/keys/{key}/sign", json=body, headers=auth).json()
    signature = CheckpointSignature(
        key, signed["key_version"], signed["algorithm"], base64.b64decode(signed["signature"])
    )
    fields = checkpoint_fields(
        chain="audit.log", seq=len(chain), digest=str(last["hash"]), time=at, final=False,
        signed=signature,
    )  # fmt: skip
    return {**fields, "replica": replica, "time": at}


@pytest.fixture
def copy(stopped: tuple[Gateway, Path], tmp_path: Path) -> Path:
    """A copy of the stopped gateway's data dir (log, head file, store) to tamper with."""
    return Path(shutil.copytree(stopped[0].data_dir, tmp_path / "data"))


def test_verify_passes_on_the_untouched_log(stopped: tuple[Gateway, Path], copy: Path) -> None:
    pem = stopped[1]
    result = verify(str(copy / "audit.log"), "--key", str(pem), "--data-dir", str(copy))
    assert result.rc == 0, str(result)
    assert "chain intact" in result.out
    assert "final record" in result.out and "0 records unsigned after it" in result.out
    assert "matches the store" in result.out and "not verified" not in result.out
    plain = verify(str(copy / "audit.log"))
    assert plain.rc == 0 and "checkpoint signatures not verified" in plain.out, str(plain)


def test_a_made_up_chain_file_fails_verify_and_no_gateway_vouches_for_it(
    stopped: tuple[Gateway, Path], copy: Path, tmp_path: Path
) -> None:
    """A made-up `audit.1.log` (well sealed, with its head file) beside a stopped gateway's
    log: `audit verify --data-dir` fails on it; a gateway with two workers started on the
    data dir leaves it alone (before: a worker continued it, and signed the made-up
    records into its checkpoints, which then "matched the store")."""
    made_up = chain_path(copy / "audit.log", 1)
    genuine = [r for r in records(copy / "audit.log") if r["action"] != CHECKPOINT_ACTION]
    rewrite(made_up, [{**record, "request_id": "made-up"} for record in genuine[:2]])
    planted = made_up.read_bytes()
    key = ("--key", str(stopped[1]), "--data-dir", str(copy))
    result = verify(str(copy / "audit.log"), *key)
    assert result.rc == 1 and "audit.1.log" in result.err, str(result)
    assert "holds 2 records and the store has no checkpoint of it" in result.err, str(result)
    with running_gateway(tmp_path, "--workers", "2", data_dir=copy) as gw:
        gw.ok("keys", "list")
    assert made_up.read_bytes() == planted
    result = verify(str(copy / "audit.log"), *key)
    assert result.rc == 1 and "holds 2 records and the store has no checkpoint" in result.err
    made_up.unlink()
    head_path(made_up).unlink()
    result = verify(str(copy / "audit.log"), *key)
    assert result.rc == 0, str(result)


def test_verify_takes_a_key_per_version_of_a_rotated_audit_key(tmp_path: Path) -> None:
    """After the audit key rotated, its checkpoints are signed by two versions: `--key`
    given once per version checks each checkpoint against them; either alone fails."""
    with running_gateway(tmp_path, KMSGATE_AUDIT_CHECKPOINT_SECONDS="0.3") as gw:
        log = gw.data_dir / "audit.log"
        pems = [tmp_path / "v1.pem", tmp_path / "v2.pem"]
        gw.ok("keys", "public-key", DEV_AUDIT_KEY, "-o", str(pems[0]))
        wait_for(lambda: bool(checkpoints(log)))
        gw.ok("keys", "rotate", DEV_AUDIT_KEY)
        gw.ok("keys", "public-key", DEV_AUDIT_KEY, "--version", "2", "-o", str(pems[1]))
        gw.ok("keys", "list")
        wait_for(lambda: any(r.get("key_version") == 2 for r in checkpoints(log)))
    assert {r.get("key_version") for r in checkpoints(log)} == {1, 2}
    both = verify(str(log), "--key", str(pems[0]), "--key", str(pems[1]))
    assert both.rc == 0 and "signatures verified" in both.out, str(both)
    for pem in pems:
        alone = verify(str(log), "--key", str(pem))
        assert alone.rc == 1 and "no public key given is that key version's" in alone.err


def test_a_configs_replica_id_names_only_its_own_log(copy: Path, tmp_path: Path) -> None:
    """`audit verify A B --config A.yaml`: A.yaml's `replica_id` is what A's log was written
    as, not B's (another replica's log checked beside it was held to A's checkpoints)."""
    config = tmp_path / "a.yaml"
    config.write_text(f"data_dir: {copy}\nreplica_id: r9\n")
    anchors, written_as = stored_anchors(None, config, None, None)
    assert anchors
    assert written_as(copy / "audit.log") == ChainIdentity("audit.log", "r9")
    assert written_as(copy / "." / "audit.log") == ChainIdentity("audit.log", "r9")
    assert written_as(tmp_path / "replica-b" / "audit.log") == UNKNOWN_WRITER


def test_verify_catches_a_record_appended_after_the_final_checkpoint(
    stopped: tuple[Gateway, Path], copy: Path
) -> None:
    log = copy / "audit.log"
    chain = records(log)
    forged = {**chain[-2], "request_id": "forged", "principal": "mallory"}
    rewrite(log, [*chain, forged])
    assert AuditFile(log).verify(keys=None).ok is False
    result = verify(str(log), "--key", str(stopped[1]))
    assert result.rc == 1, str(result)
    assert f"record {len(chain) + 1}: follows the final checkpoint" in result.err


def test_verify_catches_a_truncated_tail_with_a_rewritten_head_file(
    stopped: tuple[Gateway, Path], copy: Path
) -> None:
    log = copy / "audit.log"
    chain = records(log)
    kept = next(
        n for n in range(len(chain) - 1, 0, -1) if chain[n - 1]["action"] != CHECKPOINT_ACTION
    )
    rewrite(log, chain[:kept])  # the same first records, the head file rewritten to match
    alone = verify(str(log), "--key", str(stopped[1]))
    unsigned = re.search(r"([1-9]\d*) records? unsigned after it", alone.out)
    assert alone.rc == 0 and unsigned, str(alone)
    assert "final record" not in alone.out  # the chain no longer says it was closed
    result = verify(str(log), "--key", str(stopped[1]), "--data-dir", str(copy))
    assert result.rc == 1, str(result)
    assert (
        f"log ends at seq {kept} but the store's last checkpoint is record {len(chain)}"
        in result.err
    )


def test_verify_catches_a_tampered_checkpoint_signature(
    stopped: tuple[Gateway, Path], copy: Path
) -> None:
    log = copy / "audit.log"
    chain = records(log)
    line = len(chain)  # the final checkpoint: no later checkpoint covers its hash
    assert chain[line - 1]["action"] == CHECKPOINT_ACTION
    signature = bytearray(base64.b64decode(str(detail(chain[line - 1])["signature"])))
    signature[-1] ^= 1
    chain[line - 1]["detail"] = {
        **detail(chain[line - 1]),
        "signature": base64.b64encode(signature).decode(),
    }
    rewrite(log, chain)
    assert verify(str(log)).rc == 0  # without the key: as before checkpoints
    result = verify(str(log), "--key", str(stopped[1]))
    assert result.rc == 1, str(result)
    assert f"record {line}: checkpoint signature does not verify ({DEV_AUDIT_KEY} v1)" in result.err


def test_verify_catches_a_rewritten_head_against_the_store(
    stopped: tuple[Gateway, Path], copy: Path
) -> None:
    log = copy / "audit.log"
    chain = records(log)
    # the final checkpoint replaced by an ordinary record: the chain is whole and every
    # remaining signature holds, but the head is not the record the store kept
    forged = {**chain[-2], "request_id": "forged"}
    rewrite(log, [*chain[:-1], forged])
    alone = verify(str(log), "--key", str(stopped[1]))
    assert alone.rc == 0, str(alone)
    result = verify(str(log), "--key", str(stopped[1]), "--data-dir", str(copy))
    assert result.rc == 1, str(result)
    assert (
        f"record {len(chain)}: does not match the store's last checkpoint (rewritten, or "
        f"another gateway writes with replica_id {chain[-1]['replica']!r})" in result.err
    )
