"""Server-side envelope encryption through the real REST app: encrypt, decrypt, datakey,
rewrap (single and batch), context binding, tampering, rotation and min_decrypt_version,
cross-key rewrap, type binding, limits, policy and audit.

`wrap_backend` parametrises the round trips over every wrap-capable backend profile of the
conformance suite (tests/backends: softkms always; OpenBao and SoftHSM when their test
components are installed); those run on SQLite only, the rest on SQLite and PostgreSQL.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsgate.algorithms import KeyType
from kmsgate.backends.base import Registry, WrapCapable
from kmsgate.envelope import Envelope, Kind, decode_context, encode_context
from tests.backends.conftest import PROFILES
from tests.gateway import open_gateway
from tests.helpers import b64, create_key, unb64

CTX = {"tenant": "acme", "purpose": "invoice"}


# the keys here are envelope-data keys, AES-256-GCM unless a test names another type
create_envelope_key = functools.partial(create_key, key_type="aes-256-gcm", purpose="envelope-data")


def op(api, token, name, operation, **body):
    return api.call("POST", f"/v1/keys/{name}/{operation}", token, json=body)


def encrypt(api, token, name, plaintext, context=None) -> str:
    body = {"plaintext": b64(plaintext)}
    if context is not None:
        body["context"] = context
    r = op(api, token, name, "encrypt", **body)
    assert r.status_code == 200, r.text
    return r.json()["ciphertext"]


def decrypt(api, token, name, ciphertext, context=None):
    body = {"ciphertext": ciphertext}
    if context is not None:
        body["context"] = context
    return op(api, token, name, "decrypt", **body)


# -- backends ---------------------------------------------------------------------------------

WRAP_PROFILES = [n for n, p in PROFILES.items() if KeyType.AES_256_GCM in p.key_types]


@pytest.fixture(scope="module", params=WRAP_PROFILES)
def started_backend(request, tmp_path_factory) -> Iterator[tuple[str, object]]:
    """("softkms", None) for the gateway's own `local` backend; otherwise a started backend
    of that profile (skipped when its test component is not installed)."""
    if request.param == "softkms":
        yield "local", None
        return
    with PROFILES[request.param].start(tmp_path_factory) as backend:
        yield backend.name, backend


@pytest.fixture
def wrap_backend(api, started_backend) -> Iterator[str]:
    """The name of a configured wrap-capable backend of the `api` gateway."""
    name, backend = started_backend
    if backend is None:
        yield name
        return
    assert isinstance(backend, WrapCapable)
    original = api.service.registry
    api.service.gate.registry = Registry(
        {**dict(original.items()), name: backend}, original.default
    )
    try:
        yield name
    finally:
        api.service.gate.registry = original  # the module owns `backend`; service.close must not


def test_round_trips_on_every_wrap_backend(api, admin, wrap_backend):
    create_envelope_key(api, admin, "k", backend=wrap_backend)
    for plaintext in (b"", b"x", b"hello envelope", bytes(range(256)) * 64):
        ct = encrypt(api, admin, "k", plaintext, CTX)
        r = decrypt(api, admin, "k", ct, CTX)
        assert r.status_code == 200, r.text
        assert unb64(r.json()["plaintext"]) == plaintext
        assert r.json()["key_version"] == 1
        assert decrypt(api, admin, "k", ct, {"tenant": "other"}).json()["code"] == (
            "decryption_failed"
        )
    dk = op(api, admin, "k", "datakey", context=CTX).json()
    assert len(unb64(dk["plaintext"])) == 32
    assert unb64(decrypt(api, admin, "k", dk["ciphertext"], CTX).json()["plaintext"]) == unb64(
        dk["plaintext"]
    )
    # rotation: old ciphertexts still decrypt; rewrap moves them to the new version
    ct = encrypt(api, admin, "k", b"before rotation", CTX)
    assert api.call("POST", "/v1/keys/k/rotate", admin).status_code == 200
    r = op(api, admin, "k", "rewrap", ciphertext=ct, context=CTX)
    assert r.status_code == 200, r.text
    assert r.json()["key_version"] == 2
    assert unb64(decrypt(api, admin, "k", r.json()["ciphertext"], CTX).json()["plaintext"]) == (
        b"before rotation"
    )
    # tampering with any byte fails (one batch of every single-byte variant)
    raw = unb64(ct)
    variants = [b64(raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1 :]) for i in range(len(raw))]
    variants += [b64(raw[:-1]), b64(raw + b"\x00"), b64(raw[:20])]
    r = op(api, admin, "k", "decrypt", batch=[{"ciphertext": c, "context": CTX} for c in variants])
    assert r.status_code == 200, r.text
    for i, item in enumerate(r.json()["batch"]):
        assert "error" in item, f"variant {i} decrypted"
        assert item["error"]["code"] in ("decryption_failed", "key_version_unusable"), item


def test_ciphertext_format_is_self_describing(api, admin):
    create_envelope_key(api, admin, "fmt")
    ct = unb64(encrypt(api, admin, "fmt", b"abc", CTX))
    env = Envelope.parse(ct)
    assert ct[:4] == b"KGE\x01"
    assert (env.kind, env.key_name, env.key_version) == (Kind.MESSAGE, "fmt", 1)
    assert len(env.nonce) == 12 and len(env.body) == 3 + 16
    assert b"abc" not in ct
    # fresh DEK and nonce per message
    again = Envelope.parse(unb64(encrypt(api, admin, "fmt", b"abc", CTX)))
    assert again.wrapped_dek != env.wrapped_dek and again.body != env.body
    assert again.nonce != env.nonce


def test_context_is_bound(api, admin):
    create_envelope_key(api, admin, "c")
    ct = encrypt(api, admin, "c", b"secret", CTX)
    for wrong in (
        None,
        {},
        {"tenant": "acme"},
        {**CTX, "x": "y"},
        {"tenant": "ACME", "purpose": "invoice"},
    ):
        r = decrypt(api, admin, "c", ct, wrong)
        assert (r.status_code, r.json()["code"]) == (400, "decryption_failed"), wrong
    # order of entries does not matter (canonical encoding)
    reordered = {"purpose": "invoice", "tenant": "acme"}
    assert unb64(decrypt(api, admin, "c", ct, reordered).json()["plaintext"]) == b"secret"
    # no context on both sides works, and an empty map equals no map
    bare = encrypt(api, admin, "c", b"bare")
    assert decrypt(api, admin, "c", bare).status_code == 200
    assert decrypt(api, admin, "c", bare, {}).status_code == 200
    assert decrypt(api, admin, "c", bare, {"a": "b"}).json()["code"] == "decryption_failed"


def test_a_context_reads_in_the_audit_log_as_it_is(api, admin):
    """A context with a bidirectional override (which makes a line read as something
    else to a reviewer) is bound as sent, and its audit record writes the character as its
    escape, on the line and in the record read back."""
    create_envelope_key(api, admin, "bidi")
    tricky = {"tenant": "acme\u202egnp.exe", "note\u2066": "a\tb"}
    ct = encrypt(api, admin, "bidi", b"secret", tricky)
    assert unb64(decrypt(api, admin, "bidi", ct, tricky).json()["plaintext"]) == b"secret"
    line = api.service.settings.resolved_audit_path().read_text()
    assert "\u202e" not in line and "\u2066" not in line
    records = api.service.audit.search(action="encrypt").records
    assert records[-1]["detail"]["context"] == {
        "tenant": "acme\\u202egnp.exe",
        "note\\u2066": "a\\tb",
    }


def test_context_encoding_is_canonical_and_unambiguous():
    assert encode_context(None) == encode_context({}) == b"\x00\x00"
    assert encode_context({"b": "1", "a": "2"}) == encode_context({"a": "2", "b": "1"})
    assert encode_context({"a": "bc"}) != encode_context({"ab": "c"})
    assert encode_context({"a": ""}) != encode_context({})
    enc = encode_context(CTX | {"é": "ü"})
    assert decode_context(enc) == CTX | {"é": "ü"}
    with pytest.raises(ValueError):
        decode_context(enc + b"\x00")
    with pytest.raises(ValueError):  # unsorted
        decode_context(b"\x00\x02\x00\x01b\x00\x00\x00\x01a\x00\x00")


@pytest.mark.parametrize(
    "context",
    [
        {f"k{i}": "v" for i in range(33)},
        {"": "v"},
        {"k" * 257: "v"},
        {"k": "v" * 257},
        {"k": 1},
        ["k", "v"],
    ],
)
def test_context_limits(api, admin, context):
    create_envelope_key(api, admin, "lim")
    r = op(api, admin, "lim", "encrypt", plaintext=b64(b"x"), context=context)
    assert r.status_code == 422, r.text


def test_min_decrypt_version_enforced(api, admin):
    create_envelope_key(api, admin, "m")
    old = encrypt(api, admin, "m", b"v1 data", CTX)
    old_dk = op(api, admin, "m", "datakey", context=CTX).json()["ciphertext"]
    api.call("POST", "/v1/keys/m/rotate", admin)
    assert decrypt(api, admin, "m", old, CTX).status_code == 200
    r = api.call("PATCH", "/v1/keys/m", admin, json={"min_decrypt_version": 2})
    assert r.status_code == 200, r.text
    for ct in (old, old_dk):
        for operation in ("decrypt", "rewrap"):
            r = op(api, admin, "m", operation, ciphertext=ct, context=CTX)
            assert (r.status_code, r.json()["code"]) == (409, "key_version_unusable"), r.text
    new = encrypt(api, admin, "m", b"v2 data", CTX)
    assert Envelope.parse(unb64(new)).key_version == 2
    assert unb64(decrypt(api, admin, "m", new, CTX).json()["plaintext"]) == b"v2 data"


def test_rewrap_keeps_body_and_changes_only_the_wrap(api, admin):
    create_envelope_key(api, admin, "rw")
    ct = unb64(encrypt(api, admin, "rw", b"payload", CTX))
    api.call("POST", "/v1/keys/rw/rotate", admin)
    new = unb64(
        op(api, admin, "rw", "rewrap", ciphertext=b64(ct), context=CTX).json()["ciphertext"]
    )
    before, after = Envelope.parse(ct), Envelope.parse(new)
    assert (before.nonce, before.body) == (after.nonce, after.body)
    assert after.key_version == 2 and after.wrapped_dek != before.wrapped_dek
    # rewrap needs the right context too
    r = op(api, admin, "rw", "rewrap", ciphertext=b64(ct), context={"tenant": "x"})
    assert r.json()["code"] == "decryption_failed"
    # a forged header (version field changed) does not unwrap
    forged = Envelope(after.kind, after.key_name, 1, after.wrapped_dek, after.nonce, after.body)
    r = decrypt(api, admin, "rw", b64(forged.to_bytes()), CTX)
    assert r.json()["code"] == "decryption_failed"


def test_cross_key_rewrap_and_wrong_key(api, admin, make_token):
    create_envelope_key(api, admin, "src")
    create_envelope_key(api, admin, "dst")
    ct = encrypt(api, admin, "src", b"migrate me", CTX)
    dk = op(api, admin, "src", "datakey", context=CTX).json()
    # a ciphertext names its key: decrypting it at another key fails
    assert decrypt(api, admin, "dst", ct, CTX).json()["code"] == "decryption_failed"
    r = op(
        api,
        admin,
        "dst",
        "rewrap",
        batch=[
            {"ciphertext": ct, "context": CTX},
            {"ciphertext": dk["ciphertext"], "context": CTX},
        ],
    )
    assert r.status_code == 200, r.text
    moved, moved_dk = r.json()["batch"]
    assert Envelope.parse(unb64(moved["ciphertext"])).key_name == "dst"
    assert unb64(decrypt(api, admin, "dst", moved["ciphertext"], CTX).json()["plaintext"]) == (
        b"migrate me"
    )
    assert (
        decrypt(api, admin, "dst", moved_dk["ciphertext"], CTX).json()["plaintext"]
        == (dk["plaintext"])
    )
    assert decrypt(api, admin, "src", moved["ciphertext"], CTX).status_code == 400
    # the source key must be enabled
    api.call("POST", "/v1/keys/src/disable", admin)
    r = op(api, admin, "dst", "rewrap", ciphertext=ct, context=CTX)
    assert (r.status_code, r.json()["code"]) == (409, "key_disabled")
    # a caller without rights gets 403
    r = op(api, make_token("nobody"), "dst", "rewrap", ciphertext=ct, context=CTX)
    assert r.status_code == 403


def test_datakey_forms(api, admin):
    create_envelope_key(api, admin, "dk")
    r = op(api, admin, "dk", "datakey", include_plaintext=False, context=CTX)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"ciphertext", "key_version"}
    env = Envelope.parse(unb64(r.json()["ciphertext"]))
    assert env.kind is Kind.DATA_KEY and (env.nonce, env.body) == (b"", b"")
    assert (
        len(unb64(decrypt(api, admin, "dk", r.json()["ciphertext"], CTX).json()["plaintext"])) == 32
    )
    short = op(api, admin, "dk", "datakey", bits=128).json()
    assert len(unb64(short["plaintext"])) == 16
    assert op(api, admin, "dk", "datakey", bits=512).status_code == 422
    # the data key works as a plain AES-GCM key on the client
    key = unb64(op(api, admin, "dk", "datakey").json()["plaintext"])
    assert (
        AESGCM(key).decrypt(b"\0" * 12, AESGCM(key).encrypt(b"\0" * 12, b"m", None), None) == b"m"
    )
    # a data-key ciphertext turned into a message by flipping its kind byte does not unwrap
    raw = bytearray(unb64(short["ciphertext"]))
    raw[4] = Kind.MESSAGE
    raw += b"\0" * 28
    assert decrypt(api, admin, "dk", b64(bytes(raw))).json()["code"] == "decryption_failed"
    batch = op(api, admin, "dk", "datakey", batch=[{}, {"bits": 128}, {"include_plaintext": False}])
    results = batch.json()["batch"]
    assert [len(unb64(x["plaintext"])) for x in results[:2]] == [32, 16]
    assert "plaintext" not in results[2]


def test_batches_keep_errors_in_place(api, admin):
    create_envelope_key(api, admin, "b")
    big = b"x" * (64 * 1024 + 1)
    r = op(
        api,
        admin,
        "b",
        "encrypt",
        batch=[
            {"plaintext": b64(b"one")},
            {"plaintext": b64(big)},
            {"plaintext": b64(b"three"), "context": CTX},
        ],
    )
    assert r.status_code == 200, r.text
    one, too_big, three = r.json()["batch"]
    assert too_big["error"]["code"] == "too_large"
    r = op(
        api,
        admin,
        "b",
        "decrypt",
        batch=[
            {"ciphertext": three["ciphertext"], "context": CTX},
            {"ciphertext": one["ciphertext"], "context": CTX},
            {"ciphertext": b64(b"garbage")},
            {"ciphertext": one["ciphertext"]},
        ],
    )
    got = r.json()["batch"]
    assert unb64(got[0]["plaintext"]) == b"three"
    assert got[1]["error"]["code"] == "decryption_failed"
    assert got[2]["error"]["code"] == "decryption_failed"
    assert unb64(got[3]["plaintext"]) == b"one"


def test_limits_and_type_binding(api, admin):
    create_envelope_key(api, admin, "t")
    r = op(api, admin, "t", "encrypt", plaintext=b64(b"x" * (64 * 1024 + 1)))
    assert (r.status_code, r.json()["code"]) == (413, "too_large")
    assert op(api, admin, "t", "encrypt", plaintext=b64(b"x" * 64 * 1024)).status_code == 200
    for key_type in ("ecdsa-p256", "hmac-sha256"):
        create_envelope_key(api, admin, f"not-{key_type}", key_type=key_type)
        r = op(api, admin, f"not-{key_type}", "encrypt", plaintext=b64(b"x"))
        assert (r.status_code, r.json()["code"]) == (400, "invalid_request"), r.text
        r = op(api, admin, f"not-{key_type}", "datakey")
        assert r.status_code == 400
    # an AES key cannot sign or MAC
    assert op(api, admin, "t", "sign", input=b64(b"x")).status_code == 400
    assert decrypt(api, admin, "t", b64(b"KGE\x01")).json()["code"] == "decryption_failed"


def test_disabled_key_refuses_everything(api, admin):
    create_envelope_key(api, admin, "d")
    ct = encrypt(api, admin, "d", b"x")
    api.call("POST", "/v1/keys/d/disable", admin)
    for operation, body in (
        ("encrypt", {"plaintext": b64(b"x")}),
        ("decrypt", {"ciphertext": ct}),
        ("datakey", {}),
        ("rewrap", {"ciphertext": ct}),
    ):
        r = op(api, admin, "d", operation, **body)
        assert (r.status_code, r.json()["code"]) == (409, "key_disabled"), operation


def test_policy_and_audit(api, admin, make_token):
    create_envelope_key(api, admin, "p")
    nobody = make_token("nobody")
    for operation, body in (
        ("encrypt", {"plaintext": b64(b"x")}),
        ("decrypt", {"ciphertext": b64(b"x")}),
        ("datakey", {}),
        ("rewrap", {"ciphertext": b64(b"x")}),
    ):
        assert op(api, nobody, "p", operation, **body).status_code == 403
        assert op(api, nobody, "missing", operation, **body).status_code == 403
    secret = b"audit-must-not-see-this-plaintext"
    ct = encrypt(api, admin, "p", secret, CTX)
    dk = op(api, admin, "p", "datakey", context=CTX).json()
    assert decrypt(api, admin, "p", ct, CTX).status_code == 200
    log = api.service.settings.resolved_audit_path()
    text = log.read_text()
    import hashlib

    for needle in (
        secret.decode(),
        b64(secret),
        hashlib.sha256(secret).hexdigest(),
        dk["plaintext"],
    ):
        assert needle not in text
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    actions = [(r.get("action"), r.get("decision"), r.get("outcome")) for r in records]
    assert ("encrypt", "allow", "ok") in actions
    assert ("decrypt", "allow", "ok") in actions
    assert ("encrypt", "deny", "policy_denied") in actions
    # the context (no secret: AAD) is in the records, so the trail tells whose data it was
    done = [r for r in records if r.get("outcome") == "ok"]
    for action in ("encrypt", "decrypt", "datakey"):
        assert any(
            (r.get("detail") or {}).get("context") == CTX for r in done if r["action"] == action
        )
    batch = [{"plaintext": b64(b"m"), "context": {"tenant": f"t{i % 3}"}} for i in range(30)]
    assert api.call("POST", "/v1/keys/p/encrypt", admin, json={"batch": batch}).status_code == 200
    last = [json.loads(line) for line in log.read_text().splitlines()][-1]
    assert last["action"] == "encrypt" and last["detail"]["distinct_contexts"] == 3
    assert sorted(c["tenant"] for c in last["detail"]["contexts"]) == ["t0", "t1", "t2"]
    # a denial names the context too: who tried to decrypt whose data
    assert op(api, nobody, "p", "decrypt", ciphertext=ct, context=CTX).status_code == 403
    denied = [json.loads(line) for line in log.read_text().splitlines()][-1]
    assert (denied["action"], denied["decision"]) == ("decrypt", "deny")
    assert denied["detail"]["context"] == CTX


def test_a_rule_on_the_source_keys_context_holds_for_a_cross_key_rewrap(tmp_path):
    """The source key is decided with the ciphertext's context (and its record names it),
    so a deny on the source key's context cannot be evaded by rewrapping at another key."""
    policies = tmp_path / "policies"
    shutil.copytree(Path(__file__).resolve().parent.parent / "policies", policies)
    (policies / "secret_stays.rego").write_text(
        "package kmsgate.authz\nimport rego.v1\n"
        'deny contains "secret data never leaves src" if {\n'
        '  input.action == "rewrap"; input.resource.name == "src"\n'
        '  input.request.context.classification == "secret" }\n'
    )
    with open_gateway(tmp_path, policy_dir=policies) as (api, admin):
        create_envelope_key(api, admin, "src")
        create_envelope_key(api, admin, "dst")
        secret, public = {"classification": "secret"}, {"classification": "public"}
        sealed = encrypt(api, admin, "src", b"s", secret)
        refused = op(api, admin, "dst", "rewrap", ciphertext=sealed, context=secret)
        assert (refused.status_code, refused.json()["code"]) == (403, "policy_denied")
        moved = op(api, admin, "dst", "rewrap", ciphertext=encrypt(api, admin, "src", b"p", public),
                   context=public)  # fmt: skip
        assert moved.status_code == 200, moved.text
        source = [
            r
            for r in api.service.audit.search(action="rewrap").records
            if r["resource"]["name"] == "src"
        ]
        assert [(r["decision"], r["detail"]["context"]) for r in source] == [
            ("deny", secret),
            ("allow", public),
        ]


def test_a_forged_header_fails_as_decryption_failed(api, admin):
    """A ciphertext whose header names a key no key can have, or a version its key never
    had, is a damaged ciphertext (400), not a missing key or version."""
    create_envelope_key(api, admin, "fh")
    raw = Envelope.parse(unb64(encrypt(api, admin, "fh", b"x")))
    for forged in (replace(raw, key_name="a b c"), replace(raw, key_version=2**32 - 1)):
        for operation in ("decrypt", "rewrap"):
            reply = op(api, admin, "fh", operation, ciphertext=b64(forged.to_bytes()))
            assert (reply.status_code, reply.json()["code"]) == (400, "decryption_failed"), (
                operation, reply.text
            )  # fmt: skip
