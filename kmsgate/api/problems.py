"""RFC 9457 problem+json replies, the body-size limit, request ids and request metrics.

Every failure leaves as `{type, title, status, detail, code, request_id}`. Unexpected errors
become a bare 500 without detail: internal text never reaches clients.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kmsgate.api.bodies import repeated_header
from kmsgate.api.deadlines import BodyDeadlines
from kmsgate.api.metrics import UNMATCHED, Metrics
from kmsgate.api.responses import json_bytes
from kmsgate.errors import (
    InvalidRequest,
    KmsgateError,
    NotFound,
    NotSupported,
    TooLarge,
    UnsupportedMediaType,
    ValidationFailed,
    problem_document,
)
from kmsgate.http_protocol import add_edge_headers
from kmsgate.logs import current_decisions, current_request, request_logger
from kmsgate.request_parsing import validation_detail
from kmsgate.text import KEY_NAME

log = logging.getLogger("kmsgate.api")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 415: "unsupported_media_type"}
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_ENCODED_SEPARATOR = re.compile(rb"%(?:2[Ff]|5[Cc])")
_OCSP_GET = re.compile(rb"/v1/pki/cas/[^/]+/ocsp/")
"""What comes before an OCSP GET's request in its path: the request is base64, whose `/` a
client encodes (RFC 6960 A.1), and the route takes the rest of the path as it is."""
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?")
"""A Host value (RFC 9110 7.2): uri-host [":" port], an IPv6 literal in brackets (its
form is left to the address parser, which the gateway never needs); empty is allowed."""


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    request_id: str,
    headers: dict[str, str] | None = None,
) -> Response:
    return Response(
        json_bytes(problem_document(status, code, title, detail, request_id)),
        status_code=status,
        media_type="application/problem+json",
        headers=headers,
    )


def error_response(exc: KmsgateError, request_id: str) -> Response:
    return problem(exc.status, exc.code, exc.title, exc.detail, request_id, exc.headers())


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", "") or "-"


def failure_response(exc: Exception, request: Request) -> Response:
    """The problem reply to an exception a route raised: a KmsgateError's own (counted in
    the metrics; a client gone before its body arrived is a 400, its fault, not ours), or a
    bare 500 for anything else (logged by type, never shown)."""
    if isinstance(exc, ClientDisconnect):
        exc = InvalidRequest("the client closed the connection before its request arrived")
    if isinstance(exc, KmsgateError):
        metrics: Metrics = request.app.state.metrics
        metrics.observe_error(exc)
        return error_response(exc, request_id_of(request))
    log.error("unexpected %s in %s", type(exc).__name__, request.url.path)
    return problem(
        500,
        "internal_error",
        "Internal error",
        "internal error; see the gateway log",
        request_id_of(request),
    )


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception type to problem+json."""

    async def on_failure(request: Request, exc: Exception) -> Response:
        return failure_response(exc, request)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        detail = validation_detail(exc.errors())
        return error_response(ValidationFailed(detail), request_id_of(request))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = {name.lower(): value for name, value in (exc.headers or {}).items()}
        if exc.status_code == 405:
            headers["allow"] = ", ".join(request.app.allowed_methods(request.scope["path"]))
        return problem(
            exc.status_code, code, str(exc.detail), str(exc.detail), request_id_of(request), headers
        )

    # anything else a route raises reaches GatewayMiddleware, which answers 500 itself
    app.add_exception_handler(KmsgateError, on_failure)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)


class RequestIds:
    """Request ids: unique, not secret. A random prefix per application (per worker) and a
    counter cost no system call per request."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._count = itertools.count()

    def assign(self, scope: Scope) -> str:
        """A new id for the request of `scope`: in its state, and on every log line written
        while it is served (`kmsgate.logs.current_request`)."""
        request_id = f"{self._prefix}{next(self._count):08x}"
        scope.setdefault("state", {})["request_id"] = request_id
        current_request.set(request_id)  # each request runs in a task (a context) of its own
        if request_logger.isEnabledFor(logging.INFO):  # only its request log line reads them
            current_decisions.set([])
        return request_id


def refuse_bad_framing(scope: Scope, limit: int) -> None:
    """Refuse, before reading the body, what a proxy and the gateway could read as two
    different requests, or the gateway as another body. Raises TooLarge (a Content-Length
    over `limit` bytes, or malformed), InvalidRequest (HTTP/1.1 without a Host, two Hosts, or
    one whose value is not a host and port: RFC 9112 3.2), NotSupported (a transfer coding
    but chunked: RFC 9112 6.1), UnsupportedMediaType (a content coding, such as gzip:
    RFC 9110 8.4) or NotFound (a path with an encoded `/` or `\\` before an OCSP GET's
    request, if any: the server decodes it before routing, so `/v1/keys/k%2Frotate` would
    rotate `k` where a proxy, and RFC 3986, see one segment `k/rotate` under `/v1/keys/`)."""
    raw_path = scope.get("raw_path") or b""
    if b"%" in raw_path:
        ocsp = _OCSP_GET.match(raw_path)
        if _ENCODED_SEPARATOR.search(raw_path, 0, ocsp.end() if ocsp else len(raw_path)):
            raise NotFound("no route: the path has an encoded '/' or '\\' (%2F, %5C) in a segment")
    hosts = 0
    for name, value in scope["headers"]:
        if name == b"content-length":
            if not value.isdigit() or int(value) > limit:
                raise too_large(limit)
        elif name == b"host":
            hosts += 1
            if not _HOST.fullmatch(value):
                raise InvalidRequest("the Host header is not a host name or address and port")
        elif name == b"transfer-encoding" and value.strip().lower() != b"chunked":
            raise NotSupported("transfer coding: only chunked is supported")
        elif name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            raise UnsupportedMediaType("content coding: send the body uncompressed")
    if hosts > 1:
        raise repeated_header(b"host", hosts)
    if not hosts and scope.get("http_version") == "1.1":
        raise InvalidRequest("an HTTP/1.1 request must carry a Host header")


def observe(metrics: Metrics, scope: Scope, status: int, started_at: float) -> None:
    """Count a finished request by its matched route (`unmatched` if none); at log level
    info, log it as one JSON line (kmsgate.logs)."""
    route = scope.get("route")
    method = scope["method"] if scope["method"] in _METHODS else "other"
    path, operation = getattr(route, "path", UNMATCHED), getattr(route, "name", UNMATCHED)
    seconds = time.perf_counter() - started_at
    metrics.observe_request(path, operation, method, status, seconds)
    if request_logger.isEnabledFor(logging.INFO):
        state = scope.get("state", {})
        decided = current_decisions.get() or []
        named = scope.get("path_params", {}).get("name")
        named = named if named is None or KEY_NAME.fullmatch(named) else "(not a key name)"
        fields = {
            "request_id": state.get("request_id"),
            "method": method,
            "route": path,
            "operation": operation,
            "action": ",".join(dict.fromkeys(d.action for d in decided)) or None,
            "key": named or next((d.name for d in decided if d.kind == "key"), None),
            "principal": state.get("principal"),
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
        }
        request_logger.info("request", extra={"fields": fields})


class GatewayMiddleware:
    """Pure ASGI: assigns a request id, enforces the body-size limit, feeds the metrics,
    and answers HEAD as GET without the body (RFC 9110 9.3.2; FastAPI routes know GET
    only)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        metrics: Metrics,
        ids: RequestIds,
        deadlines: BodyDeadlines,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.ids = ids
        self.deadlines = deadlines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_at = time.perf_counter()
        request_id = self.ids.assign(scope)
        head = scope["method"] == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}
        limit = self.max_body_bytes
        received = 0
        started = False
        status = 500  # what the client gets if the application raises before answering

        guarded_receive = self.deadlines.guard(receive)

        async def limited_receive() -> Message:
            nonlocal received
            message = await guarded_receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large(limit)
            return message

        async def counting_send(message: Message) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                add_edge_headers(message.setdefault("headers", []), request_id)
            elif head and message.get("body"):
                message = {**message, "body": b""}  # its content-length stays the GET's
            await send(message)

        try:
            try:
                refuse_bad_framing(scope, limit)
            except KmsgateError as exc:
                await error_response(exc, request_id)(scope, receive, counting_send)
                return
            try:
                await self.app(scope, limited_receive, counting_send)
            except Exception as exc:  # a body over the limit, or a bug: a problem reply
                if started:
                    raise
                await failure_response(exc, Request(scope))(scope, receive, counting_send)
        finally:
            observe(self.metrics, scope, status, started_at)


def too_large(limit: int) -> TooLarge:
    return TooLarge(f"request body exceeds the limit of {limit} bytes")
