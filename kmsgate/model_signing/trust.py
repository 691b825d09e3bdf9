"""Where a verifier gets the signer's public key and the key version's status.

- `PublicKeyTrust`: a PEM public key (what the stock `model_signing` verifier uses); no status,
  and no key name or version (the bundle's keyid is unsigned; a verified provenance names them).
- `GatewayTrust`: the gateway's public key for the bundle's key version, and the gateway's own
  `verify` (with `signed_at`, or `strict` without a signing time) as the judge of whether the
  version was usable when the model was signed.
- `TrustBundle`: an offline JSON file exported from the gateway: per key, per version, the PEM
  public key, its creation time and its validity window (`not_before`, `not_after`,
  `compromised_since`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from kmsgate.algorithms import SignAlg
from kmsgate.client import ApiError, Client
from kmsgate.model_signing.bundle import (
    BundleError,
    SignedBundle,
    key_hint,
    load_public_key,
    parse_keyid,
)
from kmsgate.model_signing.provenance import parse_time
from kmsgate.model_signing.sign import gateway_public_key, signing_digest
from kmsgate.text import utc_timestamp

TRUST_BUNDLE_KIND = "kmsgate-trust-bundle"


class KeyStatusError(Exception):
    """The key version was not usable at signing time (compromised, disabled, outside its
    validity window, unknown)."""


class UnknownKeyError(Exception):
    """No trusted key matches the bundle (wrong key, hint mismatch)."""


@dataclass(frozen=True)
class KeyRef:
    name: str | None
    version: int | None


@dataclass(frozen=True)
class KeyStatus:
    source: str  # public-key | gateway | trust-bundle
    checked: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "checked": self.checked, "detail": self.detail}


class Trust(Protocol):
    source: str

    def resolve(self, bundle: SignedBundle) -> tuple[PublicKeyTypes, KeyRef]:
        """The public key to check `bundle` with. Raises UnknownKeyError."""
        ...

    def status(
        self, ref: KeyRef, bundle: SignedBundle, alg: SignAlg, signed_at: datetime | None
    ) -> KeyStatus:
        """Raises KeyStatusError if the version was not usable at `signed_at`."""
        ...


def _check_hint(bundle: SignedBundle, public_key: PublicKeyTypes) -> None:
    if bundle.hint is not None and bundle.hint != key_hint(public_key):
        raise UnknownKeyError(
            "key mismatch: the bundle's public-key hint does not match the given public key"
        )


@dataclass
class PublicKeyTrust:
    public_key: PublicKeyTypes
    source: str = "public-key"

    @classmethod
    def from_pem(cls, pem: bytes | str) -> PublicKeyTrust:
        return cls(load_public_key(pem))

    def resolve(self, bundle: SignedBundle) -> tuple[PublicKeyTypes, KeyRef]:
        """The key, naming no key version: the bundle's keyid, which no signature covers,
        is not the signer's identity. Raises UnknownKeyError."""
        _check_hint(bundle, self.public_key)
        return self.public_key, KeyRef(None, None)

    def status(
        self, ref: KeyRef, bundle: SignedBundle, alg: SignAlg, signed_at: datetime | None
    ) -> KeyStatus:
        return KeyStatus(self.source, False, "not checked: a bare public key has no status")


@dataclass
class GatewayTrust:
    client: Client
    key: str
    source: str = "gateway"

    def resolve(self, bundle: SignedBundle) -> tuple[PublicKeyTypes, KeyRef]:
        parsed = parse_keyid(bundle.keyid)
        if parsed is None or parsed[0] != self.key:
            raise UnknownKeyError(
                f"the bundle was not signed by gateway key {self.key!r} (keyid {bundle.keyid!r})"
            )
        try:
            version, public_key = gateway_public_key(self.client, self.key, parsed[1])
        except ApiError as exc:
            if exc.status in (0, 401, 403):  # unreachable or not allowed: an error, not a verdict
                raise
            raise UnknownKeyError(
                f"gateway has no usable version {parsed[1]} of {self.key!r}: "
                f"{exc.code}: {exc.detail}"
            ) from None
        except Exception as exc:
            raise UnknownKeyError(str(exc)) from None
        _check_hint(bundle, public_key)
        return public_key, KeyRef(self.key, version)

    def status(
        self, ref: KeyRef, bundle: SignedBundle, alg: SignAlg, signed_at: datetime | None
    ) -> KeyStatus:
        message = bundle.pae()
        digest = signing_digest(alg, message)
        try:
            reply = self.client.verify(
                self.key,
                bundle.signature,
                data=message if digest is None else None,
                digest=digest,
                algorithm=alg.name,
                version=ref.version,
                signed_at=signed_at,
                strict=signed_at is None,
            )
        except ApiError as exc:
            if exc.status in (0, 401, 403):  # unreachable or not allowed: an error, not a verdict
                raise
            raise KeyStatusError(f"gateway refused the key: {exc.code}: {exc.detail}") from None
        when = f"signed at {utc_timestamp(signed_at)}" if signed_at else "no signing time (strict)"
        if not reply.get("valid"):
            raise KeyStatusError(
                f"gateway rejects {self.key} v{ref.version} ({when}): the version is "
                "compromised or not usable at that time" + self._why(ref)
            )
        return KeyStatus(self.source, True, f"{self.key} v{ref.version} usable, {when}")

    def _why(self, ref: KeyRef) -> str:
        """Best effort: the version's state and compromise time (needs key.read)."""
        try:
            key = self.client.get_key(self.key)
        except ApiError:
            return ""
        for v in key.get("versions", []):
            if v.get("version") == ref.version:
                since = v.get("compromised_since")
                return f"; state {v.get('state')}" + (
                    f", compromised since {since}" if since else ""
                )
        return ""


@dataclass(frozen=True)
class TrustedVersion:
    key: str
    version: int
    public_key: PublicKeyTypes
    created_at: datetime | None
    """When the gateway made the version: nothing it signed is older."""
    not_before: datetime | None
    """The start of a window an operator narrowed (the export leaves it null)."""
    not_after: datetime | None
    compromised_since: datetime | None


@dataclass
class TrustBundle:
    versions: list[TrustedVersion] = field(default_factory=list)
    source: str = "trust-bundle"

    @classmethod
    def load(cls, path: Path) -> TrustBundle:
        """Raises BundleError for a malformed file, OSError if unreadable."""
        return cls.parse(json.loads(path.read_bytes()))

    @classmethod
    def parse(cls, doc: Any) -> TrustBundle:
        def when(value: Any) -> datetime | None:
            return None if value in (None, "") else parse_time(str(value))

        try:
            if doc["kind"] != TRUST_BUNDLE_KIND or doc["version"] != 1:
                raise BundleError("not a kmsgate trust bundle (kind/version)")
            out = [
                TrustedVersion(
                    str(k["name"]),
                    int(v["version"]),
                    load_public_key(str(v["public_key"])),
                    when(v.get("created_at")),
                    when(v.get("not_before")),
                    when(v.get("not_after")),
                    when(v.get("compromised_since")),
                )
                for k in doc["keys"]
                for v in k["versions"]
            ]
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"malformed trust bundle: {exc!r}") from None
        return cls(out)

    def _find(self, bundle: SignedBundle) -> list[TrustedVersion]:
        """The versions the bundle's public-key hint (else its key id) names: several when
        the file lists one public key more than once (under two names). Raises
        UnknownKeyError for none."""
        candidates = [
            v for v in self.versions if bundle.hint is None or key_hint(v.public_key) == bundle.hint
        ]
        parsed = parse_keyid(bundle.keyid)
        if parsed is not None and bundle.hint is None:
            candidates = [v for v in candidates if (v.key, v.version) == parsed]
        if not candidates:
            raise UnknownKeyError("no key in the trust bundle matches the bundle's public-key hint")
        return candidates

    def resolve(self, bundle: SignedBundle) -> tuple[PublicKeyTypes, KeyRef]:
        found = self._find(bundle)[0]
        return found.public_key, KeyRef(found.key, found.version)

    def status(
        self, ref: KeyRef, bundle: SignedBundle, alg: SignAlg, signed_at: datetime | None
    ) -> KeyStatus:
        """The key's status at `signed_at`. A public key the file lists more than once holds
        only if every listing does: a compromise marked on one is not escaped through
        another name. Raises KeyStatusError (the first listing that refuses)."""
        statuses = [self._status(v, signed_at) for v in self._find(bundle)]
        return statuses[0]

    def _status(self, v: TrustedVersion, signed_at: datetime | None) -> KeyStatus:
        """`status` for one listing. Raises KeyStatusError."""
        label = f"{v.key} v{v.version}"
        if signed_at is None:
            self._check_untimed(v, label)
            return KeyStatus(self.source, True, f"{label} trusted at any signing time")
        at = utc_timestamp(signed_at)
        if v.compromised_since is not None and signed_at >= v.compromised_since:
            raise KeyStatusError(
                f"{label} is compromised since {utc_timestamp(v.compromised_since)}; signed at {at}"
            )
        if v.created_at is not None and signed_at < v.created_at:
            raise KeyStatusError(
                f"{label} was created at {utc_timestamp(v.created_at)}, after the signing time {at}"
            )
        if v.not_before is not None and signed_at < v.not_before:
            raise KeyStatusError(
                f"{label} is not valid before {utc_timestamp(v.not_before)}; signed at {at}"
            )
        if v.not_after is not None and signed_at >= v.not_after:
            raise KeyStatusError(
                f"{label} is not valid after {utc_timestamp(v.not_after)}; signed at {at}"
            )
        return KeyStatus(self.source, True, f"{label} valid at {at}")

    @staticmethod
    def _check_untimed(v: TrustedVersion, label: str) -> None:
        """Whether `v` holds for a bundle that carries no signing time (no provenance): any
        time from its creation until now must lie in its window. Raises KeyStatusError for a
        compromised version, a window narrowed after its creation (or a bundle without the
        creation time, as exported before it had one) or one already closed."""
        missing = "the bundle carries no signing time (no provenance)"
        if v.compromised_since is not None:
            raise KeyStatusError(
                f"{label} is compromised since {utc_timestamp(v.compromised_since)}, and {missing}"
            )
        if v.not_before is not None and (v.created_at is None or v.not_before > v.created_at):
            raise KeyStatusError(
                f"{label} is not valid before {utc_timestamp(v.not_before)}, and {missing}"
            )
        if v.not_after is not None and v.not_after <= datetime.now(UTC):
            raise KeyStatusError(
                f"{label} is not valid after {utc_timestamp(v.not_after)}, and {missing}"
            )


def export_trust_bundle(client: Client, names: list[str]) -> dict[str, Any]:
    """A trust bundle for `names` from the gateway (needs key.read): every version that has
    a public key, its creation time and its `compromised_since` (no window: `not_before`
    and `not_after` are null, for an operator to narrow). Raises
    ApiError, or ValueError for a key that is not enabled (a bundle cannot carry that state,
    and its signatures would verify offline where the gateway refuses them)."""
    keys = []
    for name in names:
        key = client.get_key(name)
        if key.get("state") != "enabled":
            raise ValueError(
                f"key {name!r} is {key.get('state')}: a trust bundle would let its signatures "
                "verify offline (enable it, or leave it out)"
            )
        versions = []
        for v in key["versions"]:
            if v.get("state") in ("destroyed",):
                continue
            versions.append(
                {
                    "version": v["version"],
                    "public_key": client.public_key(name, v["version"]),
                    "created_at": v.get("created_at"),
                    "not_before": None,
                    "not_after": None,
                    "compromised_since": v.get("compromised_since"),
                }
            )
        keys.append({"name": name, "versions": versions})
    return {"kind": TRUST_BUNDLE_KIND, "version": 1, "keys": keys}
