"""Use cases: envelope encryption (encrypt, decrypt, datakey, rewrap).

Formats in kmsgate/envelope.py and docs/formats.md. A fresh DEK per message, wrapped by the
key's backend; the context is bound into both the wrap and the body. Audit records carry
the sha256 of ciphertexts but only the length of plaintexts (a digest of a short plaintext
would let anyone who reads the log guess it), and the encryption context, which is no
secret (as AWS KMS logs it): the trail answers "who decrypted tenant X's data".
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import TypeVar

from kmsgate.algorithms import KeyUsage
from kmsgate.auth import Principal
from kmsgate.backends.base import WrapCapable, require_capability
from kmsgate.catalogue import Key
from kmsgate.envelope import Envelope, Kind, encode_context, open_message, seal_message, wrap_aad
from kmsgate.errors import DecryptionFailed, InvalidRequest, KmsgateError, NotFound, TooLarge
from kmsgate.service.batch import ResultT, RunAll, each, run_on_target
from kmsgate.service.gate import Call, Ctx, Gate, KeyTarget, Outcome
from kmsgate.service.requests import (
    Context,
    DataKeyInput,
    DecryptInput,
    EncryptInput,
    RewrapInput,
)
from kmsgate.service.results import Ciphertext, DataKey, ItemResults, Plaintext, WrappedDataKey
from kmsgate.text import shown

EnvelopeT = TypeVar("EnvelopeT", bound=EncryptInput | DecryptInput | DataKeyInput | RewrapInput)

AUDITED_CONTEXTS = 16
"""The distinct contexts of a batch its audit record lists (it counts them all)."""


class Envelopes:
    """Encryption under a key's primary version, decryption under the version that made
    the ciphertext (while it is at or above `min_decrypt_version`)."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.max_input = gate.settings.limits.max_input_bytes

    def encrypt(
        self,
        principal: Principal,
        ctx: Ctx,
        target: KeyTarget,
        items: Sequence[EncryptInput],
        batch: bool,
    ) -> ItemResults[Ciphertext]:
        """Encrypt one plaintext or a batch (each up to `limits.max_input_bytes`). Raises
        PolicyDenied, NotFound, KeyDisabled & co., InvalidRequest (not an encryption key),
        TooLarge, NotSupported (backend cannot wrap)."""
        run = partial(each, self._encrypt_one)
        return self._operate(principal, ctx, "encrypt", target, items, batch, run)

    def decrypt(
        self,
        principal: Principal,
        ctx: Ctx,
        target: KeyTarget,
        items: Sequence[DecryptInput],
        batch: bool,
    ) -> ItemResults[Plaintext]:
        """The plaintext of an `encrypt` ciphertext, or the data key of a `datakey` one.
        Raises DecryptionFailed (tampered, wrong or missing context, another key's
        ciphertext), KeyVersionUnusable (retired or destroyed version), and the key errors."""
        run = partial(each, self._decrypt_one)
        return self._operate(principal, ctx, "decrypt", target, items, batch, run)

    def datakey(
        self,
        principal: Principal,
        ctx: Ctx,
        target: KeyTarget,
        items: Sequence[DataKeyInput],
        batch: bool,
    ) -> ItemResults[WrappedDataKey]:
        """Fresh random data keys wrapped under the primary version; the plaintext key too
        unless `include_plaintext` is false. Raises what `encrypt` raises."""
        run = partial(each, self._datakey_one)
        return self._operate(principal, ctx, "datakey", target, items, batch, run)

    def rewrap(
        self,
        principal: Principal,
        ctx: Ctx,
        target: KeyTarget,
        items: Sequence[RewrapInput],
        batch: bool,
    ) -> ItemResults[Ciphertext]:
        """Re-wrap each ciphertext's DEK under this key's primary version; the DEK and the
        plaintext never leave the gateway and the message body is kept as is.

        A ciphertext made under another key (a migration) also needs `rewrap` on that source
        key: decided and audited per source key. Raises what `decrypt` raises, and
        PolicyDenied per item for a source key the caller may not rewrap from.
        """
        sources = _RewrapSources(self, principal, ctx)
        run = partial(each, partial(self._rewrap_one, sources))
        return self._operate(principal, ctx, "rewrap", target, items, batch, run)

    # -- the common path -------------------------------------------------------------------

    def _operate(
        self,
        principal: Principal,
        ctx: Ctx,
        action: str,
        target: KeyTarget,
        items: Sequence[EnvelopeT],
        batch: bool,
        run: RunAll[EnvelopeT, ResultT],
    ) -> ItemResults[ResultT]:
        """Decide on `action` on the key and the items' contexts (once for each distinct
        context of a batch: a rule on the context sees every one), run, audit."""
        contexts = [dict(item.context or {}) for item in items]
        distinct = list({tuple(sorted(c.items())): c for c in contexts}.values())
        ciphertexts = [item.ciphertext for item in items if hasattr(item, "ciphertext")]
        plain = sum(len(item.plaintext) for item in items if isinstance(item, EncryptInput))
        request: dict[str, object] = {
            "batch": len(items),
            "context": distinct[0] if len(distinct) == 1 else None,
            "context_keys": sorted({k for c in contexts for k in c}),
        }
        whose: dict[str, object] = {}  # in every record, a denial's too: "tenant=acme", say
        if len(distinct) == 1 and distinct[0]:
            whose["context"] = _as_reviewed(distinct[0])
        elif len(distinct) > 1:
            whose["contexts"] = [_as_reviewed(c) for c in distinct[:AUDITED_CONTEXTS]]
            whose["distinct_contexts"] = len(distinct)
        detail: dict[str, object] = {}
        if action == "datakey":  # the policy may allow wrapped-only keys and no plaintext ones
            detail["plaintext_keys"] = request["plaintext_keys"] = sum(
                1 for item in items if isinstance(item, DataKeyInput) and item.include_plaintext
            )
        call = Call(
            principal,
            ctx,
            action,
            target.resource(),
            request,
            inputs=ciphertexts or None,
            detail=whose or None,
        )
        decision = None
        if len(distinct) > 1:
            each = [{**request, "context": context} for context in distinct]
            decision = self.gate.decide_each(call, each)
        if plain:
            detail["plaintext_bytes"] = plain
        return run_on_target(
            self.gate, call, target, items, batch, run, detail=detail, decision=decision
        )

    def _wrapper(self, key: Key) -> WrapCapable:
        if key.type.usage is not KeyUsage.ENCRYPT or key.verify_only:
            raise InvalidRequest(f"{key.type} keys cannot encrypt or wrap (use aes-256-gcm)")
        backend = self.gate.registry.holding(key.backend)
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
        if envelope.key_version not in key.versions:  # a forged header, not a retired version
            raise DecryptionFailed(
                f"the ciphertext names version {envelope.key_version}, which key {key.name!r} "
                "never had"
            )
        version = key.usable_version(envelope.key_version, for_signing=False)
        aad = wrap_aad(envelope.kind, key.name, version.version, context_aad)
        return wrapper.unwrap(key.backend_key(version), envelope.wrapped_dek, aad)

    # -- per operation ---------------------------------------------------------------------

    def _encrypt_one(self, key: Key, item: EncryptInput) -> Ciphertext:
        if len(item.plaintext) > self.max_input:
            raise TooLarge(
                f"plaintext of {len(item.plaintext)} bytes exceeds the limit of "
                f"{self.max_input}; encrypt larger data client-side with a data key "
                "(kmsgate encrypt-file)"
            )
        context_aad = encode_context(item.context)
        dek, nonce, body = seal_message(item.plaintext, context_aad)
        header = self._wrap_new(key, Kind.MESSAGE, dek, context_aad)
        envelope = replace(header, nonce=nonce, body=body)
        return Ciphertext(envelope.to_bytes(), header.key_version)

    def _decrypt_one(self, key: Key, item: DecryptInput) -> Plaintext:
        envelope = Envelope.parse(item.ciphertext)
        if envelope.key_name != key.name:
            raise DecryptionFailed(f"the ciphertext was made under another key, not {key.name!r}")
        context_aad = encode_context(item.context)
        dek = self._unwrap(key, envelope, context_aad)
        plaintext = (
            dek if envelope.kind is Kind.DATA_KEY else open_message(dek, envelope, context_aad)
        )
        return Plaintext(plaintext, envelope.key_version)

    def _datakey_one(self, key: Key, item: DataKeyInput) -> WrappedDataKey:
        dek = secrets.token_bytes(item.bits // 8)
        envelope = self._wrap_new(key, Kind.DATA_KEY, dek, encode_context(item.context))
        if not item.include_plaintext:
            return WrappedDataKey(envelope.to_bytes(), envelope.key_version)
        return DataKey(envelope.to_bytes(), envelope.key_version, dek)

    def _rewrap_one(self, sources: _RewrapSources, key: Key, item: RewrapInput) -> Ciphertext:
        """`item` re-wrapped under `key`, which is checked first: a key that cannot wrap
        is refused before a source key is decided on (and audited as allowed) or a data
        key unwrapped."""
        self._wrapper(key)
        envelope = Envelope.parse(item.ciphertext)
        source = (
            key
            if envelope.key_name == key.name
            else sources.get(envelope.key_name, key, item.context)
        )
        context_aad = encode_context(item.context)
        dek = self._unwrap(source, envelope, context_aad)
        if envelope.kind is Kind.MESSAGE:  # a damaged body fails now, not at a later decrypt
            open_message(dek, envelope, context_aad)
        header = self._wrap_new(key, envelope.kind, dek, context_aad)
        moved = replace(
            envelope,
            key_name=key.name,
            key_version=header.key_version,
            wrapped_dek=header.wrapped_dek,
        )
        return Ciphertext(moved.to_bytes(), header.key_version)


class _RewrapSources:
    """The other keys one rewrap request migrates from: each decided and audited once per
    encryption context, as the target is (a rule on the source key's context holds)."""

    def __init__(self, envelopes: Envelopes, principal: Principal, ctx: Ctx) -> None:
        self._gate = envelopes.gate
        self._principal = principal
        self._ctx = ctx
        self._found: dict[tuple[str, bytes], Key | KmsgateError] = {}

    def get(self, name: str, target: Key, context: Context) -> Key:
        """The source key `name` if the caller may rewrap from it into `target` what was
        encrypted with `context`. Raises the error its items report: PolicyDenied,
        DecryptionFailed (no such key), KeyDisabled."""
        seen = (name, encode_context(context))
        if seen not in self._found:
            self._found[seen] = self._check(name, target.name, context)
        found = self._found[seen]
        if isinstance(found, KmsgateError):
            raise found
        return found

    def _check(self, name: str, target: str, context: Context) -> Key | KmsgateError:
        asked = {"role": "source", "target": target, "context": dict(context or {})}
        whose = {"target": target, **({"context": asked["context"]} if context else {})}

        def check(key: Key, _: Outcome) -> Key:
            key.require_enabled()
            return key

        try:
            source = self._gate.target(name)  # a name no key can have: a forged header
            request = {**asked, "context_keys": sorted(context or {})}
            call = Call(
                self._principal, self._ctx, "rewrap", source.resource(), request, detail=whose
            )
            return self._gate.run_on_key(call, source, check)
        except NotFound:
            return DecryptionFailed("the ciphertext names a key that does not exist")
        except KmsgateError as exc:
            return exc


def _as_reviewed(context: Mapping[str, str]) -> dict[str, str]:
    """`context` as its audit record shows it to a reviewer: each control or bidirectional
    character written as its escape (`\\u202e`), which would otherwise make the line read
    as something else (the context itself, bound into the ciphertext, is as sent)."""
    return {shown(k): shown(v) for k, v in context.items()}
