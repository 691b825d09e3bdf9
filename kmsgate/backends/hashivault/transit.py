"""Transit's names and wire formats: kmsgate key types and hashes as Transit parameters, key
and mount names, `BackendKey.ref` (`_Ref`), `vault:vN:` values, the wrapped-key format and what
Transit says about a key (`_KeyInfo`)."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from kmsgate.algorithms import HashName, KeyType, Scheme, SignAlg, key_type_of_public_key
from kmsgate.errors import BackendError, InvalidRequest

# kmsgate key type -> (Transit type, extra creation parameters)
_TRANSIT_TYPES: dict[KeyType, tuple[str, dict[str, object]]] = {
    KeyType.ED25519: ("ed25519", {}),
    KeyType.ECDSA_P256: ("ecdsa-p256", {}),
    KeyType.ECDSA_P384: ("ecdsa-p384", {}),
    KeyType.RSA_3072: ("rsa-3072", {}),
    KeyType.RSA_4096: ("rsa-4096", {}),
    KeyType.AES_256_GCM: ("aes256-gcm96", {}),
    KeyType.HMAC_SHA256: ("hmac", {"key_size": 32}),
    KeyType.HMAC_SHA384: ("hmac", {"key_size": 48}),
    KeyType.HMAC_SHA512: ("hmac", {"key_size": 64}),
}
_MAC_HASH: dict[KeyType, HashName] = {
    KeyType.HMAC_SHA256: HashName.SHA256,
    KeyType.HMAC_SHA384: HashName.SHA384,
    KeyType.HMAC_SHA512: HashName.SHA512,
}
_TRANSIT_HASH: dict[HashName, str] = {
    HashName.SHA256: "sha2-256",
    HashName.SHA384: "sha2-384",
    HashName.SHA512: "sha2-512",
}
_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"  # a path segment that is never "." or ".."
_MOUNT = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})*$")
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9_])?$")
"""A kmsgate key name Transit can hold: its path parameter ends with a word character too."""
_REF = re.compile(
    rf"^hashivault:(?P<mount>{_SEGMENT}(/{_SEGMENT})*)/(?P<name>{_SEGMENT})"
    r"#(?P<version>[1-9][0-9]{0,9})$"
)
_VAULT_PREFIX = re.compile(r"^vault:v(?P<version>[1-9][0-9]{0,9}):(?P<body>.*)$", re.DOTALL)

_WRAP_FORMAT = b"\x01"
"""Wrapped form, version 1: 0x01 || Transit key version (4 bytes, big endian) || the raw
Transit ciphertext (for aes256-gcm96: 12-byte nonce || ciphertext || 16-byte tag). Binary
rather than the `vault:vN:<base64>` string, so that every byte of it is authenticated: a
flipped base64 padding bit would decode to the same ciphertext."""
_WRAP_MIN_LEN = 1 + 4 + 12 + 16
_DERIVE_CONTEXT = b"kmsgate/hashivault/wrap/v1\x00"
"""Prefix of the key-derivation context for derived Transit keys (the AAD follows), so the
context is never empty, as Transit requires."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    """Strict base64 decoding. Raises ValueError."""
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError("not base64") from exc


def _strip_prefix(value: object, version: int, what: str) -> bytes:
    """The bytes of a `vault:vN:<base64>` value, checking N. Raises BackendError."""
    match = _VAULT_PREFIX.match(value) if isinstance(value, str) else None
    if match is None:
        raise BackendError(f"the backend returned a malformed {what}")
    if int(match["version"]) != version:
        raise BackendError(f"the backend made the {what} with another key version")
    try:
        return _unb64(match["body"])
    except ValueError:
        raise BackendError(f"the backend returned a malformed {what}") from None


def _public_key_pem(key_type: KeyType, transit_value: object) -> str:
    """PEM SubjectPublicKeyInfo from Transit's `public_key` (base64 raw for Ed25519, PEM
    otherwise), checked against `key_type`. Raises BackendError."""
    try:
        if not isinstance(transit_value, str):
            raise ValueError("no public key")
        public: PublicKeyTypes
        if key_type is KeyType.ED25519:
            public = ed25519.Ed25519PublicKey.from_public_bytes(_unb64(transit_value))
        else:
            public = serialization.load_pem_public_key(transit_value.encode("ascii"))
        if key_type_of_public_key(public) is not key_type:
            raise ValueError("wrong key type")
    except (ValueError, TypeError, InvalidRequest, UnicodeEncodeError):
        raise BackendError("the backend returned an unusable public key") from None
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode("ascii")


@dataclass(frozen=True, slots=True)
class _Ref:
    mount: str
    name: str
    version: int

    def __str__(self) -> str:
        return f"hashivault:{self.mount}/{self.name}#{self.version}"

    @classmethod
    def parse(cls, ref: str) -> _Ref:
        """Raises BackendError for a reference that is not ours."""
        match = _REF.match(ref)
        if match is None:
            raise BackendError("the key reference is not a hashivault reference")
        return cls(match["mount"], match["name"], int(match["version"]))


@dataclass(frozen=True, slots=True)
class _KeyInfo:
    """What `GET <mount>/keys/<name>` says about a Transit key (never key material)."""

    transit_type: str
    derived: bool
    exportable: bool
    imported: bool
    """Its material was imported (BYOK): a copy exists outside Vault."""
    latest_version: int
    min_available_version: int
    min_decryption_version: int
    min_encryption_version: int
    public_keys: Mapping[int, object]

    @property
    def available_versions(self) -> range:
        return range(max(1, self.min_available_version), self.latest_version + 1)

    @classmethod
    def parse(cls, reply: Mapping[str, Any]) -> _KeyInfo:
        """Raises BackendError if the reply does not describe a Transit key."""
        try:
            data = reply["data"]
            keys = data.get("keys") or {}
            public_keys = {
                int(v): entry.get("public_key")
                for v, entry in keys.items()
                if isinstance(entry, Mapping)
            }
            return cls(
                transit_type=str(data["type"]),
                derived=bool(data.get("derived", False)),
                exportable=bool(data.get("exportable", False)),
                imported=bool(data.get("imported_key", False)),
                latest_version=int(data["latest_version"]),
                min_available_version=int(data.get("min_available_version") or 0),
                min_decryption_version=int(data.get("min_decryption_version") or 0),
                min_encryption_version=int(data.get("min_encryption_version") or 0),
                public_keys=public_keys,
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise BackendError("the backend returned an unexpected key description") from None


def _sign_params(alg: SignAlg, prehashed: bool) -> dict[str, object]:
    """The parameters of a Transit `sign` request for `alg` (all but input and version)."""
    if alg.scheme is Scheme.ED25519:
        return {}
    assert alg.hash is not None
    params: dict[str, object] = {
        "hash_algorithm": _TRANSIT_HASH[alg.hash],
        "prehashed": prehashed,
    }
    if alg.scheme is Scheme.ECDSA:
        params["marshaling_algorithm"] = "asn1"
    elif alg.scheme is Scheme.RSA_PSS:
        params["signature_algorithm"] = "pss"
        params["salt_length"] = str(alg.hash.digest_size)  # interoperable; Transit: max
    else:
        params["signature_algorithm"] = "pkcs1v15"
    return params


def _aead_params(info: _KeyInfo, aad: bytes) -> dict[str, object]:
    """The `associated_data` (and, for a derived key, `context`) of encrypt and decrypt."""
    params: dict[str, object] = {}
    if aad:
        params["associated_data"] = _b64(aad)
    if info.derived:
        params["context"] = _b64(_DERIVE_CONTEXT + aad)
    return params
