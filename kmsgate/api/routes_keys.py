"""Key routes: lifecycle (thread pool: may generate keys) and operations (event loop, cheap)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from kmsgate.api.bodies import JsonBodyRoute, json_object
from kmsgate.api.deps import CtxDep, PrincipalDep, ServiceDep, resolve_caller
from kmsgate.api.fastpath import Endpoint, FastRoute, fast_route
from kmsgate.api.openapi import AUTHORISING_POLICY, PUBLIC, non_json_reply
from kmsgate.api.replies import (
    CIPHERTEXT,
    DATA_KEY,
    JWKS,
    KEY,
    KEY_WITH_USAGE,
    KEYS,
    MAC,
    PLAINTEXT,
    SIGNATURE,
    VERIFIED,
    Schema,
    json_reply,
    operation_reply,
)
from kmsgate.api.responses import PEM, json_response, operation_response
from kmsgate.api.threads import BackendThreads
from kmsgate.errors import VerificationFailed
from kmsgate.request_parsing import operation_schema, parse_operation
from kmsgate.schemas import (
    LABEL_PATTERN,
    MAX_VERSION,
    CompromisedRequest,
    CreateKeyRequest,
    DataKeyItem,
    DecryptItem,
    EncryptItem,
    LabelFilter,
    MacItem,
    MacVerifyItem,
    PatchKeyRequest,
    RewrapItem,
    ScheduleDeletionRequest,
    SignItem,
    VerifyItem,
)
from kmsgate.service import Service
from kmsgate.service.crypto import Crypto
from kmsgate.service.envelope import Envelopes
from kmsgate.text import utc_timestamp

PREFIX = "/v1/keys"
POLICY_DIGEST_HEADER = "x-kmsgate-policy-digest"
OperationItem = (
    SignItem | VerifyItem | MacItem | MacVerifyItem | EncryptItem | DecryptItem | DataKeyItem
) | RewrapItem


def _crypto(service: Service) -> Crypto:
    return service.crypto


def _envelopes(service: Service) -> Envelopes:
    return service.envelopes


@dataclass(frozen=True)
class HotOperation:
    """A cryptographic operation on the key in the path, served by a plain Starlette route
    that skips FastAPI's per-request dependency machinery (DESIGN §10)."""

    path: str
    item_type: type[OperationItem]
    result: Schema
    """The schema of one item's result in the reply (`kmsgate.api.replies`)."""
    owner: Callable[[Service], Any]
    """The use-case object in the service that `run` is a method of."""
    run: Callable[..., list[Any]]
    """The use case, an unbound method of `owner(service)`: (self, principal, ctx, target,
    items, batch) -> one result or error per item."""
    doc: str
    threadpool: bool = False  # always off the event loop (may reach another key's backend)

    @property
    def name(self) -> str:
        return self.run.__name__


HOT_OPERATIONS = (
    HotOperation(
        "/{name}/sign",
        SignItem,
        SIGNATURE,
        _crypto,
        Crypto.sign,
        "Sign `input` or a prehashed `digest`; reply `{signature, key_version, algorithm}`.",
    ),
    HotOperation(
        "/{name}/verify",
        VerifyItem,
        VERIFIED,
        _crypto,
        Crypto.verify,
        "Verify a signature; reply `{valid, key_version}`.",
    ),
    HotOperation(
        "/{name}/mac",
        MacItem,
        MAC,
        _crypto,
        Crypto.mac,
        "HMAC `input`; reply `{mac, key_version}`.",
    ),
    HotOperation(
        "/{name}/mac/verify",
        MacVerifyItem,
        VERIFIED,
        _crypto,
        Crypto.mac_verify,
        "Check a MAC in constant time; reply `{valid, key_version}`.",
    ),
    HotOperation(
        "/{name}/encrypt",
        EncryptItem,
        CIPHERTEXT,
        _envelopes,
        Envelopes.encrypt,
        "Encrypt `plaintext` (fresh data key, AES-256-GCM, `context` bound as AAD); reply "
        "`{ciphertext, key_version}` (format: docs/formats.md).",
    ),
    HotOperation(
        "/{name}/decrypt",
        DecryptItem,
        PLAINTEXT,
        _envelopes,
        Envelopes.decrypt,
        "Decrypt a ciphertext from `encrypt` or `datakey` with its `context`; reply "
        "`{plaintext, key_version}`.",
    ),
    HotOperation(
        "/{name}/datakey",
        DataKeyItem,
        DATA_KEY,
        _envelopes,
        Envelopes.datakey,
        "A fresh data key; reply `{plaintext?, ciphertext, key_version}`.",
    ),
    HotOperation(
        "/{name}/rewrap",
        RewrapItem,
        CIPHERTEXT,
        _envelopes,
        Envelopes.rewrap,
        "Re-wrap a ciphertext's data key under the primary version (of this key, also for a "
        "ciphertext of another key); reply `{ciphertext, key_version}`.",
        threadpool=True,
    ),
)


def _run(op: HotOperation, service: Service, *args: Any) -> list[Any]:
    """`op` on the service; a single signature or MAC that does not verify is a result
    (`{valid: false}`), not an error."""
    try:
        return op.run(op.owner(service), *args)
    except VerificationFailed as exc:
        return [exc]


async def _operation(request: Request, op: HotOperation) -> Response:
    """Authenticate, parse the body (one item or a batch), look the key up once and run
    `op` on it. Hot path: no dependency injection, raw body parsing; a blocking backend's
    calls go to its own threads (`kmsgate.api.threads`), in-process ones stay on the event
    loop."""
    service, principal, ctx = resolve_caller(request)
    items, batch = parse_operation(
        await json_object(request), op.item_type, service.settings.limits.max_batch
    )
    inputs = [item.to_input() for item in items]
    name = request.path_params["name"]
    target = service.gate.target(name, rated=True)  # charged once the policy allowed it
    args = (op, service, principal, ctx, target, inputs, batch)
    if target.blocking and target.key is not None:  # one backend: its own threads
        threads: BackendThreads = request.app.state.backend_threads
        results = await threads.run(target.key.backend, _run, *args)
    elif op.threadpool:
        results = await run_in_threadpool(_run, *args)
    else:
        results = _run(*args)
    response = operation_response(results, batch)
    # the policy that authorised this operation: signers stamp it into attestations
    response.headers[POLICY_DIGEST_HEADER] = service.policy.digest
    return response


def _endpoint(op: HotOperation) -> Endpoint:
    """The endpoint serving `op`."""

    async def endpoint(request: Request) -> Response:
        return await _operation(request, op)

    endpoint.__doc__ = op.doc
    endpoint.__name__ = op.name
    return endpoint


def build_routes() -> tuple[list[FastRoute], APIRouter]:
    """A new application's key routes: the hot operations' Starlette routes (to be matched
    first) and the FastAPI router with every key route (lifecycle and, for the OpenAPI
    document, the operations)."""
    router = APIRouter(prefix=PREFIX, tags=["keys"], route_class=JsonBodyRoute)
    hot: list[FastRoute] = []
    digest = {POLICY_DIGEST_HEADER: AUTHORISING_POLICY}
    for op in HOT_OPERATIONS:
        hot.append(
            fast_route(
                router,
                op.path,
                _endpoint(op),
                methods=["POST"],
                openapi_extra=operation_schema(op.item_type),
                responses={200: json_reply(operation_reply(op.result), headers=digest)},
            )
        )
    key = json_reply(KEY)
    router.add_api_route("", create_key, methods=["POST"], status_code=201, responses={201: key})
    router.add_api_route("", list_keys, methods=["GET"], responses={200: json_reply(KEYS)})
    router.add_api_route(
        "/{name}", get_key, methods=["GET"], responses={200: json_reply(KEY_WITH_USAGE)}
    )
    router.add_api_route("/{name}", update_key, methods=["PATCH"], responses={200: key})
    for path, change in (
        ("/{name}/rotate", rotate_key),
        ("/{name}/disable", disable_key),
        ("/{name}/enable", enable_key),
        ("/{name}/versions/{version}/compromised", mark_compromised),
        ("/{name}/schedule-deletion", schedule_deletion),
        ("/{name}/cancel-deletion", cancel_deletion),
    ):
        router.add_api_route(path, change, methods=["POST"], responses={200: key})
    router.add_api_route("/{name}/public-key", public_key, methods=["GET"], **non_json_reply(PEM))
    router.add_api_route(
        "/{name}/jwks.json",
        jwks,
        methods=["GET"],
        responses={200: json_reply(JWKS)},
        openapi_extra=PUBLIC,
    )
    return hot, router


def _labels(label: list[str]) -> list[tuple[str, str]]:
    """The `label=name:value` filters (each checked by `LABEL_FILTER`; a name given twice
    with two values matches no key: every filter must match)."""
    return [(name, value) for name, _, value in (item.partition(":") for item in label)]


async def _on_backend(
    request: Request, backend: str | None, call: Callable[..., Any], *args: object
) -> Any:
    """`call(*args)` off the event loop: in the threads of `backend` if it is one that
    blocks (a hung Vault holds only its own threads: routes in the shared pool go on), else
    in the shared pool. Raises what `BackendThreads.run` and `call` raise."""
    service: Service = request.app.state.service
    found = service.registry.find(backend) if backend else None
    if backend is None or found is None or not found.blocking:
        return await run_in_threadpool(call, *args)
    threads: BackendThreads = request.app.state.backend_threads
    return await threads.run(backend, call, *args)


async def create_key(
    request: Request,
    body: CreateKeyRequest,
    service: ServiceDep,
    principal: PrincipalDep,
    ctx: CtxDep,
) -> Response:
    """Create a key (or import a verify-only public key)."""
    new = body.to_input()
    backend = new.backend or service.registry.default
    key = await _on_backend(request, backend, service.keys.create, principal, ctx, new)
    return json_response(key.to_dict(), 201)


def list_keys(
    service: ServiceDep,
    principal: PrincipalDep,
    ctx: CtxDep,
    purpose: Annotated[str | None, Query(pattern=LABEL_PATTERN)] = None,
    label: Annotated[list[LabelFilter], Query(max_length=32)] = [],  # noqa: B006
) -> Response:
    """Keys the caller may read, filtered by purpose and `label=name:value`."""
    keys = service.keys.search(principal, ctx, purpose=purpose, labels=_labels(label))
    return json_response({"keys": [key.to_dict() for key in keys]})


def get_key(name: str, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep) -> Response:
    """The key, each version with `uses` and `last_used` (all processes, within a second;
    null while the store cannot be reached)."""
    body = service.keys.get(principal, ctx, name).to_dict()
    usage = service.keys.usage(name)
    for version in body["versions"]:
        count, last = (None, None) if usage is None else usage.get(version["version"], (0, None))
        version["uses"] = count
        version["last_used"] = utc_timestamp(last) if last else None
    return json_response(body)


async def rotate_key(
    request: Request, name: str, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> Response:
    """Create a new primary version; old versions keep verifying."""
    target = service.gate.target(name)  # NotFound for a name no key can have, as rotate says
    backend = target.key.backend if target.key else None
    key = await _on_backend(request, backend, service.keys.rotate, principal, ctx, name)
    return json_response(key.to_dict())


def disable_key(name: str, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep) -> Response:
    return json_response(service.keys.disable(principal, ctx, name).to_dict())


def enable_key(name: str, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep) -> Response:
    return json_response(service.keys.enable(principal, ctx, name).to_dict())


def update_key(
    name: str, body: PatchKeyRequest, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> Response:
    return json_response(service.keys.update(principal, ctx, name, body.to_input()).to_dict())


def mark_compromised(
    name: str,
    version: Annotated[int, Path(ge=1, le=MAX_VERSION)],
    body: CompromisedRequest,
    service: ServiceDep,
    principal: PrincipalDep,
    ctx: CtxDep,
) -> Response:
    return json_response(
        service.keys.mark_compromised(principal, ctx, name, version, body.since).to_dict()
    )


def schedule_deletion(
    name: str,
    body: ScheduleDeletionRequest,
    service: ServiceDep,
    principal: PrincipalDep,
    ctx: CtxDep,
) -> Response:
    return json_response(
        service.keys.schedule_deletion(principal, ctx, name, body.pending_days).to_dict()
    )


def cancel_deletion(
    name: str, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> Response:
    return json_response(service.keys.cancel_deletion(principal, ctx, name).to_dict())


async def public_key(
    name: str,
    service: ServiceDep,
    principal: PrincipalDep,
    ctx: CtxDep,
    version: Annotated[int | None, Query(ge=1, le=MAX_VERSION)] = None,
) -> Response:
    """PEM SubjectPublicKeyInfo of a version (default: primary)."""
    pem = service.keys.public_key_pem(principal, ctx, name, version)
    return Response(pem, media_type=PEM)


async def jwks(name: str, service: ServiceDep) -> Response:
    """Public: the JWKS of the key's usable versions."""
    return json_response(service.keys.jwks(name))
