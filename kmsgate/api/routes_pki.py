"""PKI routes: CAs, profiles, issuance from a CSR, revocation and the inventory. The chain,
CRL and OCSP answer without a token (relying parties fetch them)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives import serialization
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from kmsgate.api.bodies import JsonBodyRoute, json_object
from kmsgate.api.deps import CtxDep, PrincipalDep, ServiceDep, resolve_caller
from kmsgate.api.fastpath import FastRoute, body_schema, fast_route
from kmsgate.api.openapi import PUBLIC, non_json_reply
from kmsgate.api.replies import (
    CA,
    CAS,
    CERTIFICATE_PAGE,
    CERTIFICATE_RECORD,
    CERTIFICATE_RECORD_PEM,
    ISSUED,
    NEW_CA,
    PROFILES,
    SPIFFE_BUNDLE,
    json_reply,
)
from kmsgate.api.responses import PEM, json_response
from kmsgate.pki.crl import LEAF_REVOCATION_REASONS, parse_reason
from kmsgate.pki.issuer import parse_serial, serial_hex
from kmsgate.request_parsing import parse_model
from kmsgate.schemas import (
    CaCertificateRequest,
    CreateCaRequest,
    IssueRequest,
    RenewRequest,
    RevokeRequest,
    Timestamp,
)
from kmsgate.service import Service
from kmsgate.service.results import Issued
from kmsgate.store.certificates import CertQuery
from kmsgate.text import utc_timestamp

CERT_DER = "application/pkix-cert"

PREFIX = "/v1/pki"


def build_routes() -> tuple[list[FastRoute], APIRouter]:
    """A new application's PKI routes: issuance and the public chain and trust bundle on the
    fast path (to be matched first), and the FastAPI router with every PKI route."""
    router = APIRouter(prefix=PREFIX, tags=["pki"], route_class=JsonBodyRoute)
    fast = [
        fast_route(
            router,
            "/cas/{ca}/issue",
            issue,
            methods=["POST"],
            openapi_extra=body_schema(IssueRequest.model_json_schema()),
            responses={200: json_reply(ISSUED)},
        ),
        fast_route(
            router,
            "/cas/{ca}/chain",
            chain,
            methods=["GET"],
            openapi_extra=PUBLIC,
            **non_json_reply(PEM),
        ),
        fast_route(
            router,
            "/cas/{ca}/certificate",
            ca_certificate,
            methods=["GET"],
            openapi_extra=PUBLIC,
            **non_json_reply(CERT_DER),
        ),
        fast_route(
            router,
            "/cas/{ca}/bundle",
            bundle,
            methods=["GET"],
            openapi_extra=PUBLIC,
            response_class=Response,
            responses={
                200: {
                    "content": {
                        "application/json": {"schema": SPIFFE_BUNDLE},
                        PEM: {"schema": {"type": "string"}},
                    }
                }
            },
        ),
    ]
    router.add_api_route("/cas", list_cas, methods=["GET"], responses={200: json_reply(CAS)})
    router.add_api_route(
        "/cas", create_ca, methods=["POST"], status_code=201, responses={201: json_reply(NEW_CA)}
    )
    router.add_api_route(
        "/cas/{ca}/certificate",
        import_certificate,
        methods=["POST"],
        responses={200: json_reply(CA)},
    )
    router.add_api_route(
        "/profiles", profiles, methods=["GET"], responses={200: json_reply(PROFILES)}
    )
    router.add_api_route(
        "/certs", list_certs, methods=["GET"], responses={200: json_reply(CERTIFICATE_PAGE)}
    )
    router.add_api_route(
        "/certs/{serial}",
        get_cert,
        methods=["GET"],
        responses={200: json_reply(CERTIFICATE_RECORD_PEM)},
    )
    router.add_api_route(
        "/certs/{serial}/revoke",
        revoke,
        methods=["POST"],
        responses={200: json_reply(CERTIFICATE_RECORD)},
    )
    router.add_api_route("/renew", renew, methods=["POST"], responses={200: json_reply(ISSUED)})
    return fast, router


def list_cas(service: ServiceDep, principal: PrincipalDep, ctx: CtxDep) -> Response:
    """The CAs: name, type, state, subject, key, parent, not_after."""
    return json_response({"cas": [ca.to_dict() for ca in service.pki.list_cas(principal, ctx)]})


def create_ca(
    body: CreateCaRequest, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> Response:
    """Create an intermediate CA's key on a backend; reply its CSR for the offline root."""
    ca = service.pki.create_ca(principal, ctx, body.to_input())
    return json_response({**ca.to_dict(), "csr": ca.csr_pem}, 201)


def import_certificate(
    ca: str,
    body: CaCertificateRequest,
    service: ServiceDep,
    principal: PrincipalDep,
    ctx: CtxDep,
) -> Response:
    """Activate a pending CA with its signed certificate and the chain up to the root."""
    certificate, chain_certs = body.certificates()
    authority = service.pki.import_certificate(principal, ctx, ca, certificate, chain_certs)
    return json_response(authority.to_dict())


async def chain(request: Request) -> Response:
    """Public: the CA's certificate and its issuers, PEM, root last."""
    service: Service = request.app.state.service
    return Response(await service.pki.chain_pem(request.path_params["ca"]), media_type=PEM)


async def ca_certificate(request: Request) -> Response:
    """Public: the CA's own certificate, DER (what the caIssuers URL of its certificates
    names)."""
    service: Service = request.app.state.service
    der = await service.pki.certificate_der(request.path_params["ca"])
    return Response(der, media_type=CERT_DER)


async def bundle(request: Request) -> Response:
    """Public: the CA's certificate and its issuers as a SPIFFE trust bundle (JWK Set,
    `use: x509-svid`, `spiffe_sequence`), or PEM when the client accepts
    `application/x-pem-file` (and not JSON)."""
    service: Service = request.app.state.service
    ca, accept = request.path_params["ca"], request.headers.get("accept", "")
    if PEM in accept and "json" not in accept:
        return Response(await service.pki.chain_pem(ca), media_type=PEM)
    return json_response(await service.pki.spiffe_bundle(ca))


async def issue(request: Request) -> Response:
    """Issue a certificate from a CSR under a profile: `{certificate, chain, serial,
    not_after}` (PEM; the chain is the issuing CA first, root last). Runs on the event
    loop: the service moves blocking work (a remote CA key, the inventory commit) off it."""
    service, principal, ctx = resolve_caller(request)
    body = parse_model(IssueRequest, await json_object(request))
    ca = request.path_params["ca"]
    issued = await service.pki.issue(principal, ctx, ca, body.to_input())
    return json_response(_issued_body(issued))


async def renew(
    body: RenewRequest, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> Response:
    """Renew the certificate the client authenticates with (mTLS): same CA, profile and
    names, the CSR's key (a new one, or the same). Same reply as issue."""
    issued = await service.pki.renew(principal, ctx, *body.to_input())
    return json_response(_issued_body(issued))


def _issued_body(issued: Issued) -> dict[str, str]:
    pem = serialization.Encoding.PEM
    return {
        "certificate": issued.certificate.public_bytes(pem).decode(),
        "chain": "".join(c.public_bytes(pem).decode() for c in issued.chain),
        "serial": issued.serial,
        "not_after": utc_timestamp(issued.not_after),
    }


def profiles(service: ServiceDep, principal: PrincipalDep, ctx: CtxDep) -> Response:
    """The certificate profiles: EKUs, SAN rules, TTLs, key types."""
    return json_response({"profiles": service.pki.describe_profiles(principal, ctx)})


def list_certs(
    service: ServiceDep,
    principal: PrincipalDep,
    ctx: CtxDep,
    ca: str | None = None,
    profile: str | None = None,
    san: Annotated[str | None, Query(max_length=256)] = None,
    status: Literal["valid", "revoked", "expired"] | None = None,
    expires_before: Timestamp | None = None,
    owner: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """The inventory, by serial; `next` is the `after` of the next page."""
    query = CertQuery(
        ca=ca,
        profile=profile,
        san=san,
        status=status,
        expires_before=expires_before,
        owner=owner,
        limit=limit,
        after=_serial(after) if after is not None else None,
    )
    records = service.pki.certificates(principal, ctx, query)
    page: dict[str, Any] = {"certs": [r.to_dict() for r in records]}
    if len(records) == limit:
        page["next"] = records[-1].serial
    return json_response(page)


def get_cert(serial: str, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep) -> Response:
    """One inventory record, with the certificate (PEM)."""
    record = service.pki.certificate(principal, ctx, _serial(serial))
    return json_response({**record.to_dict(), "certificate": record.pem})


def revoke(
    serial: str, body: RevokeRequest, service: ServiceDep, principal: PrincipalDep, ctx: CtxDep
) -> Response:
    """Revoke a certificate with an RFC 5280 reason name."""
    parse_reason(body.reason, LEAF_REVOCATION_REASONS)  # a clear 400 listing the valid names
    return json_response(service.pki.revoke(principal, ctx, _serial(serial), body.reason).to_dict())


def _serial(text: str) -> str:
    """The inventory's form of a serial given in hex (any case, leading zeros, colons).
    Raises InvalidRequest."""
    return serial_hex(parse_serial(text))
