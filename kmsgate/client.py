"""The kmsgate SDK (httpx): used by the CLI, CI signers and workloads.

Every method raises `ApiError` (carrying the problem+json `status`, `code` and `detail`) when
the gateway answers with an error, and `ApiError` with code `unreachable` when it cannot be
reached.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, BinaryIO

from kmsgate import chunked
from kmsgate.chunked import Progress
from kmsgate.client_transport import DEFAULT_ADDR, ApiError, Transport
from kmsgate.encoding import b64encode
from kmsgate.envelope import FileHeader, file_context
from kmsgate.errors import DecryptionFailed
from kmsgate.text import quoted, utc_timestamp

__all__ = ["DEFAULT_ADDR", "ApiError", "Client"]


class Client(Transport):
    """A connection to one gateway. Use as a context manager or call `close()`."""

    def _listed(self, field: str, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        """The list in `field` of a request's reply. Raises ApiError (`bad_reply` for a
        reply without it)."""
        return self.reply_field(self._json(method, path, body, **kwargs), field, list)

    # -- keys ------------------------------------------------------------------------------

    def create_key(
        self,
        name: str,
        type: str | None,
        purpose: str,
        *,
        backend: str | None = None,
        labels: Mapping[str, str] | None = None,
        public_key: str | None = None,
        uri: str | None = None,
        rotation_period: str | None = None,
        public: bool | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "purpose": purpose, "labels": dict(labels or {})}
        optional = {
            "type": type,
            "backend": backend,
            "public_key": public_key,
            "uri": uri,
            "rotation_period": rotation_period,
            "public": public,
        }
        for field, value in optional.items():
            if value is not None:
                body[field] = value
        return self._json("POST", "/v1/keys", body)

    def list_keys(
        self, purpose: str | None = None, labels: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        params: list[tuple[str, str]] = [("label", f"{k}:{v}") for k, v in (labels or {}).items()]
        if purpose:
            params.append(("purpose", purpose))
        keys: list[dict[str, Any]] = self._listed("keys", "GET", "/v1/keys", params=params)
        return keys

    def get_key(self, name: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/keys/{_segment(name)}")

    def update_key(self, name: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """PATCH /v1/keys/{name}: `min_decrypt_version`, `rotation_period` (None: stop
        rotating), `labels` (replaced whole), `public`; the key after the change."""
        return self._json("PATCH", f"/v1/keys/{_segment(name)}", dict(changes))

    def key_action(self, name: str, action: str, body: Any = None) -> dict[str, Any]:
        """POST /v1/keys/{name}/{action}: rotate, disable, enable, schedule-deletion, ..."""
        return self._json("POST", f"/v1/keys/{_segment(name)}/{action}", body)

    def audit_checkpoints(self) -> list[dict[str, Any]]:
        """The store's last checkpoint of every audit chain (`GET /v1/audit/checkpoints`)."""
        checkpoints: list[dict[str, Any]] = self._listed(
            "checkpoints", "GET", "/v1/audit/checkpoints"
        )
        return checkpoints

    def public_key(self, name: str, version: int | None = None) -> str:
        params = {"version": version} if version is not None else None
        return self.request("GET", f"/v1/keys/{_segment(name)}/public-key", params=params).text

    def jwks(self, name: str) -> list[dict[str, Any]]:
        """The keys of `name`'s public JWKS (a public key's; needs no token)."""
        keys: list[dict[str, Any]] = self._listed(
            "keys", "GET", f"/v1/keys/{_segment(name)}/jwks.json"
        )
        return keys

    # -- operations ------------------------------------------------------------------------

    def sign(
        self,
        name: str,
        *,
        data: bytes | None = None,
        digest: bytes | None = None,
        algorithm: str | None = None,
        version: int | None = None,
    ) -> dict[str, Any]:
        """`{signature (bytes), key_version, algorithm, policy_digest}`; `policy_digest` names
        the policy that authorised the signature (None from gateways that do not say)."""
        body = _message_body(data, digest, algorithm, version)
        response = self.request("POST", f"/v1/keys/{_segment(name)}/sign", json=body)
        result = self.reply_object(response)
        result["signature"] = self.reply_bytes(result, "signature")
        result["policy_digest"] = response.headers.get("x-kmsgate-policy-digest")
        return result

    def sign_batch(self, name: str, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Items as REST items (base64 already applied); results or `{error}` in order."""
        results: list[dict[str, Any]] = self._listed(
            "batch", "POST", f"/v1/keys/{_segment(name)}/sign", {"batch": list(items)}
        )
        return results

    def verify(
        self,
        name: str,
        signature: bytes,
        *,
        data: bytes | None = None,
        digest: bytes | None = None,
        algorithm: str | None = None,
        version: int | None = None,
        signed_at: datetime | None = None,
        strict: bool = False,
    ) -> dict[str, Any]:
        """`{valid, key_version}`. `signed_at`: also valid only if the version was not
        compromised then; `strict`: only if it never was."""
        body = _message_body(data, digest, algorithm, version)
        body["signature"] = b64encode(signature)
        if signed_at is not None:
            body["signed_at"] = utc_timestamp(signed_at)
        if strict:
            body["strict"] = True
        return self._json("POST", f"/v1/keys/{_segment(name)}/verify", body)

    def mac(self, name: str, data: bytes, *, algorithm: str | None = None) -> dict[str, Any]:
        """`{mac (bytes), key_version}`."""
        body: dict[str, Any] = {"input": b64encode(data)}
        if algorithm:
            body["algorithm"] = algorithm
        result = self._json("POST", f"/v1/keys/{_segment(name)}/mac", body)
        result["mac"] = self.reply_bytes(result, "mac")
        return result

    def mac_verify(self, name: str, data: bytes, mac: bytes) -> dict[str, Any]:
        body = {"input": b64encode(data), "mac": b64encode(mac)}
        return self._json("POST", f"/v1/keys/{_segment(name)}/mac/verify", body)

    # -- envelope encryption ---------------------------------------------------------------

    def encrypt(
        self, name: str, plaintext: bytes, context: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """`{ciphertext (bytes), key_version}`: server-side encryption (small payloads)."""
        body = {"plaintext": b64encode(plaintext), **_context(context)}
        result = self._json("POST", f"/v1/keys/{_segment(name)}/encrypt", body)
        result["ciphertext"] = self.reply_bytes(result, "ciphertext")
        return result

    def decrypt(
        self, name: str, ciphertext: bytes, context: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """`{plaintext (bytes), key_version}` of a ciphertext from `encrypt` or `datakey`."""
        body = {"ciphertext": b64encode(ciphertext), **_context(context)}
        result = self._json("POST", f"/v1/keys/{_segment(name)}/decrypt", body)
        result["plaintext"] = self.reply_bytes(result, "plaintext")
        return result

    def datakey(
        self,
        name: str,
        context: Mapping[str, str] | None = None,
        *,
        bits: int = 256,
        include_plaintext: bool = True,
    ) -> dict[str, Any]:
        """`{plaintext (bytes, unless include_plaintext is false), ciphertext (bytes),
        key_version}`: a fresh data key and its wrapped form."""
        body = {"bits": bits, "include_plaintext": include_plaintext, **_context(context)}
        result = self._json("POST", f"/v1/keys/{_segment(name)}/datakey", body)
        result["ciphertext"] = self.reply_bytes(result, "ciphertext")
        if include_plaintext:
            result["plaintext"] = self.reply_bytes(result, "plaintext")
        return result

    def rewrap(
        self, name: str, ciphertext: bytes, context: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """`{ciphertext (bytes), key_version}`: the ciphertext's data key re-wrapped under the
        primary version of `name` (the ciphertext may come from another key)."""
        body = {"ciphertext": b64encode(ciphertext), **_context(context)}
        result = self._json("POST", f"/v1/keys/{_segment(name)}/rewrap", body)
        result["ciphertext"] = self.reply_bytes(result, "ciphertext")
        return result

    def batch(
        self, name: str, operation: str, items: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        """Any operation's batch form: REST items (base64 already applied) in, results or
        `{error: {code, detail}}` out, in order."""
        results: list[dict[str, Any]] = self._listed(
            "batch", "POST", f"/v1/keys/{_segment(name)}/{operation}", {"batch": list(items)}
        )
        return results

    # -- streaming file encryption (client-side; format in kmsgate/envelope.py) ------------

    def encrypt_stream(
        self,
        name: str,
        src: BinaryIO,
        dst: BinaryIO,
        context: Mapping[str, str] | None = None,
        *,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Encrypt `src` to `dst` (kmsgate header + C2SP chunked body) under a fresh data key
        of `name`, in constant memory. `{key_version, bytes}`. Raises InvalidRequest (a
        context too large for the file header), ApiError, OSError."""
        file_context(context)  # a context too large for the header fails before anything
        dk = self.datakey(name, context)
        header = FileHeader(dict(context or {}), dk["ciphertext"])
        dst.write(header.to_bytes())
        size = chunked.encrypt_stream(dk["plaintext"], header.bound, src, dst, progress=progress)
        return {"key_version": self.reply_field(dk, "key_version", int), "bytes": size}

    def decrypt_stream(
        self,
        src: BinaryIO,
        dst: BinaryIO,
        context: Mapping[str, str] | None = None,
        *,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Decrypt a kmsgate encrypted stream; the key comes from its header. If `context` is
        given it must equal the header's. Authenticated chunks reach `dst` before the end is
        checked: on error discard `dst`. `{key, key_version, bytes}`.

        Raises DecryptionFailed (not a kmsgate file, tampered, truncated, wrong context),
        ApiError, OSError.
        """
        header = FileHeader.read(src)
        envelope = header.envelope()
        if context is not None and dict(context) != header.context:
            raise DecryptionFailed("the file was encrypted with another context")
        dek = self.decrypt(envelope.key_name, header.data_key, header.context)["plaintext"]
        try:
            size = chunked.decrypt_stream(dek, header.bound, src, dst, progress=progress)
        except (chunked.ChunkedDecryptionError, ValueError):
            raise DecryptionFailed("the encrypted data is not authentic or is truncated") from None
        return {"key": envelope.key_name, "key_version": envelope.key_version, "bytes": size}

    # -- PKI --------------------------------------------------------------------------------

    def create_ca(
        self, name: str, subject: str, *, key_type: str | None = None, backend: str | None = None
    ) -> dict[str, Any]:
        """A pending intermediate CA whose key the gateway creates: `{name, state, csr (PEM),
        ...}`; the CSR goes to the offline root (key type and backend: the gateway's
        defaults when None)."""
        key = {k: v for k, v in {"type": key_type, "backend": backend}.items() if v is not None}
        return self._json("POST", "/v1/pki/cas", {"name": name, "subject": subject, "key": key})

    def import_ca_certificate(self, name: str, certificate: str, chain: str) -> dict[str, Any]:
        """Activate pending CA `name` with its certificate and the chain of its issuers up to
        the self-signed root (PEM); the CA."""
        body = {"certificate": certificate, "chain": chain}
        return self._json("POST", f"/v1/pki/cas/{_segment(name)}/certificate", body)

    def list_cas(self) -> list[dict[str, Any]]:
        cas: list[dict[str, Any]] = self._listed("cas", "GET", "/v1/pki/cas")
        return cas

    def get_ca(self, name: str) -> dict[str, Any]:
        """One CA, found in the list (raises ApiError `not_found` when there is none)."""
        for ca in self.list_cas():
            if isinstance(ca, dict) and ca.get("name") == name:
                return ca
        raise ApiError(404, "not_found", f"no CA named {name!r}", token_sent=self._token_sent)

    def ca_chain(self, name: str) -> str:
        """The CA's certificate and its issuers, PEM, root last (public: needs no token)."""
        return self.request("GET", f"/v1/pki/cas/{_segment(name)}/chain").text

    def ca_crl(self, name: str, *, delta: bool = False) -> bytes:
        """The CA's current full CRL, or its delta CRL, in DER (public: needs no token)."""
        params = {"delta": "true"} if delta else None
        return self.request("GET", f"/v1/pki/cas/{_segment(name)}/crl", params=params).content

    def issue_certificate(
        self, ca: str, csr: str, profile: str, *, ttl: str | int | None = None
    ) -> dict[str, Any]:
        """A certificate for a PEM CSR under `profile`: `{certificate, chain (PEM, issuing CA
        first, root last), serial, not_after}`; `ttl` (`12h`, seconds) defaults to the
        profile's."""
        body: dict[str, Any] = {"csr": csr, "profile": profile}
        if ttl is not None:
            body["ttl"] = ttl
        return self._json("POST", f"/v1/pki/cas/{_segment(ca)}/issue", body)

    def renew_certificate(self, csr: str, *, ttl: str | int | None = None) -> dict[str, Any]:
        """Renew the certificate this client authenticates with over mTLS (a client whose
        `verify` context holds it): same names and profile, the PEM CSR's key. Same reply as
        `issue_certificate`."""
        body: dict[str, Any] = {"csr": csr}
        if ttl is not None:
            body["ttl"] = ttl
        return self._json("POST", "/v1/pki/renew", body)

    def list_profiles(self) -> list[dict[str, Any]]:
        profiles: list[dict[str, Any]] = self._listed("profiles", "GET", "/v1/pki/profiles")
        return profiles

    def list_certificates(
        self,
        *,
        ca: str | None = None,
        profile: str | None = None,
        san: str | None = None,
        status: str | None = None,
        expires_before: datetime | None = None,
        owner: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> dict[str, Any]:
        """One page of the inventory, by serial: `{certs, next}`; `next` (absent on the last
        page) is the `after` of the following page."""
        filters = {
            "ca": ca,
            "profile": profile,
            "san": san,
            "status": status,
            "expires_before": expires_before.isoformat() if expires_before else None,
            "owner": owner,
            "limit": limit,
            "after": after,
        }
        params = {k: v for k, v in filters.items() if v is not None}
        page = self._json("GET", "/v1/pki/certs", params=params)
        self.reply_field(page, "certs", list)
        return page

    def iter_certificates(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every inventory record matching `filters` (those of `list_certificates` but
        `after`), page after page."""
        after = None
        while True:
            page = self.list_certificates(**filters, after=after)
            yield from page["certs"]
            after = page.get("next")
            if not after:
                return

    def get_certificate(self, serial: str) -> dict[str, Any]:
        """One inventory record, with the certificate (PEM) in `certificate`."""
        return self._json("GET", f"/v1/pki/certs/{_segment(serial)}")

    def revoke_certificate(self, serial: str, reason: str = "unspecified") -> dict[str, Any]:
        """Revoke with an RFC 5280 reason name (`keyCompromise`, `superseded`, ...)."""
        body = {"reason": reason}
        return self._json("POST", f"/v1/pki/certs/{_segment(serial)}/revoke", body)

    # -- tokens and system -----------------------------------------------------------------

    def create_token(
        self,
        roles: Sequence[str],
        ttl: str | None = None,
        description: str = "",
        *,
        orphan: bool = False,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"roles": list(roles), "description": description}
        if orphan:
            body["orphan"] = True
        if ttl is not None:  # "" is the gateway's to refuse, not a token that never expires
            body["ttl"] = ttl
        return self._json("POST", "/v1/sys/tokens", body)

    def list_tokens(self) -> list[dict[str, Any]]:
        tokens: list[dict[str, Any]] = self._listed("tokens", "GET", "/v1/sys/tokens")
        return tokens

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/sys/tokens/{_segment(token_id)}")

    # -- JIT exceptions --------------------------------------------------------------------

    def request_exception(
        self, actions: Sequence[str], resource: str, duration: str, ticket: str, reason: str
    ) -> dict[str, Any]:
        """Ask for a grant for the caller (pending until another principal approves)."""
        body = {
            "actions": list(actions),
            "resource": resource,
            "duration": duration,
            "ticket": ticket,
            "reason": reason,
        }
        return self._json("POST", "/v1/exceptions", body)

    def approve_exception(self, grant_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/exceptions/{_segment(grant_id)}/approve")

    def revoke_exception(self, grant_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/exceptions/{_segment(grant_id)}")

    def get_exception(self, grant_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/exceptions/{_segment(grant_id)}")

    def list_exceptions(
        self, state: str | None = None, principal: str | None = None
    ) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("state", state), ("principal", principal)) if v}
        grants: list[dict[str, Any]] = self._listed(
            "exceptions", "GET", "/v1/exceptions", params=params
        )
        return grants

    def evaluate_policy(
        self,
        principal: Mapping[str, Any],
        action: str,
        resource: Mapping[str, Any],
        *,
        request: Mapping[str, Any] | None = None,
        env: str | None = None,
        exceptions: Sequence[Mapping[str, Any]] = (),
    ) -> dict[str, Any]:
        """What the policy would decide: `{allow, reasons, roles, exceptions_used}`
        (`exceptions`: active JIT grants, as `input.exceptions` holds them)."""
        body: dict[str, Any] = {
            "principal": dict(principal),
            "action": action,
            "resource": dict(resource),
            "request": dict(request or {}),
            "exceptions": [dict(grant) for grant in exceptions],
        }
        if env is not None:
            body["env"] = env
        return self._json("POST", "/v1/sys/policy/evaluate", body)

    def policy(self) -> dict[str, Any]:
        """The policy in force: `{digest, files, loaded_at}`."""
        return self._json("GET", "/v1/sys/policy")

    def reload_policy(self) -> str:
        """Have the gateway re-read its policy files; the digest now in force."""
        return self.reply_field(self._json("POST", "/v1/sys/policy/reload"), "digest", str)

    def whoami(self) -> dict[str, Any]:
        """The caller: `{id, kind, tenant, roles, claims}` (roles as the policy maps them)."""
        return self._json("GET", "/v1/sys/whoami")

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/v1/sys/health")

    def ready(self) -> dict[str, Any]:
        """Readiness: the store's and each backend's status. Raises ApiError (503) when
        one is down."""
        return self._json("GET", "/v1/sys/ready")


def _segment(value: str) -> str:
    """`value` as one URL path segment: a `/`, `?`, `#` or `%` in it, or a name that is
    all dots, cannot reach another route or action. Raises ApiError for a value that is
    not text (an argument's undecodable bytes)."""
    try:
        segment = urllib.parse.quote(value, safe="")
    except UnicodeEncodeError:
        raise ApiError(0, "invalid_request", f"{quoted(value)} is not text (UTF-8)") from None
    return segment.replace(".", "%2E") if segment.strip(".") == "" else segment


def _message_body(
    data: bytes | None, digest: bytes | None, algorithm: str | None, version: int | None
) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if data is not None:
        body["input"] = b64encode(data)
    if digest is not None:
        body["digest"] = b64encode(digest)
    if algorithm:
        body["algorithm"] = algorithm
    if version is not None:  # 0 is the gateway's to refuse, not the primary version
        body["version"] = version
    return body


def _context(context: Mapping[str, str] | None) -> dict[str, Any]:
    return {"context": dict(context)} if context else {}
