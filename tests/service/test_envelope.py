"""Envelope encryption use cases: bytes in and out, the context bound."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from kmsgate.audit import AuditFile
from kmsgate.auth import Principal
from kmsgate.bootstrap import build_service, prepare_dev_data_dir
from kmsgate.config import load_settings
from kmsgate.envelope import Envelope
from kmsgate.errors import DecryptionFailed, InvalidRequest, PolicyDenied
from kmsgate.service import Service
from kmsgate.service.requests import (
    DataKeyInput,
    DecryptInput,
    EncryptInput,
    NewKey,
    RewrapInput,
)
from kmsgate.service.results import Plaintext, WrappedDataKey
from tests.service.conftest import ADMIN, CTX, NOBODY

SHIPPED_POLICIES = Path(__file__).resolve().parents[2] / "policies"


def test_encrypt_then_decrypt_with_the_same_context_only(service, new_key):
    new_key("e", "aes-256-gcm")
    target = service.gate.target("e")
    context = {"tenant": "a"}
    [sealed] = service.envelopes.encrypt(
        ADMIN, CTX, target, [EncryptInput(b"secret", context)], False
    )
    assert b"secret" not in sealed.ciphertext
    opened = service.envelopes.decrypt(
        ADMIN, CTX, target, [DecryptInput(sealed.ciphertext, context)], False
    )
    assert opened == [Plaintext(b"secret", 1)]
    with pytest.raises(DecryptionFailed):
        service.envelopes.decrypt(
            ADMIN, CTX, target, [DecryptInput(sealed.ciphertext, {"tenant": "b"})], False
        )


def test_a_data_key_without_its_plaintext(service, new_key):
    new_key("e", "aes-256-gcm")
    target = service.gate.target("e")
    [made] = service.envelopes.datakey(
        ADMIN, CTX, target, [DataKeyInput(bits=128, include_plaintext=False)], False
    )
    assert isinstance(made, WrappedDataKey)
    [opened] = service.envelopes.decrypt(ADMIN, CTX, target, [DecryptInput(made.ciphertext)], False)
    assert len(opened.plaintext) == 16


def test_rewrap_from_another_key_needs_rewrap_on_the_source(service, new_key):
    new_key("old", "aes-256-gcm")
    new_key("new", "aes-256-gcm")
    [sealed] = service.envelopes.encrypt(
        ADMIN, CTX, service.gate.target("old"), [EncryptInput(b"data")], False
    )
    target = service.gate.target("new")
    [moved] = service.envelopes.rewrap(ADMIN, CTX, target, [RewrapInput(sealed.ciphertext)], False)
    [opened] = service.envelopes.decrypt(
        ADMIN, CTX, target, [DecryptInput(moved.ciphertext)], False
    )
    assert opened.plaintext == b"data"
    with pytest.raises(PolicyDenied):
        service.envelopes.rewrap(NOBODY, CTX, target, [RewrapInput(sealed.ciphertext)], False)


def test_rewrap_to_a_key_that_cannot_wrap_decides_on_no_source(service, new_key):
    """Rewrapping another key's ciphertext to a signing key: the source key was decided
    on, audited `ok` for a rewrap that never happened, and its data key unwrapped, before
    the target's type was refused. The target is now refused first."""
    new_key("old", "aes-256-gcm")
    new_key("signer", "ecdsa-p256")
    [sealed] = service.envelopes.encrypt(
        ADMIN, CTX, service.gate.target("old"), [EncryptInput(b"data")], False
    )
    with pytest.raises(InvalidRequest, match="cannot encrypt or wrap"):
        service.envelopes.rewrap(
            ADMIN, CTX, service.gate.target("signer"), [RewrapInput(sealed.ciphertext)], False
        )
    rewraps = service.audit.search(action="rewrap").records
    assert [(r["resource"]["name"], r["outcome"]) for r in rewraps] == [
        ("signer", "invalid_request")
    ]


def test_a_version_the_key_never_had_is_named_in_the_refusal(service, new_key):
    new_key("e", "aes-256-gcm")
    target = service.gate.target("e")
    [sealed] = service.envelopes.encrypt(ADMIN, CTX, target, [EncryptInput(b"data")], False)
    forged = replace(Envelope.parse(sealed.ciphertext), key_version=7).to_bytes()
    with pytest.raises(DecryptionFailed, match="names version 7, which key 'e' never had"):
        service.envelopes.decrypt(ADMIN, CTX, target, [DecryptInput(forged)], False)


@contextlib.contextmanager
def _service_with_rule(tmp_path: Path, rule: str) -> Iterator[Service]:
    """A service on the shipped policies plus `rule` (Rego in package kmsgate.authz), with
    an AES key `e`."""
    policies = tmp_path / "policies"
    shutil.copytree(SHIPPED_POLICIES, policies, ignore=shutil.ignore_patterns("*_test.rego"))
    (policies / "extra.rego").write_text(f"package kmsgate.authz\n\nimport rego.v1\n\n{rule}")
    settings = load_settings(
        dev=True,
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'kmsgate.db'}",
        env="test",
        policy_dir=policies,
    )
    prepare_dev_data_dir(settings)
    service = build_service(settings)
    try:
        service.keys.create(ADMIN, CTX, NewKey(name="e", type="aes-256-gcm", purpose="test"))
        yield service
    finally:
        service.close()


def test_a_rule_on_the_context_sees_each_context_of_a_batch(tmp_path):
    """A batch whose items have different contexts is decided once for each of them: a
    `deny` on one context refuses the whole batch, as it refuses that item alone (the
    policy used to see no context at all for a mixed batch, and the rule never fired)."""
    rule = (
        'deny contains "db secrets are for dbadmin" if {\n'
        '\tinput.request.context.app == "db"\n'
        '\tnot "dbadmin" in input.principal.roles\n}\n'
    )
    with _service_with_rule(tmp_path, rule) as service:
        target = service.gate.target("e")
        dba = Principal(id="token:dba", kind="token", roles=("admin", "dbadmin"))
        items = [EncryptInput(b"web", {"app": "web"}), EncryptInput(b"db", {"app": "db"})]
        web, db = service.envelopes.encrypt(dba, CTX, target, items, True)
        mixed = [
            DecryptInput(web.ciphertext, {"app": "web"}),
            DecryptInput(db.ciphertext, {"app": "db"}),
        ]
        with pytest.raises(PolicyDenied):
            service.envelopes.decrypt(ADMIN, CTX, target, mixed, True)
        with pytest.raises(PolicyDenied):
            service.envelopes.decrypt(ADMIN, CTX, target, mixed[1:], True)
        assert service.envelopes.decrypt(ADMIN, CTX, target, mixed[:1], True) == [
            Plaintext(b"web", 1)
        ]
        assert service.envelopes.decrypt(dba, CTX, target, mixed, True) == [
            Plaintext(b"web", 1),
            Plaintext(b"db", 1),
        ]


def test_the_policy_and_the_trail_see_which_data_keys_come_in_plaintext(tmp_path):
    """`datakey` tells the policy how many keys it returns in plaintext
    (`request.plaintext_keys`), so a rule can allow wrapped-only data keys and refuse
    plaintext ones; the audit record says it too."""
    rule = 'deny contains "wrapped data keys only" if input.request.plaintext_keys > 0\n'
    with _service_with_rule(tmp_path, rule) as service:
        target = service.gate.target("e")
        wrapped = [DataKeyInput(include_plaintext=False)] * 2
        assert len(service.envelopes.datakey(ADMIN, CTX, target, wrapped, True)) == 2
        with pytest.raises(PolicyDenied):
            service.envelopes.datakey(ADMIN, CTX, target, [*wrapped, DataKeyInput()], True)
        trail = AuditFile(service.settings.resolved_audit_path())
        records = trail.search(action="datakey", limit=10).records
        seen = [(r["decision"], (r.get("detail") or {}).get("plaintext_keys")) for r in records]
        assert seen == [("allow", 0), ("deny", None)]


def test_rewrap_refuses_a_damaged_message_as_decrypt_does(service, new_key):
    """Rewrap holds the data key: a message whose body or tag was changed, cut or extended
    fails as decrypt fails (400 decryption_failed), instead of being rewrapped into a
    ciphertext that fails later."""
    new_key("e", "aes-256-gcm")
    target = service.gate.target("e")
    [sealed] = service.envelopes.encrypt(ADMIN, CTX, target, [EncryptInput(b"secret")], False)
    good = sealed.ciphertext
    damaged = [good[:-1], good + b"\x00", good[:-1] + bytes([good[-1] ^ 1])]
    for ciphertext in damaged:
        for operation, item in (
            (service.envelopes.decrypt, DecryptInput(ciphertext)),
            (service.envelopes.rewrap, RewrapInput(ciphertext)),
        ):
            with pytest.raises(DecryptionFailed):
                operation(ADMIN, CTX, target, [item], False)
    [moved] = service.envelopes.rewrap(ADMIN, CTX, target, [RewrapInput(good)], False)
    opened = service.envelopes.decrypt(ADMIN, CTX, target, [DecryptInput(moved.ciphertext)], False)
    assert opened[0].plaintext == b"secret"
