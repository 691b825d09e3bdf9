"""Sign, verify and MAC as use cases: bytes in, typed results out, mismatches raise."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kmsgate.errors import (
    KeyVersionUnusable,
    MacInvalid,
    SignatureInvalid,
    TooLarge,
)
from kmsgate.service.requests import MacInput, MacVerifyInput, NewKey, SignInput, VerifyInput
from kmsgate.service.results import Mac, Signature, Verified
from tests.service.conftest import ADMIN, CTX


def test_a_signature_is_raw_bytes_that_verify_with_the_public_key(service, new_key):
    new_key("k")
    [signed] = service.crypto.sign(ADMIN, CTX, service.gate.target("k"), [SignInput(b"m")], False)
    assert isinstance(signed, Signature)
    assert (signed.key_version, signed.algorithm) == (1, "ecdsa-sha256")
    pem = service.keys.public_key_pem(ADMIN, CTX, "k", None)
    public = serialization.load_pem_public_key(pem.encode())
    public.verify(signed.signature, b"m", ec.ECDSA(hashes.SHA256()))  # raises if wrong


def test_verification_raises_on_a_mismatch_and_a_batch_keeps_it_in_place(service, new_key):
    new_key("k")
    target = service.gate.target("k")
    [signed] = service.crypto.sign(ADMIN, CTX, target, [SignInput(b"m")], False)
    good = VerifyInput(signed.signature, input=b"m")
    bad = VerifyInput(signed.signature, input=b"other")
    assert service.crypto.verify(ADMIN, CTX, target, [good], False) == [Verified(key_version=1)]
    with pytest.raises(SignatureInvalid):
        service.crypto.verify(ADMIN, CTX, target, [bad], False)
    results = service.crypto.verify(ADMIN, CTX, target, [good, bad], True)
    assert results[0] == Verified(key_version=1)
    assert isinstance(results[1], SignatureInvalid)


def test_a_signature_said_to_predate_the_version_that_made_it_does_not_verify(service, new_key):
    """`signed_at` an hour before the version existed: no signature of it can be that old
    (a backdated model provenance, say, slipping under a compromise's start), so it does not
    verify; a minute's skew is allowed. A public key imported now verifies what its owner
    signed long before."""
    key = new_key("k")
    created = key.versions[1].created_at
    target = service.gate.target("k")
    [signed] = service.crypto.sign(ADMIN, CTX, target, [SignInput(b"m")], False)

    def at(when: datetime) -> VerifyInput:
        return VerifyInput(signed.signature, input=b"m", signed_at=when)

    with pytest.raises(SignatureInvalid):
        service.crypto.verify(ADMIN, CTX, target, [at(created - timedelta(hours=1))], False)
    for when in (created - timedelta(seconds=30), created + timedelta(seconds=1)):
        assert service.crypto.verify(ADMIN, CTX, target, [at(when)], False) == [
            Verified(key_version=1)
        ]
    owner = ec.generate_private_key(ec.SECP256R1())
    spki = owner.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    service.keys.create(ADMIN, CTX, NewKey(name="i", purpose="p", public_key=spki.decode()))
    old = owner.sign(b"m", ec.ECDSA(hashes.SHA256()))
    item = VerifyInput(old, input=b"m", signed_at=datetime(2020, 1, 1, tzinfo=UTC))
    imported = service.gate.target("i")
    assert service.crypto.verify(ADMIN, CTX, imported, [item], False) == [Verified(key_version=1)]


def test_a_batch_reports_each_items_error_and_signs_the_rest(service, new_key):
    new_key("k")
    limit = service.settings.limits.max_input_bytes
    items = [SignInput(b"a"), SignInput(b"x" * (limit + 1)), SignInput(b"b", version=9)]
    results = service.crypto.sign(ADMIN, CTX, service.gate.target("k"), items, True)
    assert isinstance(results[0], Signature)
    assert isinstance(results[1], TooLarge)
    assert isinstance(results[2], KeyVersionUnusable)


def test_mac_and_mac_verify(service, new_key):
    new_key("h", "hmac-sha256")
    target = service.gate.target("h")
    [tag] = service.crypto.mac(ADMIN, CTX, target, [MacInput(b"m")], False)
    assert isinstance(tag, Mac) and len(tag.mac) == 32
    ok = MacVerifyInput(b"m", tag.mac)
    assert service.crypto.mac_verify(ADMIN, CTX, target, [ok], False) == [Verified(key_version=1)]
    forged = MacVerifyInput(b"m", bytes(32))
    with pytest.raises(MacInvalid):
        service.crypto.mac_verify(ADMIN, CTX, target, [forged], False)
