"""System routes: health, readiness, metrics, policy, API tokens and the audit trail."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import PlainTextResponse, Response

from kmsgate.api.bodies import JsonBodyRoute
from kmsgate.api.deps import CtxDep, PrincipalDep, ServiceDep
from kmsgate.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from kmsgate.api.metrics import Metrics
from kmsgate.api.openapi import PUBLIC, RETRY_AFTER, problem_reply
from kmsgate.api.readiness import Readiness
from kmsgate.api.replies import (
    AUDIT_CHECKPOINTS,
    AUDIT_RECORDS,
    HEALTH,
    IDENTITY,
    NEW_TOKEN,
    NOT_READY,
    POLICY,
    POLICY_RELOADED,
    READY,
    REVOKED_TOKEN,
    TOKENS,
    VERDICT,
    json_reply,
)
from kmsgate.api.responses import json_response
from kmsgate.audit import AuditCursor
from kmsgate.schemas import PolicyEvaluateRequest, Timestamp, TokenCreateRequest
from kmsgate.service.requests import AuditQuery


async def health() -> Response:
    """Liveness: the process answers."""
    return json_response({"status": "ok"})


async def ready(request: Request) -> Response:
    """Readiness (`kmsgate.api.readiness`): 200 when every part answers, or `degraded`
    while only the store cannot be reached; else 503."""
    readiness: Readiness = request.app.state.readiness
    body, status = await readiness.check()
    return json_response(body, status)


def metrics(
    request: Request, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> Response:
    """Prometheus text (action `metrics.read`): requests by route and status, latency per
    operation, backend errors."""
    service.system.authorize_metrics(principal, ctx)
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=METRICS_CONTENT_TYPE)


def whoami(service: ServiceDep, principal: PrincipalDep, ctx: CtxDep) -> Response:
    """The caller: `{id, kind, tenant, roles, claims}`, roles as the policy maps them."""
    return json_response(asdict(service.system.whoami(principal, ctx)))


def policy_info(service: ServiceDep, principal: PrincipalDep, ctx: CtxDep) -> Response:
    """The loaded policy bundle's digest and files."""
    return json_response(service.system.policy_info(principal, ctx))


def policy_evaluate(
    body: PolicyEvaluateRequest, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> Response:
    """What the policy decides for a given input: `{allow, reasons, roles, exceptions_used}`."""
    return json_response(service.system.evaluate_policy(principal, ctx, body.to_input()))


def policy_reload(service: ServiceDep, principal: PrincipalDep, ctx: CtxDep) -> Response:
    """Re-read the policy files atomically; the old policy stays if the new one is invalid."""
    return json_response({"digest": service.system.reload_policy(principal, ctx)})


def create_token(
    body: TokenCreateRequest, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> Response:
    """A new API token: the `token` string is shown only in this reply."""
    info, token = service.system.create_token(principal, ctx, body.to_input())
    return json_response({**info.to_dict(), "token": token}, 201)


def list_tokens(service: ServiceDep, principal: PrincipalDep, ctx: CtxDep) -> Response:
    return json_response(
        {"tokens": [t.to_dict() for t in service.system.list_tokens(principal, ctx)]}
    )


def revoke_token(
    token_id: str, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> Response:
    revoked, listed, count = service.system.revoke_token(principal, ctx, token_id)
    return json_response({**revoked.to_dict(), "also_revoked": listed, "also_revoked_count": count})


def audit_events(
    service: ServiceDep,
    principal: PrincipalDep,
    ctx: CtxDep,
    since: Timestamp | None = None,
    principal_id: Annotated[str | None, Query(alias="principal")] = None,
    key: str | None = None,
    action: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    before: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """Audit records, oldest first, filtered; `next` pages back to older ones. Raises
    InvalidRequest for a `before` that is no cursor."""
    query = AuditQuery(
        since=since,
        principal=principal_id,
        key=key,
        action=action,
        limit=limit,
        before=AuditCursor.parse(before) if before is not None else None,
    )
    page = service.system.audit_events(principal, ctx, query)
    return json_response({"events": page.records, "next": page.next})


def audit_checkpoints(service: ServiceDep, principal: PrincipalDep, ctx: CtxDep) -> Response:
    """The store's last signed checkpoint of every audit chain (action `audit.read`): what
    `kmsgate audit verify --gateway` compares the log files with."""
    anchors = service.system.audit_checkpoints(principal, ctx)
    return json_response({"checkpoints": [asdict(anchor) for anchor in anchors]})


def build_router() -> APIRouter:
    """A new application's system routes."""
    router = APIRouter(tags=["system"], route_class=JsonBodyRoute)
    router.add_api_route(
        "/v1/sys/health",
        health,
        methods=["GET"],
        responses={200: json_reply(HEALTH)},
        openapi_extra=PUBLIC,
    )
    not_ready = json_reply(NOT_READY, "not ready: what failed, in the same shape")
    router.add_api_route(
        "/v1/sys/ready",
        ready,
        methods=["GET"],
        responses={200: json_reply(READY), 503: not_ready},
        openapi_extra=PUBLIC,
    )
    router.add_api_route("/metrics", metrics, methods=["GET"], response_class=PlainTextResponse)
    router.add_api_route(
        "/v1/sys/whoami", whoami, methods=["GET"], responses={200: json_reply(IDENTITY)}
    )
    router.add_api_route(
        "/v1/sys/policy", policy_info, methods=["GET"], responses={200: json_reply(POLICY)}
    )
    router.add_api_route(
        "/v1/sys/policy/evaluate",
        policy_evaluate,
        methods=["POST"],
        responses={200: json_reply(VERDICT)},
    )
    router.add_api_route(
        "/v1/sys/policy/reload",
        policy_reload,
        methods=["POST"],
        responses={200: json_reply(POLICY_RELOADED)},
    )
    router.add_api_route(
        "/v1/sys/tokens",
        create_token,
        methods=["POST"],
        status_code=201,
        responses={201: json_reply(NEW_TOKEN)},
    )
    router.add_api_route(
        "/v1/sys/tokens", list_tokens, methods=["GET"], responses={200: json_reply(TOKENS)}
    )
    router.add_api_route(
        "/v1/sys/tokens/{token_id}",
        revoke_token,
        methods=["DELETE"],
        responses={200: json_reply(REVOKED_TOKEN)},
    )
    router.add_api_route(
        "/v1/audit",
        audit_events,
        methods=["GET"],
        responses={
            200: json_reply(AUDIT_RECORDS),
            400: problem_reply("`before` is not a cursor (the `next` of a previous page)", {}),
            503: problem_reply(
                "a chain file holds a line that is no record (no Retry-After: it lasts until "
                "an operator mends the file), or a dependency is out of reach (Retry-After)",
                {"retry-after": RETRY_AFTER},
            ),
        },
    )
    router.add_api_route(
        "/v1/audit/checkpoints",
        audit_checkpoints,
        methods=["GET"],
        responses={200: json_reply(AUDIT_CHECKPOINTS)},
    )
    return router
