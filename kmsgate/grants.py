"""JIT exceptions: grants a principal requests for itself and other principals approve.

A grant covers `actions` on `resource` (a glob over key names, or `purpose:<purpose>`) for
`duration` from its approval. Its states:

    pending --(approvals reached)--> active --(expires_at)--> expired
       |  \\--(pending_until)--> expired        \\--(revoke)--> revoked
       \\--(revoke)--> revoked

The requester never counts as an approver. `ActiveGrants` keeps the active grants of every
principal in memory (following the store's "grants" feed), so a decision never waits on the
database; the policy sees them as `input.exceptions`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from kmsgate.durations import format_duration
from kmsgate.errors import Conflict, InvalidRequest, PolicyDenied
from kmsgate.store import Row, Store, StoreMirror
from kmsgate.text import utc_timestamp

__all__ = [
    "UNGRANTABLE",
    "ActiveGrants",
    "Grant",
    "GrantState",
    "approve",
    "new_grant",
]

UNGRANTABLE = (
    "exception.",
    "token.",
    "policy.reload",
    "principal.read",
    "cert.issue",
    "cert.renew",
    "ca.create",
    "ca.import",
    "key.update",
)
"""Actions (prefixes) no grant may cover, since each would outlast it: grants, tokens and
the policy itself; certificates and CAs (a credential that authenticates, and renews itself,
after the grant ended); a key's labels and settings (what the policy reads, such as its
tenant)."""
UNNAMED = frozenset(
    {"key.list", "ca.read", "audit.read", "metrics.read", "policy.read", "policy.evaluate"}
)
"""Actions on no named resource (a listing, the audit log, the policy): a grant's
`resource` pattern matches a name, so it could never cover them."""
RESOURCE = re.compile(r"purpose:[a-z0-9][a-z0-9-]{0,63}|[A-Za-z0-9._*?-]{1,128}")
MAX_ACTIONS = 16
GRANT_ID = re.compile(r"[0-9a-f]{16}")
MIN_DURATION = timedelta(seconds=1)


class GrantState(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class Grant:
    """One JIT exception."""

    id: str
    principal: str
    actions: tuple[str, ...]
    resource: str
    duration: timedelta
    ticket: str
    reason: str
    requested_at: datetime
    pending_until: datetime
    approvals: tuple[Mapping[str, str], ...] = ()
    """`{by, at}` per approval, in order."""
    approved_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    revoked_by: str | None = None
    ended_at: datetime | None = None

    def state(self, at: datetime) -> GrantState:
        """The state at time `at`."""
        if self.revoked_at is not None:
            return GrantState.REVOKED
        if self.expires_at is not None:
            return GrantState.ACTIVE if at < self.expires_at else GrantState.EXPIRED
        return GrantState.PENDING if at < self.pending_until else GrantState.EXPIRED

    def policy_document(self) -> dict[str, object]:
        """The entry of `input.exceptions` (docs/policy.md)."""
        assert self.expires_at is not None  # only active grants reach the policy
        return {
            "id": self.id,
            "actions": list(self.actions),
            "resource": self.resource,
            "ticket": self.ticket,
            "approved_by": [a["by"] for a in self.approvals],
            "expires_at": utc_timestamp(self.expires_at),
        }

    def to_dict(self, at: datetime) -> dict[str, Any]:
        """The API's view at time `at`: the row, with its state, the duration in seconds
        as `duration`, and not the scheduler's `ended_at`."""
        view = self.row()
        view["duration"] = view.pop("duration_s")
        del view["ended_at"]
        return {"id": self.id, "state": self.state(at).value, **view}

    def row(self) -> dict[str, Any]:
        """The store's row."""
        return {
            "id": self.id,
            "principal": self.principal,
            "actions": list(self.actions),
            "resource": self.resource,
            "duration_s": int(self.duration.total_seconds()),
            "ticket": self.ticket,
            "reason": self.reason,
            "requested_at": self.requested_at,
            "pending_until": self.pending_until,
            "approvals": [dict(a) for a in self.approvals],
            "approved_at": self.approved_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "revoked_by": self.revoked_by,
            "ended_at": self.ended_at,
        }

    @classmethod
    def from_row(cls, row: Row) -> Grant:
        return cls(
            id=row["id"],
            principal=row["principal"],
            actions=tuple(row["actions"]),
            resource=row["resource"],
            duration=timedelta(seconds=row["duration_s"]),
            ticket=row["ticket"],
            reason=row["reason"],
            requested_at=row["requested_at"],
            pending_until=row["pending_until"],
            approvals=tuple(row["approvals"]),
            approved_at=row["approved_at"],
            expires_at=row["expires_at"],
            revoked_at=row["revoked_at"],
            revoked_by=row["revoked_by"],
            ended_at=row["ended_at"],
        )


def new_grant(
    principal: str,
    actions: Sequence[str],
    resource: str,
    duration: timedelta,
    ticket: str,
    reason: str,
    *,
    known_actions: frozenset[str],
    max_duration: timedelta,
    pending_for: timedelta,
    now: datetime,
) -> Grant:
    """A pending grant requested by `principal`. Raises InvalidRequest (an action that is
    not one of `known_actions`, cannot be granted or acts on no named resource, a bad
    resource pattern, a duration outside 1 s..`max_duration`, an empty ticket or reason)."""
    wanted = tuple(dict.fromkeys(actions))
    if not wanted or len(wanted) > MAX_ACTIONS:
        raise InvalidRequest(f"actions: give 1 to {MAX_ACTIONS} actions")
    refused = sorted(a for a in wanted if a in known_actions and a.startswith(UNGRANTABLE))
    unknown = sum(1 for a in wanted if a not in known_actions)
    if refused or unknown:
        problems = [f"actions {refused} cannot be granted by an exception"] if refused else []
        if unknown:  # never echoed: a pasted secret would land in the reply and the audit log
            verb = "is" if unknown == 1 else "are"
            problems.append(f"{unknown} asked for {verb} no action of the gateway")
        raise InvalidRequest("; ".join(problems) + " (docs/policy.md lists the actions)")
    unnamed = sorted(UNNAMED.intersection(wanted))
    if unnamed:
        raise InvalidRequest(
            f"actions {unnamed} act on no named resource, which is all a grant can cover: "
            "ask for a role instead"
        )
    if not RESOURCE.fullmatch(resource):
        raise InvalidRequest(
            "resource: a key name or glob (letters, digits, . _ - * ?), or purpose:<purpose>"
        )
    if not resource.strip("*?."):
        raise InvalidRequest(
            f"resource {resource!r} names no key in particular (it covers the CA and audit "
            "keys too): give a name or a prefix, such as payroll-*"
        )
    if not MIN_DURATION <= duration <= max_duration:
        raise InvalidRequest(f"duration must be between 1s and {format_duration(max_duration)}")
    if not ticket.strip() or not reason.strip():
        raise InvalidRequest("a ticket and a reason are required")
    return Grant(
        id=secrets.token_hex(8),
        principal=principal,
        actions=wanted,
        resource=resource,
        duration=duration,
        ticket=ticket.strip(),
        reason=reason.strip(),
        requested_at=now,
        pending_until=now + pending_for,
    )


def approve(
    grant: Grant, approver: str, *, required: int, max_duration: timedelta, now: datetime
) -> Grant:
    """`grant` with `approver`'s approval; active from `now` once `required` principals
    other than the requester approved. Raises PolicyDenied (the requester approving its own
    grant), Conflict (not pending any more, approved by `approver` already, or asking for
    longer than `max_duration`, lowered since the request)."""
    if approver == grant.principal:
        raise PolicyDenied("the requester of an exception cannot approve it")
    state = grant.state(now)
    if state is not GrantState.PENDING:
        raise Conflict(f"exception {grant.id} is {state.value}, not pending")
    if any(a["by"] == approver for a in grant.approvals):
        raise Conflict(f"exception {grant.id} is approved by {approver} already")
    if grant.duration > max_duration:
        raise Conflict(
            f"exception {grant.id} asks for {format_duration(grant.duration)}, longer than "
            f"exceptions.max_duration ({format_duration(max_duration)}) allows now: ask again"
        )
    approvals = (*grant.approvals, {"by": approver, "at": utc_timestamp(now)})
    if len(approvals) < required:
        return replace(grant, approvals=approvals)
    return replace(grant, approvals=approvals, approved_at=now, expires_at=now + grant.duration)


class ActiveGrants(StoreMirror):
    """The approved, unrevoked, unended grants of every principal, in memory; kept current
    from the "grants" change feed (every replica within a refresh)."""

    aggregate = "grants"

    def __init__(self, store: Store) -> None:
        self._grants: dict[str, Grant] = {}
        self._by_principal: dict[str, tuple[tuple[Grant, dict[str, object]], ...]] = {}
        """Each principal's grants, with their policy documents (made once, never changed)."""
        super().__init__(store)

    def _load(self) -> None:
        rows = self._store.grants.query(open_only=True)
        self._grants = {g.id: g for g in map(Grant.from_row, rows) if _live(g)}
        self._reindex()

    def _load_item(self, item: str) -> None:
        row = self._store.grants.get(item)
        grant = Grant.from_row(row) if row is not None else None
        grants = dict(self._grants)  # copied, then swapped: readers never see it change
        if grant is not None and _live(grant):
            grants[item] = grant
        else:
            grants.pop(item, None)
        self._grants = grants
        self._reindex()

    def _reindex(self) -> None:
        by_principal: dict[str, list[tuple[Grant, dict[str, object]]]] = {}
        for grant in self._grants.values():
            entry = (grant, grant.policy_document())
            by_principal.setdefault(grant.principal, []).append(entry)
        self._by_principal = {p: tuple(gs) for p, gs in by_principal.items()}  # one swap

    def active_grants(self, at: datetime) -> list[Grant]:
        """Every principal's grants active at `at`."""
        return [g for g in self._grants.values() if g.state(at) is GrantState.ACTIVE]

    def any_expired(self, at: datetime) -> bool:
        """Whether a grant held here expired by `at` (its end is not recorded yet)."""
        return any(g.state(at) is GrantState.EXPIRED for g in self._grants.values())

    def ended(self, ids: Sequence[str], at: datetime) -> list[str]:
        """The grants of `ids` that the store itself (as committed now, not as of the last
        refresh) does not hold active at `at`: revoked or ended by another process since.
        While no grant has changed since this copy's epoch (one read of the counter), the
        copy answers; otherwise each grant is read and the copy catches up. Raises
        Unavailable (the store is down)."""
        epoch = self._epoch
        held = self._grants  # at least as new as `epoch`
        if not self.changed_since(epoch):
            return [i for i in ids if i not in held or held[i].state(at) is not GrantState.ACTIVE]
        rows = {grant_id: self._store.grants.get(grant_id) for grant_id in ids}
        gone = [
            grant_id
            for grant_id, row in rows.items()
            if row is None or Grant.from_row(row).state(at) is not GrantState.ACTIVE
        ]
        if gone:
            self.refresh()
        return gone

    def active_for(self, principal: str, action: str, at: datetime) -> list[dict[str, object]]:
        """The policy documents of `principal`'s grants that cover `action` and are active
        at `at` (usually none: then the policy has nothing more to evaluate). They are
        shared by every request: read them, never change them."""
        grants = self._by_principal.get(principal)
        if not grants:
            return []
        return [
            document
            for g, document in grants
            if action in g.actions and g.state(at) is GrantState.ACTIVE
        ]


def _live(grant: Grant) -> bool:
    """Approved, not revoked, not ended: what may be active."""
    return grant.approved_at is not None and grant.revoked_at is None and grant.ended_at is None
