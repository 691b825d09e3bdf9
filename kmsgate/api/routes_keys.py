"""Key routes: lifecycle (thread pool: may generate keys) and operations (event loop, cheap)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from starlette.responses import Response
from starlette.routing import Route

from kmsgate.api.deps import CtxDep, PrincipalDep, ServiceDep, resolve_caller
from kmsgate.api.responses import json_response
from kmsgate.errors import InvalidRequest
from kmsgate.schemas import (
    CompromisedRequest,
    CreateKeyRequest,
    DataKeyItem,
    DecryptItem,
    EncryptItem,
    MacItem,
    MacVerifyItem,
    PatchKeyRequest,
    RewrapItem,
    ScheduleDeletionRequest,
    SignItem,
    VerifyItem,
    operation_schema,
    parse_operation,
)
from kmsgate.service import Ctx, Result
from kmsgate.tokens import Principal

router = APIRouter(prefix="/v1/keys", tags=["keys"])
POLICY_DIGEST_HEADER = "x-kmsgate-policy-digest"


# The hot operations come first: routes are matched in order.


async def _operation(
    request: Request, item_type: type[BaseModel], operation: str, threadpool: bool = False
) -> Response:
    """Authenticate, parse the body (one item or a batch) and run `operation` on the key in
    the path. Hot path: no dependency injection, raw body parsing; blocking backends go to
    the thread pool, in-process ones stay on the event loop."""
    service, principal, ctx = resolve_caller(request)
    name: str = request.path_params["name"]
    items, batch = parse_operation(
        await request.body(), item_type, service.settings.limits.max_batch
    )
    run: Callable[[Principal, Ctx, str, list[Any], bool], Result] = getattr(service, operation)
    if threadpool or service.is_blocking(name):
        result = await run_in_threadpool(run, principal, ctx, name, items, batch)
    else:
        result = run(principal, ctx, name, items, batch)
    response = json_response(result)
    # the policy that authorised this operation: signers stamp it into attestations
    response.headers[POLICY_DIGEST_HEADER] = service.policy.digest
    return response


HOT_ROUTES: list[Route] = []
"""Plain Starlette routes for the hot operations, put first in the app's routing table:
they skip FastAPI's per-request dependency machinery (DESIGN §10). The matching FastAPI
routes stay registered so the OpenAPI document describes them."""


def _hot_route(
    path: str, item_type: type[BaseModel], operation: str, doc: str, *, threadpool: bool = False
) -> None:
    """Register a hot operation; `threadpool` always runs it off the event loop (for
    operations that may reach a backend other than the path key's)."""

    async def endpoint(request: Request) -> Response:
        # FastAPI records the matched route in the scope only for its own routes; the
        # metrics label requests by it.
        request.scope["route"] = hot
        return await _operation(request, item_type, operation, threadpool)

    endpoint.__doc__ = doc
    endpoint.__name__ = operation
    name_param = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    extra = {**operation_schema(item_type), "parameters": [name_param]}
    router.post(path, openapi_extra=extra)(endpoint)
    hot = Route(router.prefix + path, endpoint, methods=["POST"])
    HOT_ROUTES.append(hot)


_hot_route(
    "/{name}/sign",
    SignItem,
    "sign",
    "Sign `input` or a prehashed `digest`; reply `{signature, key_version, algorithm}`.",
)
_hot_route(
    "/{name}/verify", VerifyItem, "verify", "Verify a signature; reply `{valid, key_version}`."
)
_hot_route("/{name}/mac", MacItem, "mac", "HMAC `input`; reply `{mac, key_version}`.")
_hot_route(
    "/{name}/mac/verify",
    MacVerifyItem,
    "mac_verify",
    "Check a MAC in constant time; reply `{valid, key_version}`.",
)
_hot_route(
    "/{name}/encrypt",
    EncryptItem,
    "encrypt",
    "Encrypt `plaintext` (fresh data key, AES-256-GCM, `context` bound as AAD); reply "
    "`{ciphertext, key_version}` (format: docs/formats.md).",
)
_hot_route(
    "/{name}/decrypt",
    DecryptItem,
    "decrypt",
    "Decrypt a ciphertext from `encrypt` or `datakey` with its `context`; reply "
    "`{plaintext, key_version}`.",
)
_hot_route(
    "/{name}/datakey",
    DataKeyItem,
    "datakey",
    "A fresh data key; reply `{plaintext?, ciphertext, key_version}`.",
)
_hot_route(
    "/{name}/rewrap",
    RewrapItem,
    "rewrap",
    "Re-wrap a ciphertext's data key under the primary version (of this key, also for a "
    "ciphertext of another key); reply `{ciphertext, key_version}`.",
    threadpool=True,
)


def _labels(label: list[str]) -> dict[str, str]:
    pairs = {}
    for item in label:
        name, sep, value = item.partition(":")
        if not sep:
            raise InvalidRequest(f"label filter {item!r} must read name:value")
        pairs[name] = value
    return pairs


@router.post("", status_code=201)
def create_key(
    body: CreateKeyRequest, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> dict[str, Any]:
    """Create a key (or import a verify-only public key)."""
    return service.create_key(principal, ctx, body).to_dict()


@router.get("")
def list_keys(
    service: ServiceDep,
    principal: PrincipalDep,
    ctx: CtxDep,
    purpose: str | None = None,
    label: Annotated[list[str], Query(max_length=32)] = [],  # noqa: B006
) -> dict[str, Any]:
    """Keys the caller may read, filtered by purpose and `label=name:value`."""
    keys = service.list_keys(principal, ctx, purpose=purpose, labels=_labels(label))
    return {"keys": [key.to_dict() for key in keys]}


@router.get("/{name}")
async def get_key(name: str, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep) -> Response:
    return json_response(service.get_key(principal, ctx, name).to_dict())


@router.post("/{name}/rotate")
def rotate_key(
    name: str, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> dict[str, Any]:
    """Create a new primary version; old versions keep verifying."""
    return service.rotate_key(principal, ctx, name).to_dict()


@router.post("/{name}/disable")
def disable_key(
    name: str, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> dict[str, Any]:
    return service.disable_key(principal, ctx, name).to_dict()


@router.post("/{name}/enable")
def enable_key(
    name: str, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> dict[str, Any]:
    return service.enable_key(principal, ctx, name).to_dict()


@router.patch("/{name}")
def update_key(
    name: str, body: PatchKeyRequest, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> dict[str, Any]:
    return service.update_key(principal, ctx, name, body).to_dict()


@router.post("/{name}/versions/{version}/compromised")
def mark_compromised(
    name: str,
    version: int,
    body: CompromisedRequest,
    service: ServiceDep,
    principal: PrincipalDep,
    ctx: CtxDep,
) -> dict[str, Any]:
    return service.mark_compromised(principal, ctx, name, version, body).to_dict()


@router.post("/{name}/schedule-deletion")
def schedule_deletion(
    name: str,
    body: ScheduleDeletionRequest,
    service: ServiceDep,
    principal: PrincipalDep,
    ctx: CtxDep,
) -> dict[str, Any]:
    return service.schedule_deletion(principal, ctx, name, body).to_dict()


@router.post("/{name}/cancel-deletion")
def cancel_deletion(
    name: str, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> dict[str, Any]:
    return service.cancel_deletion(principal, ctx, name).to_dict()


@router.get("/{name}/public-key", response_class=Response)
async def public_key(
    name: str,
    service: ServiceDep,
    principal: PrincipalDep,
    ctx: CtxDep,
    version: Annotated[int | None, Query(ge=1)] = None,
) -> Response:
    """PEM SubjectPublicKeyInfo of a version (default: primary)."""
    pem = service.public_key_pem(principal, ctx, name, version)
    return Response(pem, media_type="application/x-pem-file")


@router.get("/{name}/jwks.json")
async def jwks(name: str, service: ServiceDep) -> Response:
    """Public: the JWKS of the key's usable versions."""
    return json_response(service.jwks(name))
