"""The pkcs11 backend on a real SoftHSM2 token that others change under it: objects planted
beside a key version's (with or without the PIN), key objects replaced by someone holding
the PIN, and keys made by another process of the gateway (SoftHSM's file store shows them to
a process only after C_Initialize).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pkcs11 import Attribute, ObjectClass
from pkcs11 import KeyType as P11KeyType

from kmsgate.algorithms import SIGN_ALGORITHMS, KeyType, verify_with_public_key
from kmsgate.backends.base import BackendKey, KeySpec
from kmsgate.config import BackendSettings
from kmsgate.errors import BackendError
from tests.softhsm import SoftHsmToken, softhsm_token

pytestmark = pytest.mark.timeout(120)

MESSAGE = b"kmsgate pkcs11 tampering test message"
ECDSA = SIGN_ALGORITHMS["ecdsa-sha256"]


def make_backend(name: str, hsm_token: SoftHsmToken, **extra: Any) -> Any:
    from kmsgate.backends.pkcs11 import Pkcs11Backend

    return Pkcs11Backend.from_config(name, BackendSettings(**hsm_token.backend_config(**extra)))


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmToken]:
    with softhsm_token(tmp_path_factory, "kmsgate-tampering") as made:
        yield made


@pytest.fixture
def backend(token: SoftHsmToken) -> Iterator[Any]:
    """A backend with one worker session: whatever one call leaves behind, the next meets."""
    b = make_backend("hsm", token, sessions=1)
    yield b
    b.close()


def on_token(backend: Any, action: Callable[[Any], Any]) -> Any:
    """Run `action(session)` on a session of the backend's token (with its module lock held,
    as every call into the module must): someone else working on the token."""
    return backend._pool.call("tamper", lambda conn, worker: action(conn.token.open(rw=True)))


def plant_private_key(backend: Any, key: BackendKey, *, private: bool) -> None:
    """A second EC private key object with the label and id of `key`'s: CKA_PRIVATE false
    is what anyone can add without the PIN."""

    def plant(session: Any) -> None:
        label = f"{key.name}.v{key.version}"
        (public,) = session.get_objects(
            {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: label}
        )
        try:
            session.create_object(
                {
                    Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                    Attribute.KEY_TYPE: P11KeyType.EC,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: private,
                    Attribute.LABEL: public[Attribute.LABEL],
                    Attribute.ID: public[Attribute.ID],
                    Attribute.SIGN: True,
                    Attribute.SENSITIVE: False,
                    Attribute.EC_PARAMS: pkcs11.util.ec.encode_named_curve_parameters("secp256r1"),
                    Attribute.VALUE: (5).to_bytes(32, "big"),
                }
            )
        finally:
            session.close()

    on_token(backend, plant)


def signs(backend: Any, key: BackendKey) -> bool:
    signature = backend.sign(key, MESSAGE, ECDSA, prehashed=False)
    assert key.public_key_pem is not None
    public = load_pem_public_key(key.public_key_pem.encode())
    return verify_with_public_key(public, ECDSA, MESSAGE, signature, prehashed=False)


def test_an_object_planted_without_the_pin_is_ignored(backend: Any) -> None:
    """A CKA_PRIVATE false private key object (anyone may add one, no PIN needed) with the
    label and id of a key version's: not the key, not a second match."""
    key = backend.create_key(KeySpec("planted-public", 1, KeyType.ECDSA_P256))
    plant_private_key(backend, key, private=False)
    assert signs(backend, key)


def test_several_matching_objects_fail_that_key_only_and_end_the_search(backend: Any) -> None:
    """A second private key object under a key version's label and id (planted with the PIN):
    502 naming several objects for that key; the search is closed at once, so other keys on
    the same session keep working, on this thread and on others, while the error lives."""
    doubled = backend.create_key(KeySpec("doubled", 1, KeyType.ECDSA_P256))
    other = backend.create_key(KeySpec("bystander", 1, KeyType.ECDSA_P256))
    plant_private_key(backend, doubled, private=True)
    with pytest.raises(BackendError, match="several objects") as caught:
        backend.sign(doubled, MESSAGE, ECDSA, prehashed=False)
    assert caught.value.status == 502
    assert signs(backend, other)  # the same session: no search left open (OperationActive)
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.append(signs(backend, other)), daemon=True)
    thread.start()
    thread.join(20)
    assert results == [True], "signing from another thread hung or failed"
    with pytest.raises(BackendError, match="several objects"):
        backend.sign(doubled, MESSAGE, ECDSA, prehashed=False)
