"""FastAPI dependencies: the service, the request context and the authenticated principal."""

from __future__ import annotations

import functools
from typing import Annotated

from cryptography import x509
from fastapi import Depends, Request

from kmsgate.api.bodies import single_header
from kmsgate.auth import Credentials, Principal
from kmsgate.auth.forwarded import HEADER as FORWARDED_CERT_HEADER
from kmsgate.service import Ctx, Service


def resolve_caller(request: Request) -> tuple[Service, Principal, Ctx]:
    """Service, authenticated principal and context in one call, without FastAPI's
    dependency machinery (hot routes: sign, verify, mac). Raises Unauthenticated,
    InvalidRequest (a credential header given twice)."""
    service: Service = request.app.state.service
    ctx = request_ctx(request)
    scheme, _, value = single_header(request.scope, b"authorization").partition(" ")
    client = request.scope.get("client")
    credentials = Credentials(
        bearer=value.strip() if scheme.lower() == "bearer" else None,
        peer_chain=_peer_chain(request),
        remote_addr=client[0] if client else None,
        forwarded_cert=single_header(request.scope, FORWARDED_CERT_HEADER),
    )
    principal = service.gate.authenticate(credentials, ctx)
    request.scope.setdefault("state", {})["principal"] = principal.id  # for the request log
    return service, principal, ctx


def _peer_chain(request: Request) -> tuple[x509.Certificate, ...]:
    """The client certificate the TLS layer verified (the ASGI TLS extension, which
    `kmsgate serve` provides), none on plain HTTP."""
    tls = request.scope.get("extensions", {}).get("tls")
    if not tls or not tls.get("client_cert_chain"):
        return ()
    return tuple(_certificate(pem) for pem in tls["client_cert_chain"])


@functools.lru_cache(maxsize=4096)
def _certificate(pem: str) -> x509.Certificate:
    """A presented certificate, parsed once (a client sends the same one on every request)."""
    return x509.load_pem_x509_certificate(pem.encode())


async def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def request_ctx(request: Request) -> Ctx:
    """The request's facts for audit records."""
    return Ctx(request_id=request.scope.get("state", {}).get("request_id", "-"))


async def get_ctx(request: Request) -> Ctx:
    return request_ctx(request)


async def get_principal(request: Request) -> Principal:
    """The caller, from the request's credentials. Raises Unauthenticated."""
    return resolve_caller(request)[1]


ServiceDep = Annotated[Service, Depends(get_service)]
CtxDep = Annotated[Ctx, Depends(get_ctx)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
