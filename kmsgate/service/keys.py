"""Use cases: the key lifecycle (create, import, adopt, read, rotate, enable/disable,
update, mark compromised, schedule and cancel deletion, destroy when due)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization

from kmsgate.algorithms import KeyType, key_type_of_public_key, parse_key_type
from kmsgate.auth import SYSTEM, Principal
from kmsgate.backends.base import (
    AdoptCapable,
    BackendKey,
    KeyBackend,
    KeySpec,
    require_capability,
)
from kmsgate.catalogue import AUDIT_PURPOSE, PUBLIC_PURPOSES, Key, KeyState, KeyVersion
from kmsgate.errors import (
    Conflict,
    InvalidRequest,
    KeyDestroyed,
    KmsgateError,
    NotFound,
    Unavailable,
)
from kmsgate.jwk import public_jwk
from kmsgate.pki.authorities import CA_PURPOSE, PKI_PURPOSES
from kmsgate.policy import Decision
from kmsgate.service.gate import CLOCK_SKEW, Call, Ctx, Gate, Outcome, now
from kmsgate.service.requests import KeyChanges, NewKey
from kmsgate.text import several_pem_blocks, utc_timestamp

T = TypeVar("T")
log = logging.getLogger("kmsgate.keys")
_SCHEDULED = Decision(allow=True, reasons=("deletion scheduled by an authorised caller",))
_VERIFY_ONLY_NEVER_ROTATES = (
    "an imported public key never rotates (kmsgate holds no private key to make a new "
    "version with): no rotation_period"
)
ROTATION_RETRY = timedelta(minutes=1)
"""How long a key whose scheduled rotation failed waits before the next attempt."""
_ROTATION = Decision(allow=True, reasons=("rotation_period set by an authorised caller",))


class Keys:
    """Key lifecycle. Every change goes through the catalogue (store, then cache)."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self._rotation_retry: dict[str, datetime] = {}
        """Keys whose scheduled rotation failed -> when to try again."""

    def _on_key(
        self,
        principal: Principal,
        ctx: Ctx,
        action: str,
        name: str,
        request: Mapping[str, object] | None,
        operation: Callable[[Key, Outcome], T],
        *,
        detail: Mapping[str, object] | None = None,
    ) -> T:
        """`operation` on the key `name` as the store holds it now (a change is never
        decided on a copy another worker has moved past), through the gate: NotFound only
        after policy allowed. `detail`: what every audit record of the call says."""
        target = self.gate.target(name, current=True, change=action != "key.read")
        call = Call(principal, ctx, action, target.resource(), request, detail=detail)
        return self.gate.run_on_key(call, target, operation)

    # -- create ----------------------------------------------------------------------------

    def create(
        self, principal: Principal, ctx: Ctx, new: NewKey, *, decision: Decision | None = None
    ) -> Key:
        """Create (`type`), adopt (`uri`) or import (`public_key`) a key at version 1.
        `decision`: one taken already (the dev audit key, made by the gateway itself as
        SYSTEM); the policy is then not asked.

        Raises PolicyDenied, InvalidRequest (type, backend, public key), Conflict (name
        taken), NotSupported (backend cannot hold the type or adopt keys), BackendError.
        """
        resource = {
            "kind": "key",
            "name": new.name,
            "purpose": new.purpose,
            "type": new.type,
            "backend": new.backend or self.gate.registry.default,
            "labels": dict(new.labels),
        }
        importing = new.public_key is not None
        action = "key.import" if importing or new.uri is not None else "key.create"
        self._check_rotation_period(new.rotation_period)
        if new.rotation_period is not None:
            _refuse_a_ca_key(new.name, new.purpose, "rotates on a schedule")
            if importing:
                raise InvalidRequest(_VERIFY_ONLY_NEVER_ROTATES)
        if new.public and new.type is not None and not parse_key_type(new.type).is_asymmetric:
            raise InvalidRequest(f"{new.type} keys have no public key to publish")
        _refuse_a_pki_key(new)
        if importing and new.purpose in _SIGNED_THROUGH_THE_GATEWAY:
            # whoever holds the private key of an imported public key could sign checkpoints
            # or certificates that would verify as the gateway's
            raise InvalidRequest(
                f"a key of purpose {new.purpose!r} signs through the gateway: it cannot be "
                "an imported public key (create it, or adopt it with a uri)"
            )

        def create(outcome: Outcome) -> Key:
            if self.gate.catalogue.find(new.name) is not None:
                raise Conflict(f"a key named {new.name!r} exists")
            key = self._import(new) if importing else self.generate(new)
            outcome.key_version = 1
            outcome.detail["type"] = key.type.value
            return key

        detail = {  # what the trail keeps of the key asked for (never a backend URI)
            "purpose": new.purpose,
            "backend": resource["backend"],
            "labels": resource["labels"],
            "public": new.public,
            "rotation_period": (
                int(new.rotation_period.total_seconds()) if new.rotation_period else None
            ),
        }
        # `adopt`: a key the backend holds, used from now on (a policy can leave that to
        # whom it trusts with the HSM or KMS), rather than made or a public key imported
        asked = {"type": new.type, "adopt": new.uri is not None}
        call = Call(principal, ctx, action, resource, asked, detail=detail)
        return self.gate.run(call, create, decision=decision)

    def _check_rotation_period(self, period: timedelta | None) -> None:
        """Raises InvalidRequest for a `rotation_period` under `limits.min_rotation_seconds`."""
        least = self.gate.settings.limits.min_rotation_seconds
        if period is not None and period.total_seconds() < least:
            raise InvalidRequest(f"rotation_period must be at least {least} seconds")

    def _new_key(
        self, new: NewKey, key_type: KeyType, backend: str, version: KeyVersion, verify_only: bool
    ) -> Key:
        created = now()
        return Key(
            name=new.name,
            type=key_type,
            purpose=new.purpose,
            backend=backend,
            state=KeyState.ENABLED,
            labels=dict(new.labels),
            primary_version=1,
            min_decrypt_version=1,
            versions={1: version},
            created_at=created,
            updated_at=created,
            verify_only=verify_only,
            rotation_period=new.rotation_period,
            public=new.public
            if new.public is not None
            else new.purpose in PUBLIC_PURPOSES and key_type.is_asymmetric,
        )

    def generate(self, new: NewKey) -> Key:
        """Generate (or adopt, with `uri`) the key `new` at version 1, with no decision of its
        own: for a use case that has decided already (a CA's key). Raises InvalidRequest,
        Conflict, NotSupported, BackendError."""
        if new.type is None:
            raise InvalidRequest("'type' is required unless importing a 'public_key'")
        key_type = parse_key_type(new.type)
        backend = self.gate.registry.get(new.backend)
        spec = KeySpec(new.name, 1, key_type, dict(new.labels))
        if new.uri is None:
            created = backend.create_key(spec)
        else:
            adopter = require_capability(backend, AdoptCapable, "adopt existing keys")  # type: ignore[type-abstract]
            created = adopter.adopt_key(spec, new.uri)
            self._refuse_managed(adopter, created.ref)
        version = KeyVersion(
            version=1,
            backend_ref=created.ref,
            created_at=now(),
            material=created.material,
            public_key_pem=created.public_key_pem,
            adopted=new.uri is not None,
        )
        key = self._new_key(new, key_type, backend.name, version, verify_only=False)
        try:
            inserted = self.gate.catalogue.insert(key)
        except KmsgateError:
            if new.uri is None:  # never destroy an adopted key kmsgate did not make
                self._discard(backend, created)
            raise
        _promote(backend, created)
        return inserted

    def _discard(self, backend: KeyBackend, created: BackendKey) -> None:
        """Undo `created`, made for a catalogue write that failed: destroy it, unless the
        key stored under its name now holds that very backend key. A backend naming its
        keys after kmsgate's (a Transit key, an on-demand rotation of a KMS key) hands two
        requests racing on one name the same key, and the loser's undo would destroy the
        winner's. With the store unreadable, it is destroyed (as a store outage, not a
        race, is then the likely cause). Raises what `backend.destroy` raises."""
        try:
            shared = self.gate.catalogue.holds(created.name, backend.name, created.ref)
        except Unavailable:
            shared = False
        if shared:
            log.info(
                "key %s v%d: kept, another request made it first", created.name, created.version
            )
            return
        backend.destroy(created)

    def _refuse_managed(self, adopter: AdoptCapable, ref: str) -> None:
        """Raises Conflict if the backend key behind `ref` is already a version of a key
        (not destroyed): under a second name, it would go on signing or decrypting for a
        key disabled, scheduled for deletion or marked compromised under the first."""
        identity = adopter.key_identity(ref)
        for key in self.gate.catalogue.all():
            if key.state is KeyState.DESTROYED:
                continue
            for version in key.versions.values():
                if adopter.key_identity(version.backend_ref) == identity:
                    raise Conflict(
                        f"that backend key is already version {version.version} of key {key.name!r}"
                    )

    def _import(self, new: NewKey) -> Key:
        if several_pem_blocks(new.public_key or ""):
            raise InvalidRequest("public_key holds more than one PEM block: send one key")
        try:
            public_key = serialization.load_pem_public_key((new.public_key or "").encode())
        except (ValueError, TypeError):
            raise InvalidRequest("public_key is not a PEM SubjectPublicKeyInfo") from None
        key_type = key_type_of_public_key(public_key)
        if new.type is not None and parse_key_type(new.type) is not key_type:
            raise InvalidRequest(f"public_key is a {key_type} key, not {new.type}")
        pem = public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        version = KeyVersion(
            version=1, backend_ref=f"import:{new.name}/1", created_at=now(), public_key_pem=pem
        )
        return self.gate.catalogue.insert(
            self._new_key(new, key_type, "import", version, verify_only=True)
        )

    # -- read ------------------------------------------------------------------------------

    def search(
        self,
        principal: Principal,
        ctx: Ctx,
        *,
        purpose: str | None,
        labels: Sequence[tuple[str, str]],
    ) -> list[Key]:
        """Keys matching every filter (a purpose, label name and value pairs) that the
        principal may read (`key.read` per key). Raises Unavailable when the caches are too
        old to act on (as for one key)."""
        self.gate.require_fresh()
        visible = [
            key
            for key in self.gate.catalogue.all()
            if (purpose is None or key.purpose == purpose)
            and all(key.labels.get(name) == value for name, value in labels)
            and self.gate.decide(principal, "key.read", key.policy_resource()).allow
        ]

        def report(outcome: Outcome) -> list[Key]:
            outcome.detail["count"] = len(visible)
            return visible

        return self.gate.run(Call(principal, ctx, "key.list", {"kind": "keys"}), report)

    def get(self, principal: Principal, ctx: Ctx, name: str) -> Key:
        """The key `name`. Raises PolicyDenied or NotFound."""
        return self._on_key(principal, ctx, "key.read", name, None, _same_key)

    def usage(self, name: str) -> dict[int, tuple[int, datetime]] | None:
        """Version -> (uses, last use) of key `name` by every process (up to a second
        behind for the others); None while the store cannot say (the key itself is still
        served from the catalogue). Only after `get` allowed the caller."""
        try:
            return self.gate.usage.of_key(name)
        except Unavailable:
            return None

    def public_key_pem(self, principal: Principal, ctx: Ctx, name: str, version: int | None) -> str:
        """PEM SubjectPublicKeyInfo of a version (default: primary). Raises InvalidRequest
        for symmetric keys, KeyVersionUnusable for unknown or destroyed versions."""

        def read(key: Key, outcome: Outcome) -> str:
            if not key.type.is_asymmetric:
                raise InvalidRequest(f"{key.type} keys have no public key")
            v = key.usable_version(version, for_signing=False)
            outcome.key_version = v.version
            assert v.public_key_pem is not None  # every asymmetric version has one
            return v.public_key_pem

        return self._on_key(principal, ctx, "key.read", name, {"version": version}, read)

    def jwks(self, name: str) -> dict[str, object]:
        """The public JWKS of a key's usable versions (public endpoint, not audited).

        Raises NotFound, the same for every key not marked public as for unknown names (no
        token: nobody may learn which names exist), and for symmetric, pending or destroyed
        keys.
        """
        key = self.gate.catalogue.cached(name)  # public: unknown names never reach the store
        if (
            key is None
            or not key.public
            or not key.type.is_asymmetric
            or key.state not in (KeyState.ENABLED, KeyState.DISABLED)
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

    # -- change ----------------------------------------------------------------------------

    def rotate(self, principal: Principal, ctx: Ctx, name: str) -> Key:
        """Create a new primary version. Raises KeyDisabled & co., Conflict if verify-only,
        NotSupported and BackendError from the backend."""
        return self._on_key(principal, ctx, "key.rotate", name, None, self._rotate)

    def rotate_due(self, ctx: Ctx, at: datetime | None = None) -> list[str]:
        """Rotate, as `system`, the keys whose `rotation_period` has passed since their
        primary version was made (by `at`, default now), each audited `key.rotate`. Reads
        the catalogue in memory. A key that fails (its backend is down; another process
        rotated it meanwhile) is logged, its failure audited, and tried again one
        time after `ROTATION_RETRY`. Returns the names rotated."""
        at = at or now()
        due = [
            key
            for key in self.gate.catalogue.all()
            if (when := key.next_rotation()) is not None
            and max(when, self._rotation_retry.get(key.name, when)) <= at
        ]
        rotated = []
        for key in due:
            try:
                self.rotate_as_system(ctx, key, {"scheduled": True})
            except KmsgateError as exc:
                log.warning("scheduled rotation of %s failed: %s", key.name, exc.code)
                self._rotation_retry[key.name] = at + ROTATION_RETRY
                continue
            self._rotation_retry.pop(key.name, None)
            rotated.append(key.name)
        return rotated

    def rotate_as_system(self, ctx: Ctx, key: Key, why: Mapping[str, object]) -> Key:
        """Rotate `key` as `system`, for a use case that has decided already (audited
        `key.rotate`, `why` in its record's detail). Raises what `rotate` raises."""

        def rotate(outcome: Outcome) -> Key:
            outcome.detail.update(why)
            return self._rotate(key, outcome)

        call = Call(SYSTEM, ctx, "key.rotate", key.policy_resource(), dict(why))
        return self.gate.run(call, rotate, decision=_ROTATION)

    def _rotate(self, key: Key, outcome: Outcome) -> Key:
        """A new primary version of `key` (the version made on its backend is destroyed
        again if the catalogue refuses it). Raises KeyDisabled & co., Conflict, NotSupported,
        BackendError."""
        key.require_enabled()
        if key.verify_only:
            raise Conflict(f"key {key.name!r} is verify-only; import a new key instead")
        _refuse_a_ca_key(key.name, key.purpose, "rotates")
        number = max(key.versions) + 1
        backend = self.gate.registry.holding(key.backend)
        previous = key.backend_key(key.versions[key.primary_version])
        spec = KeySpec(key.name, number, key.type, dict(key.labels), previous=previous)
        created = backend.create_key(spec)
        version = KeyVersion(
            version=number,
            backend_ref=created.ref,
            created_at=now(),
            material=created.material,
            public_key_pem=created.public_key_pem,
        )
        try:
            rotated = self.gate.catalogue.add_version(key, version, now())
        except KmsgateError:
            self._discard(backend, created)
            raise
        _promote(backend, created)
        outcome.key_version = number
        return rotated

    def disable(self, principal: Principal, ctx: Ctx, name: str) -> Key:
        """Disable: every operation is then refused with 409 key_disabled."""
        move = partial(self._transition, [KeyState.ENABLED], KeyState.DISABLED, {})
        return self._on_key(principal, ctx, "key.disable", name, None, move)

    def enable(self, principal: Principal, ctx: Ctx, name: str) -> Key:
        """Re-enable a disabled key. Raises Conflict from pending deletion or destroyed."""
        move = partial(self._transition, [KeyState.DISABLED], KeyState.ENABLED, {})
        return self._on_key(principal, ctx, "key.enable", name, None, move)

    def cancel_deletion(self, principal: Principal, ctx: Ctx, name: str) -> Key:
        """Cancel a scheduled deletion; the key comes back disabled. Raises Conflict."""
        move = partial(
            self._transition,
            [KeyState.PENDING_DELETION],
            KeyState.DISABLED,
            {"deletion_date": None},
        )
        return self._on_key(principal, ctx, "key.cancel_deletion", name, None, move)

    def schedule_deletion(
        self, principal: Principal, ctx: Ctx, name: str, pending_days: int
    ) -> Key:
        """Refuse every operation from now; destroy the material after `pending_days`.
        Raises Conflict if the key is already pending deletion or destroyed."""

        def schedule(key: Key, outcome: Outcome) -> Key:
            date = now() + timedelta(days=pending_days)
            scheduled = self._transition(
                [KeyState.ENABLED, KeyState.DISABLED],
                KeyState.PENDING_DELETION,
                {"deletion_date": date},
                key,
                outcome,
            )
            outcome.detail["deletion_date"] = utc_timestamp(date)  # only once it holds
            return scheduled

        request = {"pending_days": pending_days}
        return self._on_key(principal, ctx, "key.delete", name, request, schedule)

    def update(self, principal: Principal, ctx: Ctx, name: str, changes: KeyChanges) -> Key:
        """Change min_decrypt_version, rotation_period (or stop rotating), labels or public.
        Raises InvalidRequest if
        min_decrypt_version is above the primary version, BackendError if the backend could
        not retire the older versions (nothing changed then)."""

        def patch(key: Key, _: Outcome) -> Key:
            _refuse_destroyed(key)
            fields: dict[str, Any] = {}
            minimum = changes.min_decrypt_version
            if minimum is not None:
                if minimum > key.primary_version:
                    raise InvalidRequest("min_decrypt_version cannot exceed the primary version")
                if minimum != key.min_decrypt_version and not key.verify_only:
                    # the backend first: if it fails, nothing changed; if it enforces the
                    # new minimum (raised or lowered), so does kmsgate a moment later
                    self.gate.registry.holding(key.backend).retire_versions_below(
                        key.backend_key(key.versions[minimum])
                    )
                fields["min_decrypt_version"] = minimum
            if changes.rotation_period is not None:
                _refuse_a_ca_key(key.name, key.purpose, "rotates on a schedule")
                if key.verify_only:
                    raise InvalidRequest(_VERIFY_ONLY_NEVER_ROTATES)
            if changes.rotation_period is not None or changes.stop_rotation:
                fields["rotation_period"] = changes.rotation_period
            if changes.labels is not None:
                fields["labels"] = dict(changes.labels)
            if changes.public is not None:
                if changes.public and not key.type.is_asymmetric:
                    raise InvalidRequest(f"{key.type} keys have no public key to publish")
                fields["public"] = changes.public
            if not fields:
                return key
            return self.gate.catalogue.update(key, updated_at=now(), **fields)

        self._check_rotation_period(changes.rotation_period)
        request = changes.policy_request()
        detail = {"changes": request}  # the trail says what changed, a refusal's too
        return self._on_key(principal, ctx, "key.update", name, request, patch, detail=detail)

    def mark_compromised(
        self, principal: Principal, ctx: Ctx, name: str, version: int, since: datetime
    ) -> Key:
        """Mark a version compromised since `since` (aware): it no longer signs, and
        signatures made after that time no longer verify when their time is known. Raises
        NotFound for an unknown version, InvalidRequest for a `since` ahead of the gateway's
        clock by more than `CLOCK_SKEW` (a compromise has happened already)."""
        if since > now() + CLOCK_SKEW:
            raise InvalidRequest("since is in the future: a compromise has happened already")

        def mark(key: Key, outcome: Outcome) -> Key:
            v = key.versions.get(version)
            if v is None:
                raise NotFound(f"key {name!r} has no version {version}")
            _refuse_destroyed(key)
            outcome.key_version = version
            outcome.detail["since"] = utc_timestamp(since)
            return self.gate.catalogue.update_version(
                key, version, compromised_since=since.astimezone(UTC)
            )

        request = {"version": version}
        return self._on_key(principal, ctx, "key.compromise", name, request, mark)

    # -- scheduled -------------------------------------------------------------------------

    def destroy_due(self, ctx: Ctx, at: datetime | None = None) -> list[str]:
        """Destroy the material of keys whose deletion date has passed (by `at`, default
        now), and finish the destruction of a key whose backend failed part-way; audited as
        `system`. Idempotent: a destroyed key is not pending any more. Then, on SQLite, the
        database's log is emptied (`Database.empty_log`): the material leaves it too."""
        at = at or now()
        self.gate.catalogue.refresh()
        due = [key for key in self.gate.catalogue.all() if _due(key, at)]
        for key in due:
            call = Call(SYSTEM, ctx, "key.destroy", key.policy_resource())
            self.gate.run(call, partial(self._destroy, key, at), decision=_SCHEDULED)
        if due and not self.gate.catalogue.empty_log():
            log.warning(
                "the store's write-ahead log still holds destroyed key material (readers kept "
                "it from being emptied): SQLite's next checkpoint empties it"
            )
        return [key.name for key in due]

    def _transition(
        self,
        allowed_from: Sequence[KeyState],
        to: KeyState,
        fields: Mapping[str, object],
        key: Key,
        _: Outcome,
    ) -> Key:
        """Move `key` to state `to` (changing `fields` with it). Raises Conflict if the key
        is in a state it cannot leave this way."""
        if key.state is to and not fields:
            return key
        if key.state not in allowed_from:
            needed = " or ".join(state.value for state in allowed_from)
            raise Conflict(f"key {key.name!r} is {key.state.value}, not {needed}")
        return self.gate.catalogue.update(key, state=to, updated_at=now(), **fields)

    def _destroy(self, key: Key, at: datetime, _: Outcome) -> Key:
        """Mark the key destroyed, then destroy every version's material (adopted ceremony
        keys are only forgotten). The mark comes first, and only from the pending deletion
        that was due: a deletion cancelled meanwhile is Conflict and destroys nothing; once
        marked, nothing brings the key back, and a backend failure leaves the rest to the
        next run (`_due`). Raises Conflict and what the backend raises."""
        if key.state is KeyState.PENDING_DELETION:
            key = self.gate.catalogue.update(key, state=KeyState.DESTROYED, updated_at=at)
        backend = None if key.verify_only else self.gate.registry.holding(key.backend)
        for v in key.versions.values():
            if v.destroyed_at is None:
                if backend is not None and not v.adopted:
                    backend.destroy(key.backend_key(v))
                key = self.gate.catalogue.update_version(
                    key, v.version, material=None, destroyed_at=at
                )
        return key


def _same_key(key: Key, _: Outcome) -> Key:
    return key


def _due(key: Key, at: datetime) -> bool:
    """Whether `key`'s material is due for destruction by `at`: its deletion date has
    passed, or it is marked destroyed and a version still holds material."""
    if key.state is KeyState.DESTROYED:
        return any(v.destroyed_at is None for v in key.versions.values())
    return (
        key.state is KeyState.PENDING_DELETION
        and key.deletion_date is not None
        and key.deletion_date <= at
    )


def _refuse_destroyed(key: Key) -> None:
    """Raises KeyDestroyed for a destroyed key: nothing about it changes any more."""
    if key.state is KeyState.DESTROYED:
        raise KeyDestroyed(f"key {key.name!r} is destroyed")


_SIGNED_THROUGH_THE_GATEWAY = PKI_PURPOSES | {AUDIT_PURPOSE}
"""Purposes of keys that sign what relying parties take as the gateway's own word."""


def _refuse_a_pki_key(new: NewKey) -> None:
    """Raises InvalidRequest for a key only the PKI makes (`/v1/pki`, never `POST
    /v1/keys`): of purpose `ca` or `ocsp`, or named as a CA's key (`ca.<ca>`) or its OCSP
    responder's (`ocsp.<ca>`). A responder key made beforehand under its name was taken
    for the CA's and certified as its OCSP signer (or, of another kind, broke its OCSP for
    good); a CA key's name taken kept the CA from being made."""
    if new.purpose in PKI_PURPOSES or new.name.startswith(_PKI_KEY_PREFIXES):
        raise InvalidRequest(
            f"key {new.name!r}: the names ca.* and ocsp.* and the purposes ca and ocsp are "
            "the PKI's, which makes such keys itself (POST /v1/pki/cas)"
        )


_PKI_KEY_PREFIXES = ("ca.", "ocsp.")


def _refuse_a_ca_key(name: str, purpose: str, what: str) -> None:
    """Raises InvalidRequest for a CA's key: its certificate certifies the key's current
    version, and what a new version signed would not verify against it."""
    if purpose == CA_PURPOSE:
        raise InvalidRequest(
            f"key {name!r} is a CA's key and never {what}: the CA's certificate certifies "
            "this key; for a new key, create a new CA and import its certificate"
        )


def _promote(backend: KeyBackend, created: BackendKey) -> None:
    """`backend.promoted(created)`, once the catalogue holds the version: a failure is
    logged, not raised (the version stands; only a name outside kmsgate lags)."""
    try:
        backend.promoted(created)
    except KmsgateError as exc:
        log.warning(
            "key %s v%d: the backend could not name it the primary version (%s)",
            created.name,
            created.version,
            exc.code,
        )
