"""Use cases: certificate authorities (create with a CSR for the offline root, import the
signed certificate) and certificates (issue from a CSR, revoke, read the inventory).

A CA's key is a kmsgate key of purpose `ca` on any backend; it signs through `RemoteKey`,
so the same code serves softkms, an HSM, Vault Transit and AWS KMS. The gateway never holds
the root key: it only verifies that an imported chain ends in a self-signed root
(`kmsgate.pki.ca_chain`). A `hashivault-pki` CA signs through Vault (`vault_pki.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
)

from kmsgate.algorithms import KeyUsage, parse_key_type
from kmsgate.auth import SYSTEM, Principal
from kmsgate.backends.base import PkiEngine
from kmsgate.catalogue import Key, KeyVersion
from kmsgate.errors import (
    ConfigError,
    Conflict,
    InvalidRequest,
    NotFound,
    Unauthenticated,
)
from kmsgate.pki.authorities import CA_PURPOSE, Authorities, Authority, CaState, CaType
from kmsgate.pki.bundle import spiffe_bundle
from kmsgate.pki.ca_chain import check_ca_certificate
from kmsgate.pki.constraints import refuse_outside_constraints
from kmsgate.pki.csr import new_key_and_csr
from kmsgate.pki.extensions import authority_key_identifier
from kmsgate.pki.inventory import (
    CertificateRecord,
    PresentedCertificates,
    record_from_row,
    record_of,
    record_row,
    requested_sans,
)
from kmsgate.pki.issuer import (
    BACKDATE,
    build_certificate,
    distribution_extensions,
    new_serial,
    parse_serial,
    signature_hash,
    validity,
)
from kmsgate.pki.profiles import MAX_SANS, Approved, Profile
from kmsgate.pki.remote_key import RemotePrivateKey, remote_private_key
from kmsgate.pki.revocation import RESPONDER_PROFILE, responders_of_key
from kmsgate.pki.root import parse_subject
from kmsgate.policy import Decision
from kmsgate.service.gate import Call, Ctx, Gate, Outcome, now
from kmsgate.service.keys import Keys
from kmsgate.service.requests import IssueInput, NewCa, NewKey
from kmsgate.service.results import Issued
from kmsgate.service.vault_pki import pki_engine, vault_ca, vault_sign
from kmsgate.store import Row, Store
from kmsgate.store.certificates import REVOKED, VALID, CertQuery
from kmsgate.text import CA_NAME, utc_timestamp

_GATEWAY_TLS = Decision(allow=True, reasons=("the gateway's own HTTPS certificate (tls.ca)",))


class Pki:
    """Certificate authorities and the certificates they issue."""

    def __init__(
        self,
        gate: Gate,
        keys: Keys,
        authorities: Authorities,
        store: Store,
        profiles: Mapping[str, Profile],
        public_url: str | None,
        presented: PresentedCertificates,
    ) -> None:
        self.gate = gate
        self.presented = presented
        """The inventory's word on client certificates (mTLS), told of revocations here."""
        self.keys = keys
        self.authorities = authorities
        self.store = store
        self.profiles = profiles
        self.public_url = public_url
        self._signers: dict[str, tuple[KeyVersion, RemotePrivateKey]] = {}
        """CA key name -> (the version it signs with, its signer); a new version, or a new
        key of that name, is a new object and replaces the entry."""

    # -- CAs -------------------------------------------------------------------------------

    def create_ca(
        self, principal: Principal, ctx: Ctx, new: NewCa, *, decision: Decision | None = None
    ) -> Authority:
        """A pending CA: its key (purpose `ca`) on `new.backend`, and a CSR for the offline
        root to sign. `decision`: one taken already (the dev CA, made by the gateway itself
        as SYSTEM); the policy is then not asked. Raises PolicyDenied, Conflict (name taken),
        InvalidRequest (subject, key type, backend), NotSupported, BackendError."""
        resource = {"kind": "ca", "name": new.name, "backend": new.backend, "type": new.key_type}

        def create(outcome: Outcome) -> Authority:
            if self.authorities.find(new.name) is not None:
                raise Conflict(f"a CA named {new.name!r} exists")
            if new.type == CaType.HASHIVAULT_PKI:
                return self.authorities.insert(vault_ca(self.gate.registry, new))
            subject = parse_subject(new.subject)
            if parse_key_type(new.key_type).usage is not KeyUsage.SIGN:  # before a key is made
                raise InvalidRequest(f"{new.key_type} keys cannot be CA keys")
            key = self.keys.generate(
                NewKey(
                    name=f"ca.{new.name}",
                    purpose=CA_PURPOSE,
                    type=new.key_type,
                    backend=new.backend,
                    labels={"ca": new.name},
                )
            )
            outcome.detail["key"] = key.name  # a failure from here on leaves it: named
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(subject)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .sign(self.signing_key(key), signature_hash(_public_key(key)))
            )
            at = now()
            ca = Authority(
                name=new.name,
                type=CaType.KMSGATE,
                state=CaState.PENDING,
                subject=subject.rfc4514_string(),
                key_name=key.name,
                csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode(),
                certificate=None,
                chain=(),
                crl_number=0,
                created_at=at,
                updated_at=at,
            )
            return self.authorities.insert(ca)

        request = {"type": new.key_type, "ca_type": new.type}
        call = Call(principal, ctx, "ca.create", resource, request)
        return self.gate.run(call, create, decision=decision)

    def import_certificate(
        self,
        principal: Principal,
        ctx: Ctx,
        name: str,
        certificate: x509.Certificate,
        chain: Sequence[x509.Certificate],
        *,
        decision: Decision | None = None,
    ) -> Authority:
        """Activate a pending CA with the certificate the offline root signed and the chain up
        to that root (`decision` as for `create_ca`). Raises NotFound, Conflict (already
        active), InvalidRequest (not a CA certificate, another key, a chain that does not
        verify or does not end in a root)."""
        ca = self._named(name)
        resource = ca.policy_resource() if ca else {"kind": "ca", "name": name}

        def activate(outcome: Outcome) -> Authority:
            if ca is None:
                raise NotFound(f"no CA named {name!r}")
            if ca.state is not CaState.PENDING:
                raise Conflict(f"CA {name!r} is {ca.state.value}")
            key = self.gate.catalogue.get(ca.key_name or "")
            check_ca_certificate(certificate, chain, _public_key(key), now())
            outcome.detail["not_after"] = utc_timestamp(certificate.not_valid_after_utc)
            return self.authorities.activate(ca, certificate, chain, now())

        call = Call(principal, ctx, "ca.import", resource)
        return self.gate.run(call, activate, decision=decision)

    def list_cas(self, principal: Principal, ctx: Ctx) -> Sequence[Authority]:
        call = Call(principal, ctx, "ca.read", {"kind": "ca"})
        return self.gate.run(call, lambda _: self.authorities.all())

    def describe_profiles(self, principal: Principal, ctx: Ctx) -> list[dict[str, object]]:
        """The profiles' rules (EKUs, SAN rules, TTLs, key types). Raises PolicyDenied."""
        call = Call(principal, ctx, "ca.read", {"kind": "profiles"})
        return self.gate.run(call, lambda _: [p.describe() for p in self.profiles.values()])

    async def chain_pem(self, name: str) -> str:
        """The CA's certificate and its issuers in PEM (public). Raises NotFound, Conflict."""
        return (await self._public_authority(name)).full_chain_pem()

    async def certificate_der(self, name: str) -> bytes:
        """The CA's own certificate in DER (public). Raises NotFound, Conflict."""
        certificate = (await self._public_authority(name)).active_certificate()
        return certificate.public_bytes(serialization.Encoding.DER)

    async def spiffe_bundle(self, name: str) -> dict[str, object]:
        """The CA's certificate and its issuers as a SPIFFE trust bundle (public); its
        sequence is the CA's last change, in seconds. Raises NotFound, Conflict."""
        ca = await self._public_authority(name)
        certificates = (ca.active_certificate(), *ca.chain)
        return spiffe_bundle(certificates, int(ca.updated_at.timestamp()))

    async def _public_authority(self, name: str) -> Authority:
        """The CA `name` from memory, on the caller's event loop; one this process does not
        hold is read from the store in a thread. Raises NotFound, Unavailable."""
        ca = self.authorities.find(name, read_through=False)
        return ca if ca is not None else await asyncio.to_thread(self.authorities.get, name)

    # -- certificates ----------------------------------------------------------------------

    async def issue(
        self,
        principal: Principal,
        ctx: Ctx,
        ca_name: str,
        request: IssueInput,
        *,
        decision: Decision | None = None,
    ) -> Issued:
        """A certificate for the CSR's key under `request.profile`, signed by the CA, and
        its inventory record committed (by the inventory's writer, with the records of
        concurrent issuance in one transaction).

        The profile alone decides the extensions; the policy decides who may have which
        names (`cert.issue` with `request {profile, sans, ttl, ca}`). Signing runs on the
        caller's event loop when the CA key is in process, in a thread when its backend
        may block (HSM, KMS, Vault). Raises PolicyDenied, NotFound (CA or profile),
        Conflict (CA pending), InvalidRequest (the profile's reason), and what the CA key's
        backend raises.
        """
        csr_sans = requested_sans(request.csr)
        facts = {
            "ca": ca_name,
            "profile": request.profile,
            "sans": list(csr_sans),
            "ttl": int(request.ttl.total_seconds()) if request.ttl else None,
        }
        return await self._issue(principal, ctx, "cert.issue", ca_name, request, facts, decision)

    async def renew(
        self,
        principal: Principal,
        ctx: Ctx,
        csr: x509.CertificateSigningRequest,
        ttl: timedelta | None = None,
    ) -> Issued:
        """A new certificate for the caller's own, authenticated by it over mTLS: same CA,
        profile and names; the CSR's key may be new (re-key). The policy decides
        (`cert.renew` with `request {serial, ca, profile, sans}`). Raises Unauthenticated
        (not an mTLS caller), InvalidRequest (a certificate kmsgate did not issue, a CSR
        with other names), and what `issue` raises."""
        if principal.kind != "mtls":
            raise Unauthenticated("a renewal is authenticated by the current certificate (mTLS)")
        serial = str(principal.claims.get("serial", ""))
        current = await asyncio.to_thread(self.store.certs.get, serial)  # off the event loop
        if current is None or current["fingerprint"] != principal.claims.get("fingerprint"):
            raise InvalidRequest("the client certificate was not issued by this gateway")
        asked = requested_sans(csr)
        if sorted(asked) != sorted(current["sans"]):
            raise InvalidRequest(
                f"a renewal keeps the certificate's names {sorted(current['sans'])}; the CSR "
                f"asks for {sorted(asked)}"
            )
        lifetime = self._lifetime(current)
        ttl = lifetime if ttl is None else min(ttl, lifetime)
        facts = {
            "serial": serial,
            "ca": current["ca"],
            "profile": current["profile"],
            "sans": list(asked),
            "ttl": int(ttl.total_seconds()),
        }
        request = IssueInput(csr=csr, profile=current["profile"], ttl=ttl)
        lineage = {"renews": serial}  # the trail leads from a stolen certificate to its heirs
        return await self._issue(
            principal, ctx, "cert.renew", current["ca"], request, facts, detail=lineage
        )

    def _lifetime(self, record: Row) -> timedelta:
        """How long the inventory's certificate `record` was issued for: what its renewal
        gets at most (a certificate issued for ten minutes does not renew into a day). A
        kmsgate CA backdates what it issues by `BACKDATE`; Vault's own backdating is left
        in, so its renewals may gain that much, within the profile's limit."""
        span: timedelta = record["not_after"] - record["not_before"]
        ca = self.authorities.find_current(record["ca"])
        backdated = ca is None or ca.type is not CaType.HASHIVAULT_PKI
        return max(span - BACKDATE if backdated else span, timedelta(seconds=1))

    async def _issue(
        self,
        principal: Principal,
        ctx: Ctx,
        action: str,
        ca_name: str,
        request: IssueInput,
        facts: Mapping[str, object],
        decision: Decision | None = None,
        detail: Mapping[str, object] | None = None,
    ) -> Issued:
        """Decide on `action` (`facts` are the policy's `request`), then issue and store.
        Every audit record of the call, a denial's too, names the profile, names and ttl
        asked for (and `detail`): the trail shows what was tried, not only what was
        issued."""
        ca = self._named(ca_name)
        resource = ca.policy_resource() if ca else {"kind": "ca", "name": ca_name}
        call = Call(
            principal, ctx, action, resource, facts, detail={**_asked(facts), **(detail or {})}
        )
        with self.gate.running(call, decision=decision) as outcome:
            if ca is None:
                raise NotFound(f"no CA named {ca_name!r}")
            work = asyncio.ensure_future(self._issue_and_store(ca, request, principal, outcome))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                # the request is cancelled (a server shutting down), not the work: a CA
                # may have signed and the record may be committing. Let that finish, so
                # that the audit record names what exists (serial, stored), then give up.
                with contextlib.suppress(Exception):
                    await work
                raise

    def _named(self, name: str) -> Authority | None:
        """The CA `name` (`find_current`), or None. Raises NotFound, before any decision or
        record, for a name no CA can have (it is not echoed)."""
        if not CA_NAME.fullmatch(name):
            raise NotFound("no CA has such a name: 1-63 letters, digits, '_' or '-'")
        return self.authorities.find_current(name)

    def trusted_certificates(self, names: Sequence[str]) -> list[x509.Certificate]:
        """The trust anchors `tls.client_cas` names: an active kmsgate CA (its own
        certificate, never its chain: the root above it signs other CAs, whose certificates
        must not pass for this one's) or the certificates of a PEM bundle file. Each is an
        anchor by itself (a chain stops at it: OpenSSL's partial-chain verification).
        Raises ConfigError for a name that is neither, or a file that holds no
        certificate."""
        certificates: list[x509.Certificate] = []
        for name in names:
            ca = self.authorities.find_current(name)
            if ca is not None and ca.certificate is not None:
                certificates.append(ca.certificate)
                continue
            try:
                certificates += x509.load_pem_x509_certificates(Path(name).read_bytes())
            except (OSError, ValueError):
                raise ConfigError(
                    f"tls.client_cas: {name!r} is neither an active CA nor a PEM bundle file"
                ) from None
        return certificates

    async def gateway_certificate(
        self, ctx: Ctx, ca_name: str, profile: str, sans: Sequence[str], ttl: timedelta | None
    ) -> tuple[ec.EllipticCurvePrivateKey, Issued]:
        """A fresh P-256 key and its certificate from CA `ca_name` for the gateway's own
        HTTPS (`tls.ca`), issued by the gateway itself (principal `system`, audited like any
        issuance; the profile still decides). Raises InvalidRequest (a malformed SAN, or one
        the profile refuses) and what `issue` raises."""
        try:
            key, csr = new_key_and_csr(list(sans))
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        request = IssueInput(csr=csr, profile=profile, ttl=ttl)
        issued = await self.issue(SYSTEM, ctx, ca_name, request, decision=_GATEWAY_TLS)
        return key, issued

    async def _issue_and_store(
        self, ca: Authority, request: IssueInput, principal: Principal, outcome: Outcome
    ) -> Issued:
        """Sign (in a thread when the CA's backend may block), then wait until the
        inventory writer has committed the record (`outcome` names it from the start)."""
        certify = functools.partial(self._certify, ca, request, principal)
        if self._may_block(ca):
            issued, record = await asyncio.to_thread(certify)
        else:
            issued, record = certify()
        outcome.detail.update(serial=record.serial, profile=record.profile, sans=list(record.sans))
        await asyncio.wrap_future(self.store.certs.submit(record_row(record)))
        outcome.detail["stored"] = True
        return issued

    def _certify(
        self, ca: Authority, request: IssueInput, principal: Principal
    ) -> tuple[Issued, CertificateRecord]:
        """The CA's certificate for `request` and its inventory record (not yet stored).
        Raises NotFound (profile), Conflict (CA pending), InvalidRequest (what the profile
        refuses, a name outside the name constraints of the CA's certificates)."""
        profile = self.profiles.get(request.profile)
        if profile is None:
            raise NotFound(f"no certificate profile named {request.profile!r}")
        issuer = ca.active_certificate()
        approved = profile.check(request.csr, request.ttl)
        refuse_outside_constraints(approved.subject, approved.sans, (issuer, *ca.chain))
        if ca.type is CaType.HASHIVAULT_PKI:
            cert, chain = vault_sign(self.gate.registry, ca, profile, request.csr, approved)
        else:
            cert, chain = self._sign(ca, issuer, profile, approved), (issuer, *ca.chain)
        record = record_of(
            cert,
            ca=ca.name,
            profile=profile.name,
            key_type=approved.key_type.value,
            owner=principal.id,
        )
        return Issued(cert, chain, record.serial, cert.not_valid_after_utc), record

    def _may_block(self, ca: Authority) -> bool:
        """Whether issuing with `ca` may block: its key is on a remote or HSM backend, or
        Vault issues."""
        return ca.type is CaType.HASHIVAULT_PKI or self.gate.target(ca.key_name or "").blocking

    def revoke(self, principal: Principal, ctx: Ctx, serial: str, reason: str) -> CertificateRecord:
        """Revoke a certificate (RFC 5280 `reason` name, already checked). Raises
        PolicyDenied, NotFound, Conflict (revoked already)."""
        record, resource = self._inventory_record(serial)

        def revoke(outcome: Outcome) -> CertificateRecord:
            if record is None:
                raise NotFound(f"no certificate with serial {serial}")
            if reason == "removeFromCRL":
                raise InvalidRequest("removeFromCRL ends a hold in a delta CRL: not a reason")
            if record.status == REVOKED:
                raise Conflict(f"certificate {serial} is revoked already")
            ca = self.authorities.get(record.ca)
            if ca.type is CaType.HASHIVAULT_PKI:  # Vault first: if it refuses, nothing changed
                self.engine(ca).revoke(parse_serial(serial))
            at = now()
            if not self.store.certs.revoke(serial, at, reason):
                raise Conflict(f"certificate {serial} is revoked already")
            outcome.detail.update(serial=serial, reason=reason)
            if record.profile == RESPONDER_PROFILE:  # its key signs no more, in any of them
                key = x509.load_pem_x509_certificate(record.pem.encode()).public_key()
                of_key = responders_of_key(self.store, record.ca, key, VALID)
                also = [s for s in of_key if s != serial]
                also = [s for s in also if self.store.certs.revoke(s, at, reason)]
                if also:
                    outcome.detail["also"] = also
            self.presented.refresh()  # refused by this process at once, by the others within ~1 s
            row = self.store.certs.get(serial)
            assert row is not None  # revoked just now, never deleted
            return record_from_row(row)

        call = Call(principal, ctx, "cert.revoke", resource, {"reason": reason})
        return self.gate.run(call, revoke)

    def certificate(self, principal: Principal, ctx: Ctx, serial: str) -> CertificateRecord:
        """One inventory record. Raises PolicyDenied, NotFound."""
        record, resource = self._inventory_record(serial)

        def read(_: Outcome) -> CertificateRecord:
            if record is None:
                raise NotFound(f"no certificate with serial {serial}")
            return record

        return self.gate.run(Call(principal, ctx, "cert.read", resource), read)

    def certificates(
        self, principal: Principal, ctx: Ctx, query: CertQuery
    ) -> list[CertificateRecord]:
        """Inventory records matching `query` (one page). Raises PolicyDenied. The policy
        sees the filters as the resource (`owner`, `ca`, `profile`; null when not given), so
        a rule that lets a principal read its own certificates lets it list them with
        `owner` set to itself."""
        resource = {
            "kind": "cert",
            "name": None,
            "ca": query.ca,
            "profile": query.profile,
            "owner": query.owner,
        }
        call = Call(principal, ctx, "cert.read", resource, {"ca": query.ca})

        def search(outcome: Outcome) -> list[CertificateRecord]:
            records = [record_from_row(row) for row in self.store.certs.search(query)]
            outcome.detail["count"] = len(records)
            return records

        return self.gate.run(call, search)

    # -- helpers ---------------------------------------------------------------------------

    def _inventory_record(
        self, serial: str
    ) -> tuple[CertificateRecord | None, Mapping[str, object]]:
        """The certificate `serial` (None if there is none) and what the policy sees of it:
        its attributes, or only its serial. Raises Unavailable."""
        found = self.store.certs.get(serial)
        record = record_from_row(found) if found else None
        return record, record.policy_resource() if record else {"kind": "cert", "name": serial}

    def _sign(
        self, ca: Authority, issuer: x509.Certificate, profile: Profile, approved: Approved
    ) -> x509.Certificate:
        """A certificate signed by the CA's own (backend-held) key, its random serial
        reserved by the inventory insert that follows (a clash, astronomically rare, makes
        that insert raise Conflict)."""
        key = self.gate.catalogue.get(ca.key_name or "")
        not_before, not_after = validity(issuer, approved.ttl, now())
        return build_certificate(
            issuer=issuer,
            key=self.signing_key(key),
            subject=approved.subject,
            public_key=approved.public_key,
            serial=new_serial(),
            not_before=not_before,
            not_after=not_after,
            extensions=[
                *profile.extensions(approved, authority_key_identifier(issuer)),
                *((ext, False) for ext in distribution_extensions(self.public_url, ca.name)),
            ],
        )

    def engine(self, ca: Authority) -> PkiEngine:
        """The Vault PKI engine of a `hashivault-pki` CA. Raises NotSupported if its backend
        fronts no PKI engine, InvalidRequest for an unusable mount or role."""
        return pki_engine(self.gate.registry, ca)

    def signing_key(self, key: Key) -> RemotePrivateKey:
        """The CA key as a cryptography private key whose signatures its backend makes."""
        key.require_enabled()
        version = key.usable_version(None, for_signing=True)
        cached = self._signers.get(key.name)
        if cached is not None and cached[0] is version:
            return cached[1]
        backend = self.gate.registry.holding(key.backend)
        count_use = functools.partial(self.gate.usage.record, key.name, version.version)
        signer = remote_private_key(
            backend, key.backend_key(version), _public_key(key), on_sign=count_use
        )
        self._signers[key.name] = (version, signer)
        return signer


def _public_key(key: Key) -> CertificatePublicKeyTypes:
    """The public key of the key's primary version. Raises InvalidRequest for a key that
    cannot sign certificates."""
    public = key.versions[key.primary_version].public_key()
    if not isinstance(
        public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    ):
        raise InvalidRequest(f"{key.type} keys cannot be CA keys")
    return public


def _asked(facts: Mapping[str, object]) -> dict[str, object]:
    """What an issuance's audit records keep of the policy's `request`: the profile, ttl
    and names asked for, at most `MAX_SANS` of them (more are refused; the count says how
    many came), not the CA (the record's resource) nor a renewal's old serial (`renews`)."""
    sans = facts.get("sans")
    asked = {name: facts[name] for name in ("profile", "ttl") if name in facts}
    if isinstance(sans, list):
        asked["sans"] = sans[:MAX_SANS]
        if len(sans) > MAX_SANS:
            asked["sans_asked"] = len(sans)
    return asked
