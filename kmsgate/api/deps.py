"""FastAPI dependencies: the service, the request context and the authenticated principal."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import Depends, Request
from starlette.responses import Response

from kmsgate.service import Ctx, Service
from kmsgate.tokens import Principal


async def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


async def get_ctx(request: Request) -> Ctx:
    return Ctx(request_id=getattr(request.state, "request_id", "-"))


async def get_principal(request: Request) -> Principal:
    """The caller, from `Authorization: Bearer <token>`. Raises Unauthenticated."""
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    bearer = credentials.strip() if scheme.lower() == "bearer" else None
    service: Service = request.app.state.service
    return service.authenticate(bearer, await get_ctx(request))


ServiceDep = Annotated[Service, Depends(get_service)]
CtxDep = Annotated[Ctx, Depends(get_ctx)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]


def json_response(body: Any, status_code: int = 200) -> Response:
    """A JSON reply serialised with orjson (fast path for hot endpoints)."""
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json")
