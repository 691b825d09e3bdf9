"""Envelope encryption use cases: bytes in and out, the context bound."""

from __future__ import annotations

import pytest

from kmsgate.errors import DecryptionFailed, PolicyDenied
from kmsgate.service.requests import DataKeyInput, DecryptInput, EncryptInput, RewrapInput
from kmsgate.service.results import Plaintext, WrappedDataKey
from tests.service.conftest import ADMIN, CTX, NOBODY


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
