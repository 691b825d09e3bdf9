"""What model verification found: the `Report` (the `--json` output), the failure codes
(`kmsgate model verify` exit codes) and the error that carries both."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kmsgate.model_signing.provenance import ProvenanceSummary
from kmsgate.model_signing.trust import KeyRef
from kmsgate.text import utc_timestamp


class Failure(enum.IntEnum):
    """Exit codes of `kmsgate model verify` (0 = verified, 2 = could not run)."""

    FORMAT = 10
    KEY_MISMATCH = 11
    SIGNATURE = 12
    DIGEST_MISMATCH = 13
    MISSING_FILES = 14
    EXTRA_FILES = 15
    KEY_STATUS = 16
    PROVENANCE = 17
    POLICY_DIGEST = 18
    ACCEPTANCE = 19

    @property
    def code(self) -> str:
        return self.name.lower()


@dataclass
class Report:
    """What verification found; `to_dict()` is the `--json` report."""

    model: str
    bundle: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    model_name: str | None = None
    model_digest: str | None = None
    files: int = 0
    key: KeyRef | None = None
    """The signing key version, as the trust source (gateway, trust bundle) or a verified
    provenance names it; unnamed for a bare public key: the bundle's `keyid` is unsigned."""
    keyid: str | None = None
    algorithm: str | None = None
    public_key_sha256: str | None = None
    signed_at: datetime | None = None
    key_status: dict[str, Any] | None = None
    integrity: dict[str, list[str]] = field(default_factory=dict)
    provenance: ProvenanceSummary | None = None
    acceptance: dict[str, Any] | None = None
    failure: Failure | None = None
    detail: str | None = None
    seconds: float = 0.0

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append({"name": name, "ok": ok, "detail": detail})

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def exit_code(self) -> int:
        return 0 if self.failure is None else int(self.failure)

    def to_dict(self) -> dict[str, Any]:
        prov = self.provenance
        return {
            "ok": self.ok,
            "exit_code": self.exit_code,
            "error": None
            if self.failure is None
            else {"code": self.failure.code, "detail": self.detail},
            "model": {
                "path": self.model,
                "name": self.model_name,
                "digest": self.model_digest,
                "files": self.files,
            },
            "bundle": self.bundle,
            "signature": {
                "keyid": self.keyid,
                "key": self.key.name if self.key else None,
                "key_version": self.key.version if self.key else None,
                "algorithm": self.algorithm,
                "public_key_sha256": self.public_key_sha256,
                "signed_at": utc_timestamp(self.signed_at) if self.signed_at else None,
            },
            "key_status": self.key_status,
            "integrity": self.integrity,
            "provenance": None
            if prov is None
            else {
                "builder_id": prov.builder_id,
                "git_sha": prov.git_sha,
                "container_digest": prov.container_digest,
                "dataset_snapshot": prov.dataset_snapshot,
                "policy_digest": prov.policy_digest,
                "parameters": dict(prov.parameters),
            },
            "acceptance": self.acceptance,
            "checks": self.checks,
            "seconds": round(self.seconds, 4),
        }


class ModelVerificationError(Exception):
    """Verification failed: `failure` (the exit code), `detail`, and the full `report`."""

    def __init__(self, failure: Failure, detail: str, report: Report) -> None:
        super().__init__(f"{failure.code}: {detail}")
        self.failure = failure
        self.detail = detail
        self.report = report


def fail(report: Report, failure: Failure, detail: str, check: str) -> ModelVerificationError:
    """Record the failed `check` in `report` and return the error to raise."""
    report.check(check, False, detail)
    report.failure = failure
    report.detail = detail
    return ModelVerificationError(failure, detail, report)
