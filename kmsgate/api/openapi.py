"""The OpenAPI document, completed with what FastAPI cannot see: the problem+json replies
every operation can give, the credentials it takes (a bearer token or a client certificate;
none for the operations registered with `PUBLIC`), the headers those replies carry, and the
schemas of the JSON replies that routes build themselves (`kmsgate.api.replies`)."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from kmsgate.api.replies import COMPONENTS, POLICY_DIGEST

PUBLIC: dict[str, Any] = {"security": []}
"""`openapi_extra` of an operation that takes no credentials."""
BINARY: dict[str, Any] = {"type": "string", "format": "binary"}
"""The schema of a DER body."""

_REQUEST_ID = {
    "description": "the request's id (also in its audit record and in a problem's body)",
    "required": True,
    "schema": {"type": "string"},
}
AUTHORISING_POLICY: dict[str, Any] = {
    "description": "the digest of the policy bundle that authorised the call (signers put it "
    "into their provenance)",
    "required": True,
    "schema": POLICY_DIGEST,
}
"""The header object of `x-kmsgate-policy-digest`, on a key operation's replies."""
_PROBLEM = {
    "type": "object",
    "description": "RFC 9457 problem details; clients act on `code`",
    "required": ["type", "title", "status", "detail", "code", "request_id"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string"},
        "request_id": {"type": "string"},
    },
}
_SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "an API token (`kmg.<id>.<secret>`) or a JWT of a configured OIDC issuer",
    },
    "mtls": {
        "type": "mutualTLS",
        "description": "a client certificate of a CA in `tls.client_cas` (HTTPS gateways)",
    },
}
_WHEN = {
    400: "malformed JSON, or a request that makes no sense (docs/api.md, Errors)",
    401: "no credentials, or unknown, expired or revoked ones",
    403: "the policy does not allow the action",
    404: "no such resource",
    413: "a body, input or batch over the limits",
    415: "a body not sent as application/json",
    422: "the request does not match the schema",
    429: "the caller or the key is over its rate, or the address over its rate of failed "
    "authentications: retry after Retry-After seconds",
    500: "a bug: see the gateway log",
    503: "a dependency (store, backend, audit log) is out of reach: retry later",
}
RETRY_AFTER: dict[str, Any] = {"schema": {"type": "string", "pattern": "^[0-9]+$"}}
"""The Retry-After header of a problem reply (optional as it stands; `_HEADERS` requires it
on a 429 and a 503)."""
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"www-authenticate": {"required": True, "schema": {"type": "string"}}},
    429: {"retry-after": {"required": True, **RETRY_AFTER}},
    503: {"retry-after": {"required": True, **RETRY_AFTER}},
}


def complete(document: dict[str, Any]) -> dict[str, Any]:
    """`document` (FastAPI's) with the problem and reply schemas, the security schemes, a
    default requirement of credentials, and every operation's error replies; returns it."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for fastapi_only in ("HTTPValidationError", "ValidationError"):  # 422 is a problem here
        schemas.pop(fastapi_only, None)
    schemas["Problem"] = _PROBLEM
    for name, schema in COMPONENTS.items():
        assert schemas.setdefault(name, schema) is schema, f"two schemas are named {name}"
    components["securitySchemes"] = _SECURITY_SCHEMES
    document["security"] = [{"bearer": []}, {"mtls": []}]
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            _describe_failures(operation)
    return document


def _describe_failures(operation: dict[str, Any]) -> None:
    """Add the problem replies `operation` can give: those it can give by its shape (a
    body, parameters, credentials), and any other status as a problem too."""
    responses = operation.setdefault("responses", {})
    for success in responses.values():
        success.setdefault("headers", {})["x-request-id"] = _REQUEST_ID
    parameters = operation.get("parameters", [])
    statuses = {500, 503}
    if operation.get("security") != []:
        statuses |= {401, 403, 429}
    if "requestBody" in operation:
        statuses |= {400, 413, 422}
        if "application/json" in operation["requestBody"].get("content", {}):
            statuses.add(415)  # a binary body (an OCSP request) is taken as it comes
    if parameters:
        statuses.add(422)
    if any(p.get("in") == "path" for p in parameters):
        statuses.add(404)
    responses.pop("422", None)  # FastAPI's own validation error
    for status in sorted(statuses):
        responses.setdefault(str(status), problem_reply(_WHEN[status], _HEADERS.get(status, {})))
    responses["default"] = problem_reply("any other failure (docs/api.md, Errors)", {})


def problem_reply(description: str, headers: dict[str, Any]) -> dict[str, Any]:
    """A problem+json reply for `responses`, with `headers` besides x-request-id (an
    operation's own reply for a status replaces the one `complete` would add)."""
    return {
        "description": description,
        "headers": {"x-request-id": _REQUEST_ID, **headers},
        "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        },
    }


def non_json_reply(media_type: str) -> dict[str, Any]:
    """`add_api_route` arguments of an operation whose success is a document of
    `media_type`, not JSON: PEM text, or DER bytes."""
    schema = {"type": "string"} if media_type.startswith("application/x-pem") else BINARY
    return {
        "response_class": Response,
        "responses": {200: {"content": {media_type: {"schema": schema}}}},
    }
