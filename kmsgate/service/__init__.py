"""The use-case layer: the REST API, the CLI's local commands and the jobs call only this.

`Service` groups the use cases by domain; `gate.py` holds the request path they all take.
Nothing here imports pydantic or speaks JSON or base64.
"""

from __future__ import annotations

from kmsgate.audit import AuditSink
from kmsgate.auth import Authenticator, Authenticators, TokenRegistry
from kmsgate.auth.forwarded import ForwardedMtlsAuthenticator
from kmsgate.auth.mtls import MtlsAuthenticator
from kmsgate.auth.oidc import OidcAuthenticator
from kmsgate.backends.base import Registry
from kmsgate.catalogue import Catalogue
from kmsgate.config import Settings
from kmsgate.grants import ActiveGrants
from kmsgate.pki.authorities import Authorities
from kmsgate.pki.inventory import PresentedCertificates
from kmsgate.pki.profiles import load_profiles
from kmsgate.policy import PolicyEngine
from kmsgate.policy.follower import PolicyFollower
from kmsgate.service.crypto import Crypto
from kmsgate.service.envelope import Envelopes
from kmsgate.service.gate import STATE_CHANGING, Call, Ctx, Gate, KeyTarget
from kmsgate.service.grants import Exceptions
from kmsgate.service.keys import Keys
from kmsgate.service.pki import Pki
from kmsgate.service.revocation import Revocation
from kmsgate.service.system import System
from kmsgate.store import Store
from kmsgate.usage import KeyUsage

__all__ = ["STATE_CHANGING", "Call", "Ctx", "Gate", "KeyTarget", "Service"]


class Service:
    """Every kmsgate operation, by domain. Thread-safe; holds only caches.

    ================================================  =================================
    operation                                         module (`kmsgate/service/`)
    ================================================  =================================
    authenticate, decide, audit (every request)       `gate.py`   (`service.gate`)
    sign, verify, mac, mac_verify                     `crypto.py` (`service.crypto`)
    encrypt, decrypt, datakey, rewrap                 `envelope.py` (`service.envelopes`)
    create, search, get, public_key_pem, jwks, rotate,  `keys.py`   (`service.keys`)
    disable, enable, update, mark_compromised,
    schedule_deletion, cancel_deletion, destroy_due
    tokens, policy read/evaluate/reload, audit        `system.py` (`service.system`)
    read, metrics authorisation
    create_ca, import_certificate, list_cas, issue,   `pki.py`    (`service.pki`)
    revoke, certificate(s), describe_profiles         (a hashivault-pki CA: `vault_pki.py`)
    crl, ocsp (public), publish_due, build            `revocation.py` (`service.revocation`)
    JIT exceptions: request, approve, revoke, get,    `grants.py` (`service.exceptions`)
    search, expire_due
    ================================================  =================================

    Shared by the use cases: `batch.py` (one item or a batch through one decision and one
    audit record), `checkpoints.py` (the audit log's signed checkpoints, signed with a key
    of the catalogue). Use cases take and return the frozen dataclasses of `requests.py`
    and `results.py` (bytes, not base64); the API turns them into JSON.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        catalogue: Catalogue,
        registry: Registry,
        policy: PolicyEngine,
        audit: AuditSink,
        tokens: TokenRegistry,
    ) -> None:
        self.store = store
        self.tokens = tokens
        # the inventory's word on presented client certificates (mTLS)
        self.client_certificates = PresentedCertificates(store)
        grants = ActiveGrants(store)  # JIT exceptions in force, for every decision
        self.gate = Gate(
            settings=settings,
            catalogue=catalogue,
            registry=registry,
            policy=policy,
            audit=audit,
            authenticators=Authenticators(self._authenticators(settings, tokens)),
            grants=grants,
            usage=KeyUsage(store),
        )
        self.exceptions = Exceptions(self.gate, store, grants, settings.exceptions)
        self.crypto = Crypto(self.gate)
        self.envelopes = Envelopes(self.gate)
        self.keys = Keys(self.gate)
        self.system = System(self.gate, tokens, PolicyFollower(store, policy), store)
        self.pki = Pki(
            self.gate,
            self.keys,
            Authorities(store),
            store,
            load_profiles(settings),
            settings.pki.public_url,
            self.client_certificates,
        )
        self.revocation = Revocation(self.gate, self.pki, store)  # CRLs and OCSP

    def _authenticators(self, settings: Settings, tokens: TokenRegistry) -> list[Authenticator]:
        """API tokens, OIDC, then client certificates: forwarded by a trusted proxy
        (`tls.trusted_proxies`), or the connection's own."""
        mtls = MtlsAuthenticator(self.client_certificates.find)
        chain: list[Authenticator] = [tokens, OidcAuthenticator(settings.auth.oidc)]
        if settings.tls is not None and settings.tls.trusted_proxies:
            client_cas = settings.tls.client_cas
            chain.append(
                ForwardedMtlsAuthenticator(
                    settings.tls.trusted_proxies,
                    lambda: self.pki.trusted_certificates(client_cas),
                    mtls,
                )
            )
        return [*chain, mtls]

    # the parts every use case shares, held once, by the gate

    @property
    def settings(self) -> Settings:
        return self.gate.settings

    @property
    def catalogue(self) -> Catalogue:
        return self.gate.catalogue

    @property
    def registry(self) -> Registry:
        return self.gate.registry

    @property
    def policy(self) -> PolicyEngine:
        return self.gate.policy

    @property
    def audit(self) -> AuditSink:
        return self.gate.audit

    def close(self) -> None:
        self.audit.close()
        self.registry.close()
        self.store.close()
