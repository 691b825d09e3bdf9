"""In-toto Statement v1, DSSE envelopes and Sigstore bundles (v0.3, public-key hint).

- in-toto Statement v1: `{_type, subject, predicateType, predicate}`
  (github.com/in-toto/attestation/blob/main/spec/v1/statement.md).
- DSSE v1: the signature is over `PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP
  LEN(body) SP body` (lengths in ASCII decimal); the envelope carries base64 `payload`,
  `payloadType` and `signatures[{keyid, sig}]` (github.com/secure-systems-lab/dsse).
- Sigstore bundle v0.3 (`application/vnd.dev.sigstore.bundle.v0.3+json`) with
  `verificationMaterial.publicKey.hint`, no transparency-log entries and a `dsseEnvelope`.
  As model_signing does, the hint is the hex SHA-256 of the signer's public key in PEM
  SubjectPublicKeyInfo form (as `cryptography` writes it), not of its DER.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from kmsgate.model_signing.manifest import FileDigest, Manifest

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
MODEL_PREDICATE_TYPE = "https://model_signing/signature/v1.0"


class BundleError(Exception):
    """A bundle or statement that is malformed or not of the expected kind."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def canonical_pem(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_hint(public_key: PublicKeyTypes) -> str:
    """The bundle's public-key hint: hex SHA-256 of the PEM SPKI bytes."""
    return hashlib.sha256(canonical_pem(public_key)).hexdigest()


def load_public_key(pem: bytes | str) -> PublicKeyTypes:
    """Raises BundleError if `pem` is not a PEM public key."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise BundleError(f"not a PEM public key: {exc}") from None


def model_statement(manifest: Manifest) -> dict[str, Any]:
    """model_signing's v1.0 statement: one subject (model name, root digest), every file in
    `predicate.resources`, the serialization parameters in `predicate.serialization`."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [
            {"name": manifest.model_name, "digest": {"sha256": manifest.root_digest().hex()}}
        ],
        "predicateType": MODEL_PREDICATE_TYPE,
        "predicate": {
            "serialization": manifest.serialization(),
            "resources": [
                {"name": f.name, "algorithm": manifest.hash_type, "digest": f.digest.hex()}
                for f in manifest.files
            ],
        },
    }


def manifest_from_statement(statement: dict[str, Any]) -> Manifest:
    """The manifest a model statement describes, after checking that its subject digest is
    the digest over its resources in order. Raises BundleError."""
    try:
        if statement["_type"] != STATEMENT_TYPE:
            raise BundleError(f"not an in-toto Statement v1: {statement['_type']!r}")
        if statement["predicateType"] != MODEL_PREDICATE_TYPE:
            raise BundleError(f"unsupported predicate type {statement['predicateType']!r}")
        (subject,) = statement["subject"]
        serialization_ = statement["predicate"]["serialization"]
        if serialization_["method"] != "files" or serialization_["hash_type"] != "sha256":
            raise BundleError(
                "only the sha256 'files' serialization is supported, got "
                f"{serialization_['method']}/{serialization_['hash_type']}"
            )
        files = []
        h = hashlib.sha256()
        for r in statement["predicate"]["resources"]:
            if r["algorithm"] != "sha256":
                raise BundleError(f"unsupported resource algorithm {r['algorithm']!r}")
            digest = bytes.fromhex(r["digest"])
            h.update(digest)
            files.append(FileDigest.of(str(r["name"]), digest))
        if h.hexdigest() != subject["digest"]["sha256"]:
            raise BundleError("the statement's subject digest does not match its resources")
        return Manifest(
            str(subject["name"]),
            tuple(files),
            tuple(str(p) for p in serialization_.get("ignore_paths", ())),
            bool(serialization_["allow_symlinks"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"malformed model statement: {exc!r}") from None


def statement_bytes(statement: dict[str, Any]) -> bytes:
    return json.dumps(statement, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class SignedBundle:
    """A Sigstore bundle holding one DSSE envelope with one signature."""

    payload: bytes
    payload_type: str
    signature: bytes
    keyid: str
    hint: str | None

    def pae(self) -> bytes:
        return pae(self.payload_type, self.payload)

    def statement(self) -> dict[str, Any]:
        """The payload as an in-toto statement. Raises BundleError."""
        if self.payload_type != INTOTO_PAYLOAD_TYPE:
            raise BundleError(f"unexpected DSSE payload type {self.payload_type!r}")
        try:
            doc = json.loads(self.payload)
        except ValueError as exc:
            raise BundleError(f"DSSE payload is not JSON: {exc}") from None
        except RecursionError:
            raise BundleError("DSSE payload is nested too deeply") from None
        if not isinstance(doc, dict) or doc.get("_type") != STATEMENT_TYPE:
            raise BundleError("DSSE payload is not an in-toto Statement v1")
        return doc

    def to_json(self) -> bytes:
        material: dict[str, Any] = {"publicKey": {"hint": self.hint or ""}, "tlogEntries": []}
        doc = {
            "mediaType": BUNDLE_MEDIA_TYPE,
            "verificationMaterial": material,
            "dsseEnvelope": {
                "payload": base64.b64encode(self.payload).decode(),
                "payloadType": self.payload_type,
                "signatures": [
                    {"sig": base64.b64encode(self.signature).decode(), "keyid": self.keyid}
                ],
            },
        }
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> SignedBundle:
        """Parse a bundle. Raises BundleError for anything but a v0.3 DSSE bundle with
        exactly one signature."""
        try:
            doc = json.loads(data)
            if doc["mediaType"] != BUNDLE_MEDIA_TYPE:
                raise BundleError(f"unsupported bundle media type {doc['mediaType']!r}")
            env = doc["dsseEnvelope"]
            signatures = env["signatures"]
            if len(signatures) != 1:
                raise BundleError(f"expected one DSSE signature, found {len(signatures)}")
            hint = doc["verificationMaterial"].get("publicKey", {}).get("hint") or None
            return cls(
                payload=base64.b64decode(env["payload"], validate=True),
                payload_type=str(env["payloadType"]),
                signature=base64.b64decode(signatures[0]["sig"], validate=True),
                keyid=str(signatures[0].get("keyid", "")),
                hint=hint,
            )
        except BundleError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError, binascii.Error) as exc:
            raise BundleError(f"not a Sigstore DSSE bundle: {exc!r}") from None
        except RecursionError:
            raise BundleError("not a Sigstore DSSE bundle: nested too deeply") from None


def parse_keyid(keyid: str) -> tuple[str, int] | None:
    """kmsgate keyids are the gateway's JWKS kid, `<key name>:v<version>`."""
    name, sep, version = keyid.rpartition(":v")
    if not sep or not name or not version.isdigit():
        return None
    return name, int(version)
