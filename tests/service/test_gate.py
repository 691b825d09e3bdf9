"""The request path: authentication, one key lookup, deny by default, audit first."""

from __future__ import annotations

import json
import shutil

import pytest

from kmsgate.auth import Credentials, Principal
from kmsgate.errors import AuditUnavailable, NotFound, PolicyDenied, Unauthenticated
from kmsgate.policy import PolicyEngine
from kmsgate.service.gate import Call
from kmsgate.service.requests import SignInput
from tests.service.conftest import ADMIN, CTX, NOBODY


def audit_records(service):
    path = service.settings.resolved_audit_path()
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_api_token_authenticates_as_a_token_principal(service):
    info, secret = service.tokens.create(["ci"], ttl=None)
    principal = service.gate.authenticate(Credentials(bearer=secret), CTX)
    assert (principal.id, principal.kind, principal.roles) == (f"token:{info.id}", "token", ("ci",))


@pytest.mark.parametrize("bearer", [None, "", "kmg.0123456789abcdef.nope", "not-a-token"])
def test_refused_credentials_are_audited_with_the_authenticator_kind(service, bearer):
    with pytest.raises(Unauthenticated):
        service.gate.authenticate(Credentials(bearer=bearer, remote_addr="127.0.0.1"), CTX)
    last = audit_records(service)[-1]
    assert (last["action"], last["decision"], last["outcome"]) == (
        "authn",
        "deny",
        "unauthenticated",
    )
    assert last["resource"] == {"kind": "token"}
    assert "principal" not in last  # nobody was authenticated


def test_the_key_is_looked_up_once_per_operation(service, new_key, monkeypatch):
    new_key("k")
    lookups = []
    real_find = service.catalogue.find

    def counting_find(name):
        lookups.append(name)
        return real_find(name)

    monkeypatch.setattr(service.catalogue, "find", counting_find)
    target = service.gate.target("k")
    service.crypto.sign(ADMIN, CTX, target, [SignInput(input=b"m")] * 3, True)
    assert lookups == ["k"]


def test_a_denied_caller_cannot_tell_whether_a_key_exists(service, new_key):
    new_key("real")
    for name in ("real", "missing"):
        with pytest.raises(PolicyDenied):
            service.crypto.sign(NOBODY, CTX, service.gate.target(name), [SignInput(b"m")], False)
    with pytest.raises(NotFound):
        service.crypto.sign(ADMIN, CTX, service.gate.target("missing"), [SignInput(b"m")], False)
    denied = [r for r in audit_records(service) if r["decision"] == "deny"]
    assert [r["resource"]["name"] for r in denied] == ["real", "missing"]


def test_a_deny_rules_veto_reads_as_any_refusal(service, new_key):
    """tenants.rego vetoes another tenant's key because of what the key is (its label): a
    refusal worded apart would tell the caller that the key exists and whose it is."""
    new_key("globex-k", labels={"tenant": "globex"})
    acme = Principal(id="token:acme", kind="token", roles=("admin",), tenant="acme")
    with pytest.raises(PolicyDenied) as vetoed:
        service.crypto.sign(acme, CTX, service.gate.target("globex-k"), [SignInput(b"m")], False)
    assert (
        vetoed.value.detail == "no rule allows sign on key globex-k for token:acme (roles [admin])"
    )
    last = audit_records(service)[-1]
    assert last["decision"] == "deny" and any("tenant" in r for r in last["reasons"])
    # nor does a missing key answer otherwise (a 404 would tell it from another tenant's)
    with pytest.raises(PolicyDenied) as missing:
        service.crypto.sign(acme, CTX, service.gate.target("no-such"), [SignInput(b"m")], False)
    assert missing.value.detail == vetoed.value.detail.replace("globex-k", "no-such")
    last = audit_records(service)[-1]
    assert (last["outcome"], last["detail"]["not_found"]) == ("policy_denied", True)
    with pytest.raises(NotFound):  # a principal of no tenant is told
        service.crypto.sign(ADMIN, CTX, service.gate.target("no-such"), [SignInput(b"m")], False)


class RefusingSink:
    """An audit sink whose writes all fail (a full disk, a lost mount)."""

    def __init__(self, real):
        self.real = real

    def append(self, event, *, reserved=False):
        raise AuditUnavailable("audit sink down")

    def problem(self):
        return "audit sink down"

    def search(self, **query):
        return self.real.search(**query)

    def verify(self):
        return self.real.verify()

    def close(self):
        self.real.close()


def test_no_record_no_change_and_no_result(service, new_key, monkeypatch):
    """A state change whose allow record cannot be written does not run; a read whose
    outcome record cannot be written returns nothing."""
    new_key("k")
    monkeypatch.setattr(service.gate, "audit", RefusingSink(service.gate.audit))
    with pytest.raises(AuditUnavailable):
        service.keys.rotate(ADMIN, CTX, "k")
    assert sorted(service.catalogue.get("k").versions) == [1]
    with pytest.raises(AuditUnavailable):
        service.crypto.sign(ADMIN, CTX, service.gate.target("k"), [SignInput(b"m")], False)


def test_state_changes_are_recorded_before_they_run(service, new_key):
    new_key("k")
    service.keys.rotate(ADMIN, CTX, "k")
    rotations = [r for r in audit_records(service) if r["action"] == "key.rotate"]
    assert [r["outcome"] for r in rotations] == ["started", "ok"]
    assert rotations[1]["key_version"] == 2
    assert rotations[0]["request_id"] == rotations[1]["request_id"] == CTX.request_id


def test_a_policy_that_fails_to_decide_says_so(service, new_key, monkeypatch, tmp_path):
    """An evaluation error denies, and the 403 says the policy failed, not that no rule
    allows: what the caller's operator must look at is the gateway's log. (The interpreter
    decides a bundle the compiler refuses, such as one with Rego v0 files; it raises on a
    conflict, where the compiled VM leaves the rule undefined.)"""
    new_key("k")
    shipped = service.gate.policy.policy_dir
    policies = tmp_path / "policies"
    shutil.copytree(shipped, policies)
    (policies / "conflict.rego").write_text('package kmsgate.authz\n\nallow := "yes"\n')
    monkeypatch.setattr(service.gate, "policy", PolicyEngine.load(policies, compiled=False))
    with pytest.raises(PolicyDenied) as denied:  # admin: `allow if` holds, and conflicts
        service.crypto.sign(ADMIN, CTX, service.gate.target("k"), [SignInput(b"m")], False)
    assert str(denied.value.detail).startswith(
        "the policy failed to decide sign on key k for token:admin (roles [admin]): "
    )
    with pytest.raises(PolicyDenied) as refused:  # nobody: no rule holds, nothing conflicts
        service.crypto.sign(NOBODY, CTX, service.gate.target("k"), [SignInput(b"m")], False)
    assert str(refused.value.detail).startswith("no rule allows sign on key k")


def test_a_record_names_the_bundle_that_decided_even_if_a_reload_came_between(
    service, new_key, tmp_path
):
    """The decision carries its bundle's digest: a policy reload between the decision and
    its audit record (another thread, a follower worker) does not make the record name the
    new bundle, which decided nothing here."""
    new_key("k")
    target = service.gate.target("k")
    decision = service.gate.decide(ADMIN, "sign", target.resource(), {"batch": 1})
    before = service.gate.policy.digest
    assert decision.allow and decision.digest == before
    policies = tmp_path / "policies"
    shutil.copytree(service.gate.policy.policy_dir, policies)
    (policies / "more.rego").write_text("package kmsgate.more\n\nx := 1\n")
    service.gate.policy = PolicyEngine.load(policies)  # the reload, in between
    assert service.gate.policy.digest != before
    call = Call(ADMIN, CTX, "sign", target.resource())
    service.gate.run(call, lambda _: None, decision=decision)
    (record,) = service.audit.search(action="sign").records
    assert record["policy_digest"] == before


def test_an_audit_search_waiting_on_another_is_refused_instead_of_holding_a_thread(service):
    """Searches take turns in a process; a queue of them, each waiting in a thread of the
    shared pool, stalled readiness and every other threaded route for 20 s. A search that
    finds another running for over half a second is 429 with Retry-After."""
    from kmsgate.errors import RateLimited
    from kmsgate.service.requests import AuditQuery

    with service.system._audit_reads, pytest.raises(RateLimited) as refused:  # one running
        service.system.audit_events(ADMIN, CTX, AuditQuery(limit=1))
    assert refused.value.headers() == {"retry-after": "1"}
    assert service.system.audit_events(ADMIN, CTX, AuditQuery(limit=1)).records
