"""Key lifecycle through the real REST app (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from kmsgate.auth import Credentials
from kmsgate.bootstrap import (
    build_service,
    ensure_dev_audit_key,
    ensure_root_token,
    prepare_dev_data_dir,
)
from kmsgate.config import DEV_AUDIT_KEY, load_settings
from kmsgate.errors import ConfigError, Unauthenticated
from kmsgate.ratelimit import TokenBucket
from kmsgate.service import Ctx
from kmsgate.store import tables
from tests.gateway import open_gateway
from tests.helpers import UTC_TIME, b64, create_key


def test_create_get_list_with_filters(api, admin):
    body = {
        "name": "a",
        "type": "ecdsa-p256",
        "purpose": "model-sign",
        "labels": {"env": "prod", "team": "ml"},
    }
    r = api.call("POST", "/v1/keys", admin, json=body)
    assert r.status_code == 201, r.text
    key = r.json()
    assert key["state"] == "enabled"
    assert key["primary_version"] == 1
    assert [v["version"] for v in key["versions"]] == [1]
    assert "material" not in r.text and "private" not in r.text.lower()
    create_key(api, admin, "b", labels={"env": "dev"})
    assert api.call("GET", "/v1/keys/a", admin).json()["labels"] == {"env": "prod", "team": "ml"}
    names = lambda r: [k["name"] for k in r.json()["keys"]]  # noqa: E731
    assert names(api.call("GET", "/v1/keys", admin)) == ["a", "b"]
    assert names(api.call("GET", "/v1/keys?purpose=model-sign", admin)) == ["a"]
    assert names(api.call("GET", "/v1/keys?label=env:dev", admin)) == ["b"]
    assert names(api.call("GET", "/v1/keys?label=env:prod&label=team:x", admin)) == []


def test_times_in_replies_are_utc_with_z_and_fixed_width(api, admin):
    create_key(api, admin, "t")
    api.call("POST", "/v1/keys/t/rotate", admin)
    api.call("POST", "/v1/keys/t/sign", admin, json={"input": b64(b"x")})
    api.call("POST", "/v1/keys/t/schedule-deletion", admin, json={"pending_days": 7})
    key = api.call("GET", "/v1/keys/t", admin).json()
    times = [key["created_at"], key["deletion_date"]]
    times += [v["created_at"] for v in key["versions"]]
    times += [v["last_used"] for v in key["versions"] if v.get("last_used")]
    r = api.call("POST", "/v1/sys/tokens", admin, json={"roles": ["reader"], "ttl": "1h"})
    assert r.status_code == 201, r.text
    for token in api.call("GET", "/v1/sys/tokens", admin).json()["tokens"]:
        times += [token["created_at"], *([token["expires_at"]] if token["expires_at"] else [])]
    times.append(api.call("GET", "/v1/sys/policy", admin).json()["loaded_at"])
    assert len(times) >= 7
    assert [t for t in times if not UTC_TIME.fullmatch(t)] == []


def test_duplicate_name_is_409_and_nothing_changes(api, admin):
    create_key(api, admin, "dup")
    body = {"name": "dup", "type": "ed25519", "purpose": "general"}
    r = api.call("POST", "/v1/keys", admin, json=body)
    assert r.status_code == 409
    assert r.json()["code"] == "conflict"
    assert api.call("GET", "/v1/keys/dup", admin).json()["type"] == "ecdsa-p256"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"name": "x", "type": "dsa-1024", "purpose": "p"}, 400, "invalid_request"),
        ({"name": "x", "purpose": "p"}, 422, "validation_failed"),
        ({"name": "bad name!", "type": "ed25519", "purpose": "p"}, 422, "validation_failed"),
        (
            {"name": "x", "type": "ed25519", "purpose": "p", "backend": "nope"},
            400,
            "invalid_request",
        ),
        ({"name": "x", "type": "ed25519", "purpose": "p", "extra": 1}, 422, "validation_failed"),
    ],
)
def test_bad_create_requests(api, admin, body, status, code):
    r = api.call("POST", "/v1/keys", admin, json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == code
    assert api.call("GET", "/v1/keys", admin).json()["keys"] == []


def test_rotate_keeps_old_signatures_valid(api, admin):
    create_key(api, admin, "k1")
    old = api.call("POST", "/v1/keys/k1/sign", admin, json={"input": b64(b"m")}).json()
    rotated = api.call("POST", "/v1/keys/k1/rotate", admin).json()
    assert rotated["primary_version"] == 2
    new = api.call("POST", "/v1/keys/k1/sign", admin, json={"input": b64(b"m")}).json()
    assert (old["key_version"], new["key_version"]) == (1, 2)
    for sig, version in ((old, 1), (new, 2)):
        r = api.call(
            "POST",
            "/v1/keys/k1/verify",
            admin,
            json={"input": b64(b"m"), "signature": sig["signature"]},
        )
        assert r.json() == {"valid": True, "key_version": version}
    pem1 = api.call("GET", "/v1/keys/k1/public-key?version=1", admin)
    pem2 = api.call("GET", "/v1/keys/k1/public-key", admin)
    assert pem1.headers["content-type"].startswith("application/x-pem-file")
    assert pem1.text != pem2.text
    assert isinstance(load_pem_public_key(pem2.text.encode()), ec.EllipticCurvePublicKey)


def test_min_decrypt_version_retires_old_versions(api, admin):
    create_key(api, admin, "k1")
    sig1 = api.call("POST", "/v1/keys/k1/sign", admin, json={"input": b64(b"m")}).json()
    api.call("POST", "/v1/keys/k1/rotate", admin)
    r = api.call("PATCH", "/v1/keys/k1", admin, json={"min_decrypt_version": 2})
    assert r.json()["versions"][0]["state"] == "retired"
    r = api.call(
        "POST",
        "/v1/keys/k1/verify",
        admin,
        json={"input": b64(b"m"), "signature": sig1["signature"]},
    )
    assert r.json()["valid"] is False
    r = api.call("PATCH", "/v1/keys/k1", admin, json={"min_decrypt_version": 3})
    assert r.status_code == 400
    updates = api.service.audit.search(action="key.update").records
    records = [r for r in updates if r["outcome"] != "started"]
    # the trail says what each change asked for: the retirement, and the refused one too
    assert [(r["outcome"], r["detail"]["changes"]) for r in records] == [
        ("ok", {"min_decrypt_version": 2}),
        ("invalid_request", {"min_decrypt_version": 3}),
    ]


def test_disable_enable(api, admin):
    create_key(api, admin, "k1")
    assert api.call("POST", "/v1/keys/k1/disable", admin).json()["state"] == "disabled"
    for op, body in (
        ("sign", {"input": b64(b"m")}),
        ("verify", {"input": b64(b"m"), "signature": b64(b"x")}),
    ):
        r = api.call("POST", f"/v1/keys/k1/{op}", admin, json=body)
        assert r.status_code == 409
        assert r.json()["code"] == "key_disabled"
    assert api.call("POST", "/v1/keys/k1/rotate", admin).json()["code"] == "key_disabled"
    assert api.call("POST", "/v1/keys/k1/enable", admin).json()["state"] == "enabled"
    assert api.call("POST", "/v1/keys/k1/sign", admin, json={"input": b64(b"m")}).status_code == 200


def test_compromised_version_stops_signing_and_strict_verify(api, admin):
    create_key(api, admin, "k1")
    sig = api.call("POST", "/v1/keys/k1/sign", admin, json={"input": b64(b"m")}).json()
    since = datetime.now(UTC)  # just after the key was made and signed
    r = api.call(
        "POST", "/v1/keys/k1/versions/1/compromised", admin, json={"since": since.isoformat()}
    )
    assert r.json()["versions"][0]["state"] == "compromised"
    r = api.call("POST", "/v1/keys/k1/sign", admin, json={"input": b64(b"m")})
    assert (r.status_code, r.json()["code"]) == (409, "key_version_unusable")
    verify = {"input": b64(b"m"), "signature": sig["signature"]}
    assert api.call("POST", "/v1/keys/k1/verify", admin, json=verify).json()["valid"] is True
    strict = api.call("POST", "/v1/keys/k1/verify", admin, json={**verify, "strict": True})
    assert strict.json()["valid"] is False
    # (a signed_at before the version existed would not verify at all: within the skew)
    before = (since - timedelta(seconds=30)).isoformat()
    after = (since + timedelta(seconds=30)).isoformat()
    ok = api.call("POST", "/v1/keys/k1/verify", admin, json={**verify, "signed_at": before})
    late = api.call("POST", "/v1/keys/k1/verify", admin, json={**verify, "signed_at": after})
    assert (ok.json()["valid"], late.json()["valid"]) == (True, False)
    r = api.call(
        "POST", "/v1/keys/k1/versions/1/compromised", admin, json={"since": "2026-01-01T00:00:00"}
    )
    assert r.status_code == 422


def test_a_compromised_version_below_the_minimum_is_retired_all_the_same(api, admin):
    """Marking a retired version compromised (or a compromised one retired) must not make
    it usable again: not to verify when named, not to decrypt or rewrap."""
    create_key(api, admin, "s1")
    signed = api.call("POST", "/v1/keys/s1/sign", admin, json={"input": b64(b"m")}).json()
    create_key(api, admin, "e1", "aes-256-gcm", purpose="envelope-data")
    sealed = api.call("POST", "/v1/keys/e1/encrypt", admin, json={"plaintext": b64(b"p")}).json()
    since = {"since": (datetime.now(UTC) - timedelta(minutes=5)).isoformat()}
    for name in ("s1", "e1"):
        api.call("POST", f"/v1/keys/{name}/rotate", admin)
        api.call("POST", f"/v1/keys/{name}/versions/1/compromised", admin, json=since)
        assert api.call(
            "PATCH", f"/v1/keys/{name}", admin, json={"min_decrypt_version": 2}
        ).is_success
    verify = {"input": b64(b"m"), "signature": signed["signature"], "version": 1}
    named = api.call("POST", "/v1/keys/s1/verify", admin, json=verify)
    assert (named.status_code, named.json()["code"]) == (409, "key_version_unusable"), named.text
    assert "is retired" in named.json()["detail"]
    for op in ("decrypt", "rewrap"):
        body = {"ciphertext": sealed["ciphertext"]}
        reply = api.call("POST", f"/v1/keys/e1/{op}", admin, json=body)
        assert (reply.status_code, reply.json()["code"]) == (409, "key_version_unusable"), op


def test_a_destroyed_keys_sealed_material_is_not_left_in_the_database_files(api, admin):
    """Destruction sets a version's material to null; SQLite would keep the old bytes in the
    page's free space, where whoever later holds the file and the root key (a backup, a
    stolen disk) could unseal the destroyed key. secure_delete overwrites them; the store
    turns it on whatever the SQLite build's default. The old page also stays in the
    write-ahead log until a checkpoint, which an idle gateway may not make for long: the
    destruction empties the log itself."""
    create_key(api, admin, "shred")
    with api.service.catalogue._store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA secure_delete").scalar() == 1
        (sealed,) = conn.execute(sa.select(tables.key_versions.c.material)).scalars().all()
    assert sealed and len(sealed) > 32
    api.call("POST", "/v1/keys/shred/schedule-deletion", admin, json={"pending_days": 7})
    later = datetime.now(UTC) + timedelta(days=8)
    assert api.service.keys.destroy_due(Ctx("t"), later) == ["shred"]
    engine = api.service.catalogue._store.engine
    database = Path(str(engine.url.database))
    for path in (database, database.with_name(database.name + "-wal")):
        if path.exists():
            assert sealed not in path.read_bytes(), path


def test_deletion_schedule_cancel_and_destroy(api, admin):
    create_key(api, admin, "k1")
    r = api.call("POST", "/v1/keys/k1/schedule-deletion", admin, json={"pending_days": 3})
    assert r.status_code == 422
    r = api.call("POST", "/v1/keys/k1/schedule-deletion", admin, json={"pending_days": 7})
    key = r.json()
    assert key["state"] == "pending_deletion"
    assert datetime.fromisoformat(key["deletion_date"]) > datetime.now(UTC) + timedelta(days=6)
    again = api.call("POST", "/v1/keys/k1/schedule-deletion", admin, json={"pending_days": 30})
    assert again.status_code == 409
    ended = [
        r
        for r in api.service.audit.search(action="key.delete").records
        if r["outcome"] != "started"
    ]
    # a refused schedule records no date: only the one that holds is in the trail
    assert [r["detail"].get("deletion_date") for r in ended] == [key["deletion_date"], None]
    r = api.call("POST", "/v1/keys/k1/sign", admin, json={"input": b64(b"m")})
    assert r.json()["code"] == "key_pending_deletion"
    assert api.call("POST", "/v1/keys/k1/enable", admin).status_code == 409
    assert api.call("POST", "/v1/keys/k1/cancel-deletion", admin).json()["state"] == "disabled"
    api.call("POST", "/v1/keys/k1/schedule-deletion", admin, json={"pending_days": 7})
    service = api.service
    assert service.keys.destroy_due(Ctx("t")) == []
    assert service.keys.destroy_due(Ctx("t"), datetime.now(UTC) + timedelta(days=8)) == ["k1"]
    key = api.call("GET", "/v1/keys/k1", admin).json()
    assert key["state"] == "destroyed"
    assert [v["state"] for v in key["versions"]] == ["destroyed"]
    with service.catalogue._store.engine.connect() as conn:
        materials = conn.execute(tables.key_versions.select()).mappings().all()
    assert [m["material"] for m in materials] == [None]
    assert (
        api.call("POST", "/v1/keys/k1/sign", admin, json={"input": b64(b"m")}).json()["code"]
        == "key_destroyed"
    )


def test_import_public_key_is_verify_only(api, admin):
    private = ec.generate_private_key(ec.SECP384R1())
    from cryptography.hazmat.primitives import hashes, serialization

    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    r = api.call("POST", "/v1/keys", admin, json={"name": "imp", "purpose": "p", "public_key": pem})
    assert r.status_code == 201, r.text
    assert (r.json()["type"], r.json()["verify_only"]) == ("ecdsa-p384", True)
    sig = private.sign(b"data", ec.ECDSA(hashes.SHA384()))
    r = api.call(
        "POST", "/v1/keys/imp/verify", admin, json={"input": b64(b"data"), "signature": b64(sig)}
    )
    assert r.json() == {"valid": True, "key_version": 1}
    r = api.call("POST", "/v1/keys/imp/sign", admin, json={"input": b64(b"data")})
    assert r.status_code == 409
    # it never rotates: a rotation period is refused, not kept and shown for nothing
    rotating = {"name": "i5", "purpose": "p", "public_key": pem, "rotation_period": "30d"}
    refused = api.call("POST", "/v1/keys", admin, json=rotating)
    assert refused.status_code == 400 and "never rotates" in refused.text, refused.text
    refused = api.call("PATCH", "/v1/keys/imp", admin, json={"rotation_period": "30d"})
    assert refused.status_code == 400 and "never rotates" in refused.text, refused.text
    assert "rotation_period" not in api.call("GET", "/v1/keys/imp", admin).json()
    bad = api.call(
        "POST", "/v1/keys", admin, json={"name": "i2", "purpose": "p", "public_key": "junk"}
    )
    assert bad.status_code == 400
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    second = other.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    two = {"name": "i4", "purpose": "p", "public_key": pem + second}  # the first would be used
    doubled = api.call("POST", "/v1/keys", admin, json=two)
    assert doubled.status_code == 400 and "more than one PEM block" in doubled.text
    wrong = api.call(
        "POST",
        "/v1/keys",
        admin,
        json={"name": "i3", "purpose": "p", "public_key": pem, "type": "ecdsa-p256"},
    )
    assert wrong.status_code == 400
    # a public key whose private key is anyone's cannot vouch for the gateway: checkpoints
    # it signed would verify as the audit log's, certificates as a CA's
    for purpose, why in (
        ("audit", "cannot be an imported public key"),
        ("ca", "are the PKI's"),
        ("ocsp", "are the PKI's"),
    ):
        body = {"name": f"forger-{purpose}", "purpose": purpose, "public_key": pem}
        refused = api.call("POST", "/v1/keys", admin, json=body)
        assert refused.status_code == 400, refused.text
        assert why in refused.json()["detail"]
        assert api.call("GET", f"/v1/keys/forger-{purpose}", admin).status_code == 404


def test_the_pkis_key_names_and_purposes_are_its_own(api, admin):
    """`ocsp.<ca>` made through POST /v1/keys was taken for the CA's OCSP responder key
    (certified as its signer, or, of another kind, breaking its OCSP for good), `ca.<ca>`
    kept the CA from being made: such names and the purposes ca and ocsp are refused, and
    the PKI still makes its own keys under them."""
    for body in (
        {"name": "ocsp.dev", "type": "ed25519", "purpose": "sig"},
        {"name": "ocsp.next", "type": "ecdsa-p256", "purpose": "ocsp"},
        {"name": "ca.next", "type": "ecdsa-p256", "purpose": "general"},
        {"name": "helper", "type": "ecdsa-p256", "purpose": "ca"},
        {"name": "helper", "type": "ecdsa-p256", "purpose": "ocsp"},
    ):
        refused = api.call("POST", "/v1/keys", admin, json=body)
        assert refused.status_code == 400 and "are the PKI's" in refused.text, refused.text
        assert api.call("GET", f"/v1/keys/{body['name']}", admin).status_code == 404
    made = api.call("POST", "/v1/pki/cas", admin, json={"name": "next", "subject": "CN=Next"})
    assert made.status_code == 201, made.text
    key = api.call("GET", "/v1/keys/ca.next", admin).json()
    assert (key["purpose"], key["labels"]) == ("ca", {"ca": "next"})


def test_jwks_is_served_without_a_token_only_for_public_keys(api, admin):
    create_key(api, admin, "j", "ed25519", purpose="model-sign")  # public by default
    api.call("POST", "/v1/keys/j/rotate", admin)
    r = api.call("GET", "/v1/keys/j/jwks.json", None)
    assert r.status_code == 200
    assert [k["kid"] for k in r.json()["keys"]] == ["j:v2", "j:v1"]
    assert all(k["kty"] == "OKP" and k["crv"] == "Ed25519" for k in r.json()["keys"])
    assert api.call("GET", "/v1/keys/j", admin).json()["public"] is True

    create_key(api, admin, "h", "hmac-sha256")
    create_key(api, admin, "private", "ecdsa-p256")  # purpose general: not public
    absent = api.call("GET", "/v1/keys/none/jwks.json", None)
    for name in ("h", "private"):  # a prober cannot tell them from a missing key
        reply = api.call("GET", f"/v1/keys/{name}/jwks.json", None)
        assert reply.status_code == 404 == absent.status_code
        assert reply.json()["detail"] == absent.json()["detail"].replace("none", name)

    made = api.call("PATCH", "/v1/keys/private", admin, json={"public": True})
    assert made.status_code == 200 and made.json()["public"] is True, made.text
    assert api.call("GET", "/v1/keys/private/jwks.json", None).status_code == 200
    api.call("PATCH", "/v1/keys/j", admin, json={"public": False})
    assert api.call("GET", "/v1/keys/j/jwks.json", None).status_code == 404
    body = {"name": "p2", "type": "ed25519", "purpose": "general", "public": True}
    assert api.call("POST", "/v1/keys", admin, json=body).json()["public"] is True
    created = [
        r for r in api.service.audit.search(action="key.create").records if r["outcome"] == "ok"
    ]
    assert created[-1]["resource"]["name"] == "p2"
    assert {k: created[-1]["detail"][k] for k in ("type", "purpose", "public")} == {
        "type": "ed25519",
        "purpose": "general",
        "public": True,
    }
    assert api.call("GET", "/v1/keys/p2/jwks.json", None).status_code == 200
    updates = api.service.audit.search(action="key.update").records
    made_public = [(r["resource"]["name"], r["detail"]["changes"]) for r in updates]
    assert [m for m, r in zip(made_public, updates, strict=True) if r["outcome"] == "ok"] == [
        ("private", {"public": True}),
        ("j", {"public": False}),
    ]


def test_adopting_needs_a_capable_backend(api, admin):
    body = {"name": "adopted", "type": "ecdsa-p256", "purpose": "general", "uri": "softkms:other/1"}
    r = api.call("POST", "/v1/keys", admin, json=body)
    assert (r.status_code, r.json()["code"]) == (501, "not_supported")
    r = api.call(
        "POST", "/v1/keys", admin, json={"name": "x", "purpose": "p", "uri": "u", "public_key": "p"}
    )
    assert r.status_code == 422
    assert api.call("GET", "/v1/keys", admin).json()["keys"] == []


@pytest.mark.parametrize(
    "name",
    ["a" * 129, "a" * 60_000, "abc\u202egpj.exe", "x\u009b31m", "-lead", ".hidden"],
)
def test_a_path_name_no_key_can_have_is_404_before_any_record(api, make_token, name):
    """A name that breaks the key-name rule names no key: 404 at once, not echoed, and no
    decision or audit record (a 60,000-character name, or bidi and C1 characters, used to
    be written into the audit log by any caller, even one allowed nothing)."""
    nobody = make_token("nobody")
    log = api.service.settings.resolved_audit_path()
    before = log.stat().st_size
    for method, path, body in (
        ("GET", f"/v1/keys/{name}", None),
        ("POST", f"/v1/keys/{name}/sign", {"input": b64(b"x")}),
        ("POST", f"/v1/keys/{name}/rotate", None),
    ):
        reply = api.call(method, path, nobody, json=body)
        assert reply.status_code == 404, (path[:40], reply.text)
        assert name not in reply.text
    assert log.stat().st_size == before


def test_a_trailing_slash_is_not_found_not_a_redirect(api, admin):
    """Starlette redirected `/v1/keys/k/` (before authentication) to the same path without
    the slash on whatever host the client's Host header named."""
    create_key(api, admin, "slashed", "ecdsa-p256")
    for method, path in (("GET", "/v1/keys/slashed/"), ("POST", "/v1/keys/slashed/sign/")):
        reply = api.call(
            method, path, admin, json={"input": b64(b"x")} if method == "POST" else None
        )
        assert reply.status_code == 404, (path, reply.status_code, reply.headers)
        assert "location" not in reply.headers


def test_a_lone_surrogate_in_any_string_is_400_not_a_policy_failure(api, admin):
    """`"\\ud800"` is JSON text with no UTF-8 form: it made the policy's input unencodable,
    so an admin's key creation was denied as a policy evaluation error (403), audited as a
    denial. It is refused as the body it is; a proper surrogate pair is one character."""
    json_type = {"content-type": "application/json"}
    log = api.service.settings.resolved_audit_path()
    before = log.stat().st_size
    for path, raw in (
        ("/v1/keys", b'{"name":"s1","type":"ed25519","purpose":"p","labels":{"t":"a\\ud800b"}}'),
        ("/v1/sys/policy/evaluate", b'{"principal":{"id":"x","roles":["admin"]},'
         b'"action":"sign","request":{"a":"\\udc00"}}'),
    ):  # fmt: skip
        reply = api.call("POST", path, admin, content=raw, headers=json_type)
        assert reply.status_code == 400, (path, reply.text)
        assert "lone surrogate" in reply.json()["detail"]
    assert log.stat().st_size == before
    paired = b'{"name":"s2","type":"ed25519","purpose":"p","labels":{"t":"\\ud83d\\ude00"}}'
    made = api.call("POST", "/v1/keys", admin, content=paired, headers=json_type)
    assert made.status_code == 201, made.text
    assert made.json()["labels"] == {"t": "\U0001f600"}


def test_past_its_store_read_budget_a_key_change_is_503_and_a_read_uses_the_copy(api, admin):
    """Reads and changes of a key ask the store first, within a budget of their own: past
    it, a read is served from this process's copy, and a change is refused (503) rather
    than decided on a copy that may be behind. Operations keep their own misses' budget."""
    create_key(api, admin, "budget")
    catalogue = api.service.catalogue
    catalogue._current_reads = TokenBucket(0.001, 1)
    assert catalogue._current_reads.take()  # spent
    assert api.call("GET", "/v1/keys/budget", admin).status_code == 200
    refused = api.call("POST", "/v1/keys/budget/rotate", admin)
    assert refused.status_code == 503 and "too many key changes" in refused.json()["detail"]
    signed = api.call("POST", "/v1/keys/budget/sign", admin, json={"input": b64(b"m")})
    assert signed.status_code == 200


def test_a_key_on_a_backend_the_gateway_no_longer_configures_is_503(tmp_path):
    """A key whose backend left the configuration (or not yet in a replica's) is the
    gateway's problem, not the caller's: 503 naming the backend, not 400 "unknown backend"."""
    two = {"local": {"type": "softkms"}, "second": {"type": "softkms"}}
    with open_gateway(tmp_path, backends=two) as (api, admin):
        create_key(api, admin, "on-second", "ecdsa-p256", backend="second")
    with open_gateway(tmp_path, backends={"local": {"type": "softkms"}}) as (api, admin):
        r = api.call("POST", "/v1/keys/on-second/sign", admin, json={"input": b64(b"m")})
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "backend_unavailable"
        assert "'second', which holds this key, is not configured" in r.json()["detail"]
        r = api.call("POST", "/v1/keys/on-second/rotate", admin)
        assert r.status_code == 503 and r.json()["code"] == "backend_unavailable", r.text


def test_a_dev_data_dir_reopened_without_the_backend_of_its_audit_key_says_which(tmp_path):
    """The dev audit checkpoint key lives on the default backend: reopened without that
    backend, the start is refused naming it (it said only "cannot sign the checkpoint")."""
    two = {"local": {"type": "softkms"}, "second": {"type": "softkms"}}
    with open_gateway(tmp_path, backends=two, default_backend="second") as (api, _):
        assert ensure_dev_audit_key(api.service)  # what `serve --dev` does
    with (
        pytest.raises(ConfigError, match="'second', which holds this key, is not configured"),
        open_gateway(tmp_path, backends={"local": {"type": "softkms"}}),
    ):
        pass


def test_a_dev_root_token_stops_working_once_its_store_serves_outside_dev(
    tmp_path: Path,
) -> None:
    """A data dir first served with `--dev`, then in production: production refuses the
    `root-token` file, and the operator deletes it, but the admin token it held stayed
    live in the store. A production start now revokes it (audited, by `system`); other
    tokens, one an operator made with that description but an expiry among them, stay;
    the tokens the root token made go with it."""
    data = tmp_path / "data"
    dev = load_settings(dev=True, data_dir=data, env="dev")
    prepare_dev_data_dir(dev)
    service = build_service(dev)
    try:
        root = ensure_root_token(service, data)
        kept = service.tokens.create(["admin"], ttl=timedelta(days=1), description="dev root token")
        assert root is not None
        root_id = root.split(".")[1]
        child = service.tokens.create(
            ["ci"], ttl=None, created_by=f"token:{root_id}", parent=root_id
        )
    finally:
        service.close()
    (data / "root-token").unlink()
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    root_key = secrets / "root.key"
    root_key.write_bytes((data / "root.key").read_bytes())
    root_key.chmod(0o600)
    production = load_settings(
        data_dir=data, root_key_file=root_key, audit_checkpoint_key=DEV_AUDIT_KEY, env="prod"
    )
    service = build_service(production)
    try:
        with pytest.raises(Unauthenticated):
            service.tokens.authenticate(Credentials(bearer=root))
        with pytest.raises(Unauthenticated):
            service.tokens.authenticate(Credentials(bearer=child[1]))
        service.tokens.authenticate(Credentials(bearer=kept[1]))
        records = service.audit.search(action="token.revoke").records
        assert [(r["principal"], r["outcome"]) for r in records] == [
            ("system", "started"),
            ("system", "ok"),
        ], records
        assert records[-1]["detail"]["also_revoked"] == [child[0].id]
    finally:
        service.close()
