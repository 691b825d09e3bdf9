"""SLSA Provenance v1 statements for signed models.

The statement's subject is the model (same name and root digest as the model signature's
subject). kmsgate-specific facts that the model_signing predicate has no room for (signing
time, key name and version, algorithm, the gateway's policy digest) are in
`predicate.buildDefinition.internalParameters.kmsgate`; the build facts (builder id, git
commit, training container digest, dataset snapshot, parameters) come from CI variables or
explicit values (https://slsa.dev/spec/v1.0/provenance).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kmsgate.model_signing.bundle import STATEMENT_TYPE, BundleError
from kmsgate.text import utc_timestamp

SLSA_PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://kmsgate.dev/model-signing/v1"


@dataclass(frozen=True)
class BuildInfo:
    """What the provenance says about the build; `from_env` fills the blanks from CI."""

    builder_id: str | None = None
    git_sha: str | None = None
    git_repo: str | None = None
    container_digest: str | None = None
    dataset_snapshot: str | None = None
    dataset_digest: str | None = None
    invocation_id: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)

    def with_env(self, env: Mapping[str, str] | None = None) -> BuildInfo:
        """Unset fields from GitHub Actions, GitLab CI or generic variables; explicit values win.

        GitHub: GITHUB_SERVER_URL, GITHUB_WORKFLOW_REF, GITHUB_REPOSITORY, GITHUB_SHA,
        GITHUB_RUN_ID, GITHUB_RUN_ATTEMPT. GitLab: CI_SERVER_URL, CI_PROJECT_PATH,
        CI_PROJECT_URL, CI_COMMIT_SHA, CI_JOB_URL, CI_RUNNER_ID. Generic: TRAIN_IMAGE_DIGEST
        or KMSGATE_CONTAINER_DIGEST, KMSGATE_DATASET_SNAPSHOT, KMSGATE_BUILDER_ID.
        """
        e = os.environ if env is None else env
        builder = e.get("KMSGATE_BUILDER_ID")
        repo = sha = invocation = None
        if e.get("GITHUB_ACTIONS") == "true":
            server = e.get("GITHUB_SERVER_URL", "https://github.com")
            if e.get("GITHUB_WORKFLOW_REF"):
                builder = builder or f"{server}/{e['GITHUB_WORKFLOW_REF']}"
            repo = f"{server}/{e['GITHUB_REPOSITORY']}" if e.get("GITHUB_REPOSITORY") else None
            sha = e.get("GITHUB_SHA")
            if repo and e.get("GITHUB_RUN_ID"):
                attempt = e.get("GITHUB_RUN_ATTEMPT", "1")
                invocation = f"{repo}/actions/runs/{e['GITHUB_RUN_ID']}/attempts/{attempt}"
        elif e.get("GITLAB_CI") == "true":
            if e.get("CI_SERVER_URL") and e.get("CI_RUNNER_ID"):
                builder = builder or f"{e['CI_SERVER_URL']}/runners/{e['CI_RUNNER_ID']}"
            repo = e.get("CI_PROJECT_URL")
            sha = e.get("CI_COMMIT_SHA")
            invocation = e.get("CI_JOB_URL")
        return BuildInfo(
            builder_id=self.builder_id or builder,
            git_sha=self.git_sha or sha,
            git_repo=self.git_repo or repo,
            container_digest=self.container_digest
            or e.get("KMSGATE_CONTAINER_DIGEST")
            or e.get("TRAIN_IMAGE_DIGEST"),
            dataset_snapshot=self.dataset_snapshot or e.get("KMSGATE_DATASET_SNAPSHOT"),
            dataset_digest=self.dataset_digest,
            invocation_id=self.invocation_id or invocation,
            parameters=dict(self.parameters),
        )


@dataclass(frozen=True)
class SigningFacts:
    """kmsgate's part of the provenance."""

    gateway: str
    key: str
    key_version: int
    algorithm: str
    signed_at: datetime
    policy_digest: str | None


def parse_time(value: str) -> datetime:
    """Raises ValueError for anything but an RFC 3339 time with an offset."""
    when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError(f"time {value!r} has no UTC offset")
    return when.astimezone(UTC)


def provenance_statement(
    model_name: str,
    root_digest: bytes,
    build: BuildInfo,
    facts: SigningFacts,
    started: datetime,
    finished: datetime,
) -> dict[str, Any]:
    dependencies: list[dict[str, Any]] = []
    if build.git_sha:
        uri = f"git+{build.git_repo}" if build.git_repo else "git"
        dependencies.append({"uri": uri, "digest": {"gitCommit": build.git_sha}})
    if build.container_digest:
        algo, _, value = build.container_digest.partition(":")
        digest = {algo: value} if value else {"sha256": algo}
        dependencies.append({"name": "training-container", "digest": digest})
    if build.dataset_snapshot:
        dataset: dict[str, Any] = {"name": "dataset", "uri": build.dataset_snapshot}
        if build.dataset_digest:
            algo, _, value = build.dataset_digest.partition(":")
            dataset["digest"] = {algo: value} if value else {"sha256": algo}
        dependencies.append(dataset)
    metadata: dict[str, Any] = {
        "startedOn": utc_timestamp(started),
        "finishedOn": utc_timestamp(finished),
    }
    if build.invocation_id:
        metadata["invocationId"] = build.invocation_id
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": root_digest.hex()}}],
        "predicateType": SLSA_PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "parameters": dict(build.parameters),
                    "dataset_snapshot": build.dataset_snapshot,
                    "container_digest": build.container_digest,
                    "git_sha": build.git_sha,
                },
                "internalParameters": {
                    "kmsgate": {
                        "gateway": facts.gateway,
                        "key": facts.key,
                        "key_version": facts.key_version,
                        "algorithm": facts.algorithm,
                        "signed_at": utc_timestamp(facts.signed_at),
                        "policy_digest": facts.policy_digest,
                    }
                },
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": {"id": build.builder_id or "https://kmsgate.dev/builders/local"},
                "metadata": metadata,
            },
        },
    }


@dataclass(frozen=True)
class ProvenanceSummary:
    """The provenance fields verification and acceptance policies use."""

    subject_name: str
    subject_digest: str
    key: str
    key_version: int
    algorithm: str
    signed_at: datetime
    policy_digest: str | None
    builder_id: str | None
    git_sha: str | None
    container_digest: str | None
    dataset_snapshot: str | None
    parameters: Mapping[str, Any]

    @classmethod
    def parse(cls, statement: Mapping[str, Any]) -> ProvenanceSummary:
        """Raises BundleError if `statement` is not a kmsgate SLSA provenance."""
        try:
            if statement["predicateType"] != SLSA_PREDICATE_TYPE:
                raise BundleError(f"not SLSA provenance: {statement['predicateType']!r}")
            (subject,) = statement["subject"]
            definition = statement["predicate"]["buildDefinition"]
            k = definition["internalParameters"]["kmsgate"]
            ext = definition["externalParameters"]
            return cls(
                subject_name=str(subject["name"]),
                subject_digest=str(subject["digest"]["sha256"]),
                key=str(k["key"]),
                key_version=int(k["key_version"]),
                algorithm=str(k["algorithm"]),
                signed_at=parse_time(str(k["signed_at"])),
                policy_digest=k.get("policy_digest"),
                builder_id=statement["predicate"]["runDetails"]["builder"].get("id"),
                git_sha=ext.get("git_sha"),
                container_digest=ext.get("container_digest"),
                dataset_snapshot=ext.get("dataset_snapshot"),
                parameters=dict(ext.get("parameters") or {}),
            )
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"malformed provenance: {exc!r}") from None
