"""JIT grants across processes: each keeps its own copy of the active grants, and a grant
ended by another process allows nothing from then on, without waiting for a refresh."""

from __future__ import annotations

from datetime import timedelta

import pytest

from kmsgate.auth import Principal
from kmsgate.bootstrap import build_service
from kmsgate.errors import PolicyDenied, Unavailable
from kmsgate.service.requests import NewException, SignInput
from tests.service.conftest import CTX

DEV = Principal(id="token:dev", kind="token", roles=("dev",))
APPROVER = Principal(id="token:approver", kind="token", roles=("approver",))
GRANT = NewException(("sign",), "k", timedelta(minutes=15), "INC-1", "sign a hotfix")


def test_a_grant_revoked_by_another_process_allows_nothing_at_once(
    gateway_settings, service, new_key
):
    new_key("k")
    other = build_service(gateway_settings)  # another worker: same store, own copies
    try:

        def sign(svc):
            return svc.crypto.sign(DEV, CTX, svc.gate.target("k"), [SignInput(b"m")], False)

        requested = service.exceptions.request(DEV, CTX, GRANT)
        grant = service.exceptions.approve(APPROVER, CTX, requested.id)
        other.exceptions.active.refresh()  # the other worker has seen the approval
        assert sign(other)[0].key_version == 1

        service.exceptions.revoke(APPROVER, CTX, grant.id)
        # no refresh: the other worker's copy still holds the grant ...
        assert [g.id for g in other.exceptions.active.active_grants(grant.approved_at)] == [
            grant.id
        ]
        with pytest.raises(PolicyDenied):  # ... and the store's word counts
            sign(other)
        assert other.exceptions.active.active_grants(grant.approved_at) == []  # caught up
        records = other.audit.search(action="sign", limit=10).records
        assert [(r["decision"], r.get("exception_id")) for r in records] == [
            ("allow", grant.id),
            ("deny", None),
        ]
    finally:
        other.close()


def test_a_grant_that_cannot_be_checked_allows_nothing(service, new_key, monkeypatch):
    new_key("k")
    grant = service.exceptions.request(DEV, CTX, GRANT)
    service.exceptions.approve(APPROVER, CTX, grant.id)

    def down(_aggregate: str) -> int:
        raise Unavailable("metadata store unavailable")

    monkeypatch.setattr(service.store.feed, "epoch_now", down)
    with pytest.raises(Unavailable):
        service.crypto.sign(DEV, CTX, service.gate.target("k"), [SignInput(b"m")], False)
    # an allow that needs no grant never asks the store
    admin = Principal(id="token:admin", kind="token", roles=("admin",))
    assert service.crypto.sign(admin, CTX, service.gate.target("k"), [SignInput(b"m")], False)


def test_the_audit_trail_alone_shows_what_a_grant_allowed_and_who_approved_it(service):
    requested = service.exceptions.request(DEV, CTX, GRANT)
    service.exceptions.approve(APPROVER, CTX, requested.id)
    service.exceptions.revoke(APPROVER, CTX, requested.id)
    evidence = {
        "exception_id": requested.id,
        "requester": DEV.id,
        "actions": ["sign"],
        "resource": "k",
        "duration": 900,
        "ticket": "INC-1",
        "reason": "sign a hotfix",
    }
    for action, approved_by, state in (
        ("exception.request", [], "pending"),
        ("exception.approve", [APPROVER.id], "active"),
        ("exception.revoke", [APPROVER.id], "revoked"),
    ):
        (record,) = [r for r in service.audit.search(action=action).records if r["outcome"] == "ok"]
        detail = record["detail"]
        assert {k: detail[k] for k in evidence} == evidence, action
        assert detail["approved_by"] == approved_by and detail.get("state") == state, action
