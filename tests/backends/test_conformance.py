"""Backend conformance: the KeyBackend contract (and MacCapable / WrapCapable), checked through
the interface only, against every backend in `conftest.PROFILES`; then softkms-specific checks
(sealing, root key, concurrency).

Signatures are checked twice: with `kmsgate.algorithms.verify_with_public_key` and with
`cryptography` directly, spelled out here independently of kmsgate's tables.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsgate.algorithms import (
    SIGN_ALGORITHMS,
    HashName,
    KeyType,
    verify_with_public_key,
)
from kmsgate.backends.base import BackendKey, KeyBackend, KeySpec, MacCapable, WrapCapable
from kmsgate.backends.softkms import SoftKmsBackend
from kmsgate.errors import (
    BackendError,
    DecryptionFailed,
    KeyDestroyed,
    KmsgateError,
    NotSupported,
)
from tests.backends.conftest import BackendProfile, KeyFactory

MESSAGE = b"kmsgate conformance message \x00\x01\xff" * 7

ASYMMETRIC = [
    KeyType.ED25519,
    KeyType.ECDSA_P256,
    KeyType.ECDSA_P384,
    KeyType.RSA_3072,
    KeyType.RSA_4096,
]
MAC_TYPES = {
    KeyType.HMAC_SHA256: "sha256",
    KeyType.HMAC_SHA384: "sha384",
    KeyType.HMAC_SHA512: "sha512",
}
SYMMETRIC = [*MAC_TYPES, KeyType.AES_256_GCM]
assert set(ASYMMETRIC) | set(SYMMETRIC) == set(KeyType), "a new key type needs conformance cases"

# Which algorithms each type must sign with (written out, not taken from kmsgate's table).
_HASHES = ("sha256", "sha384", "sha512")
COMPATIBLE: dict[KeyType, list[str]] = {
    KeyType.ED25519: ["ed25519"],
    KeyType.ECDSA_P256: [f"ecdsa-{h}" for h in _HASHES],
    KeyType.ECDSA_P384: [f"ecdsa-{h}" for h in _HASHES],
    KeyType.RSA_3072: [f"rsa-{p}-{h}" for p in ("pss", "pkcs1") for h in _HASHES],
    KeyType.RSA_4096: [f"rsa-{p}-{h}" for p in ("pss", "pkcs1") for h in _HASHES],
}
SIGN_CASES = [
    pytest.param(t, alg, prehashed, id=f"{t}-{alg}-{'digest' if prehashed else 'message'}")
    for t, algs in COMPATIBLE.items()
    for alg in algs
    for prehashed in ((False,) if alg == "ed25519" else (False, True))
]
INCOMPATIBLE_CASES = [
    pytest.param(t, alg, id=f"{t}-{alg}")
    for t in ASYMMETRIC
    for alg in SIGN_ALGORITHMS
    if alg not in COMPATIBLE[t]
]
# PKCS#8 PrivateKeyInfo: version 0 then the algorithm identifier (Ed25519, EC with the
# P-256 / P-384 parameters, RSA)
_PKCS8_HEADERS = [
    bytes.fromhex("020100300506032b6570"),
    bytes.fromhex("020100301306072a8648ce3d020106082a8648ce3d030107"),
    bytes.fromhex("020100301006072a8648ce3d020106052b81040022"),
    bytes.fromhex("020100300d06092a864886f70d0101010500"),
]
_CRYPTO_HASH = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


def _hash_of(alg: str) -> str:
    return alg.rsplit("-", 1)[1]


def _public_key(key: BackendKey):
    assert key.public_key_pem is not None
    return serialization.load_pem_public_key(key.public_key_pem.encode())


def _verify_directly(public, alg: str, message: bytes, signature: bytes) -> None:
    """cryptography's own verification, parameters spelled out. Raises InvalidSignature."""
    if alg == "ed25519":
        assert isinstance(public, ed25519.Ed25519PublicKey)
        public.verify(signature, message)
        return
    h = _CRYPTO_HASH[_hash_of(alg)]
    if alg.startswith("ecdsa-"):
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, message, ec.ECDSA(h()))
    elif alg.startswith("rsa-pss-"):
        assert isinstance(public, rsa.RSAPublicKey)
        pss = padding.PSS(mgf=padding.MGF1(h()), salt_length=h.digest_size)  # strict length
        public.verify(signature, message, pss, h())
    else:
        assert alg.startswith("rsa-pkcs1-") and isinstance(public, rsa.RSAPublicKey)
        public.verify(signature, message, padding.PKCS1v15(), h())


def _private_parts(private) -> list[bytes]:
    """Byte strings any of which would give the private key away."""
    der = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    if isinstance(private, ed25519.Ed25519PrivateKey):
        raw = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return [der, raw]
    if isinstance(private, ec.EllipticCurvePrivateKey):
        size = (private.curve.key_size + 7) // 8
        return [der, private.private_numbers().private_value.to_bytes(size, "big")]
    assert isinstance(private, rsa.RSAPrivateKey)
    n = private.private_numbers()
    values = (n.d, n.p, n.q, n.dmp1, n.dmq1, n.iqmp)
    return [der, *(v.to_bytes((v.bit_length() + 7) // 8, "big") for v in values)]


def _public_bytes(public) -> bytes:
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _as_mac(backend: KeyBackend) -> MacCapable:
    assert isinstance(backend, MacCapable), f"{backend.name} holds MAC keys but cannot MAC"
    return backend


def _as_wrap(backend: KeyBackend) -> WrapCapable:
    assert isinstance(backend, WrapCapable), f"{backend.name} holds AES keys but cannot wrap"
    return backend


def _use(backend: KeyBackend, key: BackendKey) -> bytes:
    """One operation fitting the key's type."""
    if key.key_type.is_asymmetric:
        alg = COMPATIBLE[key.key_type][0]
        return backend.sign(key, MESSAGE, SIGN_ALGORITHMS[alg], prehashed=False)
    if key.key_type in MAC_TYPES:
        return _as_mac(backend).mac(key, MESSAGE, HashName(MAC_TYPES[key.key_type]))
    return _as_wrap(backend).wrap(key, MESSAGE, b"aad")


# --------------------------------------------------------------------------------------------
# create_key
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", list(KeyType), ids=str)
def test_create_key(backend: KeyBackend, profile: BackendProfile, keys: KeyFactory, key_type):
    if key_type not in profile.key_types:
        with pytest.raises(NotSupported):
            backend.create_key(KeySpec("conformance-unsupported", 1, key_type))
        return
    key = keys.get(key_type)
    assert key.ref.startswith(f"{backend.scheme}:") and len(key.ref) > len(backend.scheme) + 1
    assert (key.key_type, key.version) == (key_type, 1)
    assert key.name.startswith(f"conformance-{key_type}-")
    if key_type.is_asymmetric:
        public = _public_key(key)
        expected = {
            KeyType.ED25519: (ed25519.Ed25519PublicKey, None),
            KeyType.ECDSA_P256: (ec.EllipticCurvePublicKey, "secp256r1"),
            KeyType.ECDSA_P384: (ec.EllipticCurvePublicKey, "secp384r1"),
            KeyType.RSA_3072: (rsa.RSAPublicKey, 3072),
            KeyType.RSA_4096: (rsa.RSAPublicKey, 4096),
        }[key_type]
        assert isinstance(public, expected[0])
        if isinstance(public, ec.EllipticCurvePublicKey):
            assert public.curve.name == expected[1]
        if isinstance(public, rsa.RSAPublicKey):
            assert public.key_size == expected[1]
            assert public.public_numbers().e == 65537
    else:
        assert key.public_key_pem is None


def test_create_key_makes_distinct_keys_and_refs(backend: KeyBackend, keys: KeyFactory):
    first, second = keys.fresh(KeyType.ED25519), keys.fresh(KeyType.ED25519)
    assert first.ref != second.ref
    assert first.public_key_pem != second.public_key_pem
    rotated = backend.create_key(KeySpec(first.name, 2, KeyType.ED25519))
    assert rotated.ref not in (first.ref, second.ref)
    assert rotated.version == 2


@pytest.mark.parametrize("key_type", list(KeyType), ids=str)
def test_material_never_holds_the_key_in_the_clear(
    backend: KeyBackend, profile: BackendProfile, keys: KeyFactory, key_type
):
    keys.require(key_type)
    key = keys.get(key_type)
    material = key.material or b""
    # Whatever the backend stores (sealed blob, HSM handle, KMS key id), it is not a
    # cleartext PKCS#8 private key, in DER or PEM.
    assert b"PRIVATE KEY" not in material
    for header in _PKCS8_HEADERS:
        assert header not in material
    if profile.extract is None:
        return  # keys never leave the backend: nothing more to compare against
    extracted = profile.extract(backend, key)
    assert key.material is not None
    if isinstance(extracted, bytes):
        # the extracted secret is the live key: same MAC / same ciphertext format
        if key_type in MAC_TYPES:
            digest = MAC_TYPES[key_type]
            assert hmac.digest(extracted, MESSAGE, digest) == _use(backend, key)
        else:
            wrapped = _use(backend, key)
            assert AESGCM(extracted).decrypt(wrapped[:12], wrapped[12:], b"aad") == MESSAGE
        secrets_ = [extracted]
    else:
        assert _public_bytes(extracted.public_key()) == _public_bytes(_public_key(key))
        secrets_ = _private_parts(extracted)
    for secret in secrets_:
        assert key.material != secret
        assert secret not in key.material


# --------------------------------------------------------------------------------------------
# sign
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key_type", "alg", "prehashed"), SIGN_CASES)
def test_sign_verifies(backend: KeyBackend, keys: KeyFactory, key_type, alg, prehashed):
    keys.require(key_type)
    key = keys.get(key_type)
    sign_alg = SIGN_ALGORITHMS[alg]
    data = hashlib.new(_hash_of(alg), MESSAGE).digest() if prehashed else MESSAGE
    signature = backend.sign(key, data, sign_alg, prehashed=prehashed)
    public = _public_key(key)

    assert verify_with_public_key(public, sign_alg, MESSAGE, signature, prehashed=False)
    if sign_alg.prehash_allowed:
        digest = hashlib.new(_hash_of(alg), MESSAGE).digest()
        assert verify_with_public_key(public, sign_alg, digest, signature, prehashed=True)
    _verify_directly(public, alg, MESSAGE, signature)

    # negative controls: both verifiers can say no
    assert not verify_with_public_key(public, sign_alg, MESSAGE + b"!", signature, prehashed=False)
    with pytest.raises(InvalidSignature):
        _verify_directly(public, alg, MESSAGE + b"!", signature)

    # encodings (docs/api.md): Ed25519 raw, ECDSA DER, RSA modulus-sized
    if alg == "ed25519":
        assert len(signature) == 64
    elif alg.startswith("ecdsa-"):
        r, s = decode_dss_signature(signature)
        assert 0 < r < 2**public.curve.key_size and 0 < s < 2**public.curve.key_size
    else:
        assert len(signature) == public.key_size // 8


@pytest.mark.parametrize("key_type", [t for t in ASYMMETRIC if t != KeyType.ED25519], ids=str)
def test_prehashed_signature_matches_message_signature(
    backend: KeyBackend, keys: KeyFactory, key_type
):
    """A digest signed with `prehashed=True` verifies as a signature over the message under
    cryptography's Prehashed too (the backend must not hash the digest again)."""
    keys.require(key_type)
    key = keys.get(key_type)
    alg = COMPATIBLE[key_type][0]
    h = _CRYPTO_HASH[_hash_of(alg)]
    digest = hashlib.new(_hash_of(alg), MESSAGE).digest()
    signature = backend.sign(key, digest, SIGN_ALGORITHMS[alg], prehashed=True)
    public = _public_key(key)
    if isinstance(public, ec.EllipticCurvePublicKey):
        public.verify(signature, digest, ec.ECDSA(Prehashed(h())))
    else:
        pss = padding.PSS(mgf=padding.MGF1(h()), salt_length=h.digest_size)
        public.verify(signature, digest, pss, Prehashed(h()))
    # signing the digest as if it were a message gives a signature over another message
    as_message = backend.sign(key, digest, SIGN_ALGORITHMS[alg], prehashed=False)
    with pytest.raises(InvalidSignature):
        _verify_directly(public, alg, MESSAGE, as_message)


@pytest.mark.parametrize(("key_type", "alg"), INCOMPATIBLE_CASES)
def test_sign_refuses_incompatible_algorithm(backend: KeyBackend, keys: KeyFactory, key_type, alg):
    keys.require(key_type)
    with pytest.raises(KmsgateError):
        backend.sign(keys.get(key_type), MESSAGE, SIGN_ALGORITHMS[alg], prehashed=False)


@pytest.mark.parametrize("key_type", SYMMETRIC, ids=str)
def test_sign_refuses_symmetric_keys(backend: KeyBackend, keys: KeyFactory, key_type):
    keys.require(key_type)
    for alg in ("ed25519", "ecdsa-sha256", "rsa-pss-sha256"):
        with pytest.raises(KmsgateError):
            backend.sign(keys.get(key_type), MESSAGE, SIGN_ALGORITHMS[alg], prehashed=False)


# --------------------------------------------------------------------------------------------
# MacCapable
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", list(MAC_TYPES), ids=str)
def test_mac_and_verify_mac(backend: KeyBackend, keys: KeyFactory, key_type):
    keys.require(key_type)
    macs = _as_mac(backend)
    key = keys.get(key_type)
    hash_name = HashName(MAC_TYPES[key_type])
    tag = macs.mac(key, MESSAGE, hash_name)
    assert len(tag) == hashlib.new(MAC_TYPES[key_type]).digest_size
    assert macs.mac(key, MESSAGE, hash_name) == tag  # deterministic
    assert macs.mac(key, MESSAGE + b"!", hash_name) != tag
    assert macs.mac(keys.fresh(key_type), MESSAGE, hash_name) != tag  # keyed

    assert macs.verify_mac(key, MESSAGE, tag, hash_name) is True
    wrong = {
        "wrong data": (MESSAGE + b"!", tag),
        "first bit flipped": (MESSAGE, bytes([tag[0] ^ 0x80]) + tag[1:]),
        "last bit flipped": (MESSAGE, tag[:-1] + bytes([tag[-1] ^ 0x01])),
        "truncated by one byte": (MESSAGE, tag[:-1]),
        "truncated to half": (MESSAGE, tag[: len(tag) // 2]),
        "truncated to 128 bits": (MESSAGE, tag[:16]),
        "extended by a zero byte": (MESSAGE, tag + b"\x00"),
        "doubled": (MESSAGE, tag + tag),
        "empty": (MESSAGE, b""),
    }
    for what, (data, candidate) in wrong.items():
        assert macs.verify_mac(key, data, candidate, hash_name) is False, what


def test_mac_of_empty_input(backend: KeyBackend, keys: KeyFactory):
    keys.require(KeyType.HMAC_SHA256)
    macs = _as_mac(backend)
    key = keys.get(KeyType.HMAC_SHA256)
    tag = macs.mac(key, b"", HashName.SHA256)
    assert len(tag) == 32
    assert macs.verify_mac(key, b"", tag, HashName.SHA256)


@pytest.mark.parametrize("key_type", [*ASYMMETRIC, KeyType.AES_256_GCM], ids=str)
def test_mac_refused_for_non_mac_keys(backend: KeyBackend, keys: KeyFactory, key_type):
    """Usage is bound to type (DESIGN.md §4): a key that is not a MAC key never MACs, even
    when the backend is called directly (defence in depth below the service's check)."""
    keys.require(key_type)
    if not isinstance(backend, MacCapable):
        return
    key = keys.get(key_type)
    with pytest.raises(KmsgateError):
        backend.mac(key, MESSAGE, HashName.SHA256)
    with pytest.raises(KmsgateError):
        backend.verify_mac(key, MESSAGE, b"\x00" * 32, HashName.SHA256)


# --------------------------------------------------------------------------------------------
# WrapCapable
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 16, 32, 1000])
def test_wrap_round_trip(backend: KeyBackend, keys: KeyFactory, size):
    keys.require(KeyType.AES_256_GCM)
    wraps = _as_wrap(backend)
    key = keys.get(KeyType.AES_256_GCM)
    plaintext = secrets.token_bytes(size)
    for aad in (b"", b"context=a", secrets.token_bytes(300)):
        wrapped = wraps.wrap(key, plaintext, aad)
        if size >= 16:
            assert plaintext not in wrapped
        assert wraps.unwrap(key, wrapped, aad) == plaintext
        assert wraps.wrap(key, plaintext, aad) != wrapped  # fresh nonce every time


def test_unwrap_rejects_wrong_aad(backend: KeyBackend, keys: KeyFactory):
    keys.require(KeyType.AES_256_GCM)
    wraps = _as_wrap(backend)
    key = keys.get(KeyType.AES_256_GCM)
    wrapped = wraps.wrap(key, b"data key material", b"tenant=a")
    for aad in (b"tenant=b", b"", b"tenant=a\x00", b"tenant=A"):
        with pytest.raises(DecryptionFailed):
            wraps.unwrap(key, wrapped, aad)
    unbound = wraps.wrap(key, b"data key material", b"")
    with pytest.raises(DecryptionFailed):
        wraps.unwrap(key, unbound, b"tenant=a")


def test_unwrap_rejects_every_flipped_byte(backend: KeyBackend, keys: KeyFactory):
    keys.require(KeyType.AES_256_GCM)
    wraps = _as_wrap(backend)
    key = keys.get(KeyType.AES_256_GCM)
    wrapped = wraps.wrap(key, secrets.token_bytes(32), b"aad")
    for i in range(len(wrapped)):
        flipped = wrapped[:i] + bytes([wrapped[i] ^ 0x01]) + wrapped[i + 1 :]
        with pytest.raises(DecryptionFailed):
            wraps.unwrap(key, flipped, b"aad")


def test_unwrap_rejects_truncated_and_extended(backend: KeyBackend, keys: KeyFactory):
    keys.require(KeyType.AES_256_GCM)
    wraps = _as_wrap(backend)
    key = keys.get(KeyType.AES_256_GCM)
    wrapped = wraps.wrap(key, secrets.token_bytes(32), b"aad")
    for candidate in (b"", wrapped[:5], wrapped[:11], wrapped[:12], wrapped[:-1], wrapped[:28]):
        with pytest.raises(DecryptionFailed):
            wraps.unwrap(key, candidate, b"aad")
    with pytest.raises(DecryptionFailed):
        wraps.unwrap(key, wrapped + b"\x00", b"aad")


def test_unwrap_under_another_key_fails(backend: KeyBackend, keys: KeyFactory):
    keys.require(KeyType.AES_256_GCM)
    wraps = _as_wrap(backend)
    wrapped = wraps.wrap(keys.get(KeyType.AES_256_GCM), b"secret", b"")
    with pytest.raises(DecryptionFailed):
        wraps.unwrap(keys.fresh(KeyType.AES_256_GCM), wrapped, b"")


@pytest.mark.parametrize("key_type", [*ASYMMETRIC, *MAC_TYPES], ids=str)
def test_wrap_refused_for_non_aes_keys(backend: KeyBackend, keys: KeyFactory, key_type):
    """Usage is bound to type (DESIGN.md §4): only an aes-256-gcm key wraps."""
    keys.require(key_type)
    if not isinstance(backend, WrapCapable):
        return
    key = keys.get(key_type)
    with pytest.raises(KmsgateError):
        backend.wrap(key, b"data key", b"")
    with pytest.raises(KmsgateError):
        backend.unwrap(key, b"\x00" * 60, b"")


# --------------------------------------------------------------------------------------------
# readiness
# --------------------------------------------------------------------------------------------


def test_status_of_a_running_backend_is_ok_in_one_form(backend: KeyBackend):
    """/v1/sys/ready reports each backend under its name: the detail is `ok`, or `ok (...)`
    with what it is connected to, and never repeats the backend's name."""
    status = backend.status()
    assert status.ok, status.detail
    assert status.detail == "ok" or status.detail.startswith("ok ("), status.detail
    assert repr(backend.name) not in status.detail


# --------------------------------------------------------------------------------------------
# destroy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", list(KeyType), ids=str)
def test_destroy_makes_the_cached_key_unusable(backend: KeyBackend, keys: KeyFactory, key_type):
    """Once destroyed, and once the catalogue dropped the material (service._destroy), the
    key is unusable even though the backend had it loaded."""
    key = keys.fresh(key_type)
    _use(backend, key)  # loaded (and cached) now
    backend.destroy(key)
    gone = replace(key, material=None)
    with pytest.raises(KeyDestroyed) as caught:  # 409 key_destroyed, whatever the backend
        _use(backend, gone)
    assert (caught.value.status, caught.value.code) == (409, "key_destroyed")


def test_destroy_leaves_other_keys_usable(backend: KeyBackend, keys: KeyFactory):
    keys.require(KeyType.ECDSA_P256)
    doomed, kept = keys.fresh(KeyType.ECDSA_P256), keys.fresh(KeyType.ECDSA_P256)
    backend.destroy(doomed)
    signature = _use(backend, kept)
    _verify_directly(_public_key(kept), "ecdsa-sha256", MESSAGE, signature)


# --------------------------------------------------------------------------------------------
# softkms only: sealing, root key, concurrency
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root_key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def softkms(root_key: bytes) -> SoftKmsBackend:
    """A fresh instance (empty cache) over the module's root key."""
    return SoftKmsBackend("softkms-test", root_key)


@pytest.fixture(scope="module")
def sealed_keys(root_key: bytes) -> dict[KeyType, BackendKey]:
    """Keys created by another instance over the same root key: loading them in `softkms`
    goes through unseal (no cached copy)."""
    creator = SoftKmsBackend("softkms-creator", root_key)
    types = [
        KeyType.ED25519,
        KeyType.ECDSA_P256,
        KeyType.RSA_3072,
        KeyType.HMAC_SHA256,
        KeyType.AES_256_GCM,
    ]
    return {t: creator.create_key(KeySpec(f"sealed-{t}", 3, t)) for t in types}


def _rebind(key: BackendKey, name: str, version: int) -> BackendKey:
    """`key`'s material presented as another key version (new ref: softkms caches by ref)."""
    return replace(key, name=name, version=version, ref=f"softkms:{name}/{version}")


def test_softkms_loads_sealed_material(softkms: SoftKmsBackend, sealed_keys):
    for key in sealed_keys.values():
        _use(softkms, key)
    signature = _use(softkms, sealed_keys[KeyType.ED25519])
    _verify_directly(_public_key(sealed_keys[KeyType.ED25519]), "ed25519", MESSAGE, signature)


@pytest.mark.parametrize(
    ("name_suffix", "version"),
    [("", 2), ("", 4), ("", 30), ("x", 3), ("-other", 3)],
    ids=["version-2", "version-4", "version-30", "name+x", "other-name"],
)
def test_softkms_material_is_bound_to_name_and_version(
    softkms: SoftKmsBackend, sealed_keys, name_suffix, version
):
    for key in sealed_keys.values():
        assert key.material is not None
        softkms.unseal(key.material, key.name, key.version)  # the right binding works
        with pytest.raises(BackendError):
            softkms.unseal(key.material, key.name + name_suffix, version)
        with pytest.raises(BackendError):
            _use(softkms, _rebind(key, key.name + name_suffix, version))


def test_softkms_material_of_one_key_does_not_serve_another(softkms: SoftKmsBackend, sealed_keys):
    ed, ec_key = sealed_keys[KeyType.ED25519], sealed_keys[KeyType.ECDSA_P256]
    swapped = replace(ed, material=ec_key.material, ref="softkms:swapped/3")
    with pytest.raises(BackendError):
        _use(softkms, swapped)


def test_softkms_other_root_key_cannot_unseal(sealed_keys):
    other = SoftKmsBackend("softkms-other-root", secrets.token_bytes(32))
    for key in sealed_keys.values():
        assert key.material is not None
        with pytest.raises(BackendError):
            other.unseal(key.material, key.name, key.version)
        with pytest.raises(BackendError):
            _use(other, key)


def test_softkms_altered_material_is_rejected(softkms: SoftKmsBackend, sealed_keys):
    key = sealed_keys[KeyType.HMAC_SHA256]
    material = key.material
    assert material is not None
    for i in range(len(material)):
        altered = material[:i] + bytes([material[i] ^ 0x01]) + material[i + 1 :]
        with pytest.raises(BackendError):
            softkms.unseal(altered, key.name, key.version)
    with pytest.raises(BackendError):
        softkms.unseal(material + b"\x00", key.name, key.version)


@pytest.mark.parametrize("length", [0, 1, 5, 12, 13, 28])
def test_softkms_truncated_material_is_a_backend_error(
    softkms: SoftKmsBackend, sealed_keys, length
):
    """`unseal` documents BackendError for altered blobs; a truncated one (a damaged store
    row) must not escape as a raw ValueError (an HTTP 500 instead of 502 backend_error)."""
    key = sealed_keys[KeyType.HMAC_SHA256]
    assert key.material is not None
    with pytest.raises(BackendError):
        softkms.unseal(key.material[:length], key.name, key.version)
    with pytest.raises(BackendError):
        _use(softkms, replace(key, material=key.material[:length], ref=f"softkms:t{length}/3"))


def test_softkms_seal_is_randomised(softkms: SoftKmsBackend):
    secret = secrets.token_bytes(32)
    first, second = softkms.seal(secret, "k", 1), softkms.seal(secret, "k", 1)
    assert first != second
    assert softkms.unseal(first, "k", 1) == softkms.unseal(second, "k", 1) == secret


def test_softkms_100_threads_sign_concurrently(softkms: SoftKmsBackend, sealed_keys, monkeypatch):
    """100 threads start together on a cold cache: every signature is valid, and each key's
    material is unsealed once (DESIGN.md §10: load private keys once)."""
    unsealed: list[str] = []
    real_unseal = softkms.unseal

    def counting_unseal(sealed: bytes, name: str, version: int) -> bytes:
        unsealed.append(name)
        return real_unseal(sealed, name, version)

    monkeypatch.setattr(softkms, "unseal", counting_unseal)
    plan = [KeyType.ED25519, KeyType.ECDSA_P256, KeyType.RSA_3072, KeyType.ED25519]
    threads = 100
    barrier = threading.Barrier(threads)

    def work(i: int) -> tuple[KeyType, bytes, bytes]:
        key_type = plan[i % len(plan)]
        message = f"message {i}".encode()
        alg = SIGN_ALGORITHMS[COMPATIBLE[key_type][0]]
        barrier.wait(timeout=30)
        return key_type, message, softkms.sign(sealed_keys[key_type], message, alg, prehashed=False)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(work, range(threads)))

    assert len(results) == threads
    for key_type, message, signature in results:
        key = sealed_keys[key_type]
        _verify_directly(_public_key(key), COMPATIBLE[key_type][0], message, signature)
    assert sorted(unsealed) == sorted({sealed_keys[t].name for t in plan})
