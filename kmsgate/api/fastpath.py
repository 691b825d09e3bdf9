"""Routes on the fast path (DESIGN §10): a plain Starlette route, matched before FastAPI's
routers, for the endpoints called at volume (key operations, issuance, OCSP). It skips
FastAPI's per-request route matching and dependency injection; the endpoint reads the
request itself. The same endpoint is also registered with FastAPI so that the OpenAPI
document describes it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Endpoint = Callable[[Request], Awaitable[Response]]


def fast_route(
    router: APIRouter,
    path: str,
    endpoint: Endpoint,
    *,
    methods: list[str],
    openapi_extra: Mapping[str, Any] | None = None,
    **documented: Any,
) -> Route:
    """The Starlette route serving `endpoint` at `router.prefix + path` (for the app to
    match first), after adding it to `router` for the OpenAPI document (`openapi_extra`
    describes what the endpoint reads itself, such as its request body; `documented` goes
    to `add_api_route`)."""

    async def handle(request: Request) -> Response:
        # FastAPI records the matched route in the scope only for its own routes; the
        # metrics label requests by it
        request.scope["route"] = route
        return await endpoint(request)

    route = Route(router.prefix + path, handle, methods=methods, name=endpoint.__name__)
    router.add_api_route(
        path,
        endpoint,
        methods=methods,
        openapi_extra=dict(openapi_extra) if openapi_extra else None,
        **documented,
    )
    return route


def body_schema(schema: Mapping[str, Any], media_type: str = "application/json") -> dict[str, Any]:
    """`openapi_extra` for an endpoint that reads a body of `schema` itself."""
    return {"requestBody": {"required": True, "content": {media_type: {"schema": dict(schema)}}}}
