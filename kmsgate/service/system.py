"""Use cases: API tokens, the policy (read, evaluate, reload), the audit log and metrics."""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from kmsgate.audit import AuditPage
from kmsgate.auth import SYSTEM, Principal, TokenInfo, TokenRegistry, token_id_of
from kmsgate.errors import (
    AuditUnreadable,
    ConfigError,
    InvalidRequest,
    NotFound,
    RateLimited,
)
from kmsgate.policy import Decision, policy_input
from kmsgate.policy.follower import PolicyFollower
from kmsgate.service.gate import WHOAMI, Call, Ctx, Gate, Outcome, exceptions_named, now
from kmsgate.service.requests import AuditQuery, NewToken, PolicyQuery
from kmsgate.service.results import Identity, PolicyInfo, PolicyVerdict
from kmsgate.store import Store
from kmsgate.store.certificates import REVOKED, VALID
from kmsgate.store.checkpoints import AuditAnchor
from kmsgate.text import utc_timestamp

AUDIT_SEARCH_WAIT_SECONDS = 0.5
"""How long an audit search waits for the one running in its process before it is 429: a
queue of searches, each holding a thread of the shared pool, stalled readiness for 20 s."""
ROTATION_GRACE = timedelta(minutes=1)
"""How late a scheduled rotation may be before /metrics counts it as overdue."""


class System:
    """The gateway's own resources: tokens, policy, audit log, metrics."""

    def __init__(
        self, gate: Gate, tokens: TokenRegistry, follower: PolicyFollower, store: Store
    ) -> None:
        self.gate = gate
        self.store = store
        self.tokens = tokens
        self.policy_follower = follower
        """Tells the other processes of a reload, and reloads after theirs."""
        self._audit_reads = threading.Lock()
        """One search of the audit log at a time in this process: each reads every chain
        file, and a caller allowed `audit.read` sending several at once took the
        interpreter from key operations for as many scans."""

    def whoami(self, principal: Principal, ctx: Ctx) -> Identity:
        """The caller as the gateway sees it: id, kind, tenant, claims and the roles the
        policy maps it to. Raises PolicyDenied (a policy without the shipped rule that
        lets every principal read itself)."""
        call = Call(principal, ctx, WHOAMI, {"kind": "principal", "name": principal.id})
        return self.gate.run(
            call,
            lambda _: Identity(
                principal.id,
                principal.kind,
                principal.tenant,
                list(self.gate.roles(principal)),
                principal.claims,
            ),
        )

    # -- tokens ----------------------------------------------------------------------------

    def create_token(self, principal: Principal, ctx: Ctx, new: NewToken) -> tuple[TokenInfo, str]:
        """A new API token; the secret string is returned once and never stored. A token
        that creates one cannot give it a longer life than its own, and revoking it revokes
        the new one too, unless that is made an `orphan`. Raises PolicyDenied,
        InvalidRequest (roles, a ttl past the creating token's end), Unauthenticated (the
        creating token revoked meanwhile)."""
        ttl = int(new.ttl.total_seconds()) if new.ttl is not None else None
        maker = principal.id.removeprefix("token:") if principal.kind == "token" else None

        def create(outcome: Outcome) -> tuple[TokenInfo, str]:
            _refuse_outliving(principal, new.ttl)
            info, secret = self.tokens.create(
                new.roles,
                ttl=new.ttl,
                description=new.description,
                created_by=principal.id,
                parent=None if new.orphan else maker,
            )
            outcome.detail.update(
                token_id=info.id,
                roles=list(info.roles),
                ttl=ttl,
                expires_at=info.ends,
                parent=info.parent,
            )
            return info, secret

        asked = {"roles": list(new.roles), "ttl": ttl, "orphan": new.orphan}
        call = Call(principal, ctx, "token.create", {"kind": "token"}, asked)
        return self.gate.run(call, create)

    def list_tokens(self, principal: Principal, ctx: Ctx) -> list[TokenInfo]:
        call = Call(principal, ctx, "token.list", {"kind": "token"})
        return self.gate.run(call, lambda _: self.tokens.list())

    def revoke_token(
        self, principal: Principal, ctx: Ctx, token_id: str
    ) -> tuple[TokenInfo, list[str], int]:
        """Revoke a token and the tokens it made, theirs and so on (not orphans), as
        `revoke_token_tree` does. The policy sees the token's `roles`, `created_by`
        and `parent` (when there is such a token). Raises NotFound if no live token has
        that id, and before anything is recorded for text that is no token id (a whole
        token pasted by mistake: its secret must not reach the audit log)."""
        if token_id_of(token_id) != token_id:
            raise NotFound("no live token has that id: give its id, the part after 'kmg.'")
        resource: dict[str, object] = {"kind": "token", "name": token_id}
        known = self.tokens.get(token_id)
        if known is not None:
            resource.update(
                roles=list(known.roles), created_by=known.created_by, parent=known.parent
            )
        revoke = functools.partial(revoke_token_tree, self.tokens, token_id)
        return self.gate.run(Call(principal, ctx, "token.revoke", resource), revoke)

    def purge_ended_tokens(self, ctx: Ctx) -> Sequence[str]:
        """Delete, as the scheduler, the tokens that ended (expired or revoked) longer than
        `auth.token_retention` ago, at most `TOKENS_PURGED_PER_RUN` a run, with one
        `token.purge` record listing the first `LISTED_DESCENDANTS` ids and the count.
        Nothing is recorded when none is due. Their ids. Raises Unavailable,
        AuditUnavailable."""
        before = now() - self.gate.settings.auth.token_retention
        if not self.tokens.any_ended_before(before):
            return ()

        def purge(outcome: Outcome) -> Sequence[str]:
            purged = self.tokens.delete_ended(before, TOKENS_PURGED_PER_RUN)
            outcome.detail.update(
                ended_before=utc_timestamp(before),
                purged=list(purged[:LISTED_DESCENDANTS]),
                purged_count=len(purged),
            )
            return purged

        call = Call(SYSTEM, ctx, "token.purge", {"kind": "token"})
        return self.gate.run(call, purge, decision=_RETENTION)

    # -- policy ----------------------------------------------------------------------------

    def policy_info(self, principal: Principal, ctx: Ctx) -> PolicyInfo:
        policy = self.gate.policy
        call = Call(principal, ctx, "policy.read", {"kind": "policy"})
        return self.gate.run(
            call,
            lambda _: PolicyInfo(
                policy.digest, policy.files, policy.loaded_at, self.gate.settings.env
            ),
        )

    def evaluate_policy(self, principal: Principal, ctx: Ctx, query: PolicyQuery) -> PolicyVerdict:
        """What the policy decides for a hypothetical input. Raises InvalidRequest for an
        input without a JSON form."""

        def evaluate(_: Outcome) -> PolicyVerdict:
            document = policy_input(
                principal=query.principal,
                action=query.action,
                resource=query.resource,
                request=query.request,
                env=self.gate.settings.env if query.env is None else query.env,
                now=now(),
                exceptions=query.exceptions,
            )
            decision = self.gate.policy.decide(document)
            return PolicyVerdict(
                decision.allow,
                list(decision.reasons),
                list(self.gate.policy.roles(document)),
                exceptions_named(decision.reasons),
            )

        return self.gate.run(Call(principal, ctx, "policy.evaluate", {"kind": "policy"}), evaluate)

    def reload_policy(self, principal: Principal, ctx: Ctx) -> str:
        """Re-read the policy files atomically, here and then in every other process (each
        reads its own files within a refresh); the new digest. Raises InvalidRequest (the old
        policy is kept: the files are invalid, or the new policy would not let `principal`
        reload it again), Unavailable (reloaded here, not announced to the others)."""
        resource = {"kind": "policy"}

        def reload(outcome: Outcome) -> str:
            again = self.gate.policy_input(principal, "policy.reload", resource)
            try:
                digest = self.gate.policy.reload(must_allow=again)
            except ConfigError as exc:
                raise InvalidRequest(f"policy not reloaded: {exc}") from None
            outcome.detail["digest"] = digest
            self.policy_follower.announce(digest)
            return digest

        return self.gate.run(Call(principal, ctx, "policy.reload", resource), reload)

    # -- audit, metrics --------------------------------------------------------------------

    def alerts(self) -> dict[str, float]:
        """What an operator alerts on, for /metrics (read when scraped; only the certificate
        counts ask the store): certificates valid, revoked and expiring within 7 days, keys
        whose scheduled rotation is over a minute late, active grants and those ending
        within an hour. Raises Unavailable (the store is down)."""
        at = now()
        late = at - ROTATION_GRACE
        overdue = sum(
            1
            for key in self.gate.catalogue.all()
            if (when := key.next_rotation()) is not None and when < late
        )
        grants = self.gate.grants.active_grants(at)
        soon = at + timedelta(hours=1)
        statuses = self.store.certs.count_by_status()
        return {
            "certificates_valid": statuses.get(VALID, 0),
            "certificates_revoked": statuses.get(REVOKED, 0),
            "certificates_expiring_7d": self.store.certs.count_expiring(at, at + timedelta(days=7)),
            "keys_rotation_overdue": overdue,
            "grants_active": len(grants),
            "grants_ending_1h": sum(1 for g in grants if g.expires_at and g.expires_at <= soon),
        }

    def audit_events(self, principal: Principal, ctx: Ctx, query: AuditQuery) -> AuditPage:
        """The page of audit records matching `query`, oldest first. Raises PolicyDenied,
        AuditUnreadable (a chain file holds a line that is no record: it names the file and
        line)."""
        call = Call(principal, ctx, "audit.read", {"kind": "audit"})

        def search(_: Outcome) -> AuditPage:
            if not self._audit_reads.acquire(timeout=AUDIT_SEARCH_WAIT_SECONDS):
                raise RateLimited(
                    "another audit search is running in this gateway process: retry shortly",
                    retry_after=1,
                )
            try:
                return self.gate.audit.search(
                    since=query.since,
                    principal=query.principal,
                    key=query.key,
                    action=query.action,
                    limit=query.limit,
                    before=query.before,
                )
            except ValueError as exc:
                raise AuditUnreadable(
                    f"the audit log cannot be read: {exc}; `kmsgate audit verify` says more"
                ) from exc
            finally:
                self._audit_reads.release()

        return self.gate.run(call, search)

    def audit_checkpoints(self, principal: Principal, ctx: Ctx) -> list[AuditAnchor]:
        """The store's last signed checkpoint of every audit chain (action `audit.read`), for
        `kmsgate audit verify --gateway`. Raises PolicyDenied, Unavailable."""
        call = Call(principal, ctx, "audit.read", {"kind": "audit"})
        return self.gate.run(call, lambda _: self.store.audit_anchors.all())

    def authorize_metrics(self, principal: Principal, ctx: Ctx) -> None:
        """Raises PolicyDenied unless the principal may read the metrics (`metrics.read`)."""
        self.gate.run(Call(principal, ctx, "metrics.read", {"kind": "metrics"}), lambda _: None)


LISTED_DESCENDANTS = 100
"""The most ids of the tokens a revocation ended with it (or a purge deleted) that its
record and reply list (both give the count): a record's size stays bounded."""
TOKENS_PURGED_PER_RUN = 10_000
"""The most ended tokens one run of the scheduler deletes (one transaction of bounded
length; the next run, a minute later, goes on)."""
_RETENTION = Decision(allow=True, reasons=("the token ended longer ago than its retention",))
"""The scheduler's own decision to delete tokens whose retention ran out."""


def revoke_token_tree(
    tokens: TokenRegistry, token_id: str, outcome: Outcome
) -> tuple[TokenInfo, list[str], int]:
    """Revoke `token_id` and the tokens it made, theirs and so on (`TokenRegistry.revoke`):
    the token, the first `LISTED_DESCENDANTS` ids of the others and their count, which
    `outcome` records too. Raises NotFound."""
    revoked, others = tokens.revoke(token_id)
    listed = list(others[:LISTED_DESCENDANTS])
    if others:
        outcome.detail.update(also_revoked=listed, also_revoked_count=len(others))
    return revoked, listed, len(others)


def _refuse_outliving(creator: Principal, ttl: timedelta | None) -> None:
    """Raises InvalidRequest if `creator`, a token that expires, would make a token that
    outlives it (no ttl, or one past its end): a short-lived token must not leave a
    longer-lived one behind."""
    ends = creator.claims.get("expires_at") if creator.kind == "token" else None
    if not isinstance(ends, str):
        return
    left = datetime.fromisoformat(ends) - datetime.now(UTC)
    if ttl is None or ttl > left:
        raise InvalidRequest(
            f"a token cannot outlive the token that creates it, which expires at {ends}: "
            f"give a ttl of at most {max(int(left.total_seconds()), 0)}s"
        )
