"""The model-server gate: verify a model before it is loaded (seed 003 runbook).

`MODEL_SIGNING_REQUIRED` (1/true/yes/on) makes a signature mandatory (0/false/no/off or
unset: optional; any other value is refused, never read as "optional");
`MODEL_SIGNING_TRUST_BUNDLE` names a trust bundle (key states and compromise times, from
`kmsgate model trust-bundle`), else `MODEL_SIGNING_PUBKEY` is the PEM public key itself or a
path to it. With a key (or a trust bundle) set, a bundle that is present is always verified
(a bad signature never loads, required or not); a missing one is only an error when
required. With neither set, a model loads unverified (with a warning) unless required.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from kmsgate.model_signing.report import Report
from kmsgate.model_signing.sign import DEFAULT_BUNDLE_NAME
from kmsgate.model_signing.trust import PublicKeyTrust, Trust, TrustBundle
from kmsgate.model_signing.verify import VerifyOptions, verify_model

log = logging.getLogger("kmsgate.model_signing")

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"", "0", "false", "no", "off"})


class ModelSigningRequired(Exception):
    """Verification is required but cannot be done (no bundle, no public key)."""


def _public_key_pem(value: str | bytes | os.PathLike[str]) -> bytes:
    """The PEM `value` is, or the content of the file it names. Raises ModelSigningRequired
    if that file cannot be read."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        return Path(value).expanduser().read_bytes()
    except OSError as exc:
        raise ModelSigningRequired(f"cannot read public key {value}: {exc.strerror}") from None


def _required(value: str) -> bool:
    """MODEL_SIGNING_REQUIRED's meaning. Raises ModelSigningRequired for a value that is
    neither true nor false: a typo must not load an unsigned model."""
    word = value.strip().lower()
    if word in TRUE or word in FALSE:
        return word in TRUE
    raise ModelSigningRequired(
        f"MODEL_SIGNING_REQUIRED={value!r} is neither true (1, true, yes, on) nor false "
        "(0, false, no, off)"
    )


def _find_bundle(model: Path) -> Path | None:
    for candidate in (model / DEFAULT_BUNDLE_NAME, model.with_name(model.name + ".sig")):
        if candidate.is_file():
            return candidate
    return None


def require_verified(
    path: str | os.PathLike[str],
    *,
    bundle: str | os.PathLike[str] | None = None,
    public_key: str | bytes | os.PathLike[str] | None = None,
    trust_bundle: str | os.PathLike[str] | None = None,
    required: bool | None = None,
    policy: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Report | None:
    """Verify the model at `path` before loading it; the report, or None when verification
    was skipped (not required and no bundle or no key).

    `bundle` defaults to `<path>/model.sig`, then `<path>.sig`; `trust_bundle` to
    MODEL_SIGNING_TRUST_BUNDLE and `public_key` (PEM, or a path to it) to
    MODEL_SIGNING_PUBKEY when neither is given; `required` to MODEL_SIGNING_REQUIRED.
    Raises ModelSigningRequired (required but impossible, MODEL_SIGNING_REQUIRED unreadable,
    or the key's file cannot be read) or ModelVerificationError (the model does not verify).
    """
    e = os.environ if env is None else env
    model = Path(path)
    if required is None:
        required = _required(e.get("MODEL_SIGNING_REQUIRED", ""))
    if trust_bundle is None and public_key is None and e.get("MODEL_SIGNING_TRUST_BUNDLE"):
        trust_bundle = e["MODEL_SIGNING_TRUST_BUNDLE"]
    bundle_path = Path(bundle) if bundle is not None else _find_bundle(model)
    if bundle_path is None or not bundle_path.is_file():
        if required:
            missing = "signature missing" if model.exists() else "no such model, nor signature"
            raise ModelSigningRequired(f"{missing}: {model}")
        log.warning("model %s has no signature; loading it unverified", model)
        return None
    trust: Trust
    if trust_bundle is not None:
        trust = TrustBundle.load(Path(trust_bundle))
    else:
        if public_key is None and e.get("MODEL_SIGNING_PUBKEY"):
            public_key = e["MODEL_SIGNING_PUBKEY"]
        if public_key is None:
            if required:
                raise ModelSigningRequired("MODEL_SIGNING_PUBKEY is not set")
            log.warning("no MODEL_SIGNING_PUBKEY: model %s loads unverified", model)
            return None
        trust = PublicKeyTrust.from_pem(_public_key_pem(public_key))
    options = VerifyOptions(policy=Path(policy) if policy else None)
    report = verify_model(model, bundle_path, trust, options)
    log.info("model %s verified (%s)", model, report.model_digest)
    return report
