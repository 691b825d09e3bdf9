"""JSON replies: serialised with orjson and ending with a newline (a reply printed by curl
leaves the shell prompt on its own line)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse


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
