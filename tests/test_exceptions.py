"""JIT exceptions (kmsgate.grants, service/grants.py, policies/exceptions.rego): a principal
asks for a time-limited grant, another approves it, it expires or is revoked; against a real
gateway with two workers, the shipped policies and its audit log."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from kmsgate.audit import AuditFile
from kmsgate.errors import Conflict, InvalidRequest, PolicyDenied
from kmsgate.grants import Grant, GrantState, approve, new_grant
from kmsgate.policy import ACTIONS
from tests.gateway import open_gateway
from tests.test_cli import Gateway, assert_one_line_error, run_cli, running_gateway

TIMEOUT = 10.0
KEY = "payroll-data"


@dataclass
class Team:
    gw: Gateway
    x: str
    """A developer (role dev): may do nothing with the key on its own."""
    y: str
    """An approver."""
    ciphertext: str

    def as_(self, token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}

    def post(self, path: str, token: str, body: Any = None) -> httpx.Response:
        return httpx.post(
            f"{self.gw.addr}{path}", json=body, headers=self.as_(token), timeout=TIMEOUT
        )

    def decrypt(self, token: str) -> int:
        reply = self.post(f"/v1/keys/{KEY}/decrypt", token, {"ciphertext": self.ciphertext})
        return reply.status_code

    def request(self, token: str, **changes: Any) -> httpx.Response:
        body = {
            "actions": ["decrypt"],
            "resource": KEY,
            "duration": "15m",
            "ticket": "INC-4711",
            "reason": "restore last night's payroll export",
            **changes,
        }
        return self.post("/v1/exceptions", token, body)


def _token(gw: Gateway, role: str) -> str:
    made = httpx.post(
        f"{gw.addr}/v1/sys/tokens",
        json={"roles": [role]},
        headers={"authorization": f"Bearer {gw.root_token}"},
        timeout=TIMEOUT,
    )
    assert made.status_code == 201, made.text
    token: str = made.json()["token"]
    return token


@pytest.fixture(scope="module")
def gateway_team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    base = tmp_path_factory.mktemp("exceptions")
    config = base / "kmsgate.yaml"
    config.write_text(json.dumps({"exceptions": {"max_duration": "1h"}}))
    with running_gateway(base, "--config", str(config), "--workers", "2") as gw:
        root = {"authorization": f"Bearer {gw.root_token}"}
        created = httpx.post(
            f"{gw.addr}/v1/keys",
            json={"name": KEY, "type": "aes-256-gcm", "purpose": "envelope-data"},
            headers=root,
            timeout=TIMEOUT,
        )
        assert created.status_code == 201, created.text
        sealed = httpx.post(
            f"{gw.addr}/v1/keys/{KEY}/encrypt",
            json={"plaintext": "c2VjcmV0"},
            headers=root,
            timeout=TIMEOUT,
        )
        assert sealed.status_code == 200, sealed.text
        yield Team(gw, _token(gw, "dev"), _token(gw, "approver"), sealed.json()["ciphertext"])


@pytest.fixture
def team(gateway_team: Team) -> Team:
    """The module's gateway with a new developer per test, so that a grant one test leaves
    in force (it failed before revoking it) cannot allow another test's refusals."""
    return replace(gateway_team, x=_token(gateway_team.gw, "dev"))


def _principal(token: str) -> str:
    return f"token:{token.split('.')[1]}"


def _audit(team: Team, action: str) -> list[dict[str, Any]]:
    return AuditFile(team.gw.data_dir / "audit.log").search(action=action, limit=10_000).records


def _within(seconds: float, check: Any) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_grant_allows_only_after_another_principal_approved_it_until_revoked(
    team: Team,
) -> None:
    assert team.decrypt(team.x) == 403
    # a refusal says what to ask for, and the same whether or not the key exists
    for key in (KEY, "no-such-key"):
        refused = team.post(f"/v1/keys/{key}/decrypt", team.x, {"ciphertext": team.ciphertext})
        assert refused.status_code == 403
        assert refused.json()["detail"] == (
            f"no rule allows decrypt on key {key} for {_principal(team.x)} (roles [dev])"
        )
    asked = team.request(team.x)
    assert asked.status_code == 201, asked.text
    grant = asked.json()
    assert (grant["state"], grant["principal"]) == ("pending", _principal(team.x))
    assert team.decrypt(team.x) == 403

    own = team.post(f"/v1/exceptions/{grant['id']}/approve", team.x)
    assert own.status_code == 403
    # an approver, or the admin, asking for itself cannot approve its own request either
    for requester in (team.y, team.gw.root_token):
        theirs = team.request(requester).json()["id"]
        refused = team.post(f"/v1/exceptions/{theirs}/approve", requester)
        assert refused.status_code == 403 and "cannot approve" in refused.json()["detail"]
    approved = team.post(f"/v1/exceptions/{grant['id']}/approve", team.y)
    assert approved.status_code == 200, approved.text
    active = approved.json()
    assert active["state"] == "active"
    assert [a["by"] for a in active["approvals"]] == [_principal(team.y)]
    expires = datetime.fromisoformat(active["expires_at"])
    assert timedelta(minutes=14) < expires - datetime.now(UTC) <= timedelta(minutes=15)

    # both workers: the approving one at once, the other within a refresh
    assert _within(1.5, lambda: all(team.decrypt(team.x) == 200 for _ in range(6)))

    def grant_gauges() -> dict[str, float]:
        metrics = httpx.get(
            f"{team.gw.addr}/metrics", headers=team.as_(team.gw.root_token), timeout=TIMEOUT
        ).text
        lines = (line for line in metrics.splitlines() if line.startswith("kmsgate_grants"))
        return {name: float(value) for name, value in (line.split(" ") for line in lines)}

    # the gauges come from each worker's snapshot, taken once a second; one scrape for both
    # (a scrape reaches one worker, which may not have seen the other's latest snapshot)
    assert _within(
        2.5,
        lambda: all(
            gauges.get(name, 0) >= 1
            for gauges in [grant_gauges()]
            for name in ("kmsgate_grants_active", "kmsgate_grants_ending_1h")
        ),
    )
    encrypt = team.post(f"/v1/keys/{KEY}/encrypt", team.x, {"plaintext": "eA=="})
    assert encrypt.status_code == 403  # only what the grant lists
    assert team.post(f"/v1/exceptions/{grant['id']}/approve", team.y).status_code == 409

    revoked = httpx.delete(
        f"{team.gw.addr}/v1/exceptions/{grant['id']}", headers=team.as_(team.y), timeout=TIMEOUT
    )
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked", revoked.text
    # at once, on both workers (new connections reach either): the other has not refreshed
    statuses = [team.decrypt(team.x) for _ in range(8)]
    assert statuses == [403] * 8, statuses

    decrypts = [r for r in _audit(team, "decrypt") if r["principal"] == _principal(team.x)]
    allowed = [r for r in decrypts if r["decision"] == "allow"]
    assert allowed and all(r["exception_id"] == grant["id"] for r in allowed)
    assert all(r.get("exception_id") is None for r in decrypts if r["decision"] == "deny")
    approvals = [r for r in _audit(team, "exception.approve") if r["outcome"] == "ok"]
    assert any(
        r["principal"] == _principal(team.y) and r["resource"]["name"] == grant["id"]
        for r in approvals
    )
    refused = [r for r in _audit(team, "exception.approve") if r["outcome"] == "policy_denied"]
    assert any(r["principal"] == _principal(team.x) for r in refused)
    assert any(r["outcome"] == "ok" for r in _audit(team, "exception.revoke"))


def test_a_grant_expires_by_itself_and_the_expiry_is_audited(team: Team) -> None:
    asked = team.request(team.x, duration="2s")
    assert asked.status_code == 201, asked.text
    grant_id = asked.json()["id"]
    assert team.post(f"/v1/exceptions/{grant_id}/approve", team.y).status_code == 200
    assert _within(1.5, lambda: team.decrypt(team.x) == 200)

    def state() -> str:
        shown = httpx.get(
            f"{team.gw.addr}/v1/exceptions/{grant_id}", headers=team.as_(team.x), timeout=TIMEOUT
        )
        assert shown.status_code == 200, shown.text
        return str(shown.json()["state"])

    # Judged after the end: until a poll, a worker that has not seen the approval denies too.
    assert _within(4.0, lambda: state() == "expired")
    statuses = [team.decrypt(team.x) for _ in range(6)]
    assert statuses == [403] * 6, statuses
    assert _within(
        3.0,
        lambda: any(
            r["resource"]["name"] == grant_id
            and r["principal"] == "system"
            and r["outcome"] == "ok"
            and r["detail"]["state"] == "expired"
            for r in _audit(team, "exception.expire")
        ),
    )
    asked_record = [
        r for r in _audit(team, "exception.request") if r["resource"]["name"] == grant_id
    ]
    assert [r["detail"]["state"] for r in asked_record if r["outcome"] == "ok"] == ["pending"]
    assert (
        httpx.delete(
            f"{team.gw.addr}/v1/exceptions/{grant_id}", headers=team.as_(team.x), timeout=TIMEOUT
        ).status_code
        == 409
    )


@pytest.mark.parametrize(
    ("changes", "status", "problem"),
    [
        ({"duration": "2h"}, 400, "between 1s and 1h"),
        ({"duration": "0s"}, 400, "positive"),
        ({"duration": "soon"}, 400, "invalid duration"),
        ({"actions": ["token.create"]}, 400, "cannot be granted"),
        ({"actions": ["exception.approve"]}, 400, "cannot be granted"),
        ({"actions": ["launch"]}, 400, "1 asked for is no action of the gateway"),
        ({"actions": ["cert.issue"]}, 400, "cannot be granted"),  # a certificate outlasts it
        ({"actions": ["key.update"]}, 400, "cannot be granted"),  # labels the policy reads
        ({"actions": ["key.list"]}, 400, "no named resource"),  # the grant could never match
        ({"actions": ["decrypt", "audit.read"]}, 400, "no named resource"),
        ({"actions": []}, 422, ""),
        ({"resource": "a/b"}, 400, "resource"),
        ({"resource": "purpose:*"}, 400, "resource"),
        ({"resource": "**"}, 400, "names no key in particular"),  # the CA and audit keys too
        ({"resource": "*.*"}, 400, "names no key in particular"),
        ({"ticket": ""}, 422, ""),
        ({"reason": "   "}, 400, "ticket and a reason"),
        ({"ticket": "A\tB\nfake-id\tactive"}, 422, ""),  # would forge a row in a listing
        ({"reason": "approved \u202eby nobody"}, 422, ""),  # reads backwards from there
    ],
)
def test_a_bad_request_is_a_clear_4xx(
    team: Team, changes: dict[str, Any], status: int, problem: str
) -> None:
    reply = team.request(team.x, **changes)
    assert reply.status_code == status, reply.text
    assert problem in reply.json().get("detail", "") or status == 422


def test_a_refused_ask_is_in_the_audit_log(team: Team) -> None:
    reply = team.request(team.x, actions=["token.create", "no-such-action"], ticket="ESC-1")
    assert reply.status_code == 400, reply.text
    refused = [r for r in _audit(team, "exception.request") if r["outcome"] == "invalid_request"]
    record = next(r for r in refused if r["detail"]["ticket"] == "ESC-1")
    assert record["principal"] == _principal(team.x) and record["decision"] == "allow"
    assert record["detail"]["actions"] == ["token.create"]  # an unknown name is not kept
    assert "cannot be granted" in record["detail"]["error"]
    assert "no-such-action" not in record["detail"]["error"]


def test_an_unknown_action_is_never_echoed(team: Team) -> None:
    """A secret pasted where an action goes (an API token is 64 characters, as an action
    may be) stays out of the reply and the audit log."""
    pasted = "kmg.0123456789abcdef." + "s3cr3t" * 7
    reply = team.request(team.x, actions=["decrypt", pasted], ticket="ESC-2")
    assert reply.status_code == 400, reply.text
    assert "1 asked for is no action" in reply.json()["detail"]
    assert "s3cr3t" not in reply.text
    assert not any("s3cr3t" in json.dumps(r) for r in _audit(team, "exception.request"))


def test_one_principal_holds_a_bounded_number_of_open_grants(team: Team) -> None:
    """Asks nobody answers cannot bury an approver's list or fill the trail: past 16
    pending or active grants a principal's next ask is 409, until one ends."""
    asker = _token(team.gw, "dev")
    ids = []
    for i in range(16):
        reply = team.request(asker, ticket=f"FLOOD-{i}")
        assert reply.status_code == 201, reply.text
        ids.append(reply.json()["id"])
    refused = team.request(asker, ticket="FLOOD-16")
    assert refused.status_code == 409, refused.text
    assert "at most 16" in refused.json()["detail"]
    gone = httpx.delete(f"{team.gw.addr}/v1/exceptions/{ids[0]}", headers=team.as_(asker))
    assert gone.status_code == 200, gone.text
    assert team.request(asker, ticket="FLOOD-17").status_code == 201


def test_grant_times_are_written_as_every_reply_writes_them(team: Team) -> None:
    grant = team.request(team.x, actions=["verify"]).json()
    for field in ("requested_at", "pending_until"):
        assert grant[field].endswith("Z") and datetime.fromisoformat(grant[field]).tzinfo, grant


def test_who_may_see_and_end_a_grant(team: Team) -> None:
    grant_id = team.request(team.x, actions=["verify"], resource="purpose:model-sign").json()["id"]
    other = _token(team.gw, "dev")
    for path in (f"/v1/exceptions/{grant_id}", "/v1/exceptions"):
        reply = httpx.get(f"{team.gw.addr}{path}", headers=team.as_(other), timeout=TIMEOUT)
        assert reply.status_code == 403, path
    mine = httpx.get(
        f"{team.gw.addr}/v1/exceptions",
        params={"principal": _principal(team.x), "state": "pending"},
        headers=team.as_(team.x),
        timeout=TIMEOUT,
    )
    assert mine.status_code == 200 and grant_id in [g["id"] for g in mine.json()["exceptions"]]
    assert team.post(f"/v1/exceptions/{grant_id}/approve", other).status_code == 403
    for unknown in ("0123456789abcdef", "not-an-id"):
        assert team.post(f"/v1/exceptions/{unknown}/approve", team.y).status_code == 404
    ended = httpx.delete(
        f"{team.gw.addr}/v1/exceptions/{grant_id}", headers=team.as_(team.x), timeout=TIMEOUT
    )
    assert ended.status_code == 200 and ended.json()["revoked_by"] == _principal(team.x)


def test_an_id_no_exception_can_have_is_404_never_echoed_nor_audited(team: Team) -> None:
    """A token pasted where an exception id goes (or NUL bytes, or 20 KB) is refused before
    any decision: not in the reply, not in the hash-chained audit log, which keeps it for
    good."""
    secret = team.y.split(".")[2]
    audit = team.gw.data_dir / "audit.log"
    for wrong in (team.y, "%00%ff", "a" * 20_000, grant_id_like := "0123456789ABCDEF"):
        for method, path in (
            ("GET", f"/v1/exceptions/{wrong}"),
            ("POST", f"/v1/exceptions/{wrong}/approve"),
            ("DELETE", f"/v1/exceptions/{wrong}"),
        ):
            reply = httpx.request(
                method, f"{team.gw.addr}{path}", headers=team.as_(team.y), timeout=TIMEOUT
            )
            assert reply.status_code == 404, (method, wrong[:40], reply.text)
            assert "16 lowercase hexadecimal digits" in reply.json()["detail"]
            assert secret not in reply.text and grant_id_like not in reply.text
    team.post(f"/v1/keys/{KEY}/decrypt", team.x, {"ciphertext": team.ciphertext})  # audited
    logs = audit.read_text() + "".join(p.read_text() for p in audit.parent.glob("audit.*.log"))
    assert secret not in logs and "\\u0000" not in logs and grant_id_like not in logs


def test_the_cli_requests_approves_and_lists(team: Team) -> None:
    asked = run_cli(
        ("exception", "request", "--action", "decrypt", "--resource", KEY, "--duration", "10m",
         "--ticket", "CHG-1", "--reason", "quarterly audit"),
        team.gw.env(team.x),
    )  # fmt: skip
    assert asked.rc == 0 and "pending" in asked.err, str(asked)
    grant_id = asked.out.strip()
    approved = run_cli(("exception", "approve", grant_id), team.gw.env(team.y))
    assert approved.rc == 0 and json.loads(approved.out)["state"] == "active", str(approved)
    listed = run_cli(("exception", "list", "--mine", "--state", "active"), team.gw.env(team.x))
    assert listed.rc == 0 and grant_id in listed.out, str(listed)
    everything = run_cli(("exception", "list"), team.gw.env(team.x))
    assert_one_line_error(everything, "policy_denied")
    revoked = run_cli(("exception", "revoke", grant_id), team.gw.env(team.x))
    assert revoked.rc == 0 and json.loads(revoked.out)["state"] == "revoked", str(revoked)


# -- the state machine -------------------------------------------------------------------------

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
EIGHT_HOURS = timedelta(hours=8)


def _grant(**changes: Any) -> Grant:
    values: dict[str, Any] = {
        "known_actions": ACTIONS,
        "max_duration": EIGHT_HOURS,
        "pending_for": timedelta(hours=1),
        "now": NOW,
    }
    values.update(changes)
    return new_grant("alice", ["sign"], "release-*", timedelta(minutes=15), "T", "R", **values)


def test_two_approvals_need_two_principals_other_than_the_requester() -> None:
    grant = _grant()
    with pytest.raises(PolicyDenied):
        approve(grant, "alice", required=2, max_duration=EIGHT_HOURS, now=NOW)
    once = approve(grant, "bob", required=2, max_duration=EIGHT_HOURS, now=NOW)
    assert once.state(NOW) is GrantState.PENDING
    with pytest.raises(Conflict):
        approve(once, "bob", required=2, max_duration=EIGHT_HOURS, now=NOW)
    later = NOW + timedelta(minutes=5)
    twice = approve(once, "carol", required=2, max_duration=EIGHT_HOURS, now=later)
    assert twice.state(later) is GrantState.ACTIVE
    assert twice.expires_at == later + timedelta(minutes=15)
    assert twice.state(later + timedelta(minutes=15)) is GrantState.EXPIRED
    assert twice.policy_document()["approved_by"] == ["bob", "carol"]


def test_a_pending_request_expires_and_cannot_be_approved_then() -> None:
    grant = _grant()
    late = NOW + timedelta(hours=1)
    assert grant.state(late) is GrantState.EXPIRED
    with pytest.raises(Conflict, match="expired"):
        approve(grant, "bob", required=1, max_duration=EIGHT_HOURS, now=late)


def test_an_approval_holds_the_duration_to_the_limit_in_force_then() -> None:
    """A request made under a longer `exceptions.max_duration` than the gateway's now (the
    operator lowered it meanwhile; another replica) cannot be approved: it would outlast
    what a new request may ask for."""
    grant = _grant(max_duration=EIGHT_HOURS)
    with pytest.raises(Conflict, match=r"asks for 15m, longer than .* \(10m\) allows now"):
        approve(grant, "bob", required=1, max_duration=timedelta(minutes=10), now=NOW)
    once = approve(grant, "bob", required=2, max_duration=EIGHT_HOURS, now=NOW)
    with pytest.raises(Conflict, match="longer than"):
        approve(once, "carol", required=2, max_duration=timedelta(minutes=10), now=NOW)
    done = approve(grant, "bob", required=1, max_duration=timedelta(minutes=15), now=NOW)
    assert done.expires_at == NOW + timedelta(minutes=15)


def test_a_gateway_whose_limit_was_lowered_refuses_to_approve_a_longer_request(
    tmp_path: Path,
) -> None:
    ask = {"actions": ["sign"], "resource": "k", "duration": "8h", "ticket": "T", "reason": "r"}
    with open_gateway(tmp_path, exceptions={"max_duration": "8h"}) as (before, _):
        dev = before.service.tokens.create(["dev"], ttl=None)[1]
        approver = before.service.tokens.create(["approver"], ttl=None)[1]
        asked = before.call("POST", "/v1/exceptions", dev, json=ask)
        assert asked.status_code == 201, asked.text
    with open_gateway(tmp_path, exceptions={"max_duration": "1h"}) as (after, _):
        refused = after.call("POST", f"/v1/exceptions/{asked.json()['id']}/approve", approver)
        assert refused.status_code == 409, refused.text
        assert "longer than exceptions.max_duration (1h)" in refused.json()["detail"]
        still = after.call("GET", f"/v1/exceptions/{asked.json()['id']}", dev)
        assert still.json()["state"] == "pending" and still.json()["approvals"] == []


def test_durations_are_bounded() -> None:
    for duration in (timedelta(0), timedelta(hours=8, seconds=1)):
        with pytest.raises(InvalidRequest, match="between 1s and 8h"):
            new_grant(
                "alice", ["sign"], "k", duration, "T", "R",
                known_actions=ACTIONS, max_duration=timedelta(hours=8),
                pending_for=timedelta(hours=1), now=NOW,
            )  # fmt: skip


def test_explain_and_what_if_decide_without_doing_anything(team: Team) -> None:
    env = team.gw.env()  # admin: policy.evaluate
    denied = run_cli(("policy", "explain", "--as", "dev", "--action", "decrypt", "--key", KEY), env)
    assert denied.rc == 1 and denied.out.startswith(f"deny: decrypt on key {KEY}"), str(denied)
    assert "no rule allows it" in denied.out
    allowed = run_cli(
        ("policy", "explain", "--as", "approver", "--action", "exception.approve"), env
    )
    assert allowed.rc == 0 and "because: role approver" in allowed.out, str(allowed)

    # model signing wants a session that began within the hour: claims make the principal
    signer = httpx.post(
        f"{team.gw.addr}/v1/keys",
        json={"name": "release-sign", "type": "ecdsa-p256", "purpose": "model-sign"},
        headers=team.as_(team.gw.root_token),
        timeout=TIMEOUT,
    )
    assert signer.status_code == 201, signer.text
    ml_sec = ("policy", "explain", "--as", "ml-sec", "--action", "sign", "--key", "release-sign")
    fresh = f"session_start={datetime.now(UTC).isoformat()}"
    signs = run_cli((*ml_sec, "--env", "prod", "--claim", fresh), env)
    assert signs.rc == 0 and "because: role ml-sec" in signs.out, str(signs)
    assert run_cli((*ml_sec, "--env", "prod"), env).rc == 1  # no session: no rule allows
    assert run_cli((*ml_sec, "--claim", fresh), env).rc == 1  # not prod
    assert_one_line_error(run_cli((*ml_sec, "--claim", "session_start"), env), "name=value")
    assert_one_line_error(run_cli((*ml_sec, "--claim", "a=1", "--claim", "a=2"), env), "twice")

    grant = {"id": "00000000000000aa", "actions": ["decrypt"], "resource": "payroll-*"}
    what_if = team.post(
        "/v1/sys/policy/evaluate",
        team.gw.root_token,
        {
            "principal": {"id": "token:x", "roles": ["dev"]},
            "action": "decrypt",
            "resource": {"kind": "key", "name": KEY, "purpose": "envelope-data"},
            "exceptions": [grant],
        },
    )
    assert what_if.status_code == 200, what_if.text
    assert what_if.json() == {
        "allow": True,
        "reasons": ["exception 00000000000000aa"],
        "roles": ["dev"],
        "exceptions_used": ["00000000000000aa"],
    }

    # a real principal's grants: --with-grants reads them (exception.read) and names the one
    # the policy relied on; without it, explain decides on the roles alone
    asked = team.request(team.x, duration="10m")
    assert asked.status_code == 201, asked.text
    grant_id = asked.json()["id"]
    assert team.post(f"/v1/exceptions/{grant_id}/approve", team.y).status_code == 200
    as_x = ("policy", "explain", "--principal", _principal(team.x), "--as", "dev")
    as_x += ("--action", "decrypt", "--key", KEY)
    assert run_cli(as_x, env).rc == 1
    granted = run_cli((*as_x, "--with-grants"), env)
    assert granted.rc == 0 and f"exception: {grant_id}" in granted.out, str(granted)
    ended = httpx.delete(
        f"{team.gw.addr}/v1/exceptions/{grant_id}", headers=team.as_(team.y), timeout=TIMEOUT
    )
    assert ended.status_code == 200, ended.text
    assert run_cli((*as_x, "--with-grants"), env).rc == 1
