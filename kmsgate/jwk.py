"""JSON Web Key (RFC 7517/8037) forms of public keys, for the public JWKS endpoint."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from kmsgate.errors import InvalidRequest


def _b64url(value: bytes) -> str:
    return base64.urlsafe_b64encode(value).rstrip(b"=").decode("ascii")


def _int_b64url(value: int) -> str:
    return _b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def public_jwk(public_key: object) -> dict[str, object]:
    """The JWK members of an EC, Ed25519 or RSA public key. Raises InvalidRequest otherwise."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        numbers = public_key.public_numbers()
        size = (public_key.curve.key_size + 7) // 8
        crv, alg = {"secp256r1": ("P-256", "ES256"), "secp384r1": ("P-384", "ES384")}[
            public_key.curve.name
        ]
        return {
            "kty": "EC",
            "crv": crv,
            "alg": alg,
            "x": _b64url(numbers.x.to_bytes(size, "big")),
            "y": _b64url(numbers.y.to_bytes(size, "big")),
        }
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "x": _b64url(raw)}
    if isinstance(public_key, rsa.RSAPublicKey):
        rsa_numbers = public_key.public_numbers()
        return {
            "kty": "RSA",
            "alg": "PS256",
            "n": _int_b64url(rsa_numbers.n),
            "e": _int_b64url(rsa_numbers.e),
        }
    raise InvalidRequest("no JWK form for this key")
