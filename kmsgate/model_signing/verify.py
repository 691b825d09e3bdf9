"""Verify a model directory against a kmsgate (or stock model_signing) bundle.

Checks, in order; the first failing stage stops verification and sets the exit code:
bundle format (10) -> key (11) -> DSSE signature (12) -> file digests (13), missing files (14),
extra files (15) -> provenance (17) -> key status at signing time (16) -> policy digest (18)
-> acceptance policy (19).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from kmsgate.algorithms import (
    SIGN_ALGORITHMS,
    SignAlg,
    default_sign_algorithm,
    key_type_of_public_key,
    sign_algorithm,
    verify_with_public_key,
)
from kmsgate.errors import KmsgateError
from kmsgate.model_signing import manifest as mf
from kmsgate.model_signing.acceptance import AcceptanceError, evaluate, policy_input
from kmsgate.model_signing.bundle import (
    BundleError,
    SignedBundle,
    key_hint,
    manifest_from_statement,
    parse_keyid,
)
from kmsgate.model_signing.provenance import ProvenanceSummary
from kmsgate.model_signing.report import Failure, ModelVerificationError, Report, fail
from kmsgate.model_signing.sign import CHECKSUMS_NAME
from kmsgate.model_signing.trust import KeyRef, KeyStatusError, Trust, UnknownKeyError
from kmsgate.text import utc_timestamp


def _algorithm(public_key: PublicKeyTypes, wanted: str | None) -> SignAlg:
    """The signature algorithm for `public_key`: ECDSA with the curve's hash (as model_signing
    does), Ed25519, or for RSA `wanted` (default RSA-PSS-SHA256)."""
    key_type = key_type_of_public_key(public_key)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        wanted = None
    return sign_algorithm(key_type, wanted or default_sign_algorithm(key_type))


def _read_bundle(
    path: Path, report: Report, what: str, missing: Failure = Failure.FORMAT
) -> SignedBundle:
    """The bundle at `path`. Raises ModelVerificationError: `missing` if it cannot be read
    (a required provenance that is not there is a provenance failure), FORMAT if it is no
    bundle."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise fail(report, missing, f"cannot read {what} {path}: {exc.strerror}", what) from None
    try:
        return SignedBundle.from_json(data)
    except BundleError as exc:
        raise fail(report, Failure.FORMAT, f"{what}: {exc}", what) from None


def _check_signature(bundle: SignedBundle, public_key: PublicKeyTypes, alg: SignAlg) -> bool:
    return verify_with_public_key(public_key, alg, bundle.pae(), bundle.signature, prehashed=False)


def check_integrity(
    model: Path,
    expected: mf.Manifest,
    *,
    extra_ignores: Sequence[str] = (),
    ignore_git_paths: bool = True,
    workers: int | None = None,
    progress: mf.Progress | None = None,
) -> tuple[list[str], list[str], list[str]]:
    """(mismatched, missing, extra) file names of `model` against `expected`. The paths the
    signer ignored are: a signer that says which (kmsgate, model_signing 1.x) lists git's
    paths among them when it ignored them, so a model signed with them, or without them
    and none there, is held to them. A manifest listing nothing ignored (an older signer)
    gets model_signing's default: git's paths ignored (`ignore_git_paths`) unless the
    manifest lists files under them."""
    want = expected.digests()
    git = [
        path
        for path in (mf.GIT_PATHS if ignore_git_paths and not expected.ignore_paths else ())
        if not any(name == path or name.startswith(f"{path}/") for name in want)
    ]
    ignores = [*expected.ignore_paths, *extra_ignores, *git]
    names, _ = mf.list_files(
        model,
        ignores,
        allow_symlinks=expected.allow_symlinks,
        symlink_hint="the model was signed without --allow-symlinks",
    )
    present = set(names)
    missing = sorted(set(want) - present)
    extra = sorted(present - set(want))
    common = [n for n in names if n in want]
    actual = {
        f.name: f.digest for f in mf.hash_files(model, common, workers=workers, progress=progress)
    }
    mismatched = sorted(n for n in common if actual[n] != want[n])
    return mismatched, missing, extra


def _checksums_agree(model: Path, expected: mf.Manifest) -> str | None:
    """None if the signed checksums.json (when present) lists exactly the other resources."""
    if CHECKSUMS_NAME not in expected.digests():
        return None
    try:
        doc = json.loads((model / CHECKSUMS_NAME).read_bytes())
        listed = {str(e["path"]): str(e["sha256"]) for e in doc["files"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"checksums.json is unreadable: {exc!r}"
    signed = {f.name: f.digest.hex() for f in expected.files if f.name != CHECKSUMS_NAME}
    return None if listed == signed else "checksums.json disagrees with the signed manifest"


def _inside(path: Path, root: Path) -> str | None:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


def default_provenance_path(bundle_path: Path) -> Path:
    return bundle_path.with_name(bundle_path.name + ".provenance.json")


@dataclass(frozen=True)
class VerifyOptions:
    """How to verify, beyond the model, its bundle and whom to trust.

    `provenance_path` defaults to the file beside the bundle; `require_provenance` fails
    without one (implied by `policy` and `expect_policy_digest`); `policy` is a Rego
    acceptance policy; `algorithm` picks the RSA padding; `workers` and `progress` tune and
    report the hashing.
    """

    provenance_path: Path | None = None
    require_provenance: bool = False
    policy: Path | None = None
    expect_policy_digest: str | None = None
    algorithm: str | None = None
    ignore_git_paths: bool = True
    workers: int | None = None
    progress: mf.Progress | None = None


def verify_model(
    model: Path, bundle_path: Path, trust: Trust, options: VerifyOptions = VerifyOptions()
) -> Report:
    """Verify `model` against `bundle_path`; return the report or raise
    ModelVerificationError (carrying the report). May also raise ApiError when the gateway
    cannot be asked (unreachable, not allowed): that is an error, not a verdict."""
    t0 = time.perf_counter()
    report = Report(str(model), str(bundle_path))
    try:
        _verify(report, model, bundle_path, trust, options)
    finally:
        report.seconds = time.perf_counter() - t0
    return report


def _verify(
    report: Report, model: Path, bundle_path: Path, trust: Trust, options: VerifyOptions
) -> None:
    bundle = _read_bundle(bundle_path, report, "bundle")
    report.keyid = bundle.keyid or None
    try:
        expected = manifest_from_statement(bundle.statement())
    except BundleError as exc:
        raise fail(report, Failure.FORMAT, str(exc), "bundle") from None
    report.check("bundle", True, "Sigstore bundle v0.3, DSSE, model_signing v1.0 statement")

    try:
        public_key, ref = trust.resolve(bundle)
    except (UnknownKeyError, BundleError) as exc:
        raise fail(report, Failure.KEY_MISMATCH, str(exc), "key") from None
    report.key = ref
    report.public_key_sha256 = key_hint(public_key)
    report.check("key", True, f"{trust.source}: public key sha256 {report.public_key_sha256}")

    try:
        alg = _algorithm(public_key, options.algorithm)
    except KmsgateError as exc:
        raise fail(report, Failure.KEY_MISMATCH, exc.detail, "signature") from None
    report.algorithm = alg.name
    if not _check_signature(bundle, public_key, alg):
        why = "the DSSE signature is not valid"
        if isinstance(public_key, rsa.RSAPublicKey) and options.algorithm is None:
            why += f" as {alg.name} (a signature with another RSA padding needs --algorithm)"
        raise fail(report, Failure.SIGNATURE, why, "signature")
    report.check("signature", True, alg.name)

    report.model_name = expected.model_name
    report.model_digest = "sha256:" + expected.root_digest().hex()
    report.files = len(expected.files)
    own = [
        rel
        for p in (bundle_path, options.provenance_path or default_provenance_path(bundle_path))
        if (rel := _inside(p, model)) is not None
    ]
    if not model.is_dir():
        raise fail(report, Failure.MISSING_FILES, f"{model} is not a directory", "files")
    try:
        mismatched, missing, extra = check_integrity(
            model,
            expected,
            extra_ignores=own,
            ignore_git_paths=options.ignore_git_paths,
            workers=options.workers,
            progress=options.progress,
        )
    except mf.ManifestError as exc:
        raise fail(report, Failure.EXTRA_FILES, str(exc), "files") from None
    report.integrity = {"mismatched": mismatched, "missing": missing, "extra": extra}
    found = [
        (failure, f"{what}: {_listed(names)}")
        for failure, names, what in (
            (Failure.DIGEST_MISMATCH, mismatched, "digest mismatch"),
            (Failure.MISSING_FILES, missing, "missing files"),
            (Failure.EXTRA_FILES, extra, "extra files"),
        )
        if names
    ]
    if found:  # the first kind decides the exit status; the message names them all
        raise fail(report, found[0][0], "; ".join(text for _, text in found), "files")
    problem = _checksums_agree(model, expected)
    if problem:
        raise fail(report, Failure.DIGEST_MISMATCH, problem, "files")
    report.check("files", True, f"{len(expected.files)} files match")

    prov_path = options.provenance_path or default_provenance_path(bundle_path)
    needs_provenance = (
        options.require_provenance
        or options.policy is not None
        or options.expect_policy_digest is not None
    )
    if options.provenance_path is not None or prov_path.exists() or needs_provenance:
        prov_bundle = _read_bundle(prov_path, report, "provenance", Failure.PROVENANCE)
        report.provenance = _check_provenance(
            report, prov_bundle, bundle, public_key, alg, expected
        )
        report.signed_at = report.provenance.signed_at
        if report.key is None or report.key.name is None:  # a signed claim, unlike the keyid
            report.key = KeyRef(report.provenance.key, report.provenance.key_version)

    try:
        status = trust.status(report.key, bundle, alg, report.signed_at)
    except KeyStatusError as exc:
        raise fail(report, Failure.KEY_STATUS, str(exc), "key_status") from None
    report.key_status = status.to_dict()
    report.check("key_status", True, status.detail)

    if options.expect_policy_digest is not None:
        assert report.provenance is not None
        got = report.provenance.policy_digest
        if got != options.expect_policy_digest:
            raise fail(
                report,
                Failure.POLICY_DIGEST,
                f"signed under policy {got}, expected {options.expect_policy_digest}",
                "policy_digest",
            )
        report.check("policy_digest", True, got)

    policy = options.policy
    if policy is not None:
        try:
            decision = evaluate(policy, policy_input(report, bundle, expected, model))
        except AcceptanceError as exc:
            raise fail(report, Failure.ACCEPTANCE, str(exc), "acceptance") from None
        report.acceptance = decision
        if not decision["allow"]:
            reasons = "; ".join(decision["deny"]) or "allow is not true"
            raise fail(
                report,
                Failure.ACCEPTANCE,
                f"rejected by {policy.name}: {reasons}",
                "acceptance",
            )
        report.check("acceptance", True, policy.name)


def _check_provenance(
    report: Report,
    prov: SignedBundle,
    bundle: SignedBundle,
    public_key: PublicKeyTypes,
    alg: SignAlg,
    expected: mf.Manifest,
) -> ProvenanceSummary:
    def bad(detail: str) -> ModelVerificationError:
        return fail(report, Failure.PROVENANCE, detail, "provenance")

    if prov.hint != bundle.hint or prov.keyid != bundle.keyid:
        raise bad("the provenance was signed by another key than the model")
    if not _check_signature(prov, public_key, alg):
        raise bad("the provenance's DSSE signature is not valid")
    try:
        summary = ProvenanceSummary.parse(prov.statement())
    except BundleError as exc:
        raise bad(str(exc)) from None
    if (
        summary.subject_digest != expected.root_digest().hex()
        or summary.subject_name != expected.model_name
    ):
        raise bad("the provenance's subject is not this model (name or digest differs)")
    ref = report.key
    # the key the trust found, else the keyid (both bundles carry it: they must agree)
    claimed = (ref.name, ref.version) if ref and ref.name else parse_keyid(bundle.keyid)
    if claimed is not None and (summary.key, summary.key_version) != claimed:
        raise bad("the provenance names another key version than the signature")
    if summary.algorithm in SIGN_ALGORITHMS and summary.algorithm != alg.name:
        raise bad(f"the provenance says {summary.algorithm}, the signature is {alg.name}")
    report.check("provenance", True, f"SLSA v1, signed at {utc_timestamp(summary.signed_at)}")
    return summary


def _listed(names: Sequence[str]) -> str:
    """The first five names, and how many more."""
    more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more
