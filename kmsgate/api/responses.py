"""JSON replies: serialised with orjson and ending with a newline (a reply printed by curl
leaves the shell prompt on its own line); use-case results turned into JSON bodies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime
from typing import Any

import orjson
from starlette.responses import JSONResponse

from kmsgate.encoding import b64encode
from kmsgate.errors import KmsgateError, VerificationFailed


def json_bytes(body: Any) -> bytes:
    """`body` as compact JSON plus a trailing newline. Raises TypeError for a value orjson
    cannot serialise."""
    return orjson.dumps(body, option=orjson.OPT_APPEND_NEWLINE)


class JsonResponse(JSONResponse):
    """The application's default response class (orjson, trailing newline)."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def json_response(body: Any, status_code: int = 200) -> JsonResponse:
    """A JSON reply for routes that build their own response (hot endpoints)."""
    return JsonResponse(body, status_code=status_code)


def result_body(result: object) -> dict[str, Any]:
    """A use case's result dataclass as JSON: bytes as base64; a field marked
    `omit_if_none` is left out when None."""
    body: dict[str, Any] = {}
    for spec in fields(result):  # type: ignore[arg-type]
        value = getattr(result, spec.name)
        if value is None and spec.metadata.get("omit_if_none"):
            continue
        if isinstance(value, bytes):
            value = b64encode(value)
        elif isinstance(value, datetime):
            value = value.isoformat()
        body[spec.name] = value
    return body


def item_body(result: object) -> dict[str, Any]:
    """One item of an operation: its result, `{valid: false}` for a signature or MAC that
    does not verify, or `{error: {code, detail}}`."""
    if isinstance(result, VerificationFailed):
        return {"valid": False, "key_version": None}
    if isinstance(result, KmsgateError):
        return {"error": {"code": result.code, "detail": result.detail}}
    return result_body(result)


def operation_body(results: Sequence[object], batch: bool) -> dict[str, Any]:
    """An operation's reply: the single item's body, or `{batch: [...]}`."""
    if not batch:
        return item_body(results[0])
    return {"batch": [item_body(result) for result in results]}
