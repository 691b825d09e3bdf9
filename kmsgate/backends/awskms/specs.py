"""kmsgate key types and algorithms in AWS KMS terms: KeySpec, KeyUsage and quota class per key
type, hash and algorithm names, the API's size limits, the reserved `kmsgate:` prefix, and the
Sign request for a message (`sign_plan`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from kmsgate.algorithms import HashName, KeyType, Scheme, SignAlg, check_digest, sign_algorithm
from kmsgate.errors import InvalidRequest

QuotaClass = Literal["symmetric", "rsa", "ecc", "control"]

# kmsgate key type -> (KeySpec, KeyUsage, quota class)
_KEY_SPECS: dict[KeyType, tuple[str, str, QuotaClass]] = {
    KeyType.ED25519: ("ECC_NIST_EDWARDS25519", "SIGN_VERIFY", "ecc"),
    KeyType.ECDSA_P256: ("ECC_NIST_P256", "SIGN_VERIFY", "ecc"),
    KeyType.ECDSA_P384: ("ECC_NIST_P384", "SIGN_VERIFY", "ecc"),
    KeyType.RSA_3072: ("RSA_3072", "SIGN_VERIFY", "rsa"),
    KeyType.RSA_4096: ("RSA_4096", "SIGN_VERIFY", "rsa"),
    KeyType.HMAC_SHA256: ("HMAC_256", "GENERATE_VERIFY_MAC", "symmetric"),
    KeyType.HMAC_SHA384: ("HMAC_384", "GENERATE_VERIFY_MAC", "symmetric"),
    KeyType.HMAC_SHA512: ("HMAC_512", "GENERATE_VERIFY_MAC", "symmetric"),
    KeyType.AES_256_GCM: ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", "symmetric"),
}
_SPEC_TYPES: dict[str, KeyType] = {spec: t for t, (spec, _, _) in _KEY_SPECS.items()}
_MAC_HASH: dict[KeyType, HashName] = {
    KeyType.HMAC_SHA256: HashName.SHA256,
    KeyType.HMAC_SHA384: HashName.SHA384,
    KeyType.HMAC_SHA512: HashName.SHA512,
}
_AWS_HASH = {HashName.SHA256: "SHA_256", HashName.SHA384: "SHA_384", HashName.SHA512: "SHA_512"}
_ECDSA_NATIVE: dict[KeyType, HashName] = {
    KeyType.ECDSA_P256: HashName.SHA256,
    KeyType.ECDSA_P384: HashName.SHA384,
}
_RAW_MAX = 4096
"""Largest Message that Sign (RAW), GenerateMac, VerifyMac and Encrypt accept."""
_CIPHERTEXT_MAX = 6144
_CONTEXT_PREFIX = "kmsgate:"


@dataclass(frozen=True, slots=True)
class SignPlan:
    """The Sign request kmsgate sends for one message: what `MessageType` and
    `SigningAlgorithm` it uses and which bytes go in `Message`."""

    message: bytes
    message_type: Literal["RAW", "DIGEST"]
    algorithm: str


def sign_plan(key_type: KeyType, alg: SignAlg, data: bytes, *, prehashed: bool) -> SignPlan:
    """The AWS KMS Sign request for `data` (a digest if `prehashed`) under `alg`.

    Raises InvalidRequest if the algorithm does not fit the key, a digest has the wrong
    length, or an Ed25519 message is outside 1-4096 bytes (AWS signs Ed25519 in RAW only).
    """
    alg = sign_algorithm(key_type, alg.name)
    if prehashed:
        check_digest(alg, data)
    if alg.scheme is Scheme.ED25519:
        if not 1 <= len(data) <= _RAW_MAX:
            raise InvalidRequest(f"AWS KMS signs Ed25519 messages of 1 to {_RAW_MAX} bytes")
        return SignPlan(data, "RAW", "ED25519_SHA_512")
    assert alg.hash is not None
    if alg.scheme is Scheme.ECDSA:
        native = _ECDSA_NATIVE[key_type]
        aws_alg = f"ECDSA_{_AWS_HASH[native]}"
        if alg.hash is native:
            if not prehashed and 1 <= len(data) <= _RAW_MAX:
                return SignPlan(data, "RAW", aws_alg)
            digest = data if prehashed else hashlib.new(alg.hash.value, data).digest()
            return SignPlan(digest, "DIGEST", aws_alg)
        # ECDSA uses the leftmost min(order bits, hash bits) bits of the hash as an integer:
        # truncating a longer digest, or zero-padding a shorter one on the left, to the
        # curve's digest size gives the same integer, hence the same signature scheme.
        digest = data if prehashed else hashlib.new(alg.hash.value, data).digest()
        size = native.digest_size
        fitted = digest[:size] if len(digest) >= size else bytes(size - len(digest)) + digest
        return SignPlan(fitted, "DIGEST", aws_alg)
    padding = "PSS" if alg.scheme is Scheme.RSA_PSS else "PKCS1_V1_5"
    aws_alg = f"RSASSA_{padding}_{_AWS_HASH[alg.hash]}"
    if not prehashed and 1 <= len(data) <= _RAW_MAX:
        return SignPlan(data, "RAW", aws_alg)
    digest = data if prehashed else hashlib.new(alg.hash.value, data).digest()
    return SignPlan(digest, "DIGEST", aws_alg)
