"""The use-case layer: one method per operation. REST routes call only this.

Every operation follows one path:

    authenticate -> policy (deny by default) -> key catalogue (cached) -> backend -> audit -> reply

The policy sees the key's attributes when the key exists and only its name otherwise, so a
caller without permission gets 403 whether or not the key exists. Every decision and outcome
is audited; if the audit write fails, the result is withheld (fail-closed).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization

from kmsgate.algorithms import (
    HashName,
    KeyType,
    KeyUsage,
    SignAlg,
    check_digest,
    default_sign_algorithm,
    key_type_of_public_key,
    mac_algorithm,
    parse_key_type,
    sign_algorithm,
    verify_with_public_key,
)
from kmsgate.audit import AuditEvent, AuditLog, input_summary, search
from kmsgate.backends.base import (
    AdoptCapable,
    KeySpec,
    MacCapable,
    Registry,
    SignMessage,
    WrapCapable,
    require_capability,
)
from kmsgate.catalogue import Catalogue, Key, KeyState, KeyVersion
from kmsgate.config import Settings
from kmsgate.encoding import b64encode
from kmsgate.envelope import (
    Envelope,
    Kind,
    encode_context,
    open_message,
    seal_message,
    wrap_aad,
)
from kmsgate.errors import (
    ConfigError,
    Conflict,
    DecryptionFailed,
    InvalidRequest,
    KmsgateError,
    NotFound,
    PolicyDenied,
    TooLarge,
)
from kmsgate.jwk import public_jwk
from kmsgate.policy import Decision, PolicyEngine, policy_input
from kmsgate.schemas import (
    CompromisedRequest,
    CreateKeyRequest,
    DataKeyItem,
    DecryptItem,
    EncryptItem,
    MacItem,
    MacVerifyItem,
    PatchKeyRequest,
    PolicyEvaluateRequest,
    RewrapItem,
    ScheduleDeletionRequest,
    SignItem,
    TokenCreateRequest,
    VerifyItem,
    parse_duration,
)
from kmsgate.store import Store
from kmsgate.tokens import Principal, TokenInfo, TokenRegistry

T = TypeVar("T")
Result = dict[str, Any]
SYSTEM = Principal(id="system", kind="system", roles=())
STARTED = "started"
STATE_CHANGING = frozenset(
    {
        "key.create",
        "key.import",
        "key.rotate",
        "key.disable",
        "key.enable",
        "key.update",
        "key.compromise",
        "key.delete",
        "key.cancel_deletion",
        "key.destroy",
        "token.create",
        "token.revoke",
        "policy.reload",
    }
)
"""Actions whose allow decision is audited (outcome `started`) before they run."""
_SCHEDULED = Decision(allow=True, reasons=("deletion scheduled by an authorised caller",))


@dataclass(slots=True)
class Ctx:
    """Per-request facts for audit records."""

    request_id: str


@dataclass(slots=True)
class _Outcome:
    """What an operation reports to its audit record besides success or failure."""

    key_version: int | None = None
    detail: dict[str, object] = field(default_factory=dict)


def _now() -> datetime:
    return datetime.now(UTC)


class Service:
    """All kmsgate operations. Thread-safe; holds only caches."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        catalogue: Catalogue,
        registry: Registry,
        policy: PolicyEngine,
        audit: AuditLog,
        tokens: TokenRegistry,
    ) -> None:
        self.settings = settings
        self.store = store
        self.catalogue = catalogue
        self.registry = registry
        self.policy = policy
        self.audit = audit
        self.tokens = tokens

    # -- the common path -------------------------------------------------------------------

    def authenticate(self, bearer: str | None, ctx: Ctx) -> Principal:
        """The caller behind `bearer`. Raises Unauthenticated (audited)."""
        try:
            return self.tokens.authenticate(bearer)
        except KmsgateError as exc:
            refused = Decision(allow=False, reasons=())
            event = self._event(ctx, None, "authn", {"kind": "token"}, refused)
            self.audit.append(replace(event, outcome=exc.code))
            raise

    def _event(
        self,
        ctx: Ctx,
        principal: Principal | None,
        action: str,
        resource: Mapping[str, object],
        decision: Decision,
        inputs: Sequence[bytes] | None = None,
    ) -> AuditEvent:
        """The audit record of a decision; its outcome records are derived from it."""
        return AuditEvent(
            action=action,
            decision="allow" if decision.allow else "deny",
            outcome=STARTED if decision.allow else PolicyDenied.code,
            request_id=ctx.request_id,
            principal=principal.id if principal else None,
            principal_kind=principal.kind if principal else None,
            resource={k: v for k, v in resource.items() if k in ("kind", "name")},
            reasons=tuple(decision.reasons),
            inputs=input_summary(inputs) if inputs else None,
            policy_digest=self.policy.digest,
        )

    @staticmethod
    def _finished(event: AuditEvent, outcome: str, result: _Outcome) -> AuditEvent:
        """`event` once its operation ended with `outcome` ("ok" or an error code)."""
        return replace(
            event,
            outcome=outcome,
            key_version=result.key_version,
            detail=result.detail or None,
        )

    def _decide(
        self,
        principal: Principal,
        action: str,
        resource: Mapping[str, object],
        request: Mapping[str, object] | None,
    ) -> Decision:
        return self.policy.decide(
            policy_input(
                principal=principal.policy_document(),
                action=action,
                resource=resource,
                request=request,
                env=self.settings.env,
                now=_now(),
                trusted=True,
            )
        )

    def _run(
        self,
        principal: Principal,
        ctx: Ctx,
        action: str,
        resource: Mapping[str, object],
        request: Mapping[str, object] | None,
        operation: Callable[[_Outcome], T],
        *,
        inputs: Sequence[bytes] | None = None,
        decision: Decision | None = None,
    ) -> T:
        """Decide (unless a `decision` was already taken), run `operation` if allowed, audit
        the decision and the outcome. A state-changing action's allow decision is written
        first, so that no change is ever made without its record.

        Raises PolicyDenied, whatever `operation` raises, or AuditUnavailable (the result
        is then withheld).
        """
        decision = decision or self._decide(principal, action, resource, request)
        event = self._event(ctx, principal, action, resource, decision, inputs)
        if not decision.allow:
            self.audit.append(event)
            raise PolicyDenied(f"policy does not allow {action} here")
        if action in STATE_CHANGING:
            # no record, no change: if this write fails (AuditUnavailable), nothing runs
            self.audit.append(event)
        outcome = _Outcome()
        try:
            result = operation(outcome)
        except Exception as exc:
            code = exc.code if isinstance(exc, KmsgateError) else "internal_error"
            self.audit.append(self._finished(event, code, outcome))
            raise
        self.audit.append(self._finished(event, "ok", outcome))
        return result

    def _key_op(
        self,
        principal: Principal,
        ctx: Ctx,
        action: str,
        name: str,
        request: Mapping[str, object] | None,
        operation: Callable[[Key, _Outcome], T],
        *,
        inputs: Sequence[bytes] | None = None,
    ) -> T:
        """`_run` for an operation on the key `name`: NotFound only after policy allowed."""
        key = self.catalogue.find(name)
        resource = key.policy_resource() if key else {"kind": "key", "name": name}

        def on_key(outcome: _Outcome) -> T:
            if key is None:
                raise NotFound(f"no key named {name!r}")
            return operation(key, outcome)

        return self._run(principal, ctx, action, resource, request, on_key, inputs=inputs)

    def is_blocking(self, name: str) -> bool:
        """Whether an operation on key `name` may block (remote or HSM backend)."""
        key = self.catalogue.find(name)
        backend = self.registry.find(key.backend) if key and not key.verify_only else None
        return backend is not None and backend.blocking

    # -- cryptographic operations ----------------------------------------------------------

    def _check_size(self, data: bytes | None) -> bytes:
        assert data is not None
        if len(data) > self.settings.limits.max_input_bytes:
            raise TooLarge(
                f"input of {len(data)} bytes exceeds the limit of "
                f"{self.settings.limits.max_input_bytes}; send a digest instead"
            )
        return data

    def _message(self, item: SignItem | VerifyItem, alg: SignAlg) -> tuple[bytes, bool]:
        if item.digest is not None:
            check_digest(alg, item.digest)
            return item.digest, True
        return self._check_size(item.input), False

    @staticmethod
    def _batch_request(
        key: Key | None, items: Sequence[SignItem | VerifyItem | MacItem]
    ) -> dict[str, object]:
        """The policy `request` document: the algorithm (when all items agree) and counts."""
        default = default_sign_algorithm(key.type) if key else None
        if key is not None and key.type.usage is KeyUsage.MAC:
            default = key.type.value
        algorithms = sorted({item.algorithm or default or "" for item in items})
        return {
            "algorithm": algorithms[0] if len(algorithms) == 1 else None,
            "algorithms": algorithms,
            "batch": len(items),
            "prehashed": any(getattr(item, "digest", None) is not None for item in items),
        }

    def _each(
        self,
        key: Key,
        outcome: _Outcome,
        items: Sequence[T],
        run: Callable[[Key, Sequence[T]], list[Result | KmsgateError]],
        batch: bool,
    ) -> Result:
        """Run the items: per-item errors in a batch, the error itself otherwise."""
        key.require_enabled()
        results = run(key, items)
        if not batch:
            result = results[0]
            if isinstance(result, KmsgateError):
                raise result
            outcome.key_version = result.get("key_version")
            return result
        replies: list[Result] = [
            {"error": {"code": r.code, "detail": r.detail}} if isinstance(r, KmsgateError) else r
            for r in results
        ]
        outcome.detail["items"] = len(items)
        outcome.detail["failed"] = sum(1 for r in results if isinstance(r, KmsgateError))
        return {"batch": replies}

    @staticmethod
    def _per_item(
        one: Callable[[Key, T], Result],
    ) -> Callable[[Key, Sequence[T]], list[Result | KmsgateError]]:
        """Run `one` item by item, keeping each item's error in its place."""

        def run(key: Key, items: Sequence[T]) -> list[Result | KmsgateError]:
            results: list[Result | KmsgateError] = []
            for item in items:
                try:
                    results.append(one(key, item))
                except KmsgateError as exc:
                    results.append(exc)
            return results

        return run

    def _operation(
        self,
        principal: Principal,
        ctx: Ctx,
        action: str,
        name: str,
        items: Sequence[Any],
        batch: bool,
        run: Callable[[Key, Sequence[Any]], list[Result | KmsgateError]],
    ) -> Result:
        inputs = [item.input if item.input is not None else item.digest or b"" for item in items]
        return self._key_op(
            principal,
            ctx,
            action,
            name,
            self._batch_request(self.catalogue.find(name), items),
            lambda key, outcome: self._each(key, outcome, items, run, batch),
            inputs=inputs,
        )

    def sign(
        self, principal: Principal, ctx: Ctx, name: str, items: Sequence[SignItem], batch: bool
    ) -> Result:
        """Sign one item or a batch. Raises PolicyDenied, NotFound, KeyDisabled, ... ."""
        return self._operation(principal, ctx, "sign", name, items, batch, self._sign_items)

    def _sign_items(self, key: Key, items: Sequence[SignItem]) -> list[Result | KmsgateError]:
        """Check every item, then sign the valid ones with one backend call per key version
        (a backend with a batch API signs a whole batch in a few requests)."""
        results: list[Result | KmsgateError] = []
        pending: dict[int, list[tuple[int, SignMessage]]] = {}
        for index, item in enumerate(items):
            try:
                alg = sign_algorithm(key.type, item.algorithm)
                version = key.usable_version(item.version, for_signing=True)
                data, prehashed = self._message(item, alg)
            except KmsgateError as exc:
                results.append(exc)
                continue
            results.append({"key_version": version.version, "algorithm": alg.name})
            pending.setdefault(version.version, []).append(
                (index, SignMessage(data, alg, prehashed))
            )
        for number, batch in pending.items():
            signed = self.registry.get(key.backend).sign_many(
                key.backend_key(key.versions[number]), [msg for _, msg in batch]
            )
            for (index, _), signature in zip(batch, signed, strict=True):
                reply = results[index]
                assert isinstance(reply, dict)
                if isinstance(signature, KmsgateError):
                    results[index] = signature
                else:
                    reply["signature"] = b64encode(signature)
        return results

    def verify(
        self, principal: Principal, ctx: Ctx, name: str, items: Sequence[VerifyItem], batch: bool
    ) -> Result:
        """Verify one signature or a batch, in-process with the cached public keys."""
        return self._operation(
            principal, ctx, "verify", name, items, batch, self._per_item(self._verify_one)
        )

    def _verify_one(self, key: Key, item: VerifyItem) -> Result:
        alg = sign_algorithm(key.type, item.algorithm)
        data, prehashed = self._message(item, alg)
        for version in key.verification_versions(item.version):
            if version.compromised_since is not None and (
                item.strict or (item.signed_at and version.is_compromised_at(item.signed_at))
            ):
                continue
            public_key = version.public_key()
            if public_key is not None and verify_with_public_key(
                public_key, alg, data, item.signature, prehashed=prehashed
            ):
                return {"valid": True, "key_version": version.version}
        return {"valid": False, "key_version": None}

    def mac(
        self, principal: Principal, ctx: Ctx, name: str, items: Sequence[MacItem], batch: bool
    ) -> Result:
        """HMAC one input or a batch."""
        return self._operation(
            principal, ctx, "mac", name, items, batch, self._per_item(self._mac_one)
        )

    def _mac_backend(self, key: Key) -> MacCapable:
        backend = self.registry.get(key.backend)
        return require_capability(backend, MacCapable, "compute MACs")  # type: ignore[type-abstract]

    def _mac_one(self, key: Key, item: MacItem) -> Result:
        hash_name = mac_algorithm(key.type, item.algorithm)
        version = key.usable_version(item.version, for_signing=True)
        tag = self._mac_backend(key).mac(
            key.backend_key(version), self._check_size(item.input), hash_name
        )
        return {"mac": b64encode(tag), "key_version": version.version}

    def mac_verify(
        self,
        principal: Principal,
        ctx: Ctx,
        name: str,
        items: Sequence[MacVerifyItem],
        batch: bool,
    ) -> Result:
        """Check one MAC or a batch (full-length tags only, constant-time comparison)."""
        return self._operation(
            principal, ctx, "mac.verify", name, items, batch, self._per_item(self._mac_verify_one)
        )

    def _mac_verify_one(self, key: Key, item: MacVerifyItem) -> Result:
        hash_name: HashName = mac_algorithm(key.type, item.algorithm)
        data = self._check_size(item.input)
        backend = self._mac_backend(key)
        for version in key.verification_versions(item.version):
            if backend.verify_mac(key.backend_key(version), data, item.mac, hash_name):
                return {"valid": True, "key_version": version.version}
        return {"valid": False, "key_version": None}

    # -- envelope encryption ---------------------------------------------------------------
    #
    # Formats in kmsgate/envelope.py and docs/formats.md. A fresh DEK per message, wrapped by
    # the key's backend; the context is bound into both the wrap and the body. Audit records
    # carry the sha256 of ciphertexts but only the length of plaintexts (a digest of a short
    # plaintext would let anyone who reads the log guess it).

    def _envelope_operation(
        self,
        principal: Principal,
        ctx: Ctx,
        action: str,
        name: str,
        items: Sequence[EncryptItem | DecryptItem | DataKeyItem | RewrapItem],
        batch: bool,
        run: Callable[[Key, Sequence[Any]], list[Result | KmsgateError]],
    ) -> Result:
        contexts = [item.context or {} for item in items]
        keys = sorted({k for c in contexts for k in c})
        request: dict[str, object] = {
            "batch": len(items),
            "context": contexts[0] if all(c == contexts[0] for c in contexts) else None,
            "context_keys": keys,
        }
        ciphertexts = [getattr(item, "ciphertext", None) for item in items]
        inputs = [c for c in ciphertexts if c is not None] or None
        plain = sum(len(item.plaintext) for item in items if isinstance(item, EncryptItem))

        def operate(key: Key, outcome: _Outcome) -> Result:
            if plain:
                outcome.detail["plaintext_bytes"] = plain
            return self._each(key, outcome, items, run, batch)

        return self._key_op(principal, ctx, action, name, request, operate, inputs=inputs)

    def _wrapper(self, key: Key) -> WrapCapable:
        if key.type.usage is not KeyUsage.ENCRYPT or key.verify_only:
            raise InvalidRequest(f"a {key.type} key cannot encrypt or wrap (use aes-256-gcm)")
        backend = self.registry.get(key.backend)
        return require_capability(backend, WrapCapable, "wrap data keys")  # type: ignore[type-abstract]

    def _wrap_new(self, key: Key, kind: Kind, dek: bytes, context_aad: bytes) -> Envelope:
        """A new envelope header: `dek` wrapped under the key's primary version."""
        wrapper = self._wrapper(key)
        version = key.usable_version(None, for_signing=True)
        wrapped = wrapper.wrap(
            key.backend_key(version), dek, wrap_aad(kind, key.name, version.version, context_aad)
        )
        return Envelope(kind, key.name, version.version, wrapped)

    def _unwrap(self, key: Key, envelope: Envelope, context_aad: bytes) -> bytes:
        """The DEK of `envelope` (made under `key`). Raises DecryptionFailed, or
        KeyVersionUnusable for a retired (below min_decrypt_version) or destroyed version."""
        wrapper = self._wrapper(key)
        version = key.usable_version(envelope.key_version, for_signing=False)
        aad = wrap_aad(envelope.kind, key.name, version.version, context_aad)
        return wrapper.unwrap(key.backend_key(version), envelope.wrapped_dek, aad)

    def _parse_for(self, key: Key, ciphertext: bytes) -> Envelope:
        envelope = Envelope.parse(ciphertext)
        if envelope.key_name != key.name:
            raise DecryptionFailed(f"the ciphertext was made under another key, not {key.name!r}")
        return envelope

    def encrypt(
        self, principal: Principal, ctx: Ctx, name: str, items: Sequence[EncryptItem], batch: bool
    ) -> Result:
        """Encrypt one plaintext or a batch (each up to `limits.max_input_bytes`) under the
        primary version. Raises PolicyDenied, NotFound, KeyDisabled, InvalidRequest (not an
        encryption key), TooLarge, NotSupported (backend cannot wrap)."""
        return self._envelope_operation(
            principal, ctx, "encrypt", name, items, batch, self._per_item(self._encrypt_one)
        )

    def _encrypt_one(self, key: Key, item: EncryptItem) -> Result:
        limit = self.settings.limits.max_input_bytes
        if len(item.plaintext) > limit:
            raise TooLarge(
                f"plaintext of {len(item.plaintext)} bytes exceeds the limit of {limit}; "
                "encrypt larger data client-side with a data key (kmsgate encrypt-file)"
            )
        context_aad = encode_context(item.context)
        dek = secrets.token_bytes(32)
        header = self._wrap_new(key, Kind.MESSAGE, dek, context_aad)
        nonce, body = seal_message(dek, item.plaintext, context_aad)
        envelope = Envelope(
            Kind.MESSAGE, key.name, header.key_version, header.wrapped_dek, nonce, body
        )
        return {"ciphertext": b64encode(envelope.to_bytes()), "key_version": header.key_version}

    def decrypt(
        self, principal: Principal, ctx: Ctx, name: str, items: Sequence[DecryptItem], batch: bool
    ) -> Result:
        """Decrypt ciphertexts from `encrypt` (the plaintext) or `datakey` (the data key).
        Raises DecryptionFailed (tampered, wrong or missing context, another key's
        ciphertext), KeyVersionUnusable (retired or destroyed version), and the key errors."""
        return self._envelope_operation(
            principal, ctx, "decrypt", name, items, batch, self._per_item(self._decrypt_one)
        )

    def _decrypt_one(self, key: Key, item: DecryptItem) -> Result:
        envelope = self._parse_for(key, item.ciphertext)
        context_aad = encode_context(item.context)
        dek = self._unwrap(key, envelope, context_aad)
        plaintext = (
            dek if envelope.kind is Kind.DATA_KEY else open_message(dek, envelope, context_aad)
        )
        return {"plaintext": b64encode(plaintext), "key_version": envelope.key_version}

    def datakey(
        self, principal: Principal, ctx: Ctx, name: str, items: Sequence[DataKeyItem], batch: bool
    ) -> Result:
        """Fresh random data keys wrapped under the primary version; the plaintext key is
        returned unless `include_plaintext` is false."""
        return self._envelope_operation(
            principal, ctx, "datakey", name, items, batch, self._per_item(self._datakey_one)
        )

    def _datakey_one(self, key: Key, item: DataKeyItem) -> Result:
        dek = secrets.token_bytes(item.bits // 8)
        envelope = self._wrap_new(key, Kind.DATA_KEY, dek, encode_context(item.context))
        result: Result = {
            "ciphertext": b64encode(envelope.to_bytes()),
            "key_version": envelope.key_version,
        }
        if item.include_plaintext:
            result["plaintext"] = b64encode(dek)
        return result

    def rewrap(
        self, principal: Principal, ctx: Ctx, name: str, items: Sequence[RewrapItem], batch: bool
    ) -> Result:
        """Re-wrap each ciphertext's DEK under this key's primary version; the DEK and the
        plaintext never leave the gateway and the message body is kept as is.

        A ciphertext made under another key (a migration) also needs `rewrap` on that source
        key: decided and audited per source key. Raises what `decrypt` raises, and
        PolicyDenied per item for a source key the caller may not rewrap from.
        """
        sources: dict[str, Key | KmsgateError] = {}

        def source_key(target: Key, envelope: Envelope) -> Key:
            if envelope.key_name == target.name:
                return target
            if envelope.key_name not in sources:
                sources[envelope.key_name] = self._rewrap_source(
                    principal, ctx, envelope.key_name, target.name
                )
            found = sources[envelope.key_name]
            if isinstance(found, KmsgateError):
                raise found
            return found

        def one(key: Key, item: RewrapItem) -> Result:
            envelope = Envelope.parse(item.ciphertext)
            source = source_key(key, envelope)
            context_aad = encode_context(item.context)
            dek = self._unwrap(source, envelope, context_aad)
            header = self._wrap_new(key, envelope.kind, dek, context_aad)
            new = Envelope(
                envelope.kind,
                key.name,
                header.key_version,
                header.wrapped_dek,
                envelope.nonce,
                envelope.body,
            )
            return {"ciphertext": b64encode(new.to_bytes()), "key_version": header.key_version}

        return self._envelope_operation(
            principal, ctx, "rewrap", name, items, batch, self._per_item(one)
        )

    def _rewrap_source(
        self, principal: Principal, ctx: Ctx, name: str, target: str
    ) -> Key | KmsgateError:
        """The source key of a cross-key rewrap if the caller may rewrap from it (decided
        and audited like any operation), else the error to report for its items."""
        request = {"role": "source", "target": target}

        def check(key: Key, outcome: _Outcome) -> Key:
            key.require_enabled()
            outcome.detail["target"] = target
            return key

        try:
            return self._key_op(principal, ctx, "rewrap", name, request, check)
        except NotFound:
            return DecryptionFailed("the ciphertext names a key that does not exist")
        except KmsgateError as exc:
            return exc

    # -- keys ------------------------------------------------------------------------------

    def create_key(self, principal: Principal, ctx: Ctx, req: CreateKeyRequest) -> Key:
        """Create (or import, with `public_key`) a key at version 1.

        Raises PolicyDenied, InvalidRequest (type, backend, public key), Conflict (name taken).
        """
        resource = {
            "kind": "key",
            "name": req.name,
            "purpose": req.purpose,
            "type": req.type,
            "backend": req.backend or self.registry.default,
            "labels": dict(req.labels),
        }
        action = "key.import" if req.public_key or req.uri else "key.create"

        def create(outcome: _Outcome) -> Key:
            if self.catalogue.find(req.name) is not None:
                raise Conflict(f"a key named {req.name!r} exists")
            key = self._import_key(req) if req.public_key else self._generate_key(req)
            outcome.key_version = 1
            outcome.detail["type"] = key.type.value
            return key

        return self._run(principal, ctx, action, resource, {"type": req.type}, create)

    def _new_key(
        self,
        req: CreateKeyRequest,
        key_type: KeyType,
        backend: str,
        version: KeyVersion,
        *,
        verify_only: bool,
    ) -> Key:
        now = _now()
        return Key(
            name=req.name,
            type=key_type,
            purpose=req.purpose,
            backend=backend,
            state=KeyState.ENABLED,
            labels=dict(req.labels),
            primary_version=1,
            min_decrypt_version=1,
            versions={1: version},
            created_at=now,
            updated_at=now,
            verify_only=verify_only,
            rotation_period=(
                parse_duration(req.rotation_period) if req.rotation_period is not None else None
            ),
        )

    def _generate_key(self, req: CreateKeyRequest) -> Key:
        assert req.type is not None
        key_type = parse_key_type(req.type)
        backend = self.registry.get(req.backend)
        spec = KeySpec(req.name, 1, key_type, dict(req.labels))
        if req.uri is None:
            created = backend.create_key(spec)
        else:
            adopter = require_capability(backend, AdoptCapable, "adopt existing keys")  # type: ignore[type-abstract]
            created = adopter.adopt_key(spec, req.uri)
        version = KeyVersion(
            version=1,
            backend_ref=created.ref,
            created_at=_now(),
            material=created.material,
            public_key_pem=created.public_key_pem,
            adopted=req.uri is not None,
        )
        key = self._new_key(req, key_type, backend.name, version, verify_only=False)
        try:
            return self.catalogue.insert(key)
        except KmsgateError:
            if req.uri is None:  # never destroy an adopted key kmsgate did not make
                backend.destroy(created)
            raise

    def _import_key(self, req: CreateKeyRequest) -> Key:
        assert req.public_key is not None
        try:
            public_key = serialization.load_pem_public_key(req.public_key.encode())
        except (ValueError, TypeError):
            raise InvalidRequest("public_key is not a PEM SubjectPublicKeyInfo") from None
        key_type = key_type_of_public_key(public_key)
        if req.type is not None and parse_key_type(req.type) is not key_type:
            raise InvalidRequest(f"public_key is a {key_type} key, not {req.type}")
        pem = public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        version = KeyVersion(
            version=1, backend_ref=f"import:{req.name}/1", created_at=_now(), public_key_pem=pem
        )
        return self.catalogue.insert(
            self._new_key(req, key_type, "import", version, verify_only=True)
        )

    def list_keys(
        self, principal: Principal, ctx: Ctx, *, purpose: str | None, labels: Mapping[str, str]
    ) -> list[Key]:
        """Keys matching the filters that the principal may read (`key.read` per key)."""
        matching = [
            key
            for key in self.catalogue.all()
            if (purpose is None or key.purpose == purpose)
            and all(key.labels.get(k) == v for k, v in labels.items())
        ]
        visible = [
            key
            for key in matching
            if self._decide(principal, "key.read", key.policy_resource(), None).allow
        ]

        def report(outcome: _Outcome) -> list[Key]:
            outcome.detail["count"] = len(visible)
            return visible

        return self._run(principal, ctx, "key.list", {"kind": "keys"}, None, report)

    def get_key(self, principal: Principal, ctx: Ctx, name: str) -> Key:
        """The key `name`. Raises PolicyDenied or NotFound."""
        return self._key_op(principal, ctx, "key.read", name, None, lambda key, _: key)

    def public_key_pem(self, principal: Principal, ctx: Ctx, name: str, version: int | None) -> str:
        """PEM SubjectPublicKeyInfo of a version (default: primary). Raises InvalidRequest
        for symmetric keys, KeyVersionUnusable for unknown or destroyed versions."""

        def read(key: Key, outcome: _Outcome) -> str:
            if not key.type.is_asymmetric:
                raise InvalidRequest(f"a {key.type} key has no public key")
            v = key.usable_version(version, for_signing=False)
            outcome.key_version = v.version
            assert v.public_key_pem is not None
            return v.public_key_pem

        return self._key_op(principal, ctx, "key.read", name, {"version": version}, read)

    def jwks(self, name: str) -> dict[str, object]:
        """The public JWKS of a key's usable versions (public endpoint, not audited).

        Raises NotFound for unknown, symmetric, pending or destroyed keys.
        """
        key = self.catalogue.cached(name)  # public: unknown names never reach the store
        if (
            key is None
            or not key.type.is_asymmetric
            or key.state
            not in (
                KeyState.ENABLED,
                KeyState.DISABLED,
            )
        ):
            raise NotFound(f"no public key set for {name!r}")
        jwks = []
        for v in key.verification_versions():
            public_key = v.public_key()
            if public_key is not None and v.compromised_since is None:
                jwks.append(
                    {"kid": f"{key.name}:v{v.version}", "use": "sig", **public_jwk(public_key)}
                )
        return {"keys": jwks}

    def rotate_key(self, principal: Principal, ctx: Ctx, name: str) -> Key:
        """Create a new primary version. Raises KeyDisabled & co., Conflict if verify-only."""

        def rotate(key: Key, outcome: _Outcome) -> Key:
            key.require_enabled()
            if key.verify_only:
                raise Conflict(f"key {name!r} is verify-only; import a new key instead")
            number = max(key.versions) + 1
            backend = self.registry.get(key.backend)
            created = backend.create_key(KeySpec(key.name, number, key.type, dict(key.labels)))
            version = KeyVersion(
                version=number,
                backend_ref=created.ref,
                created_at=_now(),
                material=created.material,
                public_key_pem=created.public_key_pem,
            )
            try:
                rotated = self.catalogue.add_version(key, version, _now())
            except KmsgateError:
                backend.destroy(created)
                raise
            outcome.key_version = number
            return rotated

        return self._key_op(principal, ctx, "key.rotate", name, None, rotate)

    def _transition(
        self, key: Key, allowed_from: Sequence[KeyState], to: KeyState, **changes: Any
    ) -> Key:
        if key.state is to and not changes:
            return key
        if key.state not in allowed_from:
            raise Conflict(f"key {key.name!r} is {key.state.value}; cannot become {to.value}")
        return self.catalogue.update(key, state=to, updated_at=_now(), **changes)

    def disable_key(self, principal: Principal, ctx: Ctx, name: str) -> Key:
        """Disable: every operation is then refused with 409 key_disabled."""
        return self._key_op(
            principal,
            ctx,
            "key.disable",
            name,
            None,
            lambda key, _: self._transition(key, [KeyState.ENABLED], KeyState.DISABLED),
        )

    def enable_key(self, principal: Principal, ctx: Ctx, name: str) -> Key:
        """Re-enable a disabled key. Raises Conflict from pending deletion or destroyed."""
        return self._key_op(
            principal,
            ctx,
            "key.enable",
            name,
            None,
            lambda key, _: self._transition(key, [KeyState.DISABLED], KeyState.ENABLED),
        )

    def update_key(self, principal: Principal, ctx: Ctx, name: str, req: PatchKeyRequest) -> Key:
        """Change min_decrypt_version, rotation_period or labels.

        Raises InvalidRequest if min_decrypt_version is above the primary version.
        """

        def patch(key: Key, _: _Outcome) -> Key:
            changes: dict[str, Any] = {}
            if req.min_decrypt_version is not None:
                if req.min_decrypt_version > key.primary_version:
                    raise InvalidRequest("min_decrypt_version cannot exceed the primary version")
                if req.min_decrypt_version > key.min_decrypt_version and not key.verify_only:
                    # the backend first: if it fails, nothing changed; if it enforces the
                    # new minimum, so does kmsgate a moment later
                    self.registry.get(key.backend).retire_versions_below(
                        key.backend_key(key.versions[key.primary_version]),
                        req.min_decrypt_version,
                    )
                changes["min_decrypt_version"] = req.min_decrypt_version
            if req.rotation_period is not None:
                changes["rotation_period"] = parse_duration(req.rotation_period)
            if req.labels is not None:
                changes["labels"] = dict(req.labels)
            if not changes:
                return key
            return self.catalogue.update(key, updated_at=_now(), **changes)

        return self._key_op(
            principal, ctx, "key.update", name, req.model_dump(exclude_none=True), patch
        )

    def mark_compromised(
        self, principal: Principal, ctx: Ctx, name: str, version: int, req: CompromisedRequest
    ) -> Key:
        """Mark a version compromised since `req.since`: it no longer signs, and signatures
        made after that time no longer verify when their time is known."""

        def mark(key: Key, outcome: _Outcome) -> Key:
            v = key.versions.get(version)
            if v is None:
                raise NotFound(f"key {name!r} has no version {version}")
            outcome.key_version = version
            outcome.detail["since"] = req.since.isoformat()
            return self.catalogue.update_version(
                key, replace(v, compromised_since=req.since.astimezone(UTC))
            )

        return self._key_op(principal, ctx, "key.compromise", name, {"version": version}, mark)

    def schedule_deletion(
        self, principal: Principal, ctx: Ctx, name: str, req: ScheduleDeletionRequest
    ) -> Key:
        """Refuse every operation from now; destroy the material after `pending_days`."""

        def schedule(key: Key, outcome: _Outcome) -> Key:
            date = _now() + timedelta(days=req.pending_days)
            outcome.detail["deletion_date"] = date.isoformat()
            return self._transition(
                key,
                [KeyState.ENABLED, KeyState.DISABLED],
                KeyState.PENDING_DELETION,
                deletion_date=date,
            )

        return self._key_op(
            principal, ctx, "key.delete", name, {"pending_days": req.pending_days}, schedule
        )

    def cancel_deletion(self, principal: Principal, ctx: Ctx, name: str) -> Key:
        """Cancel a scheduled deletion; the key comes back disabled."""
        return self._key_op(
            principal,
            ctx,
            "key.cancel_deletion",
            name,
            None,
            lambda key, _: self._transition(
                key, [KeyState.PENDING_DELETION], KeyState.DISABLED, deletion_date=None
            ),
        )

    def destroy_due_keys(self, ctx: Ctx, now: datetime | None = None) -> list[str]:
        """Destroy the material of keys whose deletion date has passed; audited as `system`."""
        now = now or _now()
        self.catalogue.refresh()
        destroyed = []
        for key in self.catalogue.all():
            if key.state is not KeyState.PENDING_DELETION or not key.deletion_date:
                continue
            if key.deletion_date > now:
                continue
            self._run(
                SYSTEM,
                ctx,
                "key.destroy",
                key.policy_resource(),
                None,
                lambda _, key=key: self._destroy(key, now),  # type: ignore[misc]
                decision=_SCHEDULED,
            )
            destroyed.append(key.name)
        return destroyed

    def _destroy(self, key: Key, now: datetime) -> Key:
        backend = None if key.verify_only else self.registry.get(key.backend)
        for v in key.versions.values():
            if v.destroyed_at is None:
                if backend is not None and not v.adopted:  # ceremony keys are only forgotten
                    backend.destroy(key.backend_key(v))
                key = self.catalogue.update_version(
                    key, replace(v, material=None, destroyed_at=now)
                )
        return self.catalogue.update(key, state=KeyState.DESTROYED, updated_at=now)

    # -- tokens ----------------------------------------------------------------------------

    def create_token(
        self, principal: Principal, ctx: Ctx, req: TokenCreateRequest
    ) -> tuple[TokenInfo, str]:
        """A new API token; the secret string is returned once and never stored."""
        ttl = parse_duration(req.ttl) if req.ttl is not None else None

        def create(outcome: _Outcome) -> tuple[TokenInfo, str]:
            info, secret = self.tokens.create(req.roles, ttl=ttl, description=req.description)
            outcome.detail.update(token_id=info.id, roles=list(info.roles))
            return info, secret

        return self._run(
            principal, ctx, "token.create", {"kind": "token"}, {"roles": req.roles}, create
        )

    def list_tokens(self, principal: Principal, ctx: Ctx) -> list[TokenInfo]:
        return self._run(
            principal, ctx, "token.list", {"kind": "token"}, None, lambda _: self.tokens.list()
        )

    def revoke_token(self, principal: Principal, ctx: Ctx, token_id: str) -> TokenInfo:
        """Revoke a token. Raises NotFound if no live token has that id."""
        return self._run(
            principal,
            ctx,
            "token.revoke",
            {"kind": "token", "name": token_id},
            None,
            lambda _: self.tokens.revoke(token_id),
        )

    # -- policy, audit, metrics -------------------------------------------------------------

    def authorize_metrics(self, principal: Principal, ctx: Ctx) -> None:
        """Raises PolicyDenied unless the principal may read the metrics (`metrics.read`)."""
        self._run(principal, ctx, "metrics.read", {"kind": "metrics"}, None, lambda _: None)

    def policy_info(self, principal: Principal, ctx: Ctx) -> dict[str, object]:
        return self._run(
            principal,
            ctx,
            "policy.read",
            {"kind": "policy"},
            None,
            lambda _: {
                "digest": self.policy.digest,
                "files": self.policy.files,
                "loaded_at": self.policy.loaded_at.isoformat(),
                "env": self.settings.env,
            },
        )

    def evaluate_policy(
        self, principal: Principal, ctx: Ctx, req: PolicyEvaluateRequest
    ) -> dict[str, object]:
        """Explain what the policy decides for a hypothetical input."""

        def evaluate(_: _Outcome) -> dict[str, object]:
            decision = self.policy.decide(
                policy_input(
                    principal=req.principal,
                    action=req.action,
                    resource=req.resource,
                    request=req.request,
                    env=self.settings.env,
                    now=_now(),
                )
            )
            return {"allow": decision.allow, "reasons": list(decision.reasons)}

        return self._run(principal, ctx, "policy.evaluate", {"kind": "policy"}, None, evaluate)

    def reload_policy(self, principal: Principal, ctx: Ctx) -> dict[str, object]:
        """Re-read the policy files atomically. Raises InvalidRequest (old policy kept)."""

        def reload(outcome: _Outcome) -> dict[str, object]:
            try:
                digest = self.policy.reload()
            except ConfigError as exc:
                raise InvalidRequest(f"policy not reloaded: {exc}") from None
            outcome.detail["digest"] = digest
            return {"digest": digest}

        return self._run(principal, ctx, "policy.reload", {"kind": "policy"}, None, reload)

    def audit_events(
        self,
        principal: Principal,
        ctx: Ctx,
        *,
        since: datetime | None,
        principal_id: str | None,
        key: str | None,
        action: str | None,
        limit: int,
    ) -> list[dict[str, object]]:
        path = self.settings.resolved_audit_path()
        return self._run(
            principal,
            ctx,
            "audit.read",
            {"kind": "audit"},
            None,
            lambda _: search(
                path, since=since, principal=principal_id, key=key, action=action, limit=limit
            ),
        )

    def close(self) -> None:
        self.audit.close()
        self.registry.close()
        self.store.close()
