"""How kmsgate key types live on a token: key kinds, mechanisms and templates, the inputs of
each signature scheme and the encoding of its output, public keys read back from the token,
and stored key references."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import MGF, Attribute, Mechanism, ObjectClass
from pkcs11 import KeyType as P11KeyType
from pkcs11 import exceptions as p11e

from kmsgate.algorithms import HashName, KeyType, Scheme, SignAlg, sign_algorithm
from kmsgate.backends.base import BackendKey
from kmsgate.errors import BackendError, InvalidRequest
from kmsgate.uri import Pkcs11Uri


@dataclass(frozen=True, slots=True)
class _Kind:
    """How one kmsgate key type lives on a token."""

    p11_type: P11KeyType
    object_class: ObjectClass
    bits: int | None
    """RSA modulus or secret key length in bits."""
    curve: str | None
    """Named curve (EC) or OID (Edwards) of CKA_EC_PARAMS."""
    mechanisms: frozenset[Mechanism]
    """What the token must offer to create and use such a key."""

    @property
    def uri_type(self) -> str:
        return "private" if self.object_class == ObjectClass.PRIVATE_KEY else "secret-key"


_PRIVATE, _SECRET = ObjectClass.PRIVATE_KEY, ObjectClass.SECRET_KEY
_EC_GEN = {Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA}
_RSA_GEN = {Mechanism.RSA_PKCS_KEY_PAIR_GEN, Mechanism.RSA_PKCS_PSS, Mechanism.RSA_PKCS}
_KINDS: dict[KeyType, _Kind] = {
    KeyType.ED25519: _Kind(
        P11KeyType.EC_EDWARDS,
        _PRIVATE,
        None,
        "1.3.101.112",
        frozenset({Mechanism.EC_EDWARDS_KEY_PAIR_GEN, Mechanism.EDDSA}),
    ),
    KeyType.ECDSA_P256: _Kind(P11KeyType.EC, _PRIVATE, None, "secp256r1", frozenset(_EC_GEN)),
    KeyType.ECDSA_P384: _Kind(P11KeyType.EC, _PRIVATE, None, "secp384r1", frozenset(_EC_GEN)),
    KeyType.RSA_3072: _Kind(P11KeyType.RSA, _PRIVATE, 3072, None, frozenset(_RSA_GEN)),
    KeyType.RSA_4096: _Kind(P11KeyType.RSA, _PRIVATE, 4096, None, frozenset(_RSA_GEN)),
    KeyType.HMAC_SHA256: _Kind(
        P11KeyType.GENERIC_SECRET,
        _SECRET,
        256,
        None,
        frozenset({Mechanism.GENERIC_SECRET_KEY_GEN, Mechanism.SHA256_HMAC}),
    ),
    KeyType.HMAC_SHA384: _Kind(
        P11KeyType.GENERIC_SECRET,
        _SECRET,
        384,
        None,
        frozenset({Mechanism.GENERIC_SECRET_KEY_GEN, Mechanism.SHA384_HMAC}),
    ),
    KeyType.HMAC_SHA512: _Kind(
        P11KeyType.GENERIC_SECRET,
        _SECRET,
        512,
        None,
        frozenset({Mechanism.GENERIC_SECRET_KEY_GEN, Mechanism.SHA512_HMAC}),
    ),
    KeyType.AES_256_GCM: _Kind(
        P11KeyType.AES,
        _SECRET,
        256,
        None,
        frozenset({Mechanism.AES_KEY_GEN, Mechanism.AES_GCM}),
    ),
}
_HMAC_KEY_TYPES = frozenset(
    {
        P11KeyType.GENERIC_SECRET,
        P11KeyType.SHA256_HMAC,
        P11KeyType.SHA384_HMAC,
        P11KeyType.SHA512_HMAC,
    }
)
_HMAC_MECHANISMS = {
    HashName.SHA256: Mechanism.SHA256_HMAC,
    HashName.SHA384: Mechanism.SHA384_HMAC,
    HashName.SHA512: Mechanism.SHA512_HMAC,
}
_PSS_HASHES = {
    HashName.SHA256: (Mechanism.SHA256, MGF.SHA256),
    HashName.SHA384: (Mechanism.SHA384, MGF.SHA384),
    HashName.SHA512: (Mechanism.SHA512, MGF.SHA512),
}
# DER DigestInfo prefixes of RFC 8017 section 9.2, note 1.
_DIGEST_INFO = {
    HashName.SHA256: bytes.fromhex("3031300d060960864801650304020105000420"),
    HashName.SHA384: bytes.fromhex("3041300d060960864801650304020205000430"),
    HashName.SHA512: bytes.fromhex("3051300d060960864801650304020305000440"),
}
_EC_CURVES: dict[KeyType, tuple[ec.EllipticCurve, int]] = {
    KeyType.ECDSA_P256: (ec.SECP256R1(), 32),
    KeyType.ECDSA_P384: (ec.SECP384R1(), 48),
}
# CKA_EC_PARAMS of Ed25519: the OID 1.3.101.112 or the PrintableString "edwards25519".
_ED25519_PARAMS = (bytes.fromhex("06032b6570"), b"\x13\x0cedwards25519")


@dataclass(frozen=True, slots=True)
class _SignInput:
    """What to hand the token for one signature, and how to encode its answer."""

    mechanism: Mechanism
    param: Any
    payload: bytes
    ec_size: int = 0
    """Bytes of r (and of s) for ECDSA; 0 for other schemes."""

    def finish(self, raw: bytes) -> bytes:
        """The signature in kmsgate's encoding (ECDSA: DER). Raises BackendError."""
        if not self.ec_size:
            return raw
        if len(raw) != 2 * self.ec_size:
            raise BackendError("the token returned a malformed ECDSA signature")
        r = int.from_bytes(raw[: self.ec_size], "big")
        s = int.from_bytes(raw[self.ec_size :], "big")
        return encode_dss_signature(r, s)


def _sign_input(key_type: KeyType, alg: SignAlg, data: bytes, prehashed: bool) -> _SignInput:
    """Raises InvalidRequest if `alg` does not fit the key or the digest is malformed."""
    alg = sign_algorithm(key_type, alg.name)
    if alg.scheme is Scheme.ED25519:
        if prehashed:
            raise InvalidRequest("ed25519 signs whole messages; send 'input', not 'digest'")
        return _SignInput(Mechanism.EDDSA, None, data)
    assert alg.hash is not None
    if prehashed:
        if len(data) != alg.hash.digest_size:
            raise InvalidRequest(f"digest for {alg.name} must be {alg.hash.digest_size} bytes")
        digest = data
    else:
        digest = hashlib.new(alg.hash.value, data).digest()
    if alg.scheme is Scheme.ECDSA:
        # CKM_ECDSA signs the digest as given (truncated to the order's length if longer)
        return _SignInput(Mechanism.ECDSA, None, digest, _EC_CURVES[key_type][1])
    if alg.scheme is Scheme.RSA_PSS:
        mech, mgf = _PSS_HASHES[alg.hash]
        return _SignInput(Mechanism.RSA_PKCS_PSS, (mech, mgf, alg.hash.digest_size), digest)
    return _SignInput(Mechanism.RSA_PKCS, None, _DIGEST_INFO[alg.hash] + digest)


def _unwrap_point(value: bytes, size: int) -> bytes:
    """A CKA_EC_POINT as the raw point of `size` bytes: DER OCTET STRING or raw."""
    if len(value) == size:
        return value
    if len(value) >= 2 and value[0] == 0x04:
        length, offset = value[1], 2
        if length & 0x80:
            count = length & 0x7F
            length, offset = int.from_bytes(value[2 : 2 + count], "big"), 2 + count
        if length == size and len(value) == offset + size:
            return value[offset:]
    raise BackendError("the token returned a malformed EC point")


def _public_key(key_type: KeyType, public: Any, private: Any) -> PublicKeyTypes:
    """The public key of a pair, from the public object (or, for RSA, the private one).
    Raises BackendError (and python-pkcs11 errors)."""
    if key_type in (KeyType.RSA_3072, KeyType.RSA_4096):
        source = public if public is not None else private
        n = int.from_bytes(source[Attribute.MODULUS], "big")
        e = int.from_bytes(source[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    if public is None:
        raise BackendError("no public key object")
    if key_type is KeyType.ED25519:
        return ed25519.Ed25519PublicKey.from_public_bytes(
            _unwrap_point(public[Attribute.EC_POINT], 32)
        )
    curve, size = _EC_CURVES[key_type]
    point = _unwrap_point(public[Attribute.EC_POINT], 1 + 2 * size)
    return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)


def _pem(public: PublicKeyTypes) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@lru_cache(maxsize=4096)
def _parse_ref(ref: str) -> Pkcs11Uri:
    """A stored key reference. Raises BackendError (the catalogue holds something odd)."""
    try:
        return Pkcs11Uri.parse_key_reference(ref)
    except InvalidRequest as exc:
        raise BackendError(f"malformed pkcs11 key reference: {exc.detail}") from None


def _generated(key: BackendKey) -> bool:
    """Whether kmsgate generated `key`'s objects: they carry the label it gives them,
    `<name>.v<version>` (an adopted key keeps the label its ceremony gave it). Raises
    BackendError (a malformed reference)."""
    return _parse_ref(key.ref).object == f"{key.name}.v{key.version}"


def _key_template(key: BackendKey) -> dict[Attribute, Any]:
    """What `key`'s private or secret key object matches: its class, label and id, and
    CKA_PRIVATE (kmsgate makes its keys private and adopts only private ones; anyone may add
    a public object to a token, no PIN needed). Raises BackendError (a malformed
    reference)."""
    return {
        Attribute.CLASS: _KINDS[key.key_type].object_class,
        Attribute.PRIVATE: True,
        **_selector(_parse_ref(key.ref)),
    }


def _selector(parsed: Pkcs11Uri) -> dict[Attribute, Any]:
    """The CKA_ID and CKA_LABEL a key reference names its objects by."""
    template: dict[Attribute, Any] = {}
    if parsed.id is not None:
        template[Attribute.ID] = parsed.id
    if parsed.object is not None:
        template[Attribute.LABEL] = parsed.object
    return template


def _attr(obj: Any, attribute: Attribute) -> Any:
    """An attribute's value, or None if the object does not have or show it."""
    try:
        return obj[attribute]
    except (p11e.AttributeTypeInvalid, p11e.AttributeSensitive):
        return None


def _secret_template(key_type: KeyType) -> dict[Attribute, Any]:
    aes = key_type is KeyType.AES_256_GCM
    return {
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.ENCRYPT: aes,
        Attribute.DECRYPT: aes,
        Attribute.SIGN: not aes,
        Attribute.VERIFY: not aes,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }
