"""Request bodies at the edge, the same for every route: JSON only (`application/json`,
else 415), parsed strictly (not JSON, a duplicate member: 400) before anything else reads
them."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from kmsgate.errors import UnsupportedMediaType
from kmsgate.schemas import parse_json_object

JSON = "application/json"


def header(scope: Scope, name: bytes) -> str:
    """The first value of header `name` (lower case), "" if absent (a direct scan of the
    raw headers: cheaper than building Starlette's Headers on the hot path)."""
    for key, value in scope["headers"]:
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return ""


def require_media_type(request: Request, expected: str) -> None:
    """Raises UnsupportedMediaType unless the request's Content-Type is `expected` (any
    parameters, such as a charset, aside)."""
    sent = header(request.scope, b"content-type")
    if sent.partition(";")[0].strip().lower() != expected:
        raise UnsupportedMediaType(f"send the request body as {expected}")


async def json_object(request: Request) -> dict[str, Any]:
    """The request's JSON object body. Raises UnsupportedMediaType (not `application/json`),
    InvalidRequest (not a JSON object, a member given twice)."""
    require_media_type(request, JSON)
    return parse_json_object(await request.body())


class _ParsedRequest(Request):
    """A request whose JSON body has been read and parsed already."""

    def __init__(self, request: Request, raw: bytes, parsed: dict[str, Any]) -> None:
        super().__init__(request.scope, request.receive)
        self._raw, self._parsed = raw, parsed

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> dict[str, Any]:
        return self._parsed


class JsonBodyRoute(APIRoute):
    """A FastAPI route whose body (if it takes one) goes through `json_object` first, so that
    FastAPI's own, lenient parsing only ever sees a checked object."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def strict(request: Request) -> Response:
            parsed = await json_object(request)
            return await handler(_ParsedRequest(request, await request.body(), parsed))

        return strict
