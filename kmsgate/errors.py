"""The kmsgate error taxonomy.

Every failure a client can see is a `KmsgateError` subclass. Each class carries the HTTP
status and the machine-readable `code` used in RFC 9457 problem+json replies. The `detail`
text is safe to return to clients: never put key material, tokens, plaintext or backend
error text in it.
"""

from __future__ import annotations

from typing import ClassVar

PROBLEM_TYPE = "https://kmsgate.dev/problems/"
"""The prefix of a problem reply's `type`: followed by the error's `code`."""


def problem_document(
    status: int, code: str, title: str, detail: str, request_id: str | None = None
) -> dict[str, object]:
    """The RFC 9457 problem+json document every error reply carries (`request_id` when the
    request got one)."""
    document: dict[str, object] = {
        "type": PROBLEM_TYPE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if request_id is not None:
        document["request_id"] = request_id
    return document


class KmsgateError(Exception):
    """Base class: a failure with an HTTP status, a stable code and a client-safe detail."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail or self.title
        super().__init__(self.detail)

    def headers(self) -> dict[str, str]:
        """The HTTP headers a reply to this failure carries besides its problem body."""
        return {}


class InvalidRequest(KmsgateError):
    status = 400
    code = "invalid_request"
    title = "Invalid request"


class DecryptionFailed(KmsgateError):
    status = 400
    code = "decryption_failed"
    title = "Decryption failed"


class VerificationFailed(KmsgateError):
    """A signature or MAC does not verify. The REST API answers `{"valid": false}` with
    200, not an error: the check itself succeeded."""

    status = 400
    code = "verification_failed"
    title = "Verification failed"


class SignatureInvalid(VerificationFailed):
    code = "signature_invalid"
    title = "Signature does not verify"


class MacInvalid(VerificationFailed):
    code = "mac_invalid"
    title = "MAC does not verify"


class Unauthenticated(KmsgateError):
    """`reason`: which check failed, for the audit record only, where the caller gets one
    message for every failure (an OIDC token's audience, expiry, signature, ...)."""

    status = 401
    code = "unauthenticated"
    title = "Authentication required"

    def __init__(self, detail: str | None = None, *, reason: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason

    def headers(self) -> dict[str, str]:
        return {"www-authenticate": 'Bearer realm="kmsgate"'}  # RFC 6750 §3


class PolicyDenied(KmsgateError):
    status = 403
    code = "policy_denied"
    title = "Denied by policy"


class NotFound(KmsgateError):
    status = 404
    code = "not_found"
    title = "Not found"


class Conflict(KmsgateError):
    status = 409
    code = "conflict"
    title = "Conflict"


class ConcurrentChange(Conflict):
    """Another process changed the same record at the same moment (a uniqueness constraint
    refused this change): trying again after a second usually succeeds."""

    def headers(self) -> dict[str, str]:
        return {"retry-after": "1"}


class KeyDisabled(Conflict):
    code = "key_disabled"
    title = "Key is disabled"


class KeyPendingDeletion(Conflict):
    code = "key_pending_deletion"
    title = "Key is scheduled for deletion"


class KeyDestroyed(Conflict):
    code = "key_destroyed"
    title = "Key material was destroyed"


class KeyVersionUnusable(Conflict):
    code = "key_version_unusable"
    title = "Key version cannot be used for this operation"


class TooLarge(KmsgateError):
    status = 413
    code = "too_large"
    title = "Request too large"


class HeaderTooLarge(KmsgateError):
    """The request line and headers exceed what the server reads; the connection is closed."""

    status = 431
    code = "header_too_large"
    title = "Request header fields too large"


class RequestTimeout(KmsgateError):
    """The client did not send its request body in time; the connection is closed."""

    status = 408
    code = "request_timeout"
    title = "Request timeout"

    def headers(self) -> dict[str, str]:
        return {"connection": "close"}


class UnsupportedMediaType(KmsgateError):
    status = 415
    code = "unsupported_media_type"
    title = "Unsupported media type"


class RetryLater(KmsgateError):
    """A refusal for now: the client should try again after `retry_after` seconds."""

    default_retry_after: ClassVar[int] = 5

    def __init__(self, detail: str | None = None, *, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after if retry_after is not None else self.default_retry_after

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after)}


class RateLimited(RetryLater):
    """Over a configured request rate."""

    status = 429
    code = "rate_limited"
    title = "Too many requests"
    default_retry_after = 1


class ValidationFailed(KmsgateError):
    status = 422
    code = "validation_failed"
    title = "Request failed validation"


class NotSupported(KmsgateError):
    status = 501
    code = "not_supported"
    title = "Not supported"


class BackendError(KmsgateError):
    status = 502
    code = "backend_error"
    title = "Key backend failed"


class Unavailable(RetryLater):
    """A dependency is temporarily out of reach."""

    status = 503
    code = "unavailable"
    title = "Service unavailable"


class BackendUnavailable(Unavailable):
    code = "backend_unavailable"
    title = "Key backend unavailable"


class AuditUnavailable(Unavailable):
    code = "audit_unavailable"
    title = "Audit log unavailable: operation refused"


class AuditUnreadable(KmsgateError):
    """A chain file holds a line that is no record. Unlike `AuditUnavailable` it lasts until
    an operator mends the file, so the reply carries no Retry-After."""

    status = 503
    code = "audit_unavailable"
    title = "Audit log cannot be read"


class ConfigError(Exception):
    """The configuration is invalid; raised at start-up, never to clients."""
