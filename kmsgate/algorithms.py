"""Key types, signature and MAC algorithms, and hash tables: the one place that knows them.

A key's type fixes what it may do (`KeyUsage`); a signature algorithm must be compatible
with the key type. RSA-PSS is always MGF1 with the message hash and salt length = hash
length, signed and verified strictly.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from kmsgate.errors import InvalidRequest


class KeyUsage(enum.StrEnum):
    SIGN = "sign"
    MAC = "mac"
    ENCRYPT = "encrypt"


class KeyType(enum.StrEnum):
    ED25519 = "ed25519"
    ECDSA_P256 = "ecdsa-p256"
    ECDSA_P384 = "ecdsa-p384"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"
    HMAC_SHA256 = "hmac-sha256"
    HMAC_SHA384 = "hmac-sha384"
    HMAC_SHA512 = "hmac-sha512"
    AES_256_GCM = "aes-256-gcm"

    @property
    def usage(self) -> KeyUsage:
        if self in _MAC_HASH:
            return KeyUsage.MAC
        if self is KeyType.AES_256_GCM:
            return KeyUsage.ENCRYPT
        return KeyUsage.SIGN

    @property
    def is_asymmetric(self) -> bool:
        return self.usage is KeyUsage.SIGN


class HashName(enum.StrEnum):
    SHA256 = "sha256"
    SHA384 = "sha384"
    SHA512 = "sha512"

    def hash(self) -> hashes.HashAlgorithm:
        """A fresh cryptography hash object for this name."""
        return _HASHES[self]()

    @property
    def digest_size(self) -> int:
        return _HASHES[self].digest_size


_HASHES: dict[HashName, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    HashName.SHA256: hashes.SHA256,
    HashName.SHA384: hashes.SHA384,
    HashName.SHA512: hashes.SHA512,
}

_MAC_HASH: dict[KeyType, HashName] = {
    KeyType.HMAC_SHA256: HashName.SHA256,
    KeyType.HMAC_SHA384: HashName.SHA384,
    KeyType.HMAC_SHA512: HashName.SHA512,
}


class Scheme(enum.StrEnum):
    ED25519 = "ed25519"
    ECDSA = "ecdsa"
    RSA_PSS = "rsa-pss"
    RSA_PKCS1 = "rsa-pkcs1"


@dataclass(frozen=True, slots=True)
class SignAlg:
    """A signature algorithm: a scheme and, except for Ed25519, a hash."""

    name: str
    scheme: Scheme
    hash: HashName | None

    @property
    def prehash_allowed(self) -> bool:
        """Whether a caller may send a digest instead of the message (not for Ed25519)."""
        return self.hash is not None


SIGN_ALGORITHMS: dict[str, SignAlg] = {
    alg.name: alg
    for alg in [
        SignAlg("ed25519", Scheme.ED25519, None),
        *(SignAlg(f"ecdsa-{h}", Scheme.ECDSA, h) for h in HashName),
        *(SignAlg(f"rsa-pss-{h}", Scheme.RSA_PSS, h) for h in HashName),
        *(SignAlg(f"rsa-pkcs1-{h}", Scheme.RSA_PKCS1, h) for h in HashName),
    ]
}

_SCHEMES_FOR_TYPE: dict[KeyType, frozenset[Scheme]] = {
    KeyType.ED25519: frozenset({Scheme.ED25519}),
    KeyType.ECDSA_P256: frozenset({Scheme.ECDSA}),
    KeyType.ECDSA_P384: frozenset({Scheme.ECDSA}),
    KeyType.RSA_3072: frozenset({Scheme.RSA_PSS, Scheme.RSA_PKCS1}),
    KeyType.RSA_4096: frozenset({Scheme.RSA_PSS, Scheme.RSA_PKCS1}),
}

_DEFAULT_SIGN_ALG: dict[KeyType, str] = {
    KeyType.ED25519: "ed25519",
    KeyType.ECDSA_P256: "ecdsa-sha256",
    KeyType.ECDSA_P384: "ecdsa-sha384",
    KeyType.RSA_3072: "rsa-pss-sha256",
    KeyType.RSA_4096: "rsa-pss-sha256",
}


def parse_key_type(name: str) -> KeyType:
    """The KeyType called `name`. Raises InvalidRequest for an unknown type."""
    try:
        return KeyType(name)
    except ValueError:
        known = ", ".join(t.value for t in KeyType)
        small = re.fullmatch(r"rsa-(\d{1,5})", name)
        if small and int(small[1]) < 3072:
            raise InvalidRequest(
                f"{name}: RSA keys under 3072 bits are not made (rsa-3072 or rsa-4096)"
            ) from None
        raise InvalidRequest(f"unknown key type {name!r}; known: {known}") from None


def default_sign_algorithm(key_type: KeyType) -> str | None:
    """The signature algorithm a key type uses when the caller names none (None: cannot sign)."""
    return _DEFAULT_SIGN_ALG.get(key_type)


def sign_algorithm(key_type: KeyType, name: str | None) -> SignAlg:
    """The signature algorithm `name` (or the key type's default), checked against the type.

    Raises InvalidRequest if the key cannot sign, the algorithm is unknown, or it does not fit
    the key type.
    """
    if key_type.usage is not KeyUsage.SIGN:
        raise InvalidRequest(f"{key_type} keys cannot sign or verify signatures")
    alg = SIGN_ALGORITHMS.get(name or _DEFAULT_SIGN_ALG[key_type])
    if alg is None:
        raise InvalidRequest(f"unknown signature algorithm {name!r}")
    if alg.scheme not in _SCHEMES_FOR_TYPE[key_type]:
        raise InvalidRequest(f"algorithm {alg.name} does not fit key type {key_type}")
    return alg


def sign_algorithm_for(key_type: KeyType, scheme: Scheme, hash_name: HashName | None) -> SignAlg:
    """The signature algorithm made of `scheme` and `hash_name`, checked against the key type.

    Raises InvalidRequest if no algorithm has those parts or it does not fit the key type.
    """
    alg = next(
        (a for a in SIGN_ALGORITHMS.values() if a.scheme is scheme and a.hash is hash_name), None
    )
    if alg is None:
        with_hash = f" with {hash_name}" if hash_name is not None else " without a hash"
        raise InvalidRequest(f"no signature algorithm is {scheme}{with_hash}")
    return sign_algorithm(key_type, alg.name)


def mac_algorithm(key_type: KeyType, name: str | None) -> HashName:
    """The hash of the MAC algorithm `name` (`hmac-sha256`, ...) for a MAC key type.

    Raises InvalidRequest if the key is not a MAC key or the algorithm differs from its type.
    """
    hash_name = _MAC_HASH.get(key_type)
    if hash_name is None:
        raise InvalidRequest(f"{key_type} keys cannot compute MACs")
    if name is not None and name != key_type.value:
        raise InvalidRequest(f"algorithm {name!r} does not fit key type {key_type}")
    return hash_name


def check_digest(alg: SignAlg, digest: bytes) -> None:
    """Raises InvalidRequest if `digest` cannot be a prehashed input for `alg`."""
    if alg.hash is None:
        raise InvalidRequest(f"{alg.name} signs whole messages; send 'input', not 'digest'")
    if len(digest) != alg.hash.digest_size:
        raise InvalidRequest(
            f"digest for {alg.name} must be {alg.hash.digest_size} bytes, got {len(digest)}"
        )


def key_type_of_public_key(public_key: PublicKeyTypes) -> KeyType:
    """The KeyType matching an imported public key. Raises InvalidRequest if unsupported."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return KeyType.ED25519
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curves = {"secp256r1": KeyType.ECDSA_P256, "secp384r1": KeyType.ECDSA_P384}
        if public_key.curve.name in curves:
            return curves[public_key.curve.name]
    if isinstance(public_key, rsa.RSAPublicKey):
        sizes = {3072: KeyType.RSA_3072, 4096: KeyType.RSA_4096}
        if public_key.key_size in sizes:
            return sizes[public_key.key_size]
    raise InvalidRequest("unsupported public key: use Ed25519, P-256, P-384, RSA-3072 or RSA-4096")


# The parameter objects below are immutable: built once per algorithm, not per signature
# (a batch of a hundred ECDSA signatures otherwise builds two hundred of them).


@functools.cache
def _hash_arg(alg: SignAlg, prehashed: bool) -> hashes.HashAlgorithm | utils.Prehashed:
    assert alg.hash is not None
    return utils.Prehashed(alg.hash.hash()) if prehashed else alg.hash.hash()


@functools.cache
def _ecdsa(alg: SignAlg, prehashed: bool) -> ec.ECDSA:
    return ec.ECDSA(_hash_arg(alg, prehashed))


@functools.cache
def _rsa_padding(alg: SignAlg) -> padding.AsymmetricPadding:
    if alg.scheme is not Scheme.RSA_PSS:
        return padding.PKCS1v15()
    assert alg.hash is not None
    return padding.PSS(mgf=padding.MGF1(alg.hash.hash()), salt_length=alg.hash.digest_size)


def sign_with_private_key(
    key: PrivateKeyTypes, alg: SignAlg, data: bytes, *, prehashed: bool
) -> bytes:
    """Sign with an in-process private key: ECDSA in DER, Ed25519 raw, RSA per `alg`.

    Raises InvalidRequest if the key does not fit the algorithm.
    """
    if isinstance(key, ed25519.Ed25519PrivateKey) and alg.scheme is Scheme.ED25519:
        return key.sign(data)
    if isinstance(key, ec.EllipticCurvePrivateKey) and alg.scheme is Scheme.ECDSA:
        return key.sign(data, _ecdsa(alg, prehashed))
    if isinstance(key, rsa.RSAPrivateKey) and alg.scheme in (Scheme.RSA_PSS, Scheme.RSA_PKCS1):
        return key.sign(data, _rsa_padding(alg), _hash_arg(alg, prehashed))
    raise InvalidRequest(f"algorithm {alg.name} does not fit this key")


def verify_with_public_key(
    key: PublicKeyTypes, alg: SignAlg, data: bytes, signature: bytes, *, prehashed: bool
) -> bool:
    """True if `signature` is valid for `data` under `key` and `alg`; never raises for a bad one."""
    try:
        if isinstance(key, ed25519.Ed25519PublicKey) and alg.scheme is Scheme.ED25519:
            key.verify(signature, data)
        elif isinstance(key, ec.EllipticCurvePublicKey) and alg.scheme is Scheme.ECDSA:
            key.verify(signature, data, _ecdsa(alg, prehashed))
        elif isinstance(key, rsa.RSAPublicKey) and alg.scheme in (
            Scheme.RSA_PSS,
            Scheme.RSA_PKCS1,
        ):
            key.verify(signature, data, _rsa_padding(alg), _hash_arg(alg, prehashed))
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True
