"""awskms: keys held by AWS KMS (or an endpoint speaking its API: a VPC endpoint, LocalStack,
moto), through boto3.

Key material never leaves KMS. Every kmsgate key version is recorded as the KMS key that backs
it (`BackendKey.material`, JSON: ARN, KeySpec, and for rotated symmetric keys the on-demand
rotation it stands for). `BackendKey.ref` is `awskms:<key ARN>#<kmsgate version>`.

- Keys: `CreateKey` with the KeySpec / KeyUsage of the kmsgate type (`_KEY_SPECS`), tags from
  the labels plus `kmsgate:name` / `kmsgate:version`, alias `<alias_prefix><name>` (a `.` in a
  kmsgate name becomes `/`: AWS alias names cannot hold dots, kmsgate names cannot hold
  slashes, so the mapping is one-to-one) pointing at the newest KMS key of the kmsgate key.
- Rotation: an aes-256-gcm key keeps one KMS key; version N > 1 is one `RotateKeyOnDemand`
  (AWS picks the right key material on decrypt). Asymmetric and HMAC keys cannot be rotated
  by AWS: version N > 1 is a new KMS key, and the alias moves to it.
- Deletion: `destroy` schedules the KMS key's deletion (`ScheduleKeyDeletion`, window
  `pending_window_days`) and removes the alias if it still points at that key.
- sign: `MessageType=RAW` for messages of 1-4096 bytes, `DIGEST` for digests (hashed locally
  for longer or empty messages). ECDSA with a hash other than the curve's own (P-256 with
  SHA-384, ...) signs the digest truncated or zero-padded to the curve's size, which is
  exactly what ECDSA does with a longer or shorter hash (FIPS 186-5, 6.4.1). RSA-PSS is
  AWS's: MGF1 with the message hash, salt = hash length. Verification is local (the service
  uses the public key read once with `GetPublicKey`).
- MAC: `GenerateMac` / `VerifyMac` (1-4096 bytes, the API's limit).
- wrap/unwrap: `Encrypt` / `Decrypt` with an EncryptionContext (the kmsgate context, the key
  name and the AAD), the KMS key pinned on decrypt. `encrypt`/`decrypt`/`generate_data_key`
  take a string-map context; `rewrap` is `ReEncrypt` between two KMS keys.
- Throttling and transient errors: retried with full jitter (`max_attempts`), then
  BackendUnavailable (503 with Retry-After). An optional token bucket per quota class
  (`rate_limits`) keeps kmsgate under the account's request quotas.
- kmsgate's key states are kmsgate's: the service refuses disabled keys before calling here,
  and a destroyed version (material dropped, or destroyed through this instance) is refused
  here whatever KMS would do.

AWS error text is logged (never key material, plaintext or credentials), never put in an
error detail. See docs/backends/awskms.md.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

import boto3  # type: ignore[import-untyped]
import botocore.config  # type: ignore[import-untyped]
import botocore.exceptions  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from kmsgate.algorithms import (
    HashName,
    KeyType,
    Scheme,
    SignAlg,
    check_digest,
    key_type_of_public_key,
    sign_algorithm,
)
from kmsgate.backends.base import (
    AdoptCapable,
    BackendKey,
    BackendStatus,
    KeyBackend,
    KeySpec,
    MacCapable,
    SignMessage,
    WrapCapable,
)
from kmsgate.config import BackendSettings
from kmsgate.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    Conflict,
    DecryptionFailed,
    InvalidRequest,
    KeyDestroyed,
    KmsgateError,
    NotFound,
    NotSupported,
    Unavailable,
)

__all__ = ["AwsKmsBackend", "AwsKmsSettings", "RateLimits", "SignPlan"]

_log = logging.getLogger(__name__)

QuotaClass = Literal["symmetric", "rsa", "ecc", "control"]

# kmsgate key type -> (KeySpec, KeyUsage, quota class)
_KEY_SPECS: dict[KeyType, tuple[str, str, QuotaClass]] = {
    KeyType.ED25519: ("ECC_NIST_EDWARDS25519", "SIGN_VERIFY", "ecc"),
    KeyType.ECDSA_P256: ("ECC_NIST_P256", "SIGN_VERIFY", "ecc"),
    KeyType.ECDSA_P384: ("ECC_NIST_P384", "SIGN_VERIFY", "ecc"),
    KeyType.RSA_3072: ("RSA_3072", "SIGN_VERIFY", "rsa"),
    KeyType.RSA_4096: ("RSA_4096", "SIGN_VERIFY", "rsa"),
    KeyType.HMAC_SHA256: ("HMAC_256", "GENERATE_VERIFY_MAC", "symmetric"),
    KeyType.HMAC_SHA384: ("HMAC_384", "GENERATE_VERIFY_MAC", "symmetric"),
    KeyType.HMAC_SHA512: ("HMAC_512", "GENERATE_VERIFY_MAC", "symmetric"),
    KeyType.AES_256_GCM: ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", "symmetric"),
}
_SPEC_TYPES: dict[str, KeyType] = {spec: t for t, (spec, _, _) in _KEY_SPECS.items()}
_MAC_HASH: dict[KeyType, HashName] = {
    KeyType.HMAC_SHA256: HashName.SHA256,
    KeyType.HMAC_SHA384: HashName.SHA384,
    KeyType.HMAC_SHA512: HashName.SHA512,
}
_AWS_HASH = {HashName.SHA256: "SHA_256", HashName.SHA384: "SHA_384", HashName.SHA512: "SHA_512"}
_ECDSA_NATIVE: dict[KeyType, HashName] = {
    KeyType.ECDSA_P256: HashName.SHA256,
    KeyType.ECDSA_P384: HashName.SHA384,
}
_RAW_MAX = 4096
"""Largest Message that Sign (RAW), GenerateMac, VerifyMac and Encrypt accept."""
_CIPHERTEXT_MAX = 6144
_MATERIAL_FORMAT = 1

_RETRYABLE_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "ThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "KMSInternalException",
        "DependencyTimeoutException",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
    }
)
_CREDENTIAL_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
    }
)
_CONTEXT_PREFIX = "kmsgate:"
_ALIAS_PREFIX = re.compile(r"^alias/[A-Za-z0-9/_-]*/$")
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REF = re.compile(r"^awskms:(?P<arn>arn:[^#\s]+:key/[^#\s]+)#(?P<version>[1-9][0-9]{0,9})$")
_TAG_VALUE = re.compile(r"^[\w\s.:/=+\-@]*$")


# -- configuration ---------------------------------------------------------------------------


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
    """A VPC endpoint, FIPS endpoint, LocalStack or moto; AWS's public endpoint if unset."""
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None

    alias_prefix: str = Field(default="alias/kmsgate/", pattern=_ALIAS_PREFIX.pattern)
    pending_window_days: int = Field(default=30, ge=7, le=30)
    """Days between `destroy` and AWS deleting the KMS key (ScheduleKeyDeletion)."""
    delete_adopted_keys: bool = False
    """Whether `destroy` schedules the deletion of an adopted key (else it only disables it)."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Extra tags put on every KMS key kmsgate creates."""

    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float = Field(default=10.0, gt=0)
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


# -- helpers ---------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


def _alias_of(prefix: str, name: str) -> str:
    """`<prefix><name>` with `.` written `/` (one-to-one: kmsgate names hold no `/`)."""
    return prefix + name.replace(".", "/")


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True, slots=True)
class _Material:
    """What kmsgate persists per key version: which KMS key backs it (never key material)."""

    arn: str
    spec: str
    rotation: int = 0
    """Symmetric keys: the on-demand rotations kmsgate requested up to this version."""
    rotated_at: str | None = None
    adopted: bool = False

    def dump(self) -> bytes:
        body: dict[str, object] = {"format": _MATERIAL_FORMAT, "arn": self.arn, "spec": self.spec}
        if self.rotation:
            body["rotation"] = self.rotation
            body["rotated_at"] = self.rotated_at
        if self.adopted:
            body["adopted"] = True
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def load(cls, key: BackendKey) -> _Material:
        """The material of `key`. Raises KeyDestroyed if dropped, BackendError if unreadable."""
        if key.material is None:
            raise KeyDestroyed(f"version {key.version} of {key.name!r} was destroyed")
        try:
            body = json.loads(key.material)
            if body.get("format") != _MATERIAL_FORMAT:
                raise ValueError("unknown format")
            material = cls(
                arn=str(body["arn"]),
                spec=str(body["spec"]),
                rotation=int(body.get("rotation", 0)),
                rotated_at=body.get("rotated_at"),
                adopted=bool(body.get("adopted", False)),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BackendError("the stored awskms key record is unreadable") from None
        match = _REF.match(key.ref)
        if match is None or match["arn"] != material.arn or int(match["version"]) != key.version:
            raise BackendError("the stored awskms key record does not match its reference")
        if _SPEC_TYPES.get(material.spec) is not key.key_type:
            raise BackendError("the stored awskms key record does not match the key type")
        return material


@dataclass(frozen=True, slots=True)
class SignPlan:
    """The Sign request kmsgate sends for one message: what `MessageType` and
    `SigningAlgorithm` it uses and which bytes go in `Message`."""

    message: bytes
    message_type: Literal["RAW", "DIGEST"]
    algorithm: str


def sign_plan(key_type: KeyType, alg: SignAlg, data: bytes, *, prehashed: bool) -> SignPlan:
    """The AWS KMS Sign request for `data` (a digest if `prehashed`) under `alg`.

    Raises InvalidRequest if the algorithm does not fit the key, a digest has the wrong
    length, or an Ed25519 message is outside 1-4096 bytes (AWS signs Ed25519 in RAW only).
    """
    alg = sign_algorithm(key_type, alg.name)
    if prehashed:
        check_digest(alg, data)
    if alg.scheme is Scheme.ED25519:
        if not 1 <= len(data) <= _RAW_MAX:
            raise InvalidRequest(f"AWS KMS signs Ed25519 messages of 1 to {_RAW_MAX} bytes")
        return SignPlan(data, "RAW", "ED25519_SHA_512")
    assert alg.hash is not None
    if alg.scheme is Scheme.ECDSA:
        native = _ECDSA_NATIVE[key_type]
        aws_alg = f"ECDSA_{_AWS_HASH[native]}"
        if alg.hash is native:
            if not prehashed and 1 <= len(data) <= _RAW_MAX:
                return SignPlan(data, "RAW", aws_alg)
            digest = data if prehashed else hashlib.new(alg.hash.value, data).digest()
            return SignPlan(digest, "DIGEST", aws_alg)
        # ECDSA uses the leftmost min(order bits, hash bits) bits of the hash as an integer:
        # truncating a longer digest, or zero-padding a shorter one on the left, to the
        # curve's digest size gives the same integer, hence the same signature scheme.
        digest = data if prehashed else hashlib.new(alg.hash.value, data).digest()
        size = native.digest_size
        fitted = digest[:size] if len(digest) >= size else bytes(size - len(digest)) + digest
        return SignPlan(fitted, "DIGEST", aws_alg)
    padding = "PSS" if alg.scheme is Scheme.RSA_PSS else "PKCS1_V1_5"
    aws_alg = f"RSASSA_{padding}_{_AWS_HASH[alg.hash]}"
    if not prehashed and 1 <= len(data) <= _RAW_MAX:
        return SignPlan(data, "RAW", aws_alg)
    digest = data if prehashed else hashlib.new(alg.hash.value, data).digest()
    return SignPlan(digest, "DIGEST", aws_alg)


class _TokenBucket:
    """A thread-safe token bucket: `rate` tokens per second, at most `capacity`."""

    def __init__(self, rate: float, burst_seconds: float, max_wait: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate * burst_seconds)
        self.max_wait = max_wait
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> float:
        """Reserve a token; return the seconds to sleep before using it, or raise
        _RateLimited(wait) when that would exceed `max_wait` (nothing reserved then)."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            wait = max(0.0, (1.0 - self._tokens) / self.rate)
            if wait > self.max_wait:
                raise _RateLimited(wait)
            self._tokens -= 1.0
            return wait


class _RateLimited(Exception):
    def __init__(self, wait: float) -> None:
        super().__init__(f"rate limited for {wait:.3f} s")
        self.wait = wait


class _AwsError(Exception):
    """A non-retryable error reply from AWS, translated by the caller (never shown)."""

    def __init__(self, operation: str, code: str, message: str) -> None:
        super().__init__(f"{operation}: {code}")
        self.operation = operation
        self.code = code
        self.message = message


# -- the backend -----------------------------------------------------------------------------


class AwsKmsBackend(KeyBackend, MacCapable, WrapCapable, AdoptCapable):
    """AWS KMS through boto3: sign, MAC, wrap, encrypt with an EncryptionContext, rewrap."""

    scheme: ClassVar[str] = "awskms"

    def __init__(self, name: str, settings: AwsKmsSettings, *, client: Any | None = None) -> None:
        super().__init__(name)
        self.settings = settings
        self._client: Any = client if client is not None else self._make_client(settings)
        limits = settings.rate_limits
        rates: dict[QuotaClass, float | None] = {
            "symmetric": limits.symmetric,
            "rsa": limits.rsa,
            "ecc": limits.ecc,
            "control": limits.control,
        }
        self._buckets: dict[QuotaClass, _TokenBucket] = {
            quota: _TokenBucket(rate, limits.burst, limits.max_wait)
            for quota, rate in rates.items()
            if rate is not None
        }
        self._destroyed: set[str] = set()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.requests = 0
        """Requests sent to AWS (tries included), for tests and metrics."""

    @staticmethod
    def _make_client(settings: AwsKmsSettings) -> Any:
        """A boto3 KMS client with botocore's own retries off (kmsgate retries). Raises
        ConfigError for an unknown profile or a missing region."""
        config = botocore.config.Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            max_pool_connections=settings.max_connections,
            user_agent_extra="kmsgate",
        )
        try:
            session = boto3.session.Session(
                profile_name=settings.profile,
                region_name=settings.region,
                aws_access_key_id=settings.access_key_id,
                aws_secret_access_key=(
                    settings.secret_access_key.get_secret_value()
                    if settings.secret_access_key
                    else None
                ),
                aws_session_token=(
                    settings.session_token.get_secret_value() if settings.session_token else None
                ),
            )
            return session.client("kms", endpoint_url=settings.endpoint_url, config=config)
        except botocore.exceptions.ProfileNotFound as exc:
            raise ConfigError(f"awskms: AWS profile {settings.profile!r} not found") from exc
        except botocore.exceptions.NoRegionError as exc:
            raise ConfigError("awskms: no AWS region (set `region` or AWS_REGION)") from exc

    @classmethod
    def from_config(cls, name: str, cfg: BackendSettings) -> AwsKmsBackend:
        """Raises ConfigError for invalid settings (the message names fields, not values)."""
        try:
            settings = AwsKmsSettings.model_validate(cfg.model_extra or {})
        except ValidationError as exc:
            fields = sorted({".".join(str(p) for p in e["loc"]) or "-" for e in exc.errors()})
            msgs = "; ".join(e["msg"] for e in exc.errors() if not e["loc"])
            raise ConfigError(
                f"backend {name!r} (awskms): invalid settings: {', '.join(fields)}"
                + (f" ({msgs})" if msgs else "")
            ) from None
        return cls(name, settings)

    # -- transport --------------------------------------------------------------------------

    def _unavailable(self, why: str, retry_after: int | None = None) -> BackendUnavailable:
        return BackendUnavailable(
            f"backend {self.name!r} is {why}", retry_after=retry_after or self.settings.retry_after
        )

    def _throttle(self, quota: QuotaClass) -> None:
        bucket = self._buckets.get(quota)
        if bucket is None:
            return
        try:
            wait = bucket.take()
        except _RateLimited as exc:
            raise self._unavailable(
                f"at its configured {quota} request rate", max(1, math.ceil(exc.wait))
            ) from None
        if wait > 0:
            time.sleep(wait)

    def _backoff(self, attempt: int) -> None:
        cap = min(self.settings.backoff_max, self.settings.backoff_base * 2**attempt)
        time.sleep(random.uniform(0, cap))  # noqa: S311 (jitter, not a secret)

    def _call(self, operation: str, quota: QuotaClass, **params: Any) -> dict[str, Any]:
        """One KMS API call with rate limiting and retries.

        Raises BackendUnavailable (throttled or unreachable after the retries, or the local
        rate limit), BackendError (credentials refused, malformed reply), or _AwsError for
        any other error reply (the caller translates it).
        """
        method = getattr(self._client, operation)
        attempts = self.settings.max_attempts
        last = "unreachable"
        for attempt in range(attempts):
            if attempt:
                self._backoff(attempt)
            self._throttle(quota)
            with self._lock:
                self.requests += 1
            try:
                reply: dict[str, Any] = method(**params)
                return reply
            except botocore.exceptions.ClientError as exc:
                error = exc.response.get("Error", {})
                code = str(error.get("Code", ""))
                message = str(error.get("Message", ""))
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
                if code in _RETRYABLE_CODES or status >= 500:
                    last = "throttled" if "Throttl" in code or "Limit" in code else "failing"
                    _log.info("awskms %s: %s (try %d/%d)", operation, code, attempt + 1, attempts)
                    continue
                if code in _CREDENTIAL_CODES or code == "AccessDeniedException":
                    _log.warning("awskms %s refused: %s: %s", operation, code, message)
                    raise _AwsError(operation, code, message) from None
                _log.info("awskms %s: %s: %s", operation, code, message)
                raise _AwsError(operation, code, message) from None
            except (
                botocore.exceptions.ConnectionError,
                botocore.exceptions.HTTPClientError,
            ) as exc:
                last = "unreachable"
                _log.info(
                    "awskms %s: %s (try %d/%d)",
                    operation,
                    type(exc).__name__,
                    attempt + 1,
                    attempts,
                )
                continue
            except botocore.exceptions.NoCredentialsError:
                raise BackendError(f"backend {self.name!r} has no AWS credentials") from None
            except botocore.exceptions.ParamValidationError:
                # botocore's text may quote parameter values (plaintext): never log it
                _log.error("awskms %s: request rejected by botocore's validation", operation)
                raise BackendError(f"backend {self.name!r} built an invalid request") from None
            except botocore.exceptions.BotoCoreError as exc:
                _log.warning("awskms %s: %s", operation, type(exc).__name__)
                raise BackendError(f"backend {self.name!r} failed") from None
        _log.warning("awskms %s: %s after %d tries", operation, last, attempts)
        raise self._unavailable(last)

    def _translated_call(
        self, what: str, operation: str, quota: QuotaClass, **params: Any
    ) -> dict[str, Any]:
        """`_call`, with any other AWS error reply translated by `_fail` (for `what`)."""
        try:
            return self._call(operation, quota, **params)
        except _AwsError as exc:
            raise self._fail(exc, what) from None

    def _fail(self, exc: _AwsError, what: str) -> KmsgateError:
        """The generic translation of an AWS error reply for an operation on a key."""
        if exc.code in _CREDENTIAL_CODES:
            return BackendError(f"backend {self.name!r}: AWS refused kmsgate's credentials")
        if exc.code == "AccessDeniedException":
            return BackendError(f"backend {self.name!r}: AWS denied {what}")
        if exc.code == "NotFoundException":
            return KeyDestroyed("the AWS KMS key behind this key version no longer exists")
        if exc.code in ("DisabledException", "KMSInvalidStateException"):
            return BackendError(f"backend {self.name!r}: the AWS KMS key is not usable ({what})")
        if exc.code == "KeyUnavailableException":
            return self._unavailable("unable to reach the key's key store")
        return BackendError(f"backend {self.name!r} failed to {what}")

    def _check_live(self, key: BackendKey) -> _Material:
        """The key's material; KeyDestroyed if kmsgate destroyed it, whatever AWS says."""
        material = _Material.load(key)
        if key.ref in self._destroyed:
            raise KeyDestroyed(f"version {key.version} of {key.name!r} was destroyed")
        return material

    # -- keys -------------------------------------------------------------------------------

    def _tags(self, spec: KeySpec) -> list[dict[str, str]]:
        tags = {**self.settings.tags}
        for label, value in spec.labels.items():
            if _TAG_VALUE.match(value) and not label.startswith(("aws:", _CONTEXT_PREFIX)):
                tags[label] = value
            else:
                _log.info("awskms: label %r not copied to a tag (characters AWS refuses)", label)
        tags["kmsgate:name"] = spec.name
        tags["kmsgate:version"] = str(spec.version)
        tags["kmsgate:type"] = spec.key_type.value
        return [{"TagKey": k, "TagValue": v} for k, v in sorted(tags.items())]

    def create_key(self, spec: KeySpec) -> BackendKey:
        """Version 1: a new KMS key and its alias. Version N > 1: a new KMS key (asymmetric,
        HMAC) or one on-demand rotation (aes-256-gcm). Raises NotSupported if the endpoint
        refuses the KeySpec, BackendUnavailable, BackendError."""
        if not _KEY_NAME.match(spec.name) or spec.version < 1:
            raise InvalidRequest("invalid key name or version")
        key_spec, usage, _ = _KEY_SPECS[spec.key_type]
        if spec.key_type is KeyType.AES_256_GCM and spec.version > 1:
            return self._rotate_symmetric(spec)
        try:
            reply = self._call(
                "create_key",
                "control",
                KeySpec=key_spec,
                KeyUsage=usage,
                Description=f"kmsgate key {spec.name} version {spec.version}",
                Tags=self._tags(spec),
            )
        except _AwsError as exc:
            if exc.code in ("ValidationException", "UnsupportedOperationException"):
                raise NotSupported(
                    f"backend {self.name!r}: the AWS KMS endpoint does not offer {key_spec} keys"
                ) from None
            if exc.code == "LimitExceededException":
                raise Conflict(
                    f"backend {self.name!r}: the AWS account's key quota is spent"
                ) from None
            raise self._fail(exc, "create a key") from None
        arn = self._arn_of(reply)
        try:
            public_pem = self._public_key(arn, spec.key_type)
            self._point_alias(spec.name, arn, create=spec.version == 1)
        except KmsgateError:
            self._schedule_deletion(arn)  # no orphan: the key is useless without its record
            raise
        material = _Material(arn=arn, spec=key_spec)
        return BackendKey(
            ref=f"awskms:{arn}#{spec.version}",
            key_type=spec.key_type,
            name=spec.name,
            version=spec.version,
            material=material.dump(),
            public_key_pem=public_pem,
        )

    @staticmethod
    def _arn_of(reply: Mapping[str, Any]) -> str:
        try:
            arn = str(reply["KeyMetadata"]["Arn"])
        except (KeyError, TypeError):
            raise BackendError("the backend returned an unexpected key description") from None
        if not arn.startswith("arn:") or ":key/" not in arn:
            raise BackendError("the backend returned an unexpected key ARN")
        return arn

    def _public_key(self, arn: str, key_type: KeyType) -> str | None:
        """PEM SubjectPublicKeyInfo from GetPublicKey, checked against `key_type` (None for
        symmetric keys). Raises BackendError."""
        if not key_type.is_asymmetric:
            return None
        reply = self._translated_call("read a public key", "get_public_key", "control", KeyId=arn)
        try:
            public = serialization.load_der_public_key(reply["PublicKey"])
            if key_type_of_public_key(public) is not key_type:
                raise ValueError("wrong key type")
        except (KeyError, TypeError, ValueError, InvalidRequest):
            raise BackendError("the backend returned an unusable public key") from None
        pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem.decode("ascii")

    def _point_alias(self, name: str, arn: str, *, create: bool) -> None:
        """Make `<alias_prefix><name>` point at `arn` (create, or move it from an older key)."""
        alias = _alias_of(self.settings.alias_prefix, name)
        first, second = (
            ("create_alias", "update_alias") if create else ("update_alias", "create_alias")
        )
        try:
            self._call(first, "control", AliasName=alias, TargetKeyId=arn)
            return
        except _AwsError as exc:
            if exc.code not in ("AlreadyExistsException", "NotFoundException"):
                raise self._fail(exc, "set the key alias") from None
        if create:
            _log.warning("awskms: alias %s existed; moving it to the new key", alias)
        self._translated_call(
            "set the key alias", second, "control", AliasName=alias, TargetKeyId=arn
        )

    def _rotate_symmetric(self, spec: KeySpec) -> BackendKey:
        """Version N > 1 of an aes-256-gcm key: RotateKeyOnDemand on the KMS key the alias
        names, recorded as the (N-1)th rotation. Raises Conflict when AWS refuses."""
        alias = _alias_of(self.settings.alias_prefix, spec.name)
        try:
            described = self._call("describe_key", "control", KeyId=alias)
        except _AwsError as exc:
            if exc.code == "NotFoundException":
                raise Conflict(
                    f"no KMS key is aliased {alias}: rotate adopted keys in AWS"
                ) from None
            raise self._fail(exc, "find the key to rotate") from None
        arn = self._arn_of(described)
        if described["KeyMetadata"].get("KeySpec") != "SYMMETRIC_DEFAULT":
            raise BackendError(f"backend {self.name!r}: {alias} is not a symmetric key")
        try:
            self._call("rotate_key_on_demand", "control", KeyId=arn)
        except _AwsError as exc:
            if exc.code == "LimitExceededException":
                raise Conflict(
                    "AWS KMS allows a limited number of on-demand rotations per key"
                ) from None
            if exc.code == "ConflictException":
                raise self._unavailable("rotating this key already") from None
            raise self._fail(exc, "rotate a key") from None
        material = _Material(
            arn=arn, spec="SYMMETRIC_DEFAULT", rotation=spec.version - 1, rotated_at=_now()
        )
        return BackendKey(
            ref=f"awskms:{arn}#{spec.version}",
            key_type=spec.key_type,
            name=spec.name,
            version=spec.version,
            material=material.dump(),
        )

    def adopt_key(self, spec: KeySpec, uri: str) -> BackendKey:
        """An existing KMS key (`awskms:<key id | ARN | alias/...>`, or the bare form),
        checked against `spec.key_type`. Creates no alias and no tag. Raises InvalidRequest,
        NotFound, BackendUnavailable, BackendError."""
        key_id = uri.removeprefix("awskms:")
        if not key_id or len(key_id) > 2048 or any(c.isspace() for c in key_id):
            raise InvalidRequest("malformed awskms key reference")
        try:
            reply = self._call("describe_key", "control", KeyId=key_id)
        except _AwsError as exc:
            if exc.code in ("NotFoundException", "InvalidArnException", "ValidationException"):
                raise NotFound("no such AWS KMS key") from None
            raise self._fail(exc, "describe a key") from None
        arn = self._arn_of(reply)
        meta = reply["KeyMetadata"]
        key_spec, usage, _ = _KEY_SPECS[spec.key_type]
        if meta.get("KeySpec") != key_spec or meta.get("KeyUsage") != usage:
            raise InvalidRequest(f"the AWS KMS key is not a {spec.key_type} key ({key_spec})")
        if meta.get("KeyState") != "Enabled":
            raise InvalidRequest("the AWS KMS key is not enabled")
        material = _Material(arn=arn, spec=key_spec, adopted=True)
        return BackendKey(
            ref=f"awskms:{arn}#{spec.version}",
            key_type=spec.key_type,
            name=spec.name,
            version=spec.version,
            material=material.dump(),
            public_key_pem=self._public_key(arn, spec.key_type),
        )

    def destroy(self, key: BackendKey) -> None:
        """Schedule the KMS key's deletion (`pending_window_days`) and drop its alias.

        Version N > 1 of an aes-256-gcm key shares the KMS key of version 1: AWS cannot
        delete one rotation's material, so only kmsgate forgets it. An adopted key is only
        disabled unless `delete_adopted_keys`. An already deleted key is not an error.
        Raises BackendUnavailable, BackendError.
        """
        with self._lock:
            self._destroyed.add(key.ref)
        match = _REF.match(key.ref)
        if match is None:
            raise BackendError("the key reference is not an awskms reference")
        arn = match["arn"]
        try:
            material = _Material.load(key)
        except KeyDestroyed:
            material = None
        if material is not None and material.rotation:
            _log.info(
                "awskms: %s v%d is a rotation of a shared KMS key: nothing to delete",
                key.name,
                key.version,
            )
            return
        if material is not None and material.adopted and not self.settings.delete_adopted_keys:
            try:
                self._call("disable_key", "control", KeyId=arn.rsplit("/", 1)[1])
            except _AwsError as exc:
                if exc.code not in ("NotFoundException", "KMSInvalidStateException"):
                    raise self._fail(exc, "disable an adopted key") from None
            return
        self._drop_alias(key.name, arn)
        self._schedule_deletion(arn, raise_errors=True)

    def _drop_alias(self, name: str, arn: str) -> None:
        alias = _alias_of(self.settings.alias_prefix, name)
        try:
            described = self._call("describe_key", "control", KeyId=alias)
            if self._arn_of(described) == arn:
                self._call("delete_alias", "control", AliasName=alias)
        except _AwsError as exc:
            if exc.code != "NotFoundException":
                raise self._fail(exc, "delete the key alias") from None

    def _schedule_deletion(self, arn: str, *, raise_errors: bool = False) -> None:
        try:
            self._call(
                "schedule_key_deletion",
                "control",
                # the key id, not the ARN: same key for AWS (our own account); moto 5.2
                # fails with HTTP 500 on an ARN here
                KeyId=arn.rsplit("/", 1)[1],
                PendingWindowInDays=self.settings.pending_window_days,
            )
        except _AwsError as exc:
            if exc.code in ("NotFoundException", "KMSInvalidStateException"):
                return  # gone or already pending deletion
            if raise_errors:
                raise self._fail(exc, "schedule a key deletion") from None
            _log.error("awskms: could not schedule the deletion of %s: %s", arn, exc.code)
        except Unavailable:
            if raise_errors:
                raise
            _log.error("awskms: could not schedule the deletion of %s (unavailable)", arn)

    # -- sign -------------------------------------------------------------------------------

    def sign(self, key: BackendKey, data: bytes, alg: SignAlg, *, prehashed: bool) -> bytes:
        """Sign with KMS (see `sign_plan`). Raises InvalidRequest, KeyDestroyed,
        BackendUnavailable, BackendError."""
        if not key.key_type.is_asymmetric:
            raise InvalidRequest(f"a {key.key_type} key cannot sign")
        plan = sign_plan(key.key_type, alg, data, prehashed=prehashed)
        material = self._check_live(key)
        quota: QuotaClass = "rsa" if key.key_type in (KeyType.RSA_3072, KeyType.RSA_4096) else "ecc"
        reply = self._translated_call(
            "sign",
            "sign",
            quota,
            KeyId=material.arn,
            Message=plan.message,
            MessageType=plan.message_type,
            SigningAlgorithm=plan.algorithm,
        )
        signature = reply.get("Signature")
        if not isinstance(signature, bytes) or reply.get("SigningAlgorithm") != plan.algorithm:
            raise BackendError("the backend returned a malformed signature")
        if reply.get("KeyId") not in (material.arn, None):
            raise BackendError("the backend signed with another key")
        return signature

    def sign_many(
        self, key: BackendKey, messages: Sequence[SignMessage]
    ) -> list[bytes | KmsgateError]:
        """Sign in parallel (`max_concurrency` requests in flight); KMS has no batch Sign.
        Unavailable fails the whole call; other errors stay in place."""
        if len(messages) <= 1 or self.settings.max_concurrency == 1:
            return super().sign_many(key, messages)

        def one(m: SignMessage) -> bytes | KmsgateError:
            try:
                return self.sign(key, m.data, m.alg, prehashed=m.prehashed)
            except Unavailable:
                raise
            except KmsgateError as exc:
                return exc

        return list(self._executor().map(one, messages))

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.settings.max_concurrency, thread_name_prefix=f"awskms-{self.name}"
                )
            return self._pool

    # -- MAC --------------------------------------------------------------------------------

    def _mac_request(self, key: BackendKey, data: bytes, hash_name: HashName) -> tuple[str, str]:
        expected = _MAC_HASH.get(key.key_type)
        if expected is None:
            raise InvalidRequest(f"a {key.key_type} key cannot compute MACs")
        if hash_name is not expected:
            raise InvalidRequest(f"a {key.key_type} key computes HMAC-{expected.value.upper()}")
        if not 1 <= len(data) <= _RAW_MAX:
            raise InvalidRequest(f"AWS KMS computes MACs over 1 to {_RAW_MAX} bytes")
        return self._check_live(key).arn, f"HMAC_{_AWS_HASH[expected]}"

    def mac(self, key: BackendKey, data: bytes, hash_name: HashName) -> bytes:
        """GenerateMac. Raises InvalidRequest (type, hash, size), KeyDestroyed,
        BackendUnavailable, BackendError."""
        arn, aws_alg = self._mac_request(key, data, hash_name)
        reply = self._translated_call(
            "compute a MAC",
            "generate_mac",
            "symmetric",
            KeyId=arn,
            Message=data,
            MacAlgorithm=aws_alg,
        )
        tag = reply.get("Mac")
        if not isinstance(tag, bytes) or len(tag) != hash_name.digest_size:
            raise BackendError("the backend returned a malformed MAC")
        return tag

    def verify_mac(self, key: BackendKey, data: bytes, mac: bytes, hash_name: HashName) -> bool:
        """VerifyMac (AWS compares); a tag of the wrong length is false without a request."""
        arn, aws_alg = self._mac_request(key, data, hash_name)
        if len(mac) != hash_name.digest_size:
            return False
        try:
            reply = self._call(
                "verify_mac", "symmetric", KeyId=arn, Message=data, MacAlgorithm=aws_alg, Mac=mac
            )
        except _AwsError as exc:
            if exc.code == "KMSInvalidMacException":
                return False
            raise self._fail(exc, "verify a MAC") from None
        return reply.get("MacValid") is True

    # -- encryption -------------------------------------------------------------------------

    def _encryption_key(self, key: BackendKey) -> str:
        if key.key_type is not KeyType.AES_256_GCM:
            raise InvalidRequest(f"a {key.key_type} key cannot encrypt or wrap")
        return self._check_live(key).arn

    @staticmethod
    def encryption_context(
        key: BackendKey, context: Mapping[str, str] | None = None, aad: bytes | None = None
    ) -> dict[str, str]:
        """The EncryptionContext for `key`: the caller's context, the kmsgate key name and
        (for `wrap`) the AAD in base64url. Raises InvalidRequest for a reserved key."""
        result: dict[str, str] = {}
        for k, v in (context or {}).items():
            if k.startswith(_CONTEXT_PREFIX) or k.startswith("aws"):
                raise InvalidRequest(f"context key {k!r}: the prefix is reserved")
            result[k] = v
        result[f"{_CONTEXT_PREFIX}key"] = key.name
        if aad:
            result[f"{_CONTEXT_PREFIX}aad"] = _b64url(aad)
        return result

    def _decrypt_failure(self, exc: _AwsError, what: str) -> KmsgateError:
        """Decrypt-like calls: a ciphertext that is bad, of another key, or whose context a
        key policy condition refuses (AccessDenied depends on the request then) is the
        caller's: DecryptionFailed. The error code is logged for operators."""
        if exc.code in ("InvalidCiphertextException", "IncorrectKeyException"):
            return DecryptionFailed()
        if exc.code == "AccessDeniedException":
            _log.warning("awskms %s: AccessDenied reported as decryption_failed", what)
            return DecryptionFailed()
        return self._fail(exc, what)

    def encrypt(
        self, key: BackendKey, plaintext: bytes, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Encrypt (1-4096 bytes) with the EncryptionContext of `context`. Raises
        InvalidRequest, KeyDestroyed, BackendUnavailable, BackendError."""
        return self._encrypt(key, plaintext, self.encryption_context(key, context))

    def _encrypt(self, key: BackendKey, plaintext: bytes, context: dict[str, str]) -> bytes:
        arn = self._encryption_key(key)
        if not 1 <= len(plaintext) <= _RAW_MAX:
            raise InvalidRequest(f"AWS KMS encrypts 1 to {_RAW_MAX} bytes")
        reply = self._translated_call(
            "encrypt",
            "encrypt",
            "symmetric",
            KeyId=arn,
            Plaintext=plaintext,
            EncryptionContext=context,
        )
        blob = reply.get("CiphertextBlob")
        if not isinstance(blob, bytes) or not blob:
            raise BackendError("the backend returned a malformed ciphertext")
        return blob

    def decrypt(
        self, key: BackendKey, ciphertext: bytes, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Decrypt with the KMS key pinned. Raises DecryptionFailed, KeyDestroyed,
        BackendUnavailable, BackendError."""
        return self._decrypt(key, ciphertext, self.encryption_context(key, context))

    def _decrypt(self, key: BackendKey, ciphertext: bytes, context: dict[str, str]) -> bytes:
        arn = self._encryption_key(key)
        if not 1 <= len(ciphertext) <= _CIPHERTEXT_MAX:
            raise DecryptionFailed()
        try:
            reply = self._call(
                "decrypt",
                "symmetric",
                KeyId=arn,
                CiphertextBlob=ciphertext,
                EncryptionContext=context,
            )
        except _AwsError as exc:
            raise self._decrypt_failure(exc, "decrypt") from None
        plaintext = reply.get("Plaintext")
        if reply.get("KeyId") not in (arn, None):
            raise DecryptionFailed()
        if not isinstance(plaintext, bytes):
            raise BackendError("the backend returned a malformed plaintext")
        return plaintext

    def wrap(self, key: BackendKey, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt bound to `aad` (in the EncryptionContext). 1-4096 bytes."""
        return self._encrypt(key, plaintext, self.encryption_context(key, aad=aad))

    def unwrap(self, key: BackendKey, ciphertext: bytes, aad: bytes) -> bytes:
        """Reverse `wrap`. Raises DecryptionFailed if the ciphertext or `aad` is wrong."""
        return self._decrypt(key, ciphertext, self.encryption_context(key, aad=aad))

    def generate_data_key(
        self,
        key: BackendKey,
        num_bytes: int = 32,
        context: Mapping[str, str] | None = None,
        *,
        include_plaintext: bool = True,
    ) -> tuple[bytes | None, bytes]:
        """(plaintext or None, ciphertext) of a fresh data key made and wrapped by KMS
        (GenerateDataKey / GenerateDataKeyWithoutPlaintext); `decrypt` unwraps it."""
        arn = self._encryption_key(key)
        if not 1 <= num_bytes <= 1024:
            raise InvalidRequest("data keys are 1 to 1024 bytes")
        operation = (
            "generate_data_key" if include_plaintext else ("generate_data_key_without_plaintext")
        )
        reply = self._translated_call(
            "generate a data key",
            operation,
            "symmetric",
            KeyId=arn,
            NumberOfBytes=num_bytes,
            EncryptionContext=self.encryption_context(key, context),
        )
        blob = reply.get("CiphertextBlob")
        plaintext = reply.get("Plaintext") if include_plaintext else None
        if not isinstance(blob, bytes) or (
            include_plaintext and (not isinstance(plaintext, bytes) or len(plaintext) != num_bytes)
        ):
            raise BackendError("the backend returned a malformed data key")
        return plaintext, blob

    def rewrap(
        self,
        source: BackendKey,
        ciphertext: bytes,
        destination: BackendKey,
        *,
        source_context: Mapping[str, str] | None = None,
        destination_context: Mapping[str, str] | None = None,
    ) -> bytes:
        """ReEncrypt from `source` to `destination` (both KMS keys of this backend): the
        plaintext never leaves KMS. Raises DecryptionFailed, KeyDestroyed, ..."""
        source_arn = self._encryption_key(source)
        destination_arn = self._encryption_key(destination)
        if not 1 <= len(ciphertext) <= _CIPHERTEXT_MAX:
            raise DecryptionFailed()
        try:
            reply = self._call(
                "re_encrypt",
                "symmetric",
                CiphertextBlob=ciphertext,
                SourceKeyId=source_arn,
                SourceEncryptionContext=self.encryption_context(source, source_context),
                DestinationKeyId=destination_arn,
                DestinationEncryptionContext=self.encryption_context(
                    destination, destination_context
                ),
            )
        except _AwsError as exc:
            raise self._decrypt_failure(exc, "re-encrypt") from None
        if reply.get("SourceKeyId") not in (source_arn, None):
            raise DecryptionFailed()
        blob = reply.get("CiphertextBlob")
        if not isinstance(blob, bytes) or reply.get("KeyId") not in (destination_arn, None):
            raise BackendError("the backend returned a malformed ciphertext")
        return blob

    # -- lifecycle --------------------------------------------------------------------------

    def status(self) -> BackendStatus:
        """Reachable and accepting kmsgate's credentials (ListKeys with Limit=1)."""
        try:
            self._call("list_keys", "control", Limit=1)
        except Unavailable as exc:
            return BackendStatus(ok=False, detail=exc.detail)
        except (_AwsError, KmsgateError):
            return BackendStatus(ok=False, detail="AWS KMS refused the request")
        return BackendStatus(ok=True)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        with contextlib.suppress(AttributeError):
            self._client.close()
