"""A CA's certificates as a SPIFFE trust bundle: a JWK Set whose keys each carry one
certificate (`x5c`) with `use: x509-svid`, and the bundle's `spiffe_sequence` (SPIFFE Trust
Domain and Bundle specification)."""

from __future__ import annotations

import base64
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmsgate.jwk import public_jwk

__all__ = ["spiffe_bundle"]

REFRESH_HINT_SECONDS = 300
"""How often a relying party should fetch the bundle again (`spiffe_refresh_hint`)."""


def spiffe_bundle(certificates: Sequence[x509.Certificate], sequence: int) -> dict[str, object]:
    """The bundle of `certificates` (the CA's own first). Raises InvalidRequest for a key
    type without a JWK form."""
    keys = []
    for cert in certificates:
        jwk = public_jwk(cert.public_key())
        jwk.pop("alg", None)  # an X.509 SVID authority names no JWS algorithm
        der = cert.public_bytes(serialization.Encoding.DER)
        keys.append({**jwk, "use": "x509-svid", "x5c": [base64.b64encode(der).decode()]})
    return {"keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": REFRESH_HINT_SECONDS}
