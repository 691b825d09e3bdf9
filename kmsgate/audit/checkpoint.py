"""Signed checkpoints: records of an audit chain that sign the chain's head.

Every `every_records` records or `every_seconds` seconds, and at `close()` (marked final),
the sink appends an ``audit.checkpoint`` record (an ordinary chained record) whose `detail`
names the record it covers (`seq`, `hash`), when it was signed, whether it is final, and
the signature made by a kmsgate key of purpose `audit` over `signed_payload` (chain file
name, replica, seq, hash, time, final). The sink signs through an injected `Signer` (the
service's backend signing: any backend, an HSM too) from a background thread, never on
the request path. A gateway that reopens a chain ending with a final checkpoint first
appends a checkpoint covering it, so that a record appended to a closed log stands out.

`check_checkpoints` checks them for `AuditFile.verify`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from kmsgate.algorithms import SIGN_ALGORITHMS, verify_with_public_key
from kmsgate.audit.chain import GENESIS_HASH, canonical
from kmsgate.store.checkpoints import AuditAnchor

__all__ = [
    "CHECKPOINT_ACTION",
    "ChainCheckpoints",
    "ChainIdentity",
    "CheckpointPolicy",
    "CheckpointSignature",
    "PublicKeys",
    "Signer",
    "UntrustedKey",
    "check_checkpoints",
    "checkpoint_fields",
    "signed_payload",
]

CHECKPOINT_ACTION = "audit.checkpoint"
_PAYLOAD_TYPE = "kmsgate-audit-checkpoint/v1"


@dataclass(frozen=True, slots=True)
class CheckpointSignature:
    """A signature over a checkpoint's payload, and the key version and algorithm that
    made it."""

    key: str
    key_version: int
    algorithm: str
    signature: bytes


Signer = Callable[[bytes], CheckpointSignature]
"""Signs a checkpoint payload. Raises KmsgateError (unknown or disabled key, backend down)."""

PublicKeys = Callable[[str, int], Sequence[PublicKeyTypes]]
"""The public keys (key name, version) may be: a checkpoint verifies under any of them
(those of a rotated key's versions, given as files), none if unknown. Raises UntrustedKey
for a key that may not sign checkpoints."""


class UntrustedKey(Exception):
    """A checkpoint names a key that may not sign checkpoints (the message says why)."""


@dataclass(frozen=True, slots=True)
class CheckpointPolicy:
    """When and how a sink checkpoints its chain: `sign` (see `Signer`) after
    `every_records` records or when a record has waited `every_seconds` unsigned; `anchor`
    keeps each checkpoint outside the log (the store), None for nowhere."""

    sign: Signer
    every_records: int = 1000
    every_seconds: float = 60.0
    anchor: Callable[[AuditAnchor], None] | None = None


def signed_payload(
    *, chain: str, replica: str, seq: int, digest: str, time: str, final: bool
) -> bytes:
    """The canonical bytes a checkpoint signs: which chain (file name and replica), the
    record it covers (seq, hash), when, and whether the chain was closed."""
    return canonical(
        {
            "type": _PAYLOAD_TYPE,
            "chain": chain,
            "replica": replica,
            "seq": seq,
            "hash": digest,
            "time": time,
            "final": final,
        }
    )


def checkpoint_fields(
    *, chain: str, seq: int, digest: str, time: str, final: bool, signed: CheckpointSignature
) -> dict[str, object]:
    """The record members of a checkpoint (besides seq, time, prev, replica and hash)."""
    return {
        "action": CHECKPOINT_ACTION,
        "decision": "allow",
        "outcome": "ok",
        "request_id": "checkpoint",
        "principal": "system",
        "resource": {"kind": "audit", "name": chain},
        "key_version": signed.key_version,
        "detail": {
            "seq": seq,
            "hash": digest,
            "time": time,
            "final": final,
            "key": signed.key,
            "algorithm": signed.algorithm,
            "signature": base64.b64encode(signed.signature).decode(),
        },
    }


# --- verification ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Mark:
    """A checkpoint record read back: its line, its writer's replica, and what it says it
    signed."""

    line: int
    chain: str
    """The chain file name it signed for (its record's resource name)."""
    replica: str
    seq: int
    digest: str
    time: str
    final: bool
    key: str
    key_version: int
    algorithm: str
    signature: bytes


@dataclass(frozen=True)
class ChainIdentity:
    """What a chain file should be, when the verifier knows: the chain file name it was
    written as (`audit.1.log`), and the replica that wrote it (the gateway config's)."""

    name: str | None = None
    replica: str | None = None


@dataclass(frozen=True)
class ChainCheckpoints:
    """What the checkpoints of one chain file (last written by `replica`) prove: the last
    checkpoint (its line, the seq it covers, final or not, key and version), how many
    records follow it unsigned, and how many signatures were checked (0 without public
    keys)."""

    chain: Path
    name: str
    """The chain file name its checkpoints were signed for (`chain`'s own name when it has
    none): another name than the file's for a renamed copy (`archive.log` of `audit.log`)."""
    replica: str
    records: int
    checkpoints: int
    last_line: int | None
    last_seq: int | None
    last_final: bool
    last_key: str | None
    unsigned: int
    signatures_checked: int
    anchored: bool
    """Whether the store's copy of the chain's last checkpoint was compared."""


def _mark(line: int, record: Mapping[str, object]) -> _Mark:
    """Raises ValueError if the checkpoint record is malformed."""
    detail, version = record.get("detail"), record.get("key_version")
    if not isinstance(detail, dict) or type(version) is not int:
        raise ValueError("malformed checkpoint")
    seq, digest, time = detail.get("seq"), detail.get("hash"), detail.get("time")
    final, key, alg, sig = (detail.get(k) for k in ("final", "key", "algorithm", "signature"))
    if type(seq) is not int or type(final) is not bool:
        raise ValueError("malformed checkpoint")
    if not all(isinstance(v, str) for v in (digest, time, key, alg, sig)):
        raise ValueError("malformed checkpoint")
    try:
        signature = base64.b64decode(str(sig), validate=True)
    except binascii.Error as exc:
        raise ValueError("malformed checkpoint signature") from exc
    resource = record.get("resource")
    chain = resource.get("name") if isinstance(resource, dict) else None
    if not isinstance(chain, str):
        raise ValueError("malformed checkpoint (no chain name)")
    replica = str(record.get("replica", ""))
    return _Mark(
        line,
        chain,
        replica,
        seq,
        str(digest),
        str(time),
        final,
        str(key),
        version,
        str(alg),
        signature,
    )


def check_checkpoints(
    chain: Path,
    expected: ChainIdentity,
    replica: str,
    hashes: Sequence[str],
    records: Mapping[int, Mapping[str, object]],
    keys: PublicKeys | None,
    anchors: Sequence[AuditAnchor],
) -> tuple[ChainCheckpoints, tuple[int, str] | None]:
    """Check the checkpoint `records` (by line) of an intact chain whose record hashes are
    `hashes` (`replica`: its last record's writer, unsigned): each covers a record of the
    chain with its hash and names the chain file it was signed in (`expected.name`; when
    that is not known, every checkpoint names the same one: a copy archived under another
    name still verifies); a final one covers the record before it and is followed by
    nothing, or by a checkpoint covering it (a gateway reopening the chain); with `keys`,
    each signature (over its own record's chain name and replica) verifies. With
    `anchors`, the store's last checkpoints: the chain still holds the one of its replica
    (`expected.replica`, else the one its last checkpoint signed when `keys` checked it,
    else any: then one of them at least).

    Returns the summary and (line, reason) of the first problem, or None.
    """
    marks: list[_Mark] = []
    checked = 0
    problem: tuple[int, str] | None = None
    name = expected.name
    for line in sorted(records):
        try:
            mark = _mark(line, records[line])
        except ValueError as exc:
            problem = (line, f"record {line}: {exc}")
            break
        name = name or mark.chain  # unknown: the first checkpoint's, and each one's after
        problem = _mark_problem(chain, name, hashes, mark, keys)
        if problem is not None:
            break
        checked += keys is not None
        marks.append(mark)
    if problem is None:
        problem = _after_final(marks, len(hashes))
    last = marks[-1] if marks else None
    name = name or chain.name
    if last is not None:
        replica = last.replica
    anchor, anchor_problem = _stored_checkpoint(
        hashes, [a for a in anchors if a.chain == name], expected.replica or (
            last.replica if last is not None and keys is not None else None
        )
    )  # fmt: skip
    problem = problem or anchor_problem
    summary = ChainCheckpoints(
        chain=chain,
        name=name,
        replica=replica,
        records=len(hashes),
        checkpoints=len(marks),
        last_line=last.line if last else None,
        last_seq=last.seq if last else None,
        last_final=bool(last and last.final),
        last_key=f"{last.key} v{last.key_version}" if last else None,
        unsigned=len(hashes) - (last.seq + 1 if last else 0),
        signatures_checked=checked,
        anchored=anchor is not None,
    )
    return summary, problem


def _stored_checkpoint(
    hashes: Sequence[str], stored: Sequence[AuditAnchor], replica: str | None
) -> tuple[AuditAnchor | None, tuple[int, str] | None]:
    """The store's last checkpoint of this chain that the chain holds, among `stored` (of
    `replica` only, when known), and else the first one's problem."""
    candidates = [a for a in stored if replica is None or a.replica == replica]
    problems = [_anchor_problem(hashes, anchor, replica is None) for anchor in candidates]
    held = next((a for a, found in zip(candidates, problems, strict=True) if not found), None)
    return held, None if held or not problems else problems[0]


def _mark_problem(
    chain: Path, name: str, hashes: Sequence[str], mark: _Mark, keys: PublicKeys | None
) -> tuple[int, str] | None:
    line = mark.line
    if mark.chain != name:
        return line, (
            f"record {line}: a checkpoint signed in chain file {mark.chain}, in {chain.name}, "
            f"where {name} belongs: chain files swapped or renamed"
        )
    # seq 0: the chain's opening checkpoint, covering its start (the first record's prev)
    covered = GENESIS_HASH if mark.seq == 0 else hashes[mark.seq - 1] if mark.seq < line else None
    if mark.seq < 0 or covered != mark.digest:
        return line, f"record {line}: checkpoint covers seq {mark.seq}, not a record before it"
    if mark.final and mark.seq != line - 1:
        return line, f"record {line}: a final checkpoint must cover the record before it"
    if keys is None:
        return None
    try:
        candidates = keys(mark.key, mark.key_version)
    except UntrustedKey as exc:
        return line, f"record {line}: {exc}: forged"
    alg = SIGN_ALGORITHMS.get(mark.algorithm)
    if not candidates:
        return line, f"record {line}: no public key for {mark.key} v{mark.key_version}"
    payload = signed_payload(
        chain=mark.chain,
        replica=mark.replica,
        seq=mark.seq,
        digest=mark.digest,
        time=mark.time,
        final=mark.final,
    )
    if alg is None or not any(
        verify_with_public_key(key, alg, payload, mark.signature, prehashed=False)
        for key in candidates
    ):
        return line, (
            f"record {line}: checkpoint signature does not verify "
            f"({mark.key} v{mark.key_version}): forged or edited, or no public key given "
            "is that key version's"
        )
    return None


def _after_final(marks: Sequence[_Mark], count: int) -> tuple[int, str] | None:
    """(line, reason) if a record follows a final checkpoint, other than a checkpoint
    covering it (a gateway reopening the chain)."""
    covering = {mark.line: mark.seq for mark in marks}
    for mark in marks:
        follower = mark.line + 1
        if mark.final and follower <= count and covering.get(follower) != mark.line:
            return follower, (
                f"record {follower}: follows the final checkpoint (record {mark.line}) "
                "without a checkpoint reopening the chain: appended after the log was closed"
            )
    return None


def _anchor_problem(
    hashes: Sequence[str], anchor: AuditAnchor, writer_unknown: bool
) -> tuple[int, str] | None:
    """(line, reason) if the chain does not hold `anchor` (`writer_unknown`: nothing signed
    says which replica wrote the chain, so the anchor may be another replica's)."""
    seq = anchor.record_seq
    last_line = max(len(hashes), 1)
    # the store keeps one last checkpoint per replica id and chain: two gateways configured
    # with one `replica_id` overwrite each other's, and each log then looks cut or rewritten
    shared = f", or another gateway writes with replica_id {anchor.replica!r}"
    if writer_unknown:  # e.g. a new replica's log before its first checkpoint
        shared += (
            f", or this is not replica {anchor.replica!r}'s log and no verified checkpoint "
            "in it says whose it is: verify it with its gateway's --config, and --key or "
            "--gateway to check its checkpoints"
        )
    if seq > len(hashes):
        return last_line, (
            f"record {len(hashes)}: log ends at seq {len(hashes)} but the store's last "
            f"checkpoint is record {seq} (records deleted from the end{shared})"
        )
    if hashes[seq - 1] != anchor.record_hash:
        return seq, (
            f"record {seq}: does not match the store's last checkpoint (rewritten{shared})"
        )
    return None
