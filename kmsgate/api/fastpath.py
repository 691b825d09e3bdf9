"""Routes on the fast path (DESIGN §10), for the endpoints called at volume (key
operations, issuance, OCSP): `GatewayApp` matches them before anything else and serves them
itself: request id, body-size limit, metrics and kmsgate's problem replies, without
FastAPI's middleware stack, route matching and dependency injection, and without the
per-message wrappers of a middleware. The endpoint gets the request with its body already
read. Its reply goes out in one piece through the server's `WHOLE_REPLY` extension when the
server offers it (kmsgate's uvicorn protocol does). Each endpoint is also registered with
FastAPI, so that the OpenAPI document describes it."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from kmsgate.api.bodies import refuse_unknown
from kmsgate.api.deadlines import BodyDeadlines
from kmsgate.api.metrics import Metrics
from kmsgate.api.openapi import complete
from kmsgate.api.problems import (
    RequestIds,
    failure_response,
    observe,
    refuse_bad_framing,
    too_large,
)
from kmsgate.api.responses import json_bytes
from kmsgate.http_protocol import WHOLE_REPLY, add_edge_headers

Endpoint = Callable[[Request], Awaitable[Response]]


class FastRequest(Request):
    """A fast route's request, its body read (within the size limit) before the endpoint
    runs."""

    def __init__(self, scope: Scope, body: bytes) -> None:
        super().__init__(scope)
        self._read_body = body

    async def body(self) -> bytes:
        return self._read_body


class GatewayApp(FastAPI):
    """The FastAPI application, with its fast routes served ahead of its middleware."""

    _fast_routes: tuple[tuple[str, Route], ...] = ()
    """(the literal end of its path, the route): a path that does not end so cannot match."""
    _included: tuple[APIRouter, ...] = ()
    _document: dict[str, Any] | None = None
    _document_bytes: bytes | None = None

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI document, with what FastAPI cannot see (`kmsgate.api.openapi`), built
        once: the routes do not change after start-up."""
        if self._document is None:
            self._document = complete(super().openapi())
        return self._document

    def setup(self) -> None:
        """FastAPI's set-up, but the OpenAPI document is served as every JSON reply is
        (orjson, a final newline) and serialised once."""
        url, self.openapi_url = self.openapi_url, None  # no route of FastAPI's own
        super().setup()
        self.openapi_url = url
        if url:
            self.add_route(url, self._serve_openapi, include_in_schema=False)

    async def _serve_openapi(self, _request: Request) -> Response:
        if self._document_bytes is None:
            self._document_bytes = json_bytes(self.openapi())
        return Response(self._document_bytes, media_type="application/json")

    def include(self, router: APIRouter) -> None:
        """`include_router`, keeping `router` for `allowed_methods`."""
        self.include_router(router)
        self._included += (router,)

    def allowed_methods(self, path: str) -> list[str]:
        """Every method served at `path`, for a 405's `Allow` (Starlette's names only the
        methods of the first route whose path matched), HEAD wherever GET is."""
        routes = [r for router in (self.router, *self._included) for r in router.routes]
        methods = {
            method
            for route in routes
            if isinstance(route, Route) and route.path_regex.match(path)
            for method in route.methods or ()
        }
        return sorted(methods | ({"HEAD"} if "GET" in methods else set()))

    def serve_fast(
        self,
        routes: list[FastRoute],
        *,
        max_body_bytes: int,
        metrics: Metrics,
        ids: RequestIds,
        deadlines: BodyDeadlines,
    ) -> None:
        """Serve `routes` ahead of FastAPI, with the gateway middleware's request ids, body
        limit and deadline, and metrics."""
        self._fast_routes = tuple((_literal_end(route.path), route) for route in routes)
        self._max_body_bytes = max_body_bytes
        self._metrics = metrics
        self._ids = ids
        self._deadlines = deadlines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            for end, route in self._fast_routes:
                if not path.endswith(end):  # a string test, where a match costs ~0.5 us
                    continue
                match, child = route.matches(scope)
                if match is Match.FULL:  # a wrong method falls through to FastAPI's 405
                    scope.update(child)
                    scope["app"] = self
                    scope["route"] = route
                    await self._serve(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the body, run the matched endpoint, send its reply (a failure's problem
        reply), count the request."""
        started_at = time.perf_counter()
        request_id = self._ids.assign(scope)
        status = 500  # what the client gets if sending the reply fails
        try:
            try:
                refuse_unknown(scope, scope["route"].query_names)
                guarded = self._deadlines.guard(receive)
                body = await _read_body(scope, guarded, self._max_body_bytes)
                response = await scope["endpoint"](FastRequest(scope, body))
            except Exception as exc:
                response = failure_response(exc, Request(scope))
            status = response.status_code
            headers = response.raw_headers
            add_edge_headers(headers, request_id)
            whole = (scope.get("extensions") or {}).get(WHOLE_REPLY)
            if whole is None or not whole(status, headers, response.body):
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": response.body})
        finally:
            observe(self._metrics, scope, status, started_at)


def _literal_end(path: str) -> str:
    """What every path a route template matches ends with: the text after its last
    parameter (`/v1/keys/{name}/sign` -> `/sign`; empty if it ends with a parameter)."""
    return path.rpartition("}")[2] if "{" in path else path


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body. Raises TooLarge beyond `limit` bytes (declared or sent), what
    `refuse_bad_framing` raises, ClientDisconnect if the client leaves before sending all
    of it."""
    refuse_bad_framing(scope, limit)
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            raise too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class FastRoute(Route):
    """A route `GatewayApp.serve_fast` serves: `query_names` are the query parameters its
    endpoint reads (any other is refused, as `JsonBodyRoute` refuses it)."""

    query_names: frozenset[str] = frozenset()


def fast_route(
    router: APIRouter,
    path: str,
    endpoint: Endpoint,
    *,
    methods: list[str],
    openapi_extra: Mapping[str, Any] | None = None,
    **documented: Any,
) -> FastRoute:
    """The Starlette route serving `endpoint` at `router.prefix + path` (for
    `GatewayApp.serve_fast`), after adding it to `router` for the OpenAPI document (`openapi_extra`
    describes what the endpoint reads itself, such as its request body or query parameters;
    its path parameters are described here; `documented` goes to `add_api_route`)."""
    route = FastRoute(router.prefix + path, endpoint, methods=methods, name=endpoint.__name__)
    extra = dict(openapi_extra or {})
    parameters = [
        *(
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in route.param_convertors
        ),
        *extra.pop("parameters", ()),
    ]
    route.query_names = frozenset(p["name"] for p in parameters if p.get("in") == "query")
    router.add_api_route(
        path,
        endpoint,
        methods=methods,
        openapi_extra={"parameters": parameters, **extra},
        **documented,
    )
    return route


def body_schema(
    schema: Mapping[str, Any], media_type: str = "application/json", *, required: bool = True
) -> dict[str, Any]:
    """`openapi_extra` for an endpoint that reads a body of `schema` itself."""
    content = {media_type: {"schema": dict(schema)}}
    return {"requestBody": {"required": required, "content": content}}
