"""A Vault/OpenBao PKI secrets engine as a certificate authority: sign a CSR through a role,
revoke, and fetch the CA chain, the CRL and OCSP answers (Vault's own endpoints)."""

from __future__ import annotations

import re

import requests
from cryptography import x509

from kmsgate.backends.hashivault.client import _VaultClient
from kmsgate.errors import BackendError, BackendUnavailable, InvalidRequest, NotFound

_PATH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class VaultPki:
    """One PKI mount and role of one hashivault backend. Calls block (HTTP)."""

    def __init__(self, vault: _VaultClient, mount: str, role: str) -> None:
        """Raises InvalidRequest for a mount or role that cannot be a path segment."""
        for what, value in (("mount", mount), ("role", role)):
            if not _PATH.match(value):
                raise InvalidRequest(f"Vault PKI {what} {value!r} is not a plain path segment")
        self._vault = vault
        self.mount = mount
        self.role = role

    def sign(
        self,
        csr_pem: str,
        *,
        common_name: str,
        dns: list[str],
        ips: list[str],
        uris: list[str],
        ttl_seconds: int,
    ) -> list[x509.Certificate]:
        """Vault's certificate for the CSR (`sign/<role>`), followed by its issuing chain.
        kmsgate's profile has approved the names already; Vault's role may refuse them too.
        Raises InvalidRequest (Vault refused), BackendError, BackendUnavailable."""
        body: dict[str, object] = {
            "csr": csr_pem,
            "common_name": common_name,
            "alt_names": ",".join(dns),
            "ip_sans": ",".join(ips),
            "uri_sans": ",".join(uris),
            "ttl": f"{ttl_seconds}s",
            "format": "pem",
            "exclude_cn_from_sans": True,
        }
        reply = self._vault.call(
            "POST",
            f"{self.mount}/sign/{self.role}",
            "sign a certificate",
            body,
            on_invalid=lambda why: InvalidRequest(f"Vault PKI refused the request: {why}"),
        )
        data = reply.get("data") or {}
        pems = [data.get("certificate", ""), *(data.get("ca_chain") or [data.get("issuing_ca")])]
        try:
            return [x509.load_pem_x509_certificate(p.encode()) for p in pems if p]
        except ValueError:
            raise BackendError("Vault PKI sent a certificate that does not parse") from None

    def role_settings(self) -> dict[str, object]:
        """The role's settings (`key_usage`, `server_flag`, ...). Raises InvalidRequest if
        the mount has no such role (or is no PKI engine), BackendError & co."""
        missing = InvalidRequest(
            f"Vault has no PKI role {self.role!r} at mount {self.mount!r} (create the role, "
            "or check that the mount is a PKI secrets engine)"
        )
        reply = self._vault.call(
            "GET", f"{self.mount}/roles/{self.role}", "read a PKI role", not_found=lambda: missing
        )
        data = reply.get("data")
        if not isinstance(data, dict):
            raise missing
        return data

    def revoke(self, serial: int) -> None:
        """Revoke in Vault (its CRL and OCSP then say so). Raises BackendError & co."""
        colons = ":".join(f"{b:02x}" for b in serial.to_bytes((serial.bit_length() + 7) // 8))
        self._vault.call(
            "POST", f"{self.mount}/revoke", "revoke a certificate", {"serial_number": colons}
        )

    def chain(self) -> list[x509.Certificate]:
        """The mount's issuing CA and its chain, nearest first. Raises BackendError & co."""
        pem = self._raw("GET", "ca_chain").decode()
        if "BEGIN CERTIFICATE" not in pem:
            pem = self._raw("GET", "ca/pem").decode()
        try:
            return list(x509.load_pem_x509_certificates(pem.encode()))
        except ValueError:
            raise BackendError("Vault PKI sent a CA chain that does not parse") from None

    def crl(self, *, delta: bool = False) -> bytes:
        """Vault's current CRL (DER). Raises NotFound (no delta CRLs configured), BackendError."""
        return self._raw("GET", "crl/delta" if delta else "crl")

    def ocsp(self, request: bytes) -> bytes:
        """Vault's OCSP answer (DER) to a DER request. Raises BackendError & co."""
        return self._raw("POST", "ocsp", request, {"content-type": "application/ocsp-request"})

    def _raw(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> bytes:
        """An unauthenticated PKI endpoint's raw reply body (an OCSP response also with an
        HTTP error status). Raises BackendUnavailable, NotFound, BackendError."""
        session: requests.Session = self._vault.hvac.adapter.session
        url = f"{self._vault.settings.addr.rstrip('/')}/v1/{self.mount}/{path}"
        try:
            reply = session.request(
                method, url, data=body, headers=headers, timeout=self._vault.settings.timeout
            )
        except requests.RequestException:
            raise BackendUnavailable(f"backend {self._vault.name!r} is unreachable") from None
        if reply.headers.get("content-type", "").startswith("application/ocsp-response"):
            return reply.content  # an OCSP answer, whatever the HTTP status (unauthorized: 401)
        if reply.status_code == 404:
            raise NotFound(f"Vault PKI mount {self.mount!r} has no {path}")
        if reply.status_code >= 400:
            raise BackendError(f"Vault PKI {path} answered {reply.status_code}")
        return reply.content
