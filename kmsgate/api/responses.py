"""JSON replies: serialised with orjson and ending with a newline (a reply printed by curl
leaves the shell prompt on its own line); use-case results turned into JSON bodies."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from starlette.responses import JSONResponse

from kmsgate.encoding import b64encode
from kmsgate.errors import KmsgateError, VerificationFailed
from kmsgate.text import utc_timestamp

PEM = "application/x-pem-file"
_OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_PASSTHROUGH_DATETIME
"""A newline at the end; every time through `_edge_value` (orjson's own form drops zero
microseconds and writes `+00:00`)."""


def _edge_value(value: Any) -> Any:
    """What orjson cannot write by itself, as the API writes it: bytes as base64, times in
    UTC with `Z` and microseconds; an item's
    error as `{error: {code, detail}}`, or `{valid: false}` for a signature or MAC that does
    not verify. Raises TypeError for anything else."""
    if isinstance(value, bytes):
        return b64encode(value)
    if isinstance(value, datetime):  # the one form of a time in a reply (`...123456Z`)
        return utc_timestamp(value)
    if isinstance(value, VerificationFailed):
        return {"valid": False, "key_version": None}
    if isinstance(value, KmsgateError):
        return {"error": {"code": value.code, "detail": value.detail}}
    raise TypeError(f"{type(value).__name__} has no JSON form")


def json_bytes(body: Any) -> bytes:
    """`body` as compact JSON plus a trailing newline. Dataclasses (the use cases' results)
    are written field by field, bytes as base64, times as `utc_timestamp` writes them.
    Raises TypeError for a value without a JSON form."""
    return orjson.dumps(body, default=_edge_value, option=_OPTIONS)


class JsonResponse(JSONResponse):
    """The application's default response class (orjson, trailing newline)."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def json_response(body: Any, status_code: int = 200) -> JsonResponse:
    """A JSON reply for routes that build their own response (hot endpoints, use-case
    results: FastAPI's own encoder would turn bytes into text, not base64)."""
    return JsonResponse(body, status_code=status_code)


def operation_response(results: Sequence[object], batch: bool) -> JsonResponse:
    """An operation's reply: its single item, or `{batch: [...]}`."""
    return json_response({"batch": results} if batch else results[0])
