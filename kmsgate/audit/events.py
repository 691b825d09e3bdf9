"""What an audit record says: the event a caller records and its members in a record."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["AuditEvent", "input_summary", "record_fields"]

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


def input_summary(items: Sequence[bytes], *, digest: bool = True) -> dict[str, object]:
    """Summarise inputs as ``{"count", "length", "sha256"}`` without keeping any data;
    without `digest`, as ``{"count", "length"}`` (inputs a digest would give away).

    For one item, sha256 is that item's digest; otherwise it is the sha256 of the
    concatenated per-item digests, so a batch summary has a fixed size.
    """
    if not digest:
        return {"count": len(items), "length": sum(len(i) for i in items)}
    if len(items) == 1:
        hexdigest = hashlib.sha256(items[0]).hexdigest()
    else:
        outer = hashlib.sha256()
        for item in items:
            outer.update(hashlib.sha256(item).digest())
        hexdigest = outer.hexdigest()
    return {"count": len(items), "length": sum(len(i) for i in items), "sha256": hexdigest}


def record_fields(event: AuditEvent) -> dict[str, object]:
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
