"""Keys and versions, their lifecycle state machine, and the in-memory catalogue cache.

`Key` and `KeyVersion` are immutable snapshots. The `Catalogue` holds all of them in memory
(the hot path reads the database only for a name it has never seen), writes changes through
the `Store`, and follows the store's change feed for keys (`refresh`, every
`cache_refresh_seconds`), reloading only the keys that changed.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from kmsgate.algorithms import KeyType
from kmsgate.backends.base import BackendKey
from kmsgate.errors import (
    Conflict,
    KeyDestroyed,
    KeyDisabled,
    KeyPendingDeletion,
    KeyVersionUnusable,
    NotFound,
    Unavailable,
)
from kmsgate.ratelimit import TokenBucket
from kmsgate.store import READ_THROUGH_PER_SECOND, Row, Store, StoreMirror, utc
from kmsgate.text import utc_timestamp

MAX_KEY_NAME = 128  # the store's column width (key names are validated at the edge)

AUDIT_PURPOSE = "audit"
"""The purpose of a key that signs the audit log's checkpoints (setting
`audit_checkpoint_key`): the raw `sign` operation refuses it, whatever the policy says, so
that no caller can make a checkpoint's signature."""


class KeyState(enum.StrEnum):
    ENABLED = "enabled"
    DISABLED = "disabled"
    PENDING_DELETION = "pending_deletion"
    DESTROYED = "destroyed"


_STATE_ERRORS: dict[KeyState, type[Conflict]] = {
    KeyState.DISABLED: KeyDisabled,
    KeyState.PENDING_DELETION: KeyPendingDeletion,
    KeyState.DESTROYED: KeyDestroyed,
}


@dataclass(frozen=True, slots=True)
class KeyVersion:
    version: int
    backend_ref: str
    created_at: datetime
    material: bytes | None = field(default=None, repr=False)
    public_key_pem: str | None = None
    compromised_since: datetime | None = None
    destroyed_at: datetime | None = None
    adopted: bool = False
    """Made outside kmsgate (a key ceremony): deletion forgets it but never destroys it."""
    _public_key: list[PublicKeyTypes] = field(default_factory=list, repr=False, compare=False)

    def public_key(self) -> PublicKeyTypes | None:
        """The parsed public key (parsed once), or None for symmetric keys."""
        if self.public_key_pem is None:
            return None
        if not self._public_key:
            self._public_key.append(load_pem_public_key(self.public_key_pem.encode()))
        return self._public_key[0]

    def is_compromised_at(self, when: datetime) -> bool:
        return self.compromised_since is not None and when >= self.compromised_since


PUBLIC_PURPOSES = frozenset({"model-sign"})
"""Purposes whose keys are public unless created otherwise: verifiers of signed models fetch
their public keys without a token."""


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    type: KeyType
    purpose: str
    backend: str
    state: KeyState
    labels: Mapping[str, str]
    primary_version: int
    min_decrypt_version: int
    versions: Mapping[int, KeyVersion]
    created_at: datetime
    updated_at: datetime
    verify_only: bool = False
    rotation_period: timedelta | None = None
    deletion_date: datetime | None = None
    public: bool = False
    """Whether its public keys are served without a token (`GET .../jwks.json`)."""

    def policy_resource(self) -> dict[str, object]:
        """The `resource` part of the policy input document."""
        return {
            "kind": "key",
            "name": self.name,
            "purpose": self.purpose,
            "type": self.type.value,
            "backend": self.backend,
            "labels": dict(self.labels),
        }

    def next_rotation(self) -> datetime | None:
        """When the scheduler rotates this key: its primary version's creation plus
        `rotation_period`; None without a period, or for a key it does not rotate (not
        enabled, verify-only)."""
        if self.rotation_period is None or self.verify_only or self.state is not KeyState.ENABLED:
            return None
        return self.versions[self.primary_version].created_at + self.rotation_period

    def require_enabled(self) -> None:
        """Raises KeyDisabled, KeyPendingDeletion or KeyDestroyed unless the key is enabled."""
        error = _STATE_ERRORS.get(self.state)
        if error is not None:
            raise error(f"key {self.name!r} is {self.state.value.replace('_', ' ')}")

    def version_state(self, v: KeyVersion) -> str:
        """What a version is, as the API shows it: destroyed, else compromised (which says
        more than retired; a compromised version below `min_decrypt_version` is retired
        too, and `usable_version` refuses it as such), else retired, else enabled."""
        if v.destroyed_at is not None:
            return "destroyed"
        if v.compromised_since is not None:
            return "compromised"
        if v.version < self.min_decrypt_version:
            return "retired"
        return "enabled"

    def usable_version(self, version: int | None, *, for_signing: bool) -> KeyVersion:
        """The requested (or primary) version if it may be used.

        Raises KeyVersionUnusable if it is unknown, retired, destroyed, or (when signing)
        compromised or public-only.
        """
        number = self.primary_version if version is None else version
        v = self.versions.get(number)
        if v is None:
            raise KeyVersionUnusable(f"key {self.name!r} has no version {number}")
        if v.destroyed_at is not None:
            raise KeyVersionUnusable(f"version {number} of {self.name!r} is destroyed")
        if number < self.min_decrypt_version:  # also when compromised: retired all the same
            raise KeyVersionUnusable(f"version {number} of {self.name!r} is retired")
        if for_signing and v.compromised_since is not None:
            raise KeyVersionUnusable(f"version {number} of {self.name!r} is compromised")
        if for_signing and self.verify_only:
            raise KeyVersionUnusable(f"key {self.name!r} is verify-only (imported public key)")
        return v

    def verification_versions(self, version: int | None = None) -> list[KeyVersion]:
        """Versions a signature or MAC may come from: `version` if given (raises
        KeyVersionUnusable if it cannot be used), else primary first, then newest to oldest."""
        if version is not None:
            return [self.usable_version(version, for_signing=False)]
        live = [v for v in self.versions.values() if self.version_state(v) != "destroyed"]
        live = [v for v in live if v.version >= self.min_decrypt_version]
        return sorted(live, key=lambda v: (v.version != self.primary_version, -v.version))

    def backend_key(self, v: KeyVersion) -> BackendKey:
        return BackendKey(
            ref=v.backend_ref,
            key_type=self.type,
            name=self.name,
            version=v.version,
            material=v.material,
            public_key_pem=v.public_key_pem,
        )

    def to_dict(self) -> dict[str, Any]:
        """The REST representation (docs/api.md `key`): no material, ever."""
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type.value,
            "purpose": self.purpose,
            "backend": self.backend,
            "state": self.state.value,
            "labels": dict(self.labels),
            "primary_version": self.primary_version,
            "min_decrypt_version": self.min_decrypt_version,
            "verify_only": self.verify_only,
            "public": self.public,
            "versions": [
                {
                    "version": v.version,
                    "state": self.version_state(v),
                    "created_at": utc_timestamp(v.created_at),
                    **(
                        {"compromised_since": utc_timestamp(v.compromised_since)}
                        if v.compromised_since
                        else {}
                    ),
                    **({"adopted": True} if v.adopted else {}),
                }
                for v in sorted(self.versions.values(), key=lambda v: v.version)
            ],
            "created_at": utc_timestamp(self.created_at),
        }
        if self.rotation_period is not None:
            out["rotation_period"] = f"{int(self.rotation_period.total_seconds())}s"
        next_rotation = self.next_rotation()
        if next_rotation is not None:
            out["next_rotation"] = utc_timestamp(next_rotation)
        if self.deletion_date is not None:
            out["deletion_date"] = utc_timestamp(self.deletion_date)
        return out


def _aware(value: datetime | None) -> datetime:
    result = utc(value)
    assert result is not None
    return result


def key_from_rows(row: Row, version_rows: Iterable[Row]) -> Key:
    """Build a Key snapshot from store rows."""
    versions = {
        r["version"]: KeyVersion(
            version=r["version"],
            backend_ref=r["backend_ref"],
            created_at=_aware(r["created_at"]),
            material=r["material"],
            public_key_pem=r["public_key"],
            compromised_since=utc(r["compromised_since"]),
            destroyed_at=utc(r["destroyed_at"]),
            adopted=bool(r["adopted"]),
        )
        for r in version_rows
    }
    period = row["rotation_period_s"]
    return Key(
        name=row["name"],
        type=KeyType(row["type"]),
        purpose=row["purpose"],
        backend=row["backend"],
        state=KeyState(row["state"]),
        labels=dict(row["labels"]),
        primary_version=row["primary_version"],
        min_decrypt_version=row["min_decrypt_version"],
        versions=versions,
        created_at=_aware(row["created_at"]),
        updated_at=_aware(row["updated_at"]),
        verify_only=bool(row["verify_only"]),
        rotation_period=timedelta(seconds=period) if period else None,
        deletion_date=utc(row["deletion_date"]),
        public=bool(row["public"]),
    )


def version_row(v: KeyVersion) -> dict[str, Any]:
    return {
        "version": v.version,
        "backend_ref": v.backend_ref,
        "material": v.material,
        "public_key": v.public_key_pem,
        "created_at": v.created_at,
        "compromised_since": v.compromised_since,
        "destroyed_at": v.destroyed_at,
        "adopted": v.adopted,
    }


def key_row(key: Key) -> dict[str, Any]:
    return {
        "name": key.name,
        "type": key.type.value,
        "purpose": key.purpose,
        "backend": key.backend,
        "state": key.state.value,
        "labels": dict(key.labels),
        "primary_version": key.primary_version,
        "min_decrypt_version": key.min_decrypt_version,
        "rotation_period_s": (
            int(key.rotation_period.total_seconds()) if key.rotation_period else None
        ),
        "deletion_date": key.deletion_date,
        "verify_only": key.verify_only,
        "public": key.public,
        "created_at": key.created_at,
        "updated_at": key.updated_at,
    }


class Catalogue(StoreMirror):
    """All keys in memory; writes go through the store, then update the cache.

    `get` and `find` answer from memory; a name the cache does not know is read through to
    the store (a key created through another worker or replica is usable at once).
    `refresh` follows other writers' changes.
    """

    aggregate = "keys"

    def __init__(
        self, store: Store, *, read_through_per_second: float = READ_THROUGH_PER_SECOND
    ) -> None:
        self._keys: dict[str, Key] = {}
        self._current_reads = TokenBucket(read_through_per_second, read_through_per_second)
        super().__init__(store, read_through_per_second=read_through_per_second)

    def _load(self) -> None:
        self._keys = {row["name"]: key_from_rows(row, rows) for row, rows in self._store.keys.all()}

    def _load_item(self, item: str) -> None:
        found = self._store.keys.get(item)
        if found is None:
            self._keys.pop(item, None)
        else:
            self._keys[item] = key_from_rows(*found)

    def find(self, name: str) -> Key | None:
        """The key called `name`, or None. Raises Unavailable when a miss cannot be read
        through to the store."""
        key = self._keys.get(name)
        if key is None and 0 < len(name) <= MAX_KEY_NAME and self._read_through(name):
            key = self._keys.get(name)
        return key

    def find_current(self, name: str, *, change: bool) -> Key | None:
        """`find`, but read from the store first, as another worker or replica may have
        changed the key since the copy last followed the feed: what a read of the key's
        record shows and what a change to it is decided on. The store is read at most
        `READ_THROUGH_PER_SECOND` times a second for this (a budget of its own, apart from
        the misses'); past it, or while the store cannot be read, a read gets the copy and
        a `change` raises Unavailable (never decided on a copy that may be behind)."""
        if not 0 < len(name) <= MAX_KEY_NAME:
            return None
        if not self._current_reads.take():
            if change:
                raise Unavailable("too many key changes at once; retry")
            return self._keys.get(name)
        try:
            with self._lock:
                self._load_item(name)
        except Unavailable:
            if change:
                raise
        return self._keys.get(name)

    def holds(self, name: str, backend: str, ref: str) -> bool:
        """Whether key `name`, as the store holds it now, has a version that is the key
        `ref` of backend `backend`. Raises Unavailable."""
        found = self._store.keys.get(name)
        if found is None:
            return False
        key = key_from_rows(*found)
        return key.backend == backend and any(v.backend_ref == ref for v in key.versions.values())

    def cached(self, name: str) -> Key | None:
        """The key called `name` if this cache holds it; never asks the store (for public,
        unauthenticated lookups)."""
        return self._keys.get(name)

    def get(self, name: str) -> Key:
        """The key called `name`. Raises NotFound, or Unavailable (see `find`)."""
        key = self.find(name)
        if key is None:
            raise NotFound(f"no key named {name!r}")
        return key

    def all(self) -> list[Key]:
        return sorted(self._keys.values(), key=lambda k: k.name)

    def _store_and_cache(self, write: Callable[[], None], new: Key) -> Key:
        with self._lock:  # a concurrent reload must not swap in a snapshot older than this
            write()
            self._keys[new.name] = new
        return new

    def insert(self, key: Key) -> Key:
        """Persist a new key with its versions. Raises Conflict if the name is taken."""
        rows = [version_row(v) for v in key.versions.values()]
        return self._store_and_cache(lambda: self._store.keys.insert(key_row(key), rows), key)

    def add_version(self, key: Key, version: KeyVersion, now: datetime) -> Key:
        """Persist a new primary version. Raises Conflict if the key was rotated, disabled
        or scheduled for deletion meanwhile."""
        new = replace(
            key,
            versions={**key.versions, version.version: version},
            primary_version=version.version,
            updated_at=now,
        )
        return self._store_and_cache(
            lambda: self._store.keys.add_version(
                key.name,
                version_row(version),
                expected_primary=key.primary_version,
                expected_state=key.state.value,
            ),
            new,
        )

    def empty_log(self) -> bool:
        """`Database.empty_log` on the key store: no copy of destroyed material left in its
        files that it can remove. False if readers kept it from doing so now. Raises
        Unavailable."""
        return self._store.empty_log()

    def update(self, key: Key, **changes: Any) -> Key:
        """Persist changed key fields, only if the stored state is still `key.state` (and,
        for a key pending deletion, its deletion date still `key.deletion_date`: a deletion
        cancelled and scheduled again is another one).

        Raises Conflict if another writer changed them meanwhile.
        """
        new = replace(key, **changes)
        values = {k: v for k, v in key_row(new).items() if k in {*changes, "updated_at"}}
        if "rotation_period" in changes:
            values["rotation_period_s"] = key_row(new)["rotation_period_s"]
        expected: dict[str, object] = {"state": key.state.value}
        if key.state is KeyState.PENDING_DELETION:
            expected["deletion_date"] = key.deletion_date
        return self._store_and_cache(
            lambda: self._store.keys.update(key.name, values, expected=expected), new
        )

    def update_version(self, key: Key, number: int, **changes: Any) -> Key:
        """Persist the changed fields of version `number` (only those; each field is named
        as its column), only while the stored key is still in `key.state` and the version
        is not destroyed. Raises Conflict if not."""
        version = replace(key.versions[number], **changes)
        new = replace(key, versions={**key.versions, number: version})
        row = version_row(version)
        values = {field: row[field] for field in changes}
        return self._store_and_cache(
            lambda: self._store.keys.update_version(
                key.name, number, values, expected_state=key.state.value
            ),
            new,
        )
