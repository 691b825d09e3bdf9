"""Public revocation routes (no token): a CA's full and delta CRL, and its OCSP responder
(RFC 6960 over HTTP: POST the DER request, or GET it base64-encoded in the path).

OCSP answers are always HTTP 200 with an OCSPResponse body, also when the request is
malformed (`malformedRequest`) or about another issuer (`unauthorized`), as OCSP clients
expect; only an unknown CA is a problem+json 404.
"""

from __future__ import annotations

import base64
import binascii
from functools import partial

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from kmsgate.api.bodies import JsonBodyRoute, refuse_repeated, strict_scalar
from kmsgate.api.deps import request_ctx
from kmsgate.api.fastpath import FastRoute, body_schema, fast_route
from kmsgate.api.openapi import BINARY, PUBLIC, non_json_reply
from kmsgate.pki.ocsp import malformed_response
from kmsgate.service import Service

PREFIX = "/v1/pki"
CRL_TYPE = "application/pkix-crl"
OCSP_REQUEST_TYPE = "application/ocsp-request"
OCSP_RESPONSE_TYPE = "application/ocsp-response"
MAX_ENCODED_REQUEST = 4096
"""Longest base64 request a GET may carry (an OCSP request is a few hundred bytes)."""
_DELTA_PARAMETER = {
    "name": "delta",
    "in": "query",
    "required": False,
    "schema": {"type": "boolean", "default": False},
    "description": "the delta CRL instead of the full one",
}


def build_routes() -> tuple[list[FastRoute], APIRouter]:
    """A new application's revocation routes: CRLs and OCSP on the fast path (to be matched
    first), and the FastAPI router that documents them."""
    router = APIRouter(prefix=PREFIX, tags=["pki"], route_class=JsonBodyRoute)
    fast = [
        fast_route(
            router,
            "/cas/{ca}/crl",
            crl,
            methods=["GET"],
            openapi_extra={"parameters": [_DELTA_PARAMETER], **PUBLIC},
            **non_json_reply(CRL_TYPE),
        ),
        fast_route(
            router,
            "/cas/{ca}/ocsp",
            ocsp_post,
            methods=["POST"],
            # any body, none included, is answered: malformedRequest when it is no request
            openapi_extra={**body_schema(BINARY, OCSP_REQUEST_TYPE, required=False), **PUBLIC},
            **non_json_reply(OCSP_RESPONSE_TYPE),
        ),
        fast_route(
            router,
            "/cas/{ca}/ocsp/{encoded:path}",
            ocsp_get,
            methods=["GET"],
            openapi_extra=PUBLIC,
            **non_json_reply(OCSP_RESPONSE_TYPE),
        ),
    ]
    return fast, router


async def crl(request: Request) -> Response:
    """Public: the CA's current full CRL, or with `?delta=1` its delta CRL (DER)."""
    service: Service = request.app.state.service
    ca, delta = request.path_params["ca"], _delta(request)
    der = service.revocation.crl_from_memory(ca, delta=delta)
    if der is None:  # a CA not asked about yet, or a CRL not here yet: the store, or Vault
        der = await run_in_threadpool(partial(service.revocation.crl, ca, delta=delta))
    return Response(der, media_type=CRL_TYPE)


def _delta(request: Request) -> bool:
    """The `delta` query parameter (false when absent). Raises ValidationFailed (also when
    it is repeated)."""
    refuse_repeated(request, ("delta",))
    value = request.query_params.get("delta")
    return value is not None and bool(strict_scalar("query.delta", value, bool))


async def ocsp_post(request: Request) -> Response:
    """Public: the OCSP answer to the DER request in the body (application/ocsp-request)."""
    return await _answer(request, await request.body())


async def ocsp_get(request: Request) -> Response:
    """Public: the OCSP answer to the request in the path, base64 (standard or URL-safe,
    padding optional, URL-decoded by the server)."""
    der = _decode(request.path_params["encoded"])
    if der is None:
        return Response(malformed_response(), media_type=OCSP_RESPONSE_TYPE)
    return await _answer(request, der)


async def _answer(request: Request, der: bytes) -> Response:
    """From memory on the event loop (a cached answer, or a nonce signed by the softkms
    responder); otherwise off it, since a miss reads the store."""
    service: Service = request.app.state.service
    ca, ctx = request.path_params["ca"], request_ctx(request)
    answer = service.revocation.ocsp_from_memory(ca, der)
    if answer is None:
        answer = await run_in_threadpool(service.revocation.ocsp, ctx, ca, der)
    return Response(answer, media_type=OCSP_RESPONSE_TYPE)


def _decode(encoded: str) -> bytes | None:
    """The bytes of a base64 path segment, or None if it is not base64."""
    if len(encoded) > MAX_ENCODED_REQUEST:
        return None
    text = encoded.strip().replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
