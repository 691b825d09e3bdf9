"""A `hashivault-pki` CA: Vault's PKI engine holds the key and signs; kmsgate makes the CA
from the engine's role and chain, and holds what Vault signs to the profile."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmsgate.backends.base import PkiEngine, PkiEngineCapable, Registry, require_capability
from kmsgate.durations import format_duration
from kmsgate.errors import BackendError, InvalidRequest
from kmsgate.pki.authorities import Authority, CaState, CaType
from kmsgate.pki.inventory import san_strings
from kmsgate.pki.profiles import Approved, Profile
from kmsgate.service.gate import now
from kmsgate.service.requests import NewCa


def pki_engine(registry: Registry, ca: Authority) -> PkiEngine:
    """The Vault PKI engine of a `hashivault-pki` CA. Raises NotSupported if its backend
    fronts no PKI engine, InvalidRequest for an unusable mount or role."""
    backend = registry.holding(ca.backend) if ca.backend else registry.get(None)
    engine = require_capability(backend, PkiEngineCapable, "front a PKI engine")  # type: ignore[type-abstract]
    return engine.pki(ca.options.get("mount", ""), ca.options.get("role", ""))


def vault_ca(registry: Registry, new: NewCa) -> Authority:
    """An active CA over the Vault PKI engine `new.mount` (its chain read from Vault).
    Raises InvalidRequest (no mount or role, not a hashivault backend), BackendError."""
    if not new.mount or not new.role:
        raise InvalidRequest("a hashivault-pki CA needs 'mount' and 'role'")
    backend = registry.get(new.backend)
    if not isinstance(backend, PkiEngineCapable):
        raise InvalidRequest(
            f"backend {backend.name!r} ({backend.scheme}) fronts no PKI engine: a "
            "hashivault-pki CA needs a hashivault backend"
        )
    at = now()
    pending = Authority(
        name=new.name,
        type=CaType.HASHIVAULT_PKI,
        state=CaState.ACTIVE,
        subject="",
        key_name=None,
        csr_pem=None,
        certificate=None,
        chain=(),
        crl_number=0,
        created_at=at,
        updated_at=at,
        backend=backend.name,
        options={"mount": new.mount, "role": new.role},
    )
    engine = pki_engine(registry, pending)
    settings = engine.role_settings()
    _refuse_role_settings(settings, new.role)
    ekus = ",".join(_role_ekus(settings))
    pending = replace(pending, options={**pending.options, "ekus": ekus})
    chain = engine.chain()
    if not chain:
        raise BackendError(f"Vault PKI mount {new.mount!r} has no CA certificate")
    return replace(
        pending,
        subject=chain[0].subject.rfc4514_string(),
        certificate=chain[0],
        chain=tuple(chain[1:]),
    )


def vault_sign(
    registry: Registry,
    ca: Authority,
    profile: Profile,
    csr: x509.CertificateSigningRequest,
    approved: Approved,
) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
    """Vault's certificate for the CSR with the names the profile approved. Raises
    InvalidRequest, before asking Vault, if the role (as it was when the CA was made)
    gives other extended key usages than the profile; BackendError (after revoking it in
    Vault) if the role gave the certificate other extensions than the profile would (it
    changed since); and what the engine raises."""
    remembered = ca.options.get("ekus")  # the role's, when the CA was made (or none)
    role_ekus = remembered.split(",") if remembered else []
    if remembered is not None and sorted(role_ekus) != sorted(profile.ekus):
        raise InvalidRequest(
            f"CA {ca.name!r} issues through Vault PKI role {ca.options.get('role')!r}, "
            f"whose certificates have extended key usages {sorted(role_ekus)}; profile "
            f"{profile.name!r} gives {sorted(profile.ekus)}: use a CA whose role matches it"
        )
    sans = san_strings(list(approved.sans))
    by_kind: dict[str, list[str]] = {"dns": [], "ip": [], "uri": []}
    for san in sans:
        kind, _, value = san.partition(":")
        by_kind.setdefault(kind, []).append(value)
    cns = approved.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    common_name = str(cns[0].value) if cns else (sans[0].partition(":")[2] if sans else "")
    pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    engine = pki_engine(registry, ca)
    asked_until = now() + approved.ttl
    certs = engine.sign(
        pem,
        common_name=common_name,
        dns=by_kind["dns"],
        ips=by_kind["ip"],
        uris=by_kind["uri"],
        ttl_seconds=int(approved.ttl.total_seconds()),
    )
    departures = profile.departures(certs[0])
    if departures:  # the role decided other extensions: the certificate must not live
        engine.revoke(certs[0].serial_number)
        raise BackendError(
            f"Vault PKI role {ca.options.get('role')!r} issued a certificate unlike profile "
            f"{profile.name!r} ({'; '.join(departures)}); it was revoked in Vault. Set "
            "the role's server_flag/client_flag to the profile's EKUs (a role per "
            "profile), key_usage [DigitalSignature] and basic_constraints_valid_for_non_ca"
        )
    _refuse_shortened(engine, ca, certs, asked_until)
    return certs[0], tuple(certs[1:])


_TTL_SLACK = timedelta(minutes=1)
"""How much earlier than asked Vault's certificate may end (clocks, the request's time)."""


def _refuse_shortened(
    engine: PkiEngine, ca: Authority, certs: list[x509.Certificate], asked_until: datetime
) -> None:
    """Raise InvalidRequest, after revoking it in Vault, if the certificate Vault issued
    ends more than a minute before `asked_until` and before its issuer does: the role's
    `max_ttl` (or the mount's) cut it short, where the profile allowed the ttl asked for."""
    ends = certs[0].not_valid_after_utc
    issuer_ends = certs[1].not_valid_after_utc if len(certs) > 1 else None
    if ends >= asked_until - _TTL_SLACK or (issuer_ends and ends >= issuer_ends - _TTL_SLACK):
        return
    engine.revoke(certs[0].serial_number)
    minutes = max(round((ends - now()).total_seconds() / 60), 0)
    raise InvalidRequest(
        f"Vault PKI role {ca.options.get('role')!r} cuts certificates short (this one was "
        f"valid for {format_duration(timedelta(minutes=minutes))} more and was revoked in "
        "Vault): ask for a shorter ttl, or raise the role's max_ttl"
    )


def _role_ekus(settings: Mapping[str, object]) -> list[str]:
    """The extended key usages (as profiles name them) a Vault PKI role's certificates get
    from its `server_flag` and `client_flag`."""
    flags = (("server_flag", "server_auth"), ("client_flag", "client_auth"))
    return [eku for flag, eku in flags if settings.get(flag) is True]


def _refuse_role_settings(settings: Mapping[str, object], role: str) -> None:
    """Raise InvalidRequest if the Vault PKI role's settings would give certificates other
    key usages or basic constraints than every kmsgate profile does."""
    wrong = []
    usages = settings.get("key_usage")
    if not isinstance(usages, list) or [str(u).lower() for u in usages] != ["digitalsignature"]:
        wrong.append("key_usage must be [DigitalSignature]")
    if settings.get("basic_constraints_valid_for_non_ca") is not True:
        wrong.append("basic_constraints_valid_for_non_ca must be true")
    if wrong:
        raise InvalidRequest(f"Vault PKI role {role!r}: {'; '.join(wrong)}")
