"""Use cases: JIT exceptions (request, approve, revoke, read) and their expiry.

Every change is decided by the policy and audited before it is made; the requester of a
grant never approves it, whatever the policy says. A change refreshes this process's
`ActiveGrants` at once (other processes follow the change feed within a refresh).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from kmsgate.auth import SYSTEM, Principal
from kmsgate.config import ExceptionSettings
from kmsgate.errors import Conflict, InvalidRequest, NotFound
from kmsgate.grants import (
    GRANT_ID,
    RESOURCE,
    ActiveGrants,
    Grant,
    GrantState,
    approve,
    new_grant,
)
from kmsgate.policy import ACTIONS, Decision
from kmsgate.service.gate import Call, Ctx, Gate, Outcome, now
from kmsgate.service.requests import NewException
from kmsgate.store import Row, Store

_EXPIRY = Decision(allow=True, reasons=("a grant's time ran out",))
"""The scheduler's own decision to record that a grant ended by itself."""
_ENDED = (GrantState.EXPIRED, GrantState.REVOKED)
MAX_OPEN_GRANTS = 16
"""Grants one principal may have pending or active at once."""


class Exceptions:
    """JIT exceptions: grants a principal requests and others approve."""

    def __init__(
        self, gate: Gate, store: Store, active: ActiveGrants, settings: ExceptionSettings
    ) -> None:
        self.gate = gate
        self.store = store
        self.active = active
        self.settings = settings

    def request(self, principal: Principal, ctx: Ctx, new: NewException) -> Grant:
        """A pending grant for the caller. Raises PolicyDenied, InvalidRequest (recorded
        too: an ask for what no grant may give is evidence)."""
        try:
            grant = new_grant(
                principal.id,
                new.actions,
                new.resource,
                new.duration,
                new.ticket,
                new.reason,
                known_actions=ACTIONS,
                max_duration=self.settings.max_duration,
                pending_for=self.settings.pending_for,
                now=now(),
            )
        except InvalidRequest as refused:
            return self._refuse(principal, ctx, new, refused)

        def insert(outcome: Outcome) -> Grant:
            outcome.detail.update(_evidence(grant, grant.requested_at))
            held = self.store.grants.insert(grant.row(), open_limit=MAX_OPEN_GRANTS)
            if held is not None:  # approvers' list and the trail stay readable
                raise Conflict(
                    f"{principal.id} already has {held} grants pending or active (at most "
                    f"{MAX_OPEN_GRANTS}): wait for an answer, or revoke one"
                )
            return grant

        resource = {"kind": "exception", "name": grant.id, "owner": principal.id}
        call = Call(principal, ctx, "exception.request", resource, _request(grant))
        return self.gate.run(call, insert)

    def _refuse(
        self, principal: Principal, ctx: Ctx, new: NewException, refused: InvalidRequest
    ) -> Grant:
        """Decide and record the request `new` as asked, failed with `refused`; raises
        PolicyDenied or `refused`. The record names only the actions the gateway knows and
        a resource pattern it accepts (what else was sent is not for the trail)."""

        def fail(_: Outcome) -> Grant:
            raise refused

        asked = {
            "actions": [a for a in new.actions if a in ACTIONS],
            "resource": new.resource if RESOURCE.fullmatch(new.resource) else None,
            "duration": int(new.duration.total_seconds()),
            "ticket": new.ticket,
        }
        resource = {"kind": "exception", "name": None, "owner": principal.id}
        call = Call(principal, ctx, "exception.request", resource, asked, detail=asked)
        return self.gate.run(call, fail)

    def approve(self, principal: Principal, ctx: Ctx, grant_id: str) -> Grant:
        """Add the caller's approval; the grant is active from the last one needed. Raises
        PolicyDenied (also for the requester itself), NotFound, Conflict (not pending,
        approved by the caller already, or longer than `exceptions.max_duration` now)."""
        settings = self.settings
        return self._change(
            principal,
            ctx,
            "exception.approve",
            grant_id,
            lambda grant: approve(
                grant,
                principal.id,
                required=settings.approvals,
                max_duration=settings.max_duration,
                now=now(),
            ),
        )

    def revoke(self, principal: Principal, ctx: Ctx, grant_id: str) -> Grant:
        """End a pending or active grant now, in every process at once (`Gate.decide` checks
        a grant against the store before it allows). Raises PolicyDenied, NotFound, Conflict
        (ended already)."""

        def revoked(grant: Grant) -> Grant:
            at = now()
            state = grant.state(at)
            if state in _ENDED:
                raise Conflict(f"exception {grant.id} is {state.value} already")
            return replace(grant, revoked_at=at, revoked_by=principal.id, ended_at=at)

        return self._change(principal, ctx, "exception.revoke", grant_id, revoked)

    def get(self, principal: Principal, ctx: Ctx, grant_id: str) -> Grant:
        """One grant. Raises PolicyDenied, NotFound."""
        grant = self._find(grant_id)
        call = Call(principal, ctx, "exception.read", _resource(grant_id, grant))
        return self.gate.run(call, lambda _: _required(grant_id, grant))

    def search(
        self, principal: Principal, ctx: Ctx, *, owner: str | None, state: GrantState | None
    ) -> list[Grant]:
        """Grants, oldest first: of `owner` only if given, in `state` only if given.
        Raises PolicyDenied (the shipped policy lets a principal read its own grants and
        role approver read all)."""
        resource = {"kind": "exception", "name": None, "owner": owner}

        def read(_: Outcome) -> list[Grant]:
            at = now()
            grants = map(Grant.from_row, self.store.grants.query(principal=owner))
            return [g for g in grants if state is None or g.state(at) is state]

        return self.gate.run(Call(principal, ctx, "exception.read", resource), read)

    def expire_due(self, ctx: Ctx) -> list[str]:
        """Record, as the scheduler, the grants whose time ran out (active ones past
        `expires_at`, pending ones past `pending_until`): action `exception.expire`, one
        audit record each. Returns their ids. Raises Unavailable, AuditUnavailable."""
        at = now()
        due = [
            grant
            for grant in map(Grant.from_row, self.store.grants.query(open_only=True))
            if grant.state(at) is GrantState.EXPIRED
        ]
        for grant in due:
            resource = _resource(grant.id, grant)
            call = Call(SYSTEM, ctx, "exception.expire", resource, _request(grant))

            def end(outcome: Outcome, grant: Grant = grant) -> None:
                outcome.detail.update(_evidence(grant, at))
                self.store.grants.change(grant.id, lambda _row: {"ended_at": at})

            self.gate.run(call, end, decision=_EXPIRY)
        if due:
            self.active.refresh()
        return [grant.id for grant in due]

    def expire_active_due(self, ctx: Ctx) -> list[str]:
        """`expire_due` when an active grant's time ran out (checked in memory: the
        scheduler calls this every second; pending requests wait for `expire_due`'s own
        tick)."""
        return self.expire_due(ctx) if self.active.any_expired(now()) else []

    def _change(
        self,
        principal: Principal,
        ctx: Ctx,
        action: str,
        grant_id: str,
        change: Callable[[Grant], Grant],
    ) -> Grant:
        """Decide `action` on the grant, then apply `change` to it in one store
        transaction (reading it again there) and refresh the active grants."""
        grant = self._find(grant_id)
        request = _request(grant) if grant is not None else None

        def apply(outcome: Outcome) -> Grant:
            outcome.detail.update(exception_id=grant_id)
            changed = grant

            def decide(row: Row) -> Mapping[str, Any]:
                nonlocal changed
                changed = change(Grant.from_row(row))
                return changed.row()

            if self.store.grants.change(grant_id, decide) is None or changed is None:
                raise NotFound(f"no exception {grant_id}")
            self.active.refresh()
            outcome.detail.update(_evidence(changed, now()))
            return changed

        call = Call(principal, ctx, action, _resource(grant_id, grant), request)
        return self.gate.run(call, apply)

    def _find(self, grant_id: str) -> Grant | None:
        """The grant `grant_id`, or None. Raises NotFound, before any decision or record,
        for an id no grant can have: it is not echoed (a token pasted in its place would
        otherwise stay in the audit log for good)."""
        if not GRANT_ID.fullmatch(grant_id):
            raise NotFound("no exception has such an id: 16 lowercase hexadecimal digits")
        row = self.store.grants.get(grant_id)
        return Grant.from_row(row) if row is not None else None


def _resource(grant_id: str, grant: Grant | None) -> dict[str, object]:
    """The policy's view of a grant: its id and requester (`owner`, null if unknown)."""
    return {"kind": "exception", "name": grant_id, "owner": grant.principal if grant else None}


def _request(grant: Grant) -> dict[str, object]:
    """What a grant asks for, as the policy sees it (`duration` in seconds)."""
    return {
        "actions": list(grant.actions),
        "resource": grant.resource,
        "duration": int(grant.duration.total_seconds()),
        "ticket": grant.ticket,
    }


def _evidence(grant: Grant, at: datetime) -> dict[str, object]:
    """What the audit record of a change to `grant` says of it: the grant whole (what was
    asked, by whom, why, who approved it, and its state at `at`, once changed), so that the
    trail alone shows what a grant allowed."""
    return {
        "exception_id": grant.id,
        "requester": grant.principal,
        **_request(grant),
        "reason": grant.reason,
        "approved_by": [approval["by"] for approval in grant.approvals],
        "state": grant.state(at).value,
    }


def _required(grant_id: str, grant: Grant | None) -> Grant:
    if grant is None:
        raise NotFound(f"no exception {grant_id}")
    return grant
