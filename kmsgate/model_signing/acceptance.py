"""Rego acceptance policies over a verified bundle and its provenance (seed 000 §7).

The policy file's own package is queried: `data.<package>.allow` must be exactly `true`, and
an optional `data.<package>.deny` (set of strings) explains a rejection. Rego v1 is tried
first, then v0 (the runbook's `allow { ... }` style). A fresh regorus engine is built, used and
dropped on the calling thread (regorus engines are thread-bound, see kmsgate/policy/engine.py).

The input document is described in docs/model-signing.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import regorus

from kmsgate.model_signing import manifest as mf
from kmsgate.model_signing.bundle import SignedBundle
from kmsgate.model_signing.report import Report
from kmsgate.text import utc_timestamp

SBOM_SUFFIXES = (".spdx.json", ".spdx", ".cdx.json", ".cyclonedx.json")


class AcceptanceError(Exception):
    """The policy cannot be read, parsed or evaluated."""


def _error_text(exc: BaseException) -> str:
    return str(exc).split("Stack backtrace:", 1)[0].strip() or type(exc).__name__


def policy_input(
    report: Report, bundle: SignedBundle, expected: mf.Manifest, model: Path
) -> dict[str, Any]:
    names = [f.name for f in expected.files]
    prov = report.provenance
    params = dict(prov.parameters) if prov else {}
    return {
        "model": {
            "path": str(model),
            "name": expected.model_name,
            "digest": report.model_digest,
            "files": names,
        },
        "signature": {
            "verified": True,
            "keyid": bundle.keyid,
            "key": report.key.name if report.key else None,
            "key_version": report.key.version if report.key else None,
            "algorithm": report.algorithm,
            "public_key_sha256": report.public_key_sha256,
            "signed_at": utc_timestamp(report.signed_at) if report.signed_at else None,
            "key_status": report.key_status,
        },
        "artifacts": {
            "signatures": {"model": True},
            "attestation": prov is not None,
            "checksums": "checksums.json" in names,
            "sbom": any(n.lower().endswith(SBOM_SUFFIXES) or "sbom" in n.lower() for n in names),
            "model_card": any(n.rsplit("/", 1)[-1].lower() == "model_card.md" for n in names),
        },
        "meta": {
            "git_sha": prov.git_sha if prov else None,
            "container_digest": prov.container_digest if prov else None,
            "dataset_snapshot": prov.dataset_snapshot if prov else None,
            "builder_id": prov.builder_id if prov else None,
            "policy_digest": prov.policy_digest if prov else None,
        },
        "tags": {k: v for k, v in params.items() if isinstance(v, str)},
        "parameters": params,
    }


def _package(engine: Any) -> str:
    packages = [p for p in engine.get_packages() if not p.endswith("_test")]
    if len(packages) != 1:
        raise AcceptanceError(f"the policy must define exactly one package, found {packages}")
    return str(packages[0]).removeprefix("data.")


def _engine(text: str, name: str) -> tuple[Any, str]:
    problems = []
    for v0 in (False, True):
        engine = regorus.Engine()
        engine.set_rego_v0(v0)
        try:
            engine.add_policy(name, text)
        except Exception as exc:
            problems.append(_error_text(exc))
            del engine
            continue
        return engine, _package(engine)
    raise AcceptanceError(f"invalid policy {name}: {problems[0]}")


def evaluate(policy: Path, document: dict[str, Any]) -> dict[str, Any]:
    """`{allow, deny, package}`. Raises AcceptanceError."""
    try:
        text = policy.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise AcceptanceError(f"cannot read policy {policy}: {exc}") from None
    engine, package = _engine(text, policy.name)
    engine.set_input_json(json.dumps(document))
    try:
        allow = engine.eval_rule(f"data.{package}.allow")
    except Exception as exc:
        raise AcceptanceError(
            f"policy {policy.name}: data.{package}.allow: {_error_text(exc)}"
        ) from None
    try:
        deny = engine.eval_rule(f"data.{package}.deny")
    except Exception:
        deny = None
    reasons = sorted(str(d) for d in deny) if isinstance(deny, set | list) else []
    return {"package": package, "allow": allow is True and not reasons, "deny": reasons}
