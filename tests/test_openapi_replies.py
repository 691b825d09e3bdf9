"""The OpenAPI document describes every reply: no success of any operation has a schema that
says nothing (empty, or any object: schemathesis checks nothing against either), and the
replies schemathesis rarely or never meets (a batch with failed items, a signature that does
not verify, a data key without its plaintext, a key with every optional member and through
each change, a grant in each state, a CA pending and active, certificate records, a CA's
trust bundle, tokens and the audit trail, a gateway that is not ready) match theirs, with the
headers they declare. tests/test_openapi_conformance.py checks the rest against a live
gateway."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema_rs
import pytest
from cryptography import x509
from fastapi import FastAPI

from kmsgate.api.routes_keys import HOT_OPERATIONS, POLICY_DIGEST_HEADER, PREFIX
from kmsgate.bootstrap import ensure_dev_audit_key
from tests.gateway import open_gateway
from tests.helpers import b64, create_key
from tests.pki.ceremony import OfflineRoot, leaf_csr, make_intermediate

JSON = "application/json"


def _refs(node: Any) -> set[str]:
    """Every `$ref` in `node`."""
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(_refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(value) for value in node))
    return set()


def _says_nothing(schema: dict[str, Any], components: dict[str, Any]) -> bool:
    """Whether `schema` leaves a reply unchecked: empty, or any object at all (FastAPI's
    reading of a `dict[str, Any]` return annotation, `{type: object, additionalProperties:
    true}`)."""
    while "$ref" in schema:
        schema = components[schema["$ref"].removeprefix("#/components/schemas/")]
    said = {k: v for k, v in schema.items() if k not in ("title", "description")}
    return (
        set(said) <= {"type", "additionalProperties"}
        and said.get("type", "object") == "object"
        and said.get("additionalProperties", True) in (True, {})
    )


def test_the_guard_knows_fastapis_open_object():
    """What FastAPI documents for a route that returns a `dict[str, Any]`."""
    app = FastAPI()

    @app.get("/open")
    def open_reply() -> dict[str, Any]:
        return {}

    schema = app.openapi()["paths"]["/open"]["get"]["responses"]["200"]["content"][JSON]
    assert _says_nothing(schema["schema"], {})
    assert not _says_nothing({"type": "object", "properties": {"a": {}}}, {})
    assert not _says_nothing({"type": "string"}, {})


def test_only_a_json_body_is_documented_as_refused_by_its_media_type(api):
    """415 is for a body that is not JSON: the OCSP responder takes its DER as it comes."""
    served = api.client.get("/openapi.json")
    assert served.content.endswith(b"}\n")  # as every JSON reply (docs/api.md)
    paths = served.json()["paths"]
    assert "415" not in paths["/v1/pki/cas/{ca}/ocsp"]["post"]["responses"]
    assert "415" in paths["/v1/keys/{name}/sign"]["post"]["responses"]


def test_every_success_has_a_schema_and_every_reference_resolves(api):
    spec = api.client.get("/openapi.json").json()
    components = spec["components"]["schemas"]
    unchecked = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for status, reply in operation["responses"].items():
                if not status.startswith("2") or status == "204":
                    continue
                for media_type, content in (reply.get("content") or {"no content": {}}).items():
                    if _says_nothing(content.get("schema", {}), components):
                        unchecked.append(f"{method.upper()} {path} {status} {media_type}")
    assert not unchecked, "\n".join(unchecked)
    missing = {
        ref for ref in _refs(spec) if ref.removeprefix("#/components/schemas/") not in components
    }
    assert not missing


class Replies:
    """Checks replies against the served document's schema of their operation."""

    def __init__(self, api: Any, token: str) -> None:
        self.api = api
        self.token = token
        self.spec = api.client.get("/openapi.json").json()

    def call(self, method: str, template: str, status: int = 200, **kwargs: Any) -> Any:
        """`method` on `template` (`{name}` and the like filled in from `kwargs`), asserting
        the status, that the JSON body matches the document's schema and that the reply
        carries the headers the document declares, as it declares them; the body."""
        names = {key: kwargs.pop(key) for key in list(kwargs) if "{" + key + "}" in template}
        token = kwargs.pop("token", self.token)
        r = self.api.call(method, template.format(**names), token, **kwargs)
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == JSON
        reply = self.spec["paths"][template][method.lower()]["responses"][str(status)]
        where = f"{method} {template} {status}"
        for header, declared in reply.get("headers", {}).items():
            value = r.headers.get(header)
            assert value is not None or not declared.get("required"), f"{where}: no {header}"
            if value is not None:
                self._validate(declared["schema"], value, f"{where} {header}")
        body = r.json()
        self._validate(reply["content"][JSON]["schema"], body, where)
        return body

    def _validate(self, schema: dict[str, Any], instance: Any, where: str) -> None:
        validator = jsonschema_rs.Draft202012Validator(
            {**schema, "components": self.spec["components"]}, validate_formats=True
        )
        errors = [f"{e.instance_path}: {e.message}" for e in validator.iter_errors(instance)]
        assert not errors, f"{where}: {instance}\n" + "\n".join(errors)


@pytest.fixture
def replies(api, admin):
    return Replies(api, admin)


def test_key_operation_replies_single_and_batched(api, admin, replies):
    for name, key_type in (("sig", "ecdsa-p256"), ("enc", "aes-256-gcm"), ("mac", "hmac-sha256")):
        create_key(api, admin, name, key_type)
    data, other = b64(b"data"), b64(b"other")
    op = "/v1/keys/{name}/"
    signed = replies.call("POST", op + "sign", name="sig", json={"input": data})
    sign_batch = {"batch": [{"input": data}, {"input": data, "version": 9}]}
    assert [
        set(i) for i in replies.call("POST", op + "sign", name="sig", json=sign_batch)["batch"]
    ] == [{"signature", "key_version", "algorithm"}, {"error"}]
    signature = signed["signature"]
    verify = {"input": data, "signature": signature}
    assert replies.call("POST", op + "verify", name="sig", json=verify)["valid"] is True
    wrong = {"input": other, "signature": signature}
    assert replies.call("POST", op + "verify", name="sig", json=wrong) == {
        "valid": False,
        "key_version": None,
    }
    batch = {"batch": [verify, wrong, {**verify, "version": 5}]}
    verified = replies.call("POST", op + "verify", name="sig", json=batch)["batch"]
    assert [item.get("valid") for item in verified] == [True, False, None]

    mac = replies.call("POST", op + "mac", name="mac", json={"input": data})["mac"]
    replies.call("POST", op + "mac", name="mac", json={"batch": [{"input": data}]})
    checks = [{"input": data, "mac": mac}, {"input": other, "mac": mac}]
    for check in checks:
        replies.call("POST", op + "mac/verify", name="mac", json=check)
    checks.append({"input": data, "mac": mac, "version": 3})
    replies.call("POST", op + "mac/verify", name="mac", json={"batch": checks})

    sealed = replies.call("POST", op + "encrypt", name="enc", json={"plaintext": data})
    ciphertext = sealed["ciphertext"]
    replies.call("POST", op + "encrypt", name="enc", json={"batch": [{"plaintext": ""}]})
    opened = replies.call("POST", op + "decrypt", name="enc", json={"ciphertext": ciphertext})
    assert opened["plaintext"] == data
    damaged = {"ciphertext": ciphertext, "context": {"wrong": "context"}}
    batch = {"batch": [{"ciphertext": ciphertext}, damaged]}
    assert "error" in replies.call("POST", op + "decrypt", name="enc", json=batch)["batch"][1]
    assert "plaintext" in replies.call("POST", op + "datakey", name="enc", json={})
    wrapped_only = {"include_plaintext": False, "bits": 128}
    assert "plaintext" not in replies.call("POST", op + "datakey", name="enc", json=wrapped_only)
    replies.call("POST", op + "datakey", name="enc", json={"batch": [{}, wrapped_only]})
    replies.call("POST", op + "rewrap", name="enc", json={"ciphertext": ciphertext})
    replies.call(
        "POST", op + "rewrap", name="enc", json={"batch": [{"ciphertext": ciphertext}, damaged]}
    )


def test_a_key_with_every_optional_member_and_the_jwks_of_each_key_type(
    api, admin, replies, monkeypatch
):
    create_key(api, admin, "aged", "ed25519", rotation_period="30d", public=True)
    assert "next_rotation" in replies.call("GET", "/v1/keys/{name}", name="aged")
    rotated = api.call("POST", "/v1/keys/aged/rotate", admin)
    assert rotated.status_code == 200, rotated.text
    since = {"since": (datetime.now(UTC) - timedelta(hours=1)).isoformat()}
    marked = api.call("POST", "/v1/keys/aged/versions/1/compromised", admin, json=since)
    assert marked.status_code == 200, marked.text
    assert (
        api.call("POST", "/v1/keys/aged/sign", admin, json={"input": b64(b"x")}).status_code == 200
    )
    key = replies.call("GET", "/v1/keys/{name}", name="aged")
    assert [v["state"] for v in key["versions"]] == ["compromised", "enabled"]
    assert key["versions"][1]["uses"] == 1 and key["versions"][0]["last_used"] is None
    for key_type in ("ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-3072"):
        create_key(api, admin, key_type, key_type, public=True)
        jwks = replies.call("GET", "/v1/keys/{name}/jwks.json", name=key_type, token=None)
        assert len(jwks["keys"]) == 1
    assert len(replies.call("GET", "/v1/keys/{name}/jwks.json", name="aged")["keys"]) == 1
    deleted = api.call("POST", "/v1/keys/aged/schedule-deletion", admin, json={"pending_days": 7})
    assert deleted.status_code == 200, deleted.text
    monkeypatch.setattr(api.service.keys, "usage", lambda _name: None)  # the store is down
    key = replies.call("GET", "/v1/keys/{name}", name="aged")
    assert (key["state"], "deletion_date" in key, "next_rotation" in key) == (
        "pending_deletion",
        True,
        False,
    )
    assert {v["uses"] for v in key["versions"]} == {None}


def test_a_key_operation_reply_carries_the_documented_policy_digest(api, replies):
    """What signers stamp into their provenance: declared on every key operation's reply,
    and sent (`Replies.call` checks every declared header)."""
    for op in HOT_OPERATIONS:
        reply = replies.spec["paths"][PREFIX + op.path]["post"]["responses"]["200"]
        assert reply["headers"][POLICY_DIGEST_HEADER]["required"] is True, op.path
    create_key(api, replies.token, "sig", "ecdsa-p256")
    r = api.call("POST", "/v1/keys/sig/sign", replies.token, json={"input": b64(b"x")})
    assert r.headers[POLICY_DIGEST_HEADER] == api.service.policy.digest
    replies.call("POST", "/v1/keys/{name}/sign", name="sig", json={"input": b64(b"x")})


def test_key_lifecycle_replies_and_the_list(api, admin, replies):
    """Each change replies the key object: without the versions' use, which only
    `GET /v1/keys/{name}` adds."""
    body = {
        "name": "life",
        "type": "ecdsa-p256",
        "purpose": "general",
        "labels": {"team": "ml"},
        "rotation_period": "30d",
        "public": True,
    }
    key = replies.call("POST", "/v1/keys", 201, json=body)
    assert (key["rotation_period"], "next_rotation" in key) == ("2592000s", True)
    assert "uses" not in key["versions"][0]
    public_pem = api.call("GET", "/v1/keys/life/public-key", admin).text
    imported = {"name": "imported", "purpose": "general", "public_key": public_pem}
    assert replies.call("POST", "/v1/keys", 201, json=imported)["verify_only"] is True
    path = "/v1/keys/{name}"
    rotated = replies.call("POST", path + "/rotate", name="life")
    assert [v["state"] for v in rotated["versions"]] == ["enabled", "enabled"]
    patched = replies.call(
        "PATCH", path, name="life", json={"min_decrypt_version": 2, "rotation_period": None}
    )
    assert (patched["versions"][0]["state"], "rotation_period" in patched) == ("retired", False)
    since = {"since": (datetime.now(UTC) - timedelta(hours=1)).isoformat()}
    marked = replies.call(
        "POST", path + "/versions/{version}/compromised", name="life", version=1, json=since
    )
    assert "compromised_since" in marked["versions"][0]
    assert replies.call("POST", path + "/disable", name="life")["state"] == "disabled"
    assert replies.call("POST", path + "/enable", name="life")["state"] == "enabled"
    deleting = replies.call(
        "POST", path + "/schedule-deletion", name="life", json={"pending_days": 7}
    )
    assert (deleting["state"], "deletion_date" in deleting) == ("pending_deletion", True)
    assert replies.call("POST", path + "/cancel-deletion", name="life")["state"] == "disabled"
    listed = replies.call("GET", "/v1/keys")["keys"]
    assert sorted(k["name"] for k in listed) == ["imported", "life"]
    assert replies.call("GET", "/v1/keys", params={"label": "team:ml"})["keys"][0]["name"] == "life"


def test_issuance_and_the_trust_bundle(api, admin, replies):
    """(A renewal, over mTLS only, replies as issuance does: `routes_pki._issued_body`.)"""
    make_intermediate(api, admin, OfflineRoot())
    _, csr = leaf_csr(x509.DNSName("web.lab"))
    issued = replies.call(
        "POST", "/v1/pki/cas/{ca}/issue", ca="issuing", json={"csr": csr, "profile": "server"}
    )
    assert issued["chain"].count("BEGIN CERTIFICATE") == 2
    bundle = replies.call("GET", "/v1/pki/cas/{ca}/bundle", ca="issuing", token=None)
    assert [k["crv"] for k in bundle["keys"]] == ["P-256", "P-384"]


def test_cas_profiles_and_the_inventory(replies):
    """A CA pending (with its CSR) and active, the profiles, and certificate records: valid,
    revoked, a full page with `next`, and one with its certificate."""
    root = OfflineRoot()
    body = {"name": "issuing", "subject": "CN=issuing CA,O=kmsgate tests", "key": {}}
    pending = replies.call("POST", "/v1/pki/cas", 201, json=body)
    assert (pending["state"], pending["not_after"]) == ("pending", None)
    signed = {"certificate": root.sign_intermediate(pending["csr"]), "chain": root.pem}
    active = replies.call("POST", "/v1/pki/cas/{ca}/certificate", ca="issuing", json=signed)
    assert active["state"] == "active" and active["parent"]
    replies.call("POST", "/v1/pki/cas", 201, json={**body, "name": "other"})
    states = [ca["state"] for ca in replies.call("GET", "/v1/pki/cas")["cas"]]
    assert states == ["active", "pending"]
    assert replies.call("GET", "/v1/pki/profiles")["profiles"]
    serials = []
    for host in ("a.lab", "b.lab"):
        issue = {"csr": leaf_csr(x509.DNSName(host))[1], "profile": "server"}
        issued = replies.call("POST", "/v1/pki/cas/{ca}/issue", ca="issuing", json=issue)
        serials.append(issued["serial"])
    page = replies.call("GET", "/v1/pki/certs", params={"limit": 1})
    assert len(page["certs"]) == 1 and "next" in page
    assert "next" not in replies.call("GET", "/v1/pki/certs")
    path = "/v1/pki/certs/{serial}"
    record = replies.call("GET", path, serial=serials[0])
    assert record["certificate"].startswith("-----BEGIN CERTIFICATE-----")
    assert (record["status"], record["revoked_at"], record["reason"]) == ("valid", None, None)
    revoked = replies.call(
        "POST", path + "/revoke", serial=serials[0], json={"reason": "superseded"}
    )
    assert (revoked["status"], revoked["reason"]) == ("revoked", "superseded")
    assert replies.call("GET", path, serial=serials[0])["revoked_at"] == revoked["revoked_at"]
    listed = replies.call("GET", "/v1/pki/certs", params={"status": "revoked"})["certs"]
    assert [r["serial"] for r in listed] == [serials[0]]


def test_system_replies(api, admin, replies, monkeypatch):
    replies.call("GET", "/v1/sys/health", token=None)
    replies.call("GET", "/v1/sys/ready", token=None)
    replies.call("GET", "/v1/sys/whoami")
    replies.call("GET", "/v1/sys/policy")
    query = {"principal": {"id": "x", "roles": ["admin"]}, "action": "sign"}
    assert replies.call("POST", "/v1/sys/policy/evaluate", json=query)["allow"] is True
    monkeypatch.setattr(api.service.store, "ping", lambda: "the database is unreachable")
    degraded = replies.call("GET", "/v1/sys/ready", token=None)
    assert (degraded["status"], degraded["store"]["ok"]) == ("degraded", False)
    monkeypatch.setattr(api.service.gate.freshness, "stale", lambda: True)
    down = replies.call("GET", "/v1/sys/ready", 503, token=None)
    assert (down["code"], down["store"]["ok"]) == ("not_ready", False)


def test_tokens_a_policy_reload_and_the_audit_trail(tmp_path):
    """Token creation (with and without expiry), list and revocation, a reload, and the
    audit records they leave, with those of a key operation, of a refused credential and of
    a signed checkpoint (every record is checkpointed here), whose copy the store keeps."""
    with open_gateway(tmp_path, audit_checkpoint_records=1) as (api, admin):
        replies = Replies(api, admin)
        assert ensure_dev_audit_key(api.service)
        ask = {"roles": ["dev"], "ttl": "1h", "description": "ci"}
        created = replies.call("POST", "/v1/sys/tokens", 201, json=ask)
        assert created["token"].startswith("kmg." + created["id"] + ".")
        lasting = replies.call("POST", "/v1/sys/tokens", 201, json={"roles": ["dev"]})
        assert lasting["expires_at"] is None
        listed = replies.call("GET", "/v1/sys/tokens")["tokens"]
        assert created["id"] in {t["id"] for t in listed}
        revoked = replies.call("DELETE", "/v1/sys/tokens/{token_id}", token_id=created["id"])
        assert revoked["revoked_at"] is not None
        assert replies.call("POST", "/v1/sys/policy/reload")["digest"] == api.service.policy.digest
        assert api.call("GET", "/v1/sys/whoami", created["token"]).status_code == 401
        create_key(api, admin, "sig", "ecdsa-p256")
        signed = api.call("POST", "/v1/keys/sig/sign", admin, json={"input": b64(b"x")})
        assert signed.status_code == 200, signed.text
        assert api.call("GET", "/v1/pki/certs", admin).status_code == 200  # resource name null
        deadline = time.monotonic() + 10
        while not replies.call("GET", "/v1/audit/checkpoints")["checkpoints"]:
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.05)
        events = replies.call("GET", "/v1/audit", params={"limit": 10000})["events"]
        actions = {event["action"] for event in events}
        assert {"token.create", "token.revoke", "policy.reload", "authn", "sign"} <= actions
        assert {"kind": "cert", "name": None} in [event.get("resource") for event in events]
        assert "audit.checkpoint" in actions
        assert any("inputs" in event for event in events)


def test_grant_replies_pending_active_revoked_and_listed(api, make_token, replies):
    requester, approver = make_token("dev"), make_token("approver")
    ask = {
        "actions": ["decrypt"],
        "resource": "enc",
        "duration": "1h",
        "ticket": "T-1",
        "reason": "r",
    }
    grant = replies.call("POST", "/v1/exceptions", 201, json=ask, token=requester)
    assert grant["state"] == "pending"
    path = "/v1/exceptions/{grant_id}"
    replies.call("GET", path, grant_id=grant["id"])
    approved = replies.call("POST", path + "/approve", grant_id=grant["id"], token=approver)
    assert approved["state"] == "active" and approved["approvals"]
    assert replies.call("DELETE", path, grant_id=grant["id"])["state"] == "revoked"
    replies.call("POST", "/v1/exceptions", 201, json=ask, token=requester)
    listed = replies.call("GET", "/v1/exceptions")["exceptions"]
    assert [g["state"] for g in listed] == ["revoked", "pending"]
