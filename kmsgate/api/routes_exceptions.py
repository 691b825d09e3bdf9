"""JIT exception routes (API.md "Policy, exceptions, system"): request, approve, revoke,
list and show grants."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from starlette.responses import Response

from kmsgate.api.bodies import JsonBodyRoute
from kmsgate.api.deps import CtxDep, PrincipalDep, ServiceDep
from kmsgate.api.replies import GRANT, GRANTS, json_reply
from kmsgate.api.responses import json_response
from kmsgate.grants import GrantState
from kmsgate.schemas import ExceptionCreateRequest

PREFIX = "/v1/exceptions"


def now() -> datetime:
    """The moment a reply's `state` is given for."""
    return datetime.now(UTC)


def request_exception(
    body: ExceptionCreateRequest, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> Response:
    """Ask for a grant for the caller: 201, pending until approved."""
    grant = service.exceptions.request(principal, ctx, body.to_input())
    return json_response(grant.to_dict(now()), 201)


def approve_exception(
    grant_id: str, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> Response:
    """Approve another principal's grant; active once enough approvals are in."""
    return json_response(service.exceptions.approve(principal, ctx, grant_id).to_dict(now()))


def revoke_exception(
    grant_id: str, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> Response:
    """End a pending or active grant now."""
    return json_response(service.exceptions.revoke(principal, ctx, grant_id).to_dict(now()))


def show_exception(
    grant_id: str, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> Response:
    return json_response(service.exceptions.get(principal, ctx, grant_id).to_dict(now()))


def list_exceptions(
    service: ServiceDep,
    principal: PrincipalDep,
    ctx: CtxDep,
    state: GrantState | None = None,
    principal_id: Annotated[str | None, Query(alias="principal", max_length=256)] = None,
) -> Response:
    """Grants, oldest first, by state and requester."""
    grants = service.exceptions.search(principal, ctx, owner=principal_id, state=state)
    at = now()
    return json_response({"exceptions": [g.to_dict(at) for g in grants]})


def build_router() -> APIRouter:
    """A new application's exception routes."""
    router = APIRouter(prefix=PREFIX, tags=["exceptions"], route_class=JsonBodyRoute)
    grant = json_reply(GRANT)
    router.add_api_route(
        "", request_exception, methods=["POST"], status_code=201, responses={201: grant}
    )
    router.add_api_route("", list_exceptions, methods=["GET"], responses={200: json_reply(GRANTS)})
    router.add_api_route("/{grant_id}", show_exception, methods=["GET"], responses={200: grant})
    router.add_api_route(
        "/{grant_id}", revoke_exception, methods=["DELETE"], responses={200: grant}
    )
    router.add_api_route(
        "/{grant_id}/approve", approve_exception, methods=["POST"], responses={200: grant}
    )
    return router
