"""The pkcs11 backend on a real SoftHSM2 token that others change under it: objects planted
beside a key version's (with or without the PIN), key objects replaced by someone holding
the PIN, and keys made by another process of the gateway (SoftHSM's file store shows them to
a process only after C_Initialize).
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pkcs11 import Attribute, ObjectClass
from pkcs11 import KeyType as P11KeyType

from kmsgate.algorithms import SIGN_ALGORITHMS, HashName, KeyType, verify_with_public_key
from kmsgate.backends.base import BackendKey, KeySpec
from kmsgate.backends.pkcs11.adopt import check_same_key, key_check_record
from kmsgate.errors import BackendError, KeyDestroyed
from tests.softhsm import SoftHsmToken, make_backend, softhsm_token

pytestmark = pytest.mark.timeout(120)

MESSAGE = b"kmsgate pkcs11 tampering test message"
ECDSA = SIGN_ALGORITHMS["ecdsa-sha256"]


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


def plant_private_key(
    backend: Any, key: BackendKey, *, private: bool, label: str | None = None
) -> None:
    """A second EC private key object with the label (`label`, by default the one kmsgate
    gives the version) and id of `key`'s: CKA_PRIVATE false is what anyone can add without
    the PIN."""

    def plant(session: Any) -> None:
        nonlocal label
        label = label or f"{key.name}.v{key.version}"
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


def test_an_object_planted_without_the_pin_beside_an_adopted_key_is_ignored(backend: Any) -> None:
    """The same for a key made by a ceremony and adopted: it was refused as ambiguous (502)
    for as long as the planted object stayed, by anyone able to reach the token."""

    def ceremony(session: Any) -> None:
        try:
            curve = pkcs11.util.ec.encode_named_curve_parameters("secp256r1")
            params = session.create_domain_parameters(
                P11KeyType.EC, {Attribute.EC_PARAMS: curve}, local=True
            )
            params.generate_keypair(
                store=True,
                label="ceremony-ec",
                id=b"\xce",
                private_template={Attribute.SIGN: True, Attribute.PRIVATE: True},
            )
        finally:
            session.close()

    on_token(backend, ceremony)
    spec = KeySpec("adopted-ceremony", 1, KeyType.ECDSA_P256)
    key = backend.adopt_key(spec, "pkcs11:object=ceremony-ec;type=private")
    plant_private_key(backend, key, private=False, label="ceremony-ec")
    assert signs(backend, key)


def test_a_public_object_planted_without_the_pin_does_not_stop_destroy(backend: Any) -> None:
    """A second public key object under a key version's label and id (anyone may add one):
    destroying the key removes every object of that label, the planted one too, where it
    failed with "several objects" each time."""
    key = backend.create_key(KeySpec("planted-twin", 1, KeyType.ECDSA_P256))
    label = f"{key.name}.v{key.version}"
    public_template = {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: label}

    def plant(session: Any) -> None:
        try:
            (public,) = session.get_objects(public_template)
            public.copy({Attribute.TOKEN: True})
        finally:
            session.close()

    def labelled(session: Any) -> int:
        try:
            return len(list(session.get_objects({Attribute.LABEL: label})))
        finally:
            session.close()

    on_token(backend, plant)
    assert on_token(backend, labelled) == 3  # the private key and two public ones
    backend.destroy(key)
    assert on_token(backend, labelled) == 0
    backend.destroy(key)  # gone already: still no error


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


def replace_secret_key(backend: Any, key: BackendKey, *, sensitive: bool, label: str = "") -> None:
    """Destroy `key`'s secret key object and create one with a value known to the caller under
    its label and id (or under `label`, keeping the original), as someone with the PIN may."""
    original = f"{key.name}.v{key.version}"

    def replace(session: Any) -> None:
        try:
            (found,) = session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: original}
            )
            key_id = found[Attribute.ID]
            if not label:
                found.destroy()
            aes = key.key_type is KeyType.AES_256_GCM
            session.create_object(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: P11KeyType.AES if aes else P11KeyType.GENERIC_SECRET,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.LABEL: label or original,
                    Attribute.ID: key_id,
                    Attribute.VALUE: b"A" * 32,
                    Attribute.SENSITIVE: sensitive,
                    Attribute.EXTRACTABLE: not sensitive,
                    Attribute.SIGN: not aes,
                    Attribute.VERIFY: not aes,
                    Attribute.ENCRYPT: aes,
                    Attribute.DECRYPT: aes,
                }
            )
        finally:
            session.close()

    on_token(backend, replace)


@pytest.mark.parametrize("sensitive", [False, True], ids=["readable", "sensitive"])
def test_a_generated_secret_key_replaced_by_a_known_one_is_refused(
    backend: Any, sensitive: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone with the PIN replaces an AES or HMAC key version by a key whose value they
    know (readable, or made sensitive: still not generated on the token): kmsgate refuses
    the object (502, logged) instead of encrypting or MACing with it."""
    aes = backend.create_key(KeySpec(f"kek-{sensitive}", 1, KeyType.AES_256_GCM))
    tag = backend.create_key(KeySpec(f"tag-{sensitive}", 1, KeyType.HMAC_SHA256))
    replace_secret_key(backend, aes, sensitive=sensitive)
    replace_secret_key(backend, tag, sensitive=sensitive)
    for attempt in (
        lambda: backend.wrap(aes, b"data key", b"aad"),
        lambda: backend.mac(tag, MESSAGE, HashName.SHA256),
    ):
        with pytest.raises(BackendError, match="not a protected key") as caught:
            attempt()
        assert caught.value.status == 502
    assert "is refused" in caplog.text


def test_an_adopted_key_needs_what_adoption_needs(
    token: SoftHsmToken, backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A key adopted under its own label may have been imported (not generated on the
    token): it is used as long as it is what adoption requires."""
    aes = backend.create_key(KeySpec("kek-source", 1, KeyType.AES_256_GCM))
    replace_secret_key(backend, aes, sensitive=True, label="imported-kek")
    adopted = backend.adopt_key(
        KeySpec("imported", 1, KeyType.AES_256_GCM), "pkcs11:object=imported-kek"
    )
    wrapped = backend.wrap(adopted, b"data key", b"aad")
    assert backend.unwrap(adopted, wrapped, b"aad") == b"data key"
    # adopted before check records (no material): used as before, and the log says so
    legacy = dataclasses.replace(adopted, name="legacy", material=None)
    restarted = make_backend("hsm", token, sessions=1)
    try:
        assert restarted.unwrap(legacy, wrapped, b"aad") == b"data key"
    finally:
        restarted.close()
    assert "'legacy' version 1 was adopted before check records" in caplog.text


def swap_secret_object(backend: Any, label: str, value: bytes) -> None:
    """Destroy the secret key object labelled `label` and make one with the same label, id
    and attributes but the value `value` (known to the caller), as someone with the PIN may."""

    def swap(session: Any) -> None:
        try:
            (found,) = session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
            )
            kept = {
                a: found[a]
                for a in (Attribute.KEY_TYPE, Attribute.ID, Attribute.ENCRYPT, Attribute.SIGN)
            }
            found.destroy()
            session.create_object(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.LABEL: label,
                    Attribute.VALUE: value,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.DECRYPT: kept[Attribute.ENCRYPT],
                    Attribute.VERIFY: kept[Attribute.SIGN],
                    **kept,
                }
            )
        finally:
            session.close()

    on_token(backend, swap)


def test_an_adopted_secret_key_replaced_by_another_is_refused(
    token: SoftHsmToken, backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An adopted AES or HMAC key need not have been generated on the token, so its
    attributes cannot tell it from another imported key put in its place by someone with the
    PIN. Its check record, made at adoption, does: the swapped key is refused (502, logged)
    by the running backend and by one started after, instead of encrypting or MACing with a
    key whose value is known."""
    for label, key_type in (
        ("ceremony-kek", KeyType.AES_256_GCM),
        ("ceremony-tag", KeyType.HMAC_SHA256),
    ):
        made = backend.create_key(KeySpec(f"{label}-source", 1, key_type))
        replace_secret_key(backend, made, sensitive=True, label=label)
    kek = backend.adopt_key(KeySpec("kek", 1, KeyType.AES_256_GCM), "pkcs11:object=ceremony-kek")
    tag = backend.adopt_key(KeySpec("tag", 1, KeyType.HMAC_SHA256), "pkcs11:object=ceremony-tag")
    assert kek.material and tag.material  # the check records the catalogue keeps
    wrapped = backend.wrap(kek, b"data key", b"aad")
    assert backend.unwrap(kek, wrapped, b"aad") == b"data key"
    made_before = backend.mac(tag, MESSAGE, HashName.SHA256)
    swap_secret_object(backend, "ceremony-kek", b"B" * 32)
    swap_secret_object(backend, "ceremony-tag", b"B" * 32)
    restarted = make_backend("hsm", token, sessions=1)
    try:
        for serving in (backend, restarted):
            with pytest.raises(BackendError, match="not a protected key") as wrapping:
                serving.wrap(kek, b"data key", b"aad")
            with pytest.raises(BackendError, match="not a protected key") as macing:
                serving.mac(tag, MESSAGE, HashName.SHA256)
            assert wrapping.value.status == macing.value.status == 502
    finally:
        restarted.close()
    assert "not the key that was adopted" in caplog.text
    assert made_before == hmac.new(b"A" * 32, MESSAGE, "sha256").digest()  # the first key's


class _FailingToken:
    """An AES key object on a token that fails: every decryption raises `error`."""

    def __init__(self, error: type[Exception]) -> None:
        self.error = error

    def encrypt(self, data: bytes, **_: Any) -> bytes:
        return b"\x00" * (len(data) + 16)

    def decrypt(self, data: bytes, **_: Any) -> bytes:
        raise self.error()


@pytest.mark.parametrize("error", [pkcs11.exceptions.DeviceRemoved, pkcs11.exceptions.GeneralError])
def test_a_token_failing_during_the_check_is_no_replaced_key(error: type[Exception]) -> None:
    """The check record is judged by the key only when the token works: a token error
    (a removed device; a decryption error even on what the key has just encrypted) is
    raised as it is, for the pool to answer 503 or retry, never "replaced on the token"."""
    record = key_check_record(KeyType.AES_256_GCM, _FailingToken(error))
    with pytest.raises(error):
        check_same_key(KeyType.AES_256_GCM, _FailingToken(error), record)


_CREATE_ELSEWHERE = """
import json, sys
from kmsgate.algorithms import KeyType
from kmsgate.backends.base import KeySpec
from kmsgate.backends.pkcs11 import Pkcs11Backend
from kmsgate.config import BackendSettings

backend = Pkcs11Backend.from_config("hsm", BackendSettings(**json.loads(sys.argv[1])))
key = backend.create_key(KeySpec(sys.argv[2], 1, KeyType(sys.argv[3])))
print(json.dumps({"ref": key.ref, "pem": key.public_key_pem}))
backend.close()
"""


def created_by_another_process(token: SoftHsmToken, name: str, key_type: KeyType) -> BackendKey:
    """A key made by another process of the gateway (its own module state and login)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _CREATE_ELSEWHERE,
            json.dumps(token.backend_config()),
            name,
            key_type.value,
        ],
        env=token.hsm.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    made = json.loads(proc.stdout)
    return BackendKey(made["ref"], key_type, name, 1, None, made["pem"])


def connected_a_while_ago(backend: Any) -> None:
    """`backend` logged in more than a second ago (a gateway worker that has been running)."""
    assert signs(backend, backend.create_key(KeySpec("warm-up", 1, KeyType.ECDSA_P256)))
    time.sleep(1.1)


def test_a_key_made_by_another_process_is_found(token: SoftHsmToken, backend: Any) -> None:
    """Two worker processes: one makes a key, the other (logged in before) signs with it.
    SoftHSM shows the second the new object only after C_Initialize: the backend
    re-initialises the module and looks again rather than calling the key destroyed."""
    connected_a_while_ago(backend)
    key = created_by_another_process(token, "elsewhere", KeyType.ECDSA_P256)
    # the store of this process misses the other's object once this process writes too
    assert signs(backend, backend.create_key(KeySpec("here", 1, KeyType.ECDSA_P256)))
    assert signs(backend, key)


def test_destroying_a_key_made_by_another_process_destroys_its_objects(
    token: SoftHsmToken, backend: Any
) -> None:
    """The jobs leader destroys a key another worker made: the objects it does not see at
    first are looked for again after re-initialising, and destroyed (not taken as gone)."""
    connected_a_while_ago(backend)
    key = created_by_another_process(token, "doomed-elsewhere", KeyType.ECDSA_P256)
    assert signs(backend, backend.create_key(KeySpec("here-too", 1, KeyType.ECDSA_P256)))
    backend.destroy(key)
    labels = [found.get("label") for found in token.list_objects()]
    assert "doomed-elsewhere.v1" not in labels and "here-too.v1" in labels
    backend.destroy(key)  # idempotent


def test_a_key_object_deleted_behind_the_gateway_is_looked_for_again_once(
    backend: Any,
) -> None:
    """A key whose private key was deleted from the token (someone with the PIN): the first
    use re-initialises the module to look again, then answers 409 key_destroyed; later uses
    answer at once, without re-initialising the module (which ends the sessions of every
    backend on it) each second a client asks."""
    key = backend.create_key(KeySpec("deleted-behind", 1, KeyType.ECDSA_P256))
    label = f"{key.name}.v{key.version}"

    def delete(session: Any) -> None:
        try:
            for obj in session.get_objects(
                {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}
            ):
                obj.destroy()
        finally:
            session.close()

    on_token(backend, delete)
    module = backend._pool._module
    time.sleep(1.2)  # past the once-a-second bound on re-initialising
    before = module.generation
    with pytest.raises(KeyDestroyed):
        backend.sign(key, MESSAGE, ECDSA, prehashed=False)
    looked_again = module.generation
    assert looked_again > before  # looked again after re-initialising
    time.sleep(1.2)
    for _ in range(3):
        with pytest.raises(KeyDestroyed):
            backend.sign(key, MESSAGE, ECDSA, prehashed=False)
    assert module.generation == looked_again


def test_a_key_adopted_from_a_public_object_is_refused_by_name_until_copied_private(
    backend: Any, token: SoftHsmToken
) -> None:
    """A secret key adopted before only private keys were (pkcs11-tool --keygen without
    --private): 502 saying the object is public, not "destroyed"; once copied as a private
    object and the public one deleted (the documented migration), it works again."""
    label = "old-public-aes"

    def make_public(session: Any) -> None:
        try:
            session.generate_key(
                P11KeyType.AES, 256, label=label, id=b"\xa9", store=True,
                template={Attribute.PRIVATE: False, Attribute.SENSITIVE: True,
                          Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: True,
                          Attribute.DECRYPT: True},
            )  # fmt: skip
        finally:
            session.close()

    def migrate(session: Any) -> None:
        try:
            (public,) = session.get_objects({Attribute.LABEL: label})
            public.copy({Attribute.PRIVATE: True})
            public.destroy()
        finally:
            session.close()

    on_token(backend, make_public)
    ref = f"pkcs11:token={token.label};object={label};id=%A9;type=secret-key"
    key = BackendKey(ref, KeyType.AES_256_GCM, "old", 1, None, None)
    with pytest.raises(BackendError, match=r"is public \(CKA_PRIVATE false\)"):
        backend.wrap(key, MESSAGE, b"aad")
    on_token(backend, migrate)
    assert backend.unwrap(key, backend.wrap(key, MESSAGE, b"aad"), b"aad") == MESSAGE
