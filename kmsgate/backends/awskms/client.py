"""Requests to AWS KMS: the boto3 client (botocore's retries off), per-quota token buckets,
retries with full jitter, and the translation of AWS error replies into kmsgate errors (AWS's
text is logged only)."""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from typing import Any

import boto3  # type: ignore[import-untyped]
import botocore.config  # type: ignore[import-untyped]
import botocore.exceptions  # type: ignore[import-untyped]

from kmsgate.backends.awskms.settings import AwsKmsSettings
from kmsgate.backends.awskms.specs import QuotaClass
from kmsgate.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    KeyDestroyed,
    KmsgateError,
    RateLimited,
)
from kmsgate.ratelimit import TokenBucket

_log = logging.getLogger(__name__)

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


class _AwsError(Exception):
    """A non-retryable error reply from AWS, translated by the caller (never shown)."""

    def __init__(self, operation: str, code: str, message: str) -> None:
        super().__init__(f"{operation}: {code}")
        self.operation = operation
        self.code = code
        self.message = message


class _KmsClient:
    """One backend's requests to AWS KMS (`name` is the backend's). Thread-safe."""

    def __init__(self, backend: str, settings: AwsKmsSettings, client: Any | None) -> None:
        self.name = backend
        self.settings = settings
        self._client: Any = client if client is not None else self._make_client(settings)
        limits = settings.rate_limits
        rates: dict[QuotaClass, float | None] = {
            "symmetric": limits.symmetric,
            "rsa": limits.rsa,
            "ecc": limits.ecc,
            "control": limits.control,
        }
        self._buckets: dict[QuotaClass, TokenBucket] = {
            quota: TokenBucket(rate, rate * limits.burst)
            for quota, rate in rates.items()
            if rate is not None
        }
        self._lock = threading.Lock()
        self.requests = 0
        self.region: str = self._client.meta.region_name
        """The region requests go to (`region`, else the profile's or AWS_REGION)."""
        """Requests sent, tries included (`AwsKmsBackend.requests`)."""

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

    def unavailable(self, why: str, retry_after: int | None = None) -> BackendUnavailable:
        return BackendUnavailable(
            f"backend {self.name!r} is {why}", retry_after=retry_after or self.settings.retry_after
        )

    def _throttle(self, quota: QuotaClass) -> None:
        bucket = self._buckets.get(quota)
        if bucket is None:
            return
        try:
            wait = bucket.reserve(self.settings.rate_limits.max_wait)
        except RateLimited as exc:
            raise self.unavailable(
                f"at its configured {quota} request rate", exc.retry_after
            ) from None
        if wait > 0:
            time.sleep(wait)

    def _backoff(self, attempt: int) -> None:
        cap = min(self.settings.backoff_max, self.settings.backoff_base * 2**attempt)
        time.sleep(random.uniform(0, cap))  # noqa: S311 (jitter, not a secret)

    def call(self, operation: str, quota: QuotaClass, **params: Any) -> dict[str, Any]:
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
            except botocore.exceptions.ReadTimeoutError:
                # sent, and no answer within read_timeout: a hung endpoint answers a retry no
                # sooner (each try would hold the caller another read_timeout), and the call
                # may have been carried out (CreateKey twice)
                _log.info("awskms %s: no answer within %g s", operation, self.settings.read_timeout)
                last = "not answering"
                break
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
        _log.warning("awskms %s: %s after %d tries", operation, last, attempt + 1)
        raise self.unavailable(last)

    def translated_call(
        self, what: str, operation: str, quota: QuotaClass, **params: Any
    ) -> dict[str, Any]:
        """`call`, with any other AWS error reply translated by `fail` (for `what`)."""
        try:
            return self.call(operation, quota, **params)
        except _AwsError as exc:
            raise self.fail(exc, what) from None

    def fail(self, exc: _AwsError, what: str) -> KmsgateError:
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
            return self.unavailable("unable to reach the key's key store")
        return BackendError(f"backend {self.name!r} failed to {what}")

    def close(self) -> None:
        with contextlib.suppress(AttributeError):
            self._client.close()
