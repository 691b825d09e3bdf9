"""Sign a model directory through the gateway.

Only digests leave the machine: the files are hashed locally, and the gateway signs the
SHA-256/384 of the DSSE PAE as a prehashed digest (ECDSA, RSA) or the PAE itself (Ed25519,
which has no prehashed form; the PAE of a large manifest may then exceed the gateway's
`max_input_bytes`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from kmsgate.algorithms import (
    SIGN_ALGORITHMS,
    SignAlg,
    default_sign_algorithm,
    key_type_of_public_key,
    verify_with_public_key,
)
from kmsgate.client import ApiError, Client
from kmsgate.files import write_all
from kmsgate.model_signing import manifest as mf
from kmsgate.model_signing.bundle import (
    BUNDLE_MEDIA_TYPE,
    INTOTO_PAYLOAD_TYPE,
    SignedBundle,
    canonical_pem,
    key_hint,
    load_public_key,
    model_statement,
    pae,
    statement_bytes,
)
from kmsgate.model_signing.provenance import (
    BuildInfo,
    SigningFacts,
    provenance_statement,
)
from kmsgate.text import utc_timestamp

DEFAULT_BUNDLE_NAME = "model.sig"
CHECKSUMS_NAME = "checksums.json"
_HEAD_BYTES = 4096
"""How much of a file named like a signature is read to tell whether it holds JSON."""
_MAX_BUNDLE_BYTES = 256 << 20
"""Beyond any bundle kmsgate writes (~160 bytes per model file: over a million files)."""


class SigningError(Exception):
    """Signing failed for a reason other than an API error (bad key reply, I/O)."""


def signing_digest(alg: SignAlg, message: bytes) -> bytes | None:
    """The digest the gateway signs for `alg`, or None when it must get the message."""
    if not alg.prehash_allowed:
        return None
    assert alg.hash is not None
    return hashlib.new(alg.hash.value, message).digest()


def _b64url_int(value: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")


def public_key_from_jwk(jwk: dict[str, Any]) -> PublicKeyTypes:
    """A public key from the gateway's JWKS entry (EC P-256/384, Ed25519, RSA)."""
    kty = jwk.get("kty")
    if kty == "EC":
        curve = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}[str(jwk["crv"])]
        numbers = ec.EllipticCurvePublicNumbers(_b64url_int(jwk["x"]), _b64url_int(jwk["y"]), curve)
        return numbers.public_key()
    if kty == "OKP" and jwk.get("crv") == "Ed25519":
        raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    if kty == "RSA":
        return rsa.RSAPublicNumbers(_b64url_int(jwk["e"]), _b64url_int(jwk["n"])).public_key()
    raise SigningError(f"unsupported JWK key type {kty!r}")


def gateway_public_key(
    client: Client, name: str, version: int | None
) -> tuple[int | None, PublicKeyTypes]:
    """(version, public key) of `name`: from `GET public-key` (needs key.read), else from the
    unauthenticated JWKS (then `version` None means the newest non-compromised version).
    Raises the refusal of the read (401, 403) when the JWKS does not list the version (it
    leaves compromised ones out), SigningError when the key publishes no JWKS (not public,
    or no such key) or neither has the version."""
    try:
        return version, load_public_key(client.public_key(name, version))
    except ApiError as exc:
        if exc.status not in (401, 403):
            raise
        refused = exc
    try:
        keys = client.jwks(name)
    except ApiError as exc:
        if exc.status != 404:
            raise
        raise SigningError(
            f"this token may not read key {name!r} ({refused.code}), and the key does not "
            "publish its public key (no such key, or not public): a bundle names the public "
            "key that verifies it, so make the key public (`public: true`) or let the "
            "signer read it (action key.read)"
        ) from None
    found: dict[int, dict[str, Any]] = {}
    for jwk in keys:
        key_name, _, v = str(jwk.get("kid", "")).rpartition(":v")
        if key_name == name and v.isdigit():
            found[int(v)] = jwk
    wanted = version if version is not None else max(found, default=None)
    if wanted is None or wanted not in found:
        raise refused  # the version may be compromised: only a reader of the key can tell
    return wanted, public_key_from_jwk(found[wanted])


def _refuse_a_foreign_checksums_file(model: Path, name: str, *, ours: bool) -> None:
    """Raises SigningError when the model (named `name`) holds a `checksums.json` this
    signing would overwrite (`ours`) but did not write, or would sign as a model file (not
    `ours`) but an earlier signing wrote: verification would read it as kmsgate's and
    fail."""
    path = model / CHECKSUMS_NAME
    if not path.is_file():
        return
    try:
        written = _of_our_shape(json.loads(path.read_bytes()), name)
    except (OSError, ValueError):
        written = False
    if ours and not written:
        raise SigningError(
            f"{path} is the model's own file, not one kmsgate wrote: sign with --no-checksums, "
            "or move it"
        )
    if not ours and written:
        raise SigningError(
            f"{path} was written by an earlier signing and would be signed as a model file: "
            "remove it, or sign without --no-checksums"
        )


def _of_our_shape(doc: object, model_name: str) -> bool:
    """Whether `doc` is what `checksums_document` writes for the model `model_name`: those
    members and no other, each file `{path, sha256}` (a model's own `checksums.json` that
    merely shares a member or two is not)."""
    if not isinstance(doc, dict) or set(doc) != {"model", "algorithm", "files"}:
        return False
    files = doc["files"]
    return (
        doc["model"] == model_name
        and doc["algorithm"] == mf.HASH_TYPE
        and isinstance(files, list)
        and all(isinstance(f, dict) and set(f) == {"path", "sha256"} for f in files)
    )


@dataclass
class GatewaySigner:
    """Signs DSSE PAEs with a gateway key; remembers each version's public key."""

    client: Client
    key: str
    algorithm: str | None = None
    policy_digest: str | None = None
    """The digest of the gateway policy that authorised the last signature."""
    _public_keys: dict[int, PublicKeyTypes] = field(default_factory=dict)

    def resolve_algorithm(self) -> SignAlg:
        """The algorithm to sign with: the one asked for, else the key's default. Raises
        SigningError for an unknown one, or an ECDSA hash other than the curve's (the
        model_signing verifier hashes with the curve's own: nobody could verify it); ApiError
        when the public key cannot be had: the gateway's refusal to sign with the key
        (`key_version_unusable` when every version is compromised, which the public JWKS
        leaves out), else the refusal of the read."""
        try:
            _, public_key = gateway_public_key(self.client, self.key, None)
        except ApiError as exc:
            if exc.status in (401, 403):
                self._raise_refusal_to_sign()
            raise
        default = default_sign_algorithm(key_type_of_public_key(public_key))
        self.algorithm = self.algorithm or default
        alg = SIGN_ALGORITHMS.get(self.algorithm or "")
        if alg is None:
            raise SigningError(f"unknown signature algorithm {self.algorithm!r}")
        if isinstance(public_key, ec.EllipticCurvePublicKey) and alg.name != default:
            raise SigningError(
                f"{alg.name} with a {public_key.curve.name} key makes a bundle the model_signing "
                f"verifier rejects: it hashes with the curve's own hash ({default})"
            )
        return alg

    def _raise_refusal_to_sign(self) -> None:
        """Raises the gateway's refusal to sign with the key (a compromised version, a
        disabled key, the policy), if it has one. Asked with a one-byte digest, which no
        algorithm takes: nothing is signed, and a key that would sign answers 400."""
        try:
            self.client.sign(self.key, digest=b"\0", algorithm=self.algorithm)
        except ApiError as exc:
            if exc.status != 400:
                raise

    def public_key(self, version: int) -> PublicKeyTypes:
        if version not in self._public_keys:
            self._public_keys[version] = gateway_public_key(self.client, self.key, version)[1]
        return self._public_keys[version]

    def sign(self, payload_type: str, payload: bytes) -> tuple[SignedBundle, int, str]:
        """(bundle, key version, algorithm). The signature is checked locally against the
        version's public key before it is returned. Raises ApiError, SigningError."""
        alg = self.resolve_algorithm()
        message = pae(payload_type, payload)
        digest = signing_digest(alg, message)
        if digest is None:
            try:
                reply = self.client.sign(self.key, data=message, algorithm=alg.name)
            except ApiError as exc:
                if exc.status != 413:
                    raise
                raise SigningError(
                    f"the statement to sign is {len(message)} bytes, over the gateway's input "
                    f"limit, and a {alg.name} key signs it whole (it has no prehashed form): "
                    "sign a model of this many files with an ECDSA key"
                ) from None
        else:
            reply = self.client.sign(self.key, digest=digest, algorithm=alg.name)
        version = int(reply["key_version"])
        self.policy_digest = reply.get("policy_digest") or self.policy_digest
        public_key = self.public_key(version)
        signed = digest if digest is not None else message
        if not verify_with_public_key(
            public_key, alg, signed, reply["signature"], prehashed=digest is not None
        ):
            raise SigningError("the gateway's signature does not verify with its public key")
        bundle = SignedBundle(
            payload,
            payload_type,
            reply["signature"],
            f"{self.key}:v{version}",
            key_hint(public_key),
        )
        return bundle, version, alg.name


@dataclass(frozen=True)
class SignResult:
    bundle_path: Path
    provenance_path: Path | None
    checksums_path: Path | None
    manifest: mf.Manifest
    key: str
    key_version: int
    algorithm: str
    public_key_pem: str
    signed_at: datetime
    policy_digest: str | None
    bytes_hashed: int
    hash_seconds: float
    sign_seconds: float
    left_out: tuple[str, ...] = ()
    """Earlier signatures in the model, left out of this one (`ignore_paths`)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle_path),
            "provenance": str(self.provenance_path) if self.provenance_path else None,
            "checksums": str(self.checksums_path) if self.checksums_path else None,
            "model": self.manifest.model_name,
            "digest": "sha256:" + self.manifest.root_digest().hex(),
            "files": len(self.manifest.files),
            "bytes": self.bytes_hashed,
            "key": self.key,
            "key_version": self.key_version,
            "algorithm": self.algorithm,
            "signed_at": utc_timestamp(self.signed_at),
            "policy_digest": self.policy_digest,
            "earlier_signatures_left_out": list(self.left_out),
            "timings": {
                "hash_s": round(self.hash_seconds, 4),
                "sign_s": round(self.sign_seconds, 4),
            },
        }


def _refuse_to_replace(output: Path, model: Path) -> None:
    """Raises SigningError when `output` is `checksums.json`, an existing file that is not
    a Sigstore bundle (an earlier signature, which signing again replaces), a symbolic link
    (the rename would replace the link, not write where it points), or in a directory this
    process cannot write: inside `model` a model file the signing would replace (and then
    leave out of the signature), elsewhere someone's file. Checked before the gateway is
    asked anything."""
    if output.is_symlink():
        raise SigningError(
            f"{output} is a symbolic link: refusing to replace it (give the file it points "
            f"to, {os.path.realpath(output)}, or another path)"
        )
    relative = _relative_inside(output, model)
    ours = output.exists() and output.is_file() and _is_a_bundle(output)
    if relative == CHECKSUMS_NAME or (relative is not None and output.exists() and not ours):
        raise SigningError(f"{output} is a file of the model: write the signature elsewhere")
    if output.exists() and not ours:
        raise SigningError(f"{output} exists and is not a signature: refusing to replace it")
    if not os.access(output.parent, os.W_OK):
        hint = " (sign with --no-checksums and -o elsewhere)" if relative is not None else ""
        raise SigningError(f"cannot write into {output.parent}{hint}")


def _an_earlier_signature(path: Path) -> bool:
    """Whether `path` is a signature kmsgate wrote (a Sigstore bundle named `*.sig` or
    `*.sig.provenance.json`): another signing of the same model leaves it out, so that what
    it signed (checksums.json too) stays as it was and it goes on verifying (a bundle grows
    with the model's file count: up to `_MAX_BUNDLE_BYTES`). Raises SigningError for a file
    so named that starts like JSON but is no bundle (it is neither left out nor signed as a
    model file), OSError if it cannot be read."""
    name = path.name
    if not (name.endswith(".sig") or name.endswith(".sig.provenance.json")):
        return False
    with path.open("rb") as f:
        if not f.read(_HEAD_BYTES).lstrip().startswith(b"{"):
            return False  # not JSON: a file of the model's own (weights, a GPG signature)
    if _is_a_bundle(path):
        return True
    raise SigningError(
        f"{path} is named like a signature and starts like JSON, but is not a Sigstore bundle "
        f"of at most {_MAX_BUNDLE_BYTES >> 20} MiB (a damaged one?): signed as a model file it "
        "would break the signature it may belong to; remove or rename it, or leave it out "
        "with --ignore"
    )


def _is_a_bundle(path: Path) -> bool:
    """Whether `path` holds a Sigstore bundle of at most `_MAX_BUNDLE_BYTES` (no more is
    read)."""
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_BUNDLE_BYTES + 1)
        doc = json.loads(raw) if len(raw) <= _MAX_BUNDLE_BYTES else None
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("mediaType") == BUNDLE_MEDIA_TYPE


def _relative_inside(path: Path, root: Path) -> str | None:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


def policy_digest(client: Client) -> str | None:
    """The gateway's policy digest, or None if this token may not read it (policy.read)."""
    try:
        return str(client.policy()["digest"])
    except ApiError as exc:
        if exc.status in (401, 403):
            return None
        raise


def sign_model(
    model: Path,
    signer: GatewaySigner,
    *,
    bundle_path: Path | None = None,
    provenance_path: Path | None = None,
    provenance: bool = True,
    checksums: bool = True,
    ignore: Sequence[str] = (),
    ignore_git_paths: bool = True,
    allow_symlinks: bool = False,
    build: BuildInfo | None = None,
    workers: int | None = None,
    progress: mf.Progress | None = None,
    on_total: Any = None,
) -> SignResult:
    """Hash `model`, write `checksums.json` into it, sign the model_signing statement (and an
    SLSA provenance) through the gateway and write the bundle(s).

    `ignore` are glob patterns; the paths they match, the git files, and the bundle and
    provenance files (when inside the model) are recorded as model_signing `ignore_paths`.
    `on_total(total_bytes)` is called once the files are listed (for a progress bar).
    The files are written all or none (`write_all`): a signing that fails at any point
    leaves the model and the output paths as they were, an earlier signing's bundles and
    `checksums.json` included (they go on verifying).
    Raises ManifestError, SigningError, ApiError, OSError (naming the file it failed on).
    """
    started = datetime.now(UTC)
    if not model.is_dir():
        raise mf.ManifestError(f"{model} is not a directory")
    bundle_path = bundle_path or model / DEFAULT_BUNDLE_NAME
    if provenance and provenance_path is None:
        provenance_path = bundle_path.with_name(bundle_path.name + ".provenance.json")
    outputs = [bundle_path, *([provenance_path] if provenance and provenance_path else [])]
    if len({p.resolve() for p in outputs}) < len(outputs):
        raise SigningError(f"the bundle and the provenance would both be {bundle_path}")
    for output in outputs:
        _refuse_to_replace(output, model)
    if checksums and not os.access(model, os.W_OK):
        raise SigningError(f"cannot write {model / CHECKSUMS_NAME} (sign with --no-checksums)")
    if checksums and CHECKSUMS_NAME in {p.removeprefix("./") for p in ignore}:
        raise SigningError(
            f"{CHECKSUMS_NAME} is written and signed by kmsgate: to leave it out, sign with "
            "--no-checksums"
        )
    ignored = list(mf.GIT_PATHS) if ignore_git_paths else []
    ignored += [rel for p in outputs if (rel := _relative_inside(p, model)) is not None]
    checksums_path = model / CHECKSUMS_NAME if checksums else None
    name = mf.model_name_of(model)  # before hashing: a name the statement cannot hold
    _refuse_a_foreign_checksums_file(model, name, ours=checksums)
    skip = [*ignored, CHECKSUMS_NAME] if checksums else ignored

    alg = signer.resolve_algorithm()  # fail on key/permission problems before hashing
    t0 = time.perf_counter()
    names, matched = mf.list_files(model, skip, patterns=ignore, allow_symlinks=allow_symlinks)
    earlier = [n for n in names if _an_earlier_signature(model / n)]
    names = [n for n in names if n not in earlier]
    ignored += earlier  # signing again keeps them, and checksums.json, as they were
    if not names:  # a signature over nothing would verify any directory of ignored files
        raise mf.ManifestError(f"no file to sign in {model} (after the ignored paths)")
    ignored += matched
    sizes = sum((model / n).stat().st_size for n in names)
    if on_total is not None:
        on_total(sizes)
    files = mf.hash_files(model, names, workers=workers, progress=progress)
    checksums_doc = b""
    if checksums_path is not None:  # written with the bundle, once the signing succeeded
        checksums_doc = mf.checksums_document(mf.Manifest.build(name, files))
        files.append(mf.FileDigest.of(CHECKSUMS_NAME, hashlib.sha256(checksums_doc).digest()))
    manifest = mf.Manifest.build(name, files, ignored, allow_symlinks)
    hash_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    signed_at = datetime.now(UTC)
    bundle, version, alg_name = signer.sign(
        INTOTO_PAYLOAD_TYPE, statement_bytes(model_statement(manifest))
    )
    digest_of_policy = None
    if provenance and provenance_path is not None:
        digest_of_policy = signer.policy_digest or policy_digest(signer.client)
        facts = SigningFacts(
            signer.client.addr, signer.key, version, alg_name, signed_at, digest_of_policy
        )
        statement = provenance_statement(
            name,
            manifest.root_digest(),
            (build or BuildInfo()).with_env(),
            facts,
            started,
            datetime.now(UTC),
        )
        prov_bundle, prov_version, _ = signer.sign(INTOTO_PAYLOAD_TYPE, statement_bytes(statement))
        if prov_version != version:
            raise SigningError("the key rotated while signing; sign again")
    sign_seconds = time.perf_counter() - t1

    written = [(bundle_path, bundle.to_json())]
    if checksums_path is not None:
        written.insert(0, (checksums_path, checksums_doc))
    if provenance and provenance_path is not None:
        written.append((provenance_path, prov_bundle.to_json()))
    write_all(written, mode=0o644)
    return SignResult(
        bundle_path=bundle_path,
        provenance_path=provenance_path if provenance else None,
        checksums_path=checksums_path,
        manifest=manifest,
        key=signer.key,
        key_version=version,
        algorithm=alg.name,
        public_key_pem=canonical_pem(signer.public_key(version)).decode(),
        signed_at=signed_at,
        policy_digest=digest_of_policy,
        bytes_hashed=sizes,
        hash_seconds=hash_seconds,
        sign_seconds=sign_seconds,
        left_out=tuple(earlier),
    )
