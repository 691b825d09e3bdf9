"""The request path, once: authenticate -> decide -> run -> audit.

Every use case goes through `Gate.run` (or `Gate.run_on_key`). The policy sees the key's
attributes when the key exists and only its name otherwise, so a caller without permission
gets 403 whether or not the key exists. Every decision and outcome is audited; a
state-changing action's allow decision is written before it runs (no record, no change),
and if an outcome record cannot be written the result is withheld (fail-closed).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, TypeVar

from kmsgate.audit import AuditEvent, AuditSink, input_summary
from kmsgate.auth import AuthenticationFailed, Authenticators, Credentials, Principal
from kmsgate.backends.base import Registry
from kmsgate.catalogue import Catalogue, Key
from kmsgate.config import Settings
from kmsgate.errors import KmsgateError, NotFound, PolicyDenied, RateLimited, Unavailable
from kmsgate.grants import ActiveGrants
from kmsgate.logs import Decided, current_decisions
from kmsgate.policy import Decision, PolicyEngine, policy_input
from kmsgate.ratelimit import FailureLimit, RequestRates
from kmsgate.text import KEY_NAME
from kmsgate.usage import BackendTimes, KeyUsage

T = TypeVar("T")
EXCEPTION_REASON = "exception "
"""How the shipped exceptions.rego names the grant that allowed a request (`exception <id>`)."""
ERROR_DETAIL_CHARS = 256
"""How much of a failed operation's error detail its audit record keeps (`detail.error`)."""
STARTED = "started"
STATE_CHANGING = frozenset(
    {
        "key.create",
        "key.import",
        "key.rotate",
        "key.disable",
        "key.enable",
        "key.update",
        "key.compromise",
        "key.delete",
        "key.cancel_deletion",
        "key.destroy",
        "token.create",
        "token.bootstrap",
        "token.revoke",
        "token.purge",
        "policy.reload",
        "ca.create",
        "ca.import",
        "cert.issue",
        "cert.renew",
        "cert.revoke",
        "crl.build",
        "ocsp.responder",
        "exception.request",
        "exception.approve",
        "exception.revoke",
        "exception.expire",
    }
)
"""Actions whose allow decision is audited (outcome `started`) before they run."""
CLOCK_SKEW = timedelta(minutes=1)
"""How far a client's clock may be from the gateway's, for the times clients state (a
compromise's start, a signature's `signed_at`)."""
WHOAMI = "principal.read"
"""The action of a principal reading who it is (`GET /v1/sys/whoami`)."""


def now() -> datetime:
    return datetime.now(UTC)


class Ctx(NamedTuple):
    """Per-request facts for audit records."""

    request_id: str


class Call(NamedTuple):
    """One decision to take and record: who asks to do what to which resource (a named
    tuple: built on every request, immutable, cheap)."""

    principal: Principal
    ctx: Ctx
    action: str
    resource: Mapping[str, object]
    request: Mapping[str, object] | None = None
    inputs: Sequence[bytes] | None = None
    """Message inputs, recorded in the audit log as their count, length and (with
    `digests`) digest, never as they are."""
    detail: Mapping[str, object] | None = None
    """What every audit record of the call has in its `detail`, a denial's too (an
    envelope's encryption context: who tried to decrypt whose data)."""
    digests: bool = True
    """Whether the records digest `inputs`: not for what is MACed, often a short secret
    (an account number, an e-mail) that anyone reading the log could find from its hash."""


@dataclass(slots=True)
class Outcome:
    """What an operation reports to its audit record besides success or failure."""

    key_version: int | None = None
    detail: dict[str, object] = field(default_factory=dict)

    def event(self, facts: Mapping[str, Any], outcome: str) -> AuditEvent:
        """The outcome record: `facts` of the call, ended with `outcome` ("ok" or a code)."""
        return AuditEvent(
            **facts, outcome=outcome, key_version=self.key_version, detail=self.detail or None
        )


class KeyTarget(NamedTuple):
    """The key a request names, looked up once: policy and operation see this snapshot."""

    name: str
    key: Key | None
    blocking: bool
    """Whether the operation may block (remote or HSM backend): run it off the event loop."""
    rated: bool = False
    """Whether the operation counts against the key's rate (`limits.key_rate`): once the
    policy allowed it (`Gate.run_on_key`), so that callers it denies never use it up."""

    def resource(self) -> dict[str, object]:
        """The policy's view: the key's attributes, or only its name if there is no key."""
        return self.key.policy_resource() if self.key else {"kind": "key", "name": self.name}

    def require(self) -> Key:
        """The key. Raises NotFound (only ever after the policy allowed the call)."""
        if self.key is None:
            raise NotFound(f"no key named {self.name!r}")
        return self.key


class Freshness:
    """When the caches last followed the store; stale after `limit` seconds without. Never
    stale until something follows the store (the API's cache refresher marks it)."""

    def __init__(self, limit: float) -> None:
        self._limit = limit
        self._at: float | None = None

    def mark(self) -> None:
        """The caches have just caught up with the store."""
        self._at = time.monotonic()

    def stale(self) -> bool:
        return self.behind(self._limit)

    def behind(self, seconds: float) -> bool:
        """Whether the caches have not followed the store for over `seconds` (the store
        is likely down)."""
        return self._at is not None and time.monotonic() - self._at > seconds


class Gate:
    """Authentication, policy decisions and their audit records for every use case."""

    def __init__(
        self,
        *,
        settings: Settings,
        catalogue: Catalogue,
        registry: Registry,
        policy: PolicyEngine,
        audit: AuditSink,
        authenticators: Authenticators,
        grants: ActiveGrants,
        usage: KeyUsage,
    ) -> None:
        self.settings = settings
        self.backend_times = BackendTimes()
        self.decisions = [0, 0]
        """Decisions taken by this process: [denied, allowed] (for /metrics)."""
        self.freshness = Freshness(settings.max_staleness_seconds)
        self.grants = grants
        self.usage = usage
        self.catalogue = catalogue
        self.registry = registry
        self.policy = policy
        self.audit = audit
        self.authenticators = authenticators
        self.rates = RequestRates(
            *settings.limits.rates(settings.dev), settings.limits.burst_seconds
        )
        self.failures = FailureLimit(
            settings.limits.failed_auth_rate,
            settings.limits.burst_seconds,
            exempt=settings.tls.trusted_proxies if settings.tls else (),
        )

    def authenticate(self, credentials: Credentials, ctx: Ctx) -> Principal:
        """The caller behind `credentials`. Raises Unauthenticated (audited, naming the
        authenticator kind that refused), RateLimited (the caller is over its request rate,
        not audited: nothing was decided; or its address is over its rate of failed
        authentications, audited only for the first failure of such a run)."""
        try:
            principal = self.authenticators.authenticate(credentials)
        except AuthenticationFailed as exc:
            within, audited, unrecorded = self.failures.failed(credentials.remote_addr)
            if audited:
                self._audit_failure(exc, credentials, ctx, within, unrecorded)
            if not within:
                raise RateLimited(retry_after=1) from None
            raise
        self.rates.admit_principal(principal.id)
        return principal

    def _audit_failure(
        self,
        exc: AuthenticationFailed,
        credentials: Credentials,
        ctx: Ctx,
        within: bool,
        unrecorded: int,
    ) -> None:
        """The `authn` record of a failed authentication (`within`: the address is within
        its rate of failures; else this starts a run of failures answered 429 unrecorded;
        `unrecorded`: how many such failures of the address this record follows)."""
        detail: dict[str, object] = {}
        if unrecorded:
            detail["unrecorded_before"] = unrecorded
        if credentials.remote_addr:
            detail["remote_addr"] = credentials.remote_addr  # where a run of failures comes from
        reason = exc.reason or exc.detail  # which check failed (an OIDC one is not told)
        detail["reason"] = reason[:ERROR_DETAIL_CHARS]
        if not within:
            detail["throttled"] = "further failures from this address are refused unrecorded"
        self.audit.append(
            AuditEvent(
                action="authn",
                decision="deny",
                outcome=exc.code,
                request_id=ctx.request_id,
                principal=None,
                resource={"kind": exc.kind, **({"name": exc.subject} if exc.subject else {})},
                policy_digest=self.policy.digest,
                detail=detail or None,
            )
        )

    def require_fresh(self) -> None:
        """Raises Unavailable when the caches have not been able to follow the store for over
        `max_staleness_seconds` (a disable or a revocation made elsewhere could be missed)."""
        if self.freshness.stale():
            raise Unavailable(
                "the metadata store has been unreachable for too long to act on cached state"
            )

    def target(
        self, name: str, *, current: bool = False, change: bool = False, rated: bool = False
    ) -> KeyTarget:
        """The key `name` as this request will see it (from the cache, or read through;
        `current`: as the store holds it now, for a read of the key's record or, `change`,
        for a change to it: see `find_current`; `rated`: an operation on the key's rate).
        Raises NotFound, before any decision or record, for a name no key can have (it is
        not echoed); Unavailable as `require_fresh` does, and for a change the store cannot
        be asked about."""
        if not KEY_NAME.fullmatch(name):
            raise NotFound("no key has such a name: 1-128 letters, digits, '.', '_' or '-'")
        self.require_fresh()
        # a read while the store seems down is served from the caches, as operations are
        down = not change and self.freshness.behind(2 * self.settings.cache_refresh_seconds + 1)
        key = (
            self.catalogue.find_current(name, change=change)
            if current and not down
            else self.catalogue.find(name)
        )
        backend = self.registry.find(key.backend) if key and not key.verify_only else None
        return KeyTarget(name, key, backend is not None and backend.blocking, rated)

    def decide(
        self,
        principal: Principal,
        action: str,
        resource: Mapping[str, object],
        request: Mapping[str, object] | None = None,
    ) -> Decision:
        """The policy's decision, with the principal's active JIT grants as `exceptions`.

        An allow that only grants gave is checked against the store before it stands (this
        process's copy of the grants lags by up to a refresh): a grant revoked anywhere
        allows nothing from then on, and the policy decides again without it. Raises
        Unavailable if that check cannot reach the store (fail closed).
        """
        at = now()
        grants = self.grants.active_for(principal.id, action, at)
        decision = self.policy.decide(
            self.policy_input(principal, action, resource, request, at=at, grants=grants)
        )
        if not grants:  # the usual case: no grant to check
            return decision
        ended = self.grants.ended(_grants_relied_on(decision), at)
        if not ended:
            return decision
        still = [g for g in grants if g["id"] not in ended]
        return self.policy.decide(
            self.policy_input(principal, action, resource, request, at=at, grants=still)
        )

    def policy_input(
        self,
        principal: Principal,
        action: str,
        resource: Mapping[str, object],
        request: Mapping[str, object] | None = None,
        *,
        at: datetime | None = None,
        grants: Sequence[Mapping[str, object]] | None = None,
    ) -> dict[str, object]:
        """The policy's input for `principal` doing `action` on `resource` at `at` (now),
        with `grants` as `exceptions` (by default the principal's active grants)."""
        at = at or now()
        if grants is None:
            grants = self.grants.active_for(principal.id, action, at)
        return policy_input(
            principal=principal.policy_document(),
            action=action,
            resource=resource,
            request=request,
            env=self.settings.env,
            now=at,
            exceptions=grants,
            trusted=True,
        )

    def roles(self, principal: Principal) -> tuple[str, ...]:
        """The roles the policy maps `principal` to (its token's roles, and those policy
        derives from its claims)."""
        return self.policy.roles(
            self.policy_input(principal, WHOAMI, {"kind": "principal"}, grants=())
        )

    def run(
        self,
        call: Call,
        operation: Callable[[Outcome], T],
        *,
        decision: Decision | None = None,
    ) -> T:
        """Decide (unless a `decision` was already taken), run `operation` if allowed, audit
        the decision and the outcome.

        Raises PolicyDenied, whatever `operation` raises, or AuditUnavailable (nothing runs
        if a state-changing action's decision cannot be recorded; otherwise the result is
        withheld).
        """
        with self.running(call, decision=decision) as outcome:
            return operation(outcome)

    @contextlib.contextmanager
    def running(self, call: Call, *, decision: Decision | None = None) -> Iterator[Outcome]:
        """`run` as a `with` block, for an operation that awaits inside it: decide and
        record the decision on entry (raising PolicyDenied or AuditUnavailable before the
        block runs), record the block's outcome on exit."""
        decision = decision or self.decide(call.principal, call.action, call.resource, call.request)
        self.decisions[decision.allow] += 1
        decided = current_decisions.get()
        if decided is not None:  # in a request: its log line names the action
            decided.append(
                Decided(call.action, call.resource.get("kind"), call.resource.get("name"))
            )
        facts = self._facts(call, decision)
        given = dict(call.detail) if call.detail else None
        if not decision.allow:
            self.audit.append(AuditEvent(**facts, outcome=PolicyDenied.code, detail=given))
            raise PolicyDenied(self._denial(call, decision))
        changing = call.action in STATE_CHANGING
        if changing:
            # no record, no change: if this write fails (AuditUnavailable), nothing runs
            self.audit.append(AuditEvent(**facts, outcome=STARTED, detail=given))
        outcome = Outcome(detail=given or {})
        try:
            yield outcome
        except BaseException as exc:  # also a cancelled request: its outcome is recorded
            if isinstance(exc, KmsgateError):  # what the caller was told, so the trail says why
                outcome.detail["error"] = exc.detail[:ERROR_DETAIL_CHARS]
            self.audit.append(outcome.event(facts, _failure_code(exc)), reserved=changing)
            raise
        self.audit.append(outcome.event(facts, "ok"), reserved=changing)

    def run_on_key(
        self,
        call: Call,
        target: KeyTarget,
        operation: Callable[[Key, Outcome], T],
        *,
        decision: Decision | None = None,
    ) -> T:
        """`run` for an operation on `target` (whose attributes are `call.resource`).
        Raises NotFound only after the policy allowed the call; PolicyDenied, worded as any
        refusal, instead for a principal bound to a tenant: another tenant's key is refused
        by what it is (its label), so a 404 for a missing one would tell them apart. The
        audit record keeps `not_found`. Raises RateLimited, also after the policy allowed
        the call, when a `rated` target's key is over its rate."""

        def on_key(outcome: Outcome) -> T:
            if target.key is None and call.principal.tenant is not None:
                outcome.detail["not_found"] = True
                raise PolicyDenied(self._denial(call, Decision(allow=False, reasons=())))
            if target.rated:
                self.rates.admit_key(target.name)
            return operation(target.require(), outcome)

        return self.run(call, on_key, decision=decision)

    def decide_each(self, call: Call, requests: Sequence[Mapping[str, object]]) -> Decision:
        """One decision on `call` for all of `requests` (each a policy `request` for part
        of it): the first denial, else an allow with every decision's reasons. Raises what
        `decide` raises."""
        reasons: set[str] = set()
        for request in requests:
            decision = self.decide(call.principal, call.action, call.resource, request)
            if not decision.allow:
                return decision
            reasons.update(decision.reasons)
        return Decision(allow=True, reasons=tuple(sorted(reasons)))

    def _denial(self, call: Call, decision: Decision) -> str:
        """What a refused caller can act on: the action, what it was asked on (as the
        caller named it: nothing about whether it exists) and the roles the policy saw. A
        `deny` rule's veto reads the same as no allowing rule (the audit record and `policy
        explain` tell them apart): a veto fires on what the resource is, such as another
        tenant's label, so its wording would tell a caller that the key exists."""
        kind, name = call.resource.get("kind", "resource"), call.resource.get("name")
        target = f"{kind} {name}" if name else str(kind)
        roles = ", ".join(self.roles(call.principal))
        who = f"{call.principal.id} (roles [{roles}])"
        if decision.failed:
            return (
                f"the policy failed to decide {call.action} on {target} for {who}: an "
                "evaluation error, logged by the gateway with its policy location"
            )
        return f"no rule allows {call.action} on {target} for {who}"

    def _facts(self, call: Call, decision: Decision) -> dict[str, Any]:
        """What every audit record of `call` says (all but its outcome)."""
        return {
            "action": call.action,
            "decision": "allow" if decision.allow else "deny",
            "request_id": call.ctx.request_id,
            "principal": call.principal.id,
            "principal_kind": call.principal.kind,
            "resource": {k: v for k, v in call.resource.items() if k in ("kind", "name")},
            "reasons": tuple(decision.reasons),
            "exception_id": _exception_used(decision),
            "inputs": input_summary(call.inputs, digest=call.digests) if call.inputs else None,
            "policy_digest": decision.digest or self.policy.digest,
        }


def _grants_relied_on(decision: Decision) -> list[str]:
    """The grants an allow relied on: named by reasons `exception <id>` (policies/
    exceptions.rego), and only when no other rule allowed the request as well."""
    if not decision.allow:
        return []
    used = exceptions_named(decision.reasons)
    return used if used and len(used) == len(decision.reasons) else []


def _exception_used(decision: Decision) -> str | None:
    """The grant an allow relied on, as its audit record names it (the first, if several)."""
    relied_on = _grants_relied_on(decision)
    return relied_on[0] if relied_on else None


def exceptions_named(reasons: Sequence[str]) -> list[str]:
    """The grant ids that reasons `exception <id>` name."""
    return [r.removeprefix(EXCEPTION_REASON) for r in reasons if r.startswith(EXCEPTION_REASON)]


def _failure_code(exc: BaseException) -> str:
    """The outcome an audit record gives an operation that raised `exc`."""
    if isinstance(exc, KmsgateError):
        return exc.code
    return "internal_error" if isinstance(exc, Exception) else "interrupted"
