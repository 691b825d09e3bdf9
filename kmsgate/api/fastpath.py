"""Routes on the fast path (DESIGN §10), for the endpoints called at volume (key
operations, issuance, OCSP): `GatewayApp` matches them before anything else and serves them
through the gateway middleware (request id, body limit, metrics) and kmsgate's problem
replies only, skipping FastAPI's middleware stack, route matching and dependency injection;
the endpoint reads the request itself. Each endpoint is also registered with FastAPI, so
that the OpenAPI document describes it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from kmsgate.api.problems import failure_response
from kmsgate.errors import InvalidRequest

Endpoint = Callable[[Request], Awaitable[Response]]


class GatewayApp(FastAPI):
    """The FastAPI application, with its fast routes served ahead of its middleware."""

    _fast_routes: tuple[Route, ...] = ()
    _fast_app: ASGIApp | None = None

    def serve_fast(self, routes: list[Route], wrap: Callable[[ASGIApp], ASGIApp]) -> None:
        """Serve `routes` ahead of FastAPI, through `wrap` (the gateway middleware)."""
        self._fast_routes = tuple(routes)
        self._fast_app = wrap(_serve_endpoint)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._fast_app is not None:
            for route in self._fast_routes:
                match, child = route.matches(scope)
                if match is Match.FULL:  # a wrong method falls through to FastAPI's 405
                    scope.update(child)
                    scope["app"] = self
                    await self._fast_app(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)


async def _serve_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """Run the matched fast route's endpoint; a failure becomes its problem reply."""
    request = Request(scope, receive, send)
    try:
        response = await scope["endpoint"](request)
    except ClientDisconnect:  # the client went away mid-body: its fault, not an error of ours
        gone = InvalidRequest("the client closed the connection before its request arrived")
        response = failure_response(gone, request)
    except Exception as exc:
        response = failure_response(exc, request)
    await response(scope, receive, send)


def fast_route(
    router: APIRouter,
    path: str,
    endpoint: Endpoint,
    *,
    methods: list[str],
    openapi_extra: Mapping[str, Any] | None = None,
    **documented: Any,
) -> Route:
    """The Starlette route serving `endpoint` at `router.prefix + path` (for
    `GatewayApp.serve_fast`), after adding it to `router` for the OpenAPI document (`openapi_extra`
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
