"""Use cases: sign, verify, mac, mac verify (one item or a batch, on one key)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from functools import partial
from typing import TypeVar

from kmsgate.algorithms import (
    HashName,
    KeyUsage,
    SignAlg,
    check_digest,
    default_sign_algorithm,
    mac_algorithm,
    sign_algorithm,
    verify_with_public_key,
)
from kmsgate.auth import Principal
from kmsgate.backends.base import MacCapable, SignMessage, require_capability
from kmsgate.catalogue import AUDIT_PURPOSE, Key, KeyVersion
from kmsgate.errors import (
    InvalidRequest,
    KmsgateError,
    MacInvalid,
    SignatureInvalid,
    Unavailable,
)
from kmsgate.pki.authorities import PKI_PURPOSES
from kmsgate.service.batch import ItemT, ResultT, RunAll, check_size, each, run_on_target
from kmsgate.service.gate import CLOCK_SKEW, Call, Ctx, Gate, KeyTarget
from kmsgate.service.requests import MacInput, MacVerifyInput, SignInput, VerifyInput
from kmsgate.service.results import ItemResults, Mac, Signature, Verified

_GATEWAY_ONLY_PURPOSES = {
    **{
        purpose: f"a {purpose} key: it signs certificates, CRLs or OCSP responses through "
        "/v1/pki, never raw data"
        for purpose in PKI_PURPOSES
    },
    AUDIT_PURPOSE: "an audit key: it signs the audit log's checkpoints, made by the gateway, "
    "never raw data",
}
"""Purposes whose keys the raw `sign` operation refuses, and what such a key is."""

_SEND_A_DIGEST = "send a digest instead"
_ED25519_WHOLE = (
    "Ed25519 signs the whole message, not a digest, so the input must fit; "
    "to sign more, use an ECDSA or RSA key and send a digest"
)
_HMAC_WHOLE = "an HMAC covers the whole input, not a digest, so the input must fit"
"""What a caller over `limits.max_input_bytes` can do: a digest only where the algorithm
hashes (not Ed25519, not HMAC)."""

MessageT = TypeVar("MessageT", bound=SignInput | VerifyInput | MacInput | MacVerifyInput)
MessageOut = TypeVar("MessageOut")
"""What a backend is given for one item (a `SignMessage`, the bytes to MAC)."""


class Crypto:
    """Signatures and MACs with the key in the request. Verification runs in-process with
    the cached public keys; signing and MACs go to the key's backend."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.max_input = gate.settings.limits.max_input_bytes

    def sign(
        self,
        principal: Principal,
        ctx: Ctx,
        target: KeyTarget,
        items: Sequence[SignInput],
        batch: bool,
    ) -> ItemResults[Signature]:
        """Sign one item or a batch. Raises PolicyDenied, NotFound, KeyDisabled & co., and
        (single item) the item's error: InvalidRequest, TooLarge, KeyVersionUnusable,
        BackendError, ..."""
        return self._operate(principal, ctx, "sign", target, items, batch, self._sign)

    def verify(
        self,
        principal: Principal,
        ctx: Ctx,
        target: KeyTarget,
        items: Sequence[VerifyInput],
        batch: bool,
    ) -> ItemResults[Verified]:
        """Verify one signature or a batch. Raises SignatureInvalid (per item in a batch)
        and what `sign` raises."""
        run = partial(each, self._verify_one)
        return self._operate(principal, ctx, "verify", target, items, batch, run)

    def mac(
        self,
        principal: Principal,
        ctx: Ctx,
        target: KeyTarget,
        items: Sequence[MacInput],
        batch: bool,
    ) -> ItemResults[Mac]:
        """HMAC one input or a batch. Raises what `sign` raises, and NotSupported for a
        backend without MACs."""
        return self._operate(principal, ctx, "mac", target, items, batch, self._mac)

    def mac_verify(
        self,
        principal: Principal,
        ctx: Ctx,
        target: KeyTarget,
        items: Sequence[MacVerifyInput],
        batch: bool,
    ) -> ItemResults[Verified]:
        """Check one MAC or a batch (full-length tags, constant-time comparison). Raises
        MacInvalid (per item in a batch) and what `mac` raises."""
        run = partial(each, self._mac_verify_one)
        return self._operate(principal, ctx, "mac.verify", target, items, batch, run)

    # -- the common path -------------------------------------------------------------------

    def _operate(
        self,
        principal: Principal,
        ctx: Ctx,
        action: str,
        target: KeyTarget,
        items: Sequence[MessageT],
        batch: bool,
        run: RunAll[MessageT, ResultT],
    ) -> ItemResults[ResultT]:
        """Decide on `action` on the key and the items, run, audit."""
        call = Call(
            principal,
            ctx,
            action,
            resource=target.resource(),
            request=_policy_request(target.key, items),
            inputs=[_message_bytes(item) for item in items],
            digests=not action.startswith("mac"),  # what is signed is public; a MAC's input not
        )
        return run_on_target(self.gate, call, target, items, batch, run)

    def _message(self, item: SignInput | VerifyInput, alg: SignAlg) -> tuple[bytes, bool]:
        """The bytes to sign or verify and whether they are a digest. Raises InvalidRequest
        (digest of the wrong length) or TooLarge."""
        if item.digest is not None:
            check_digest(alg, item.digest)
            return item.digest, True
        assert item.input is not None  # the edge guarantees exactly one of the two
        advice = _SEND_A_DIGEST if alg.prehash_allowed else _ED25519_WHOLE
        return check_size(item.input, self.max_input, advice), False

    # -- per operation ---------------------------------------------------------------------

    def _sign(self, key: Key, items: Sequence[SignInput]) -> ItemResults[Signature]:
        """Check every item, then sign the valid ones with one backend call per key version
        (a backend with a batch API signs a whole batch in a few requests). Raises
        InvalidRequest for a CA, OCSP responder or audit key, whatever the policy says: it
        signs only certificates, CRLs or OCSP responses, through the PKI, or the audit log's
        checkpoints, through the gateway itself; Unavailable when the backend is down
        before anything was signed (once something was, the rest carry the error)."""
        refused = _GATEWAY_ONLY_PURPOSES.get(key.purpose)
        if refused is not None:
            raise InvalidRequest(f"key {key.name!r} is {refused}")

        def prepare(item: SignInput) -> tuple[int, SignMessage]:
            alg = sign_algorithm(key.type, item.algorithm)
            version = key.usable_version(item.version, for_signing=True)
            data, prehashed = self._message(item, alg)
            return version.version, SignMessage(data, alg, prehashed)

        return _by_version(
            items,
            prepare,
            lambda number, messages: self.gate.registry.holding(key.backend).sign_checked(
                key.backend_key(key.versions[number]), messages
            ),
            lambda number, message, signature: Signature(number, message.alg.name, signature),
        )

    def _verify_one(self, key: Key, item: VerifyInput) -> Verified:
        alg = sign_algorithm(key.type, item.algorithm)
        data, prehashed = self._message(item, alg)
        for version in key.verification_versions(item.version):
            if version.compromised_since is not None and (
                item.strict or (item.signed_at and version.is_compromised_at(item.signed_at))
            ):
                continue
            if item.signed_at and _made_before(key, version, item.signed_at):
                continue
            public_key = version.public_key()
            if public_key is not None and verify_with_public_key(
                public_key, alg, data, item.signature, prehashed=prehashed
            ):
                return Verified(key_version=version.version)
        raise SignatureInvalid(f"the signature does not verify under key {key.name!r}")

    def _mac_backend(self, key: Key) -> MacCapable:
        backend = self.gate.registry.holding(key.backend)
        return require_capability(backend, MacCapable, "compute MACs")  # type: ignore[type-abstract]

    def _mac(self, key: Key, items: Sequence[MacInput]) -> ItemResults[Mac]:
        """Check every item, then MAC the valid ones with one backend call per key version
        (a backend with a batch API MACs a whole batch in a few requests); a backend
        without MACs is each item's NotSupported. Raises Unavailable as `_sign` does."""

        def prepare(item: MacInput) -> tuple[int, bytes]:
            mac_algorithm(key.type, item.algorithm)  # the one hash of the key's type
            version = key.usable_version(item.version, for_signing=True)
            return version.version, check_size(item.input, self.max_input, _HMAC_WHOLE)

        return _by_version(
            items,
            prepare,
            lambda number, messages: self._mac_backend(key).mac_many(
                key.backend_key(key.versions[number]), messages, mac_algorithm(key.type, None)
            ),
            lambda number, _, tag: Mac(tag, number),
        )

    def _mac_verify_one(self, key: Key, item: MacVerifyInput) -> Verified:
        hash_name: HashName = mac_algorithm(key.type, item.algorithm)
        data = check_size(item.input, self.max_input, _HMAC_WHOLE)
        backend = self._mac_backend(key)
        for version in key.verification_versions(item.version):
            if version.compromised_since is not None:
                continue  # a MAC carries no time: one made with a leaked key proves nothing
            if backend.verify_mac(key.backend_key(version), data, item.mac, hash_name):
                return Verified(key_version=version.version)
        raise MacInvalid(f"the MAC does not verify under key {key.name!r}")


def _made_before(key: Key, version: KeyVersion, signed_at: datetime) -> bool:
    """Whether a signature said to be made at `signed_at` would predate `version`, which
    kmsgate made itself (an imported or adopted key signed before kmsgate knew it), by more
    than the clocks' skew: no such signature is genuine (a backdated `signed_at`)."""
    made_here = not key.verify_only and not version.adopted
    return made_here and signed_at < version.created_at - CLOCK_SKEW


def _message_bytes(item: SignInput | VerifyInput | MacInput | MacVerifyInput) -> bytes:
    """What the audit record summarises for an item: its input or its digest."""
    if item.input is not None:
        return item.input
    return getattr(item, "digest", None) or b""


def _policy_request(
    key: Key | None, items: Sequence[SignInput | VerifyInput | MacInput | MacVerifyInput]
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


def _by_version(
    items: Sequence[ItemT],
    prepare: Callable[[ItemT], tuple[int, MessageOut]],
    produce: Callable[[int, list[MessageOut]], list[bytes | KmsgateError]],
    result: Callable[[int, MessageOut, bytes], ResultT],
) -> ItemResults[ResultT]:
    """Prepare every item ((key version, message); an error stays in the item's place), then
    `produce` the messages of each version in one backend call and make each item's
    `result`. Raises Unavailable when the backend is down before anything was produced
    (once something was, the rest carry the error)."""
    results: dict[int, ResultT | KmsgateError] = {}
    pending: dict[int, list[tuple[int, MessageOut]]] = {}
    for index, item in enumerate(items):
        try:
            version, message = prepare(item)
        except KmsgateError as exc:
            results[index] = exc
            continue
        pending.setdefault(version, []).append((index, message))
    produced = False
    for version, messages in pending.items():
        try:
            outputs = produce(version, [message for _, message in messages])
        except Unavailable as exc:  # down: what another version produced still stands
            if not produced:
                raise
            outputs = [exc] * len(messages)
        except KmsgateError as exc:  # the backend cannot (NotSupported): each item says so
            outputs = [exc] * len(messages)
        for (index, message), output in zip(messages, outputs, strict=True):
            if isinstance(output, KmsgateError):
                results[index] = output
            else:
                results[index] = result(version, message, output)
                produced = True
    return [results[index] for index in range(len(items))]
