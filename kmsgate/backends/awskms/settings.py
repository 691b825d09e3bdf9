"""Configuration of a `type: awskms` backend: region, endpoint and credentials, alias prefix,
deletion window, tags and key policy, timeouts, retries and the per-quota rate limits
(`RateLimits`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from kmsgate.backends.awskms.specs import _CONTEXT_PREFIX
from kmsgate.errors import ConfigError
from kmsgate.loopback import https_or_loopback, plain_http_refused

_ALIAS_PREFIX = re.compile(r"^alias/[A-Za-z0-9/_-]*/$")
KEY_POLICY_MAX_BYTES = 32 * 1024
"""AWS's limit on a key policy document."""


class RateLimits(BaseModel):
    """Requests per second this gateway instance may send, per AWS quota class (None: no
    limit). Set them to the account's quotas divided by the number of replicas."""

    model_config = ConfigDict(extra="forbid")

    symmetric: float | None = Field(default=None, gt=0)
    """Encrypt, Decrypt, GenerateDataKey, ReEncrypt, GenerateMac, VerifyMac."""
    rsa: float | None = Field(default=None, gt=0)
    """Sign with RSA keys."""
    ecc: float | None = Field(default=None, gt=0)
    """Sign with elliptic-curve keys (ECDSA, Ed25519)."""
    control: float | None = Field(default=None, gt=0)
    """Everything else: CreateKey, GetPublicKey, DescribeKey, aliases, deletion, ..."""
    burst: float = Field(default=1.0, gt=0)
    """Bucket size, in seconds' worth of requests (at least one request)."""
    max_wait: float = Field(default=0.5, ge=0)
    """Longest a request waits for a token; beyond it the call fails with 503 Retry-After."""


class AwsKmsSettings(BaseModel):
    """The `backends.<name>` entry of a `type: awskms` backend (everything but `type`).

    Credentials come from the default chain (environment, shared files, container or
    instance role) unless `profile` or explicit keys are given; explicit keys are for test
    endpoints (moto, LocalStack), never for production.
    """

    model_config = ConfigDict(extra="forbid")

    region: str | None = Field(default=None, pattern=r"^[a-z0-9-]{1,32}$")
    profile: str | None = None
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/.*)?$")
    """A VPC endpoint, FIPS endpoint, LocalStack or moto; AWS's public endpoint if unset.
    `http://` only to a loopback host: SigV4 keeps the secret key off the wire, but requests
    and replies carry plaintext (encrypt, decrypt, data keys)."""
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None

    alias_prefix: str = Field(default="alias/kmsgate/", pattern=_ALIAS_PREFIX.pattern)
    pending_window_days: int = Field(default=30, ge=7, le=30)
    """Days between `destroy` and AWS deleting the KMS key (ScheduleKeyDeletion)."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Extra tags put on every KMS key kmsgate creates."""
    key_policy_file: Path | None = None
    """A JSON key policy document (at most 32 KiB) given as `Policy` to every CreateKey
    kmsgate makes, read once at start (`read_key_policy`); unset, AWS gives the key its
    default policy, which lets IAM identity policies of the account allow any use of it.
    Adopted keys keep their own."""

    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float = Field(default=5.0, gt=0)
    """Seconds to wait for an answer to a request sent; past it, 503 at once (not retried:
    the request may have been carried out, and a hung endpoint answers a retry no sooner)."""
    max_connections: int = Field(default=32, ge=1)
    max_concurrency: int = Field(default=8, ge=1)
    """Parallel Sign requests for one batch."""
    max_attempts: int = Field(default=4, ge=1, le=20)
    """Tries per request when AWS throttles or fails transiently (1: no retry)."""
    backoff_base: float = Field(default=0.05, ge=0)
    """Retry n waits a random time in [0, min(backoff_max, backoff_base * 2**n)] (full jitter)."""
    backoff_max: float = Field(default=1.0, ge=0)
    retry_after: int = Field(default=1, ge=1)
    """Retry-After (seconds) sent with a 503 after the retries are spent."""
    rate_limits: RateLimits = Field(default_factory=RateLimits)

    @field_validator("endpoint_url")
    @classmethod
    def _https_off_loopback(cls, url: str | None) -> str | None:
        if url is not None and not https_or_loopback(url):
            raise ValueError(plain_http_refused(url, "plaintext and data keys"))
        return url

    @model_validator(mode="after")
    def _credentials(self) -> AwsKmsSettings:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key go together")
        if self.profile is not None and self.access_key_id is not None:
            raise ValueError("configure either profile or access keys, not both")
        if self.alias_prefix.startswith("alias/aws/"):
            raise ValueError("alias names under alias/aws/ are reserved for AWS")
        for key in self.tags:
            if key.startswith(("aws:", _CONTEXT_PREFIX)):
                raise ValueError(f"tag {key!r}: the 'aws:' and 'kmsgate:' prefixes are reserved")
        return self


def read_key_policy(backend: str, path: Path) -> str:
    """The key policy document in `path`, as it is sent to AWS. Raises ConfigError naming
    the file if it cannot be read, is larger than `KEY_POLICY_MAX_BYTES` or is not a JSON
    object."""
    where = f"backend {backend!r} (awskms): key_policy_file {path}"
    try:
        with path.open("rb") as source:
            data = source.read(KEY_POLICY_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror}") from None
    if len(data) > KEY_POLICY_MAX_BYTES:
        raise ConfigError(f"{where} is larger than 32 KiB, AWS's limit for a key policy")
    try:
        text = data.decode()
        policy = json.loads(text)
    except ValueError as exc:  # UnicodeDecodeError is one
        raise ConfigError(f"{where} is not JSON in UTF-8: {exc}") from None
    if not isinstance(policy, dict):
        raise ConfigError(f"{where} is not a JSON object (a key policy document)")
    return text
