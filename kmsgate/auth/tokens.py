"""API tokens: the first authenticator.

A token reads `kmg.<id>.<secret>`: the id (public, 16 hex) finds the record, the secret
(256 random bits) is checked against its stored SHA-256 in constant time. Only hashes are
stored; the full token is shown once, at creation. Tokens are cached in memory and the
cache follows the store's change feed for tokens, so authentication waits on the database
only for a token id it has never seen (within the read-through budget).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Final

from kmsgate.auth.authenticator import Credentials
from kmsgate.auth.principal import Principal
from kmsgate.errors import InvalidRequest, NotFound, Unauthenticated
from kmsgate.store import READ_THROUGH_PER_SECOND, Row, Store, StoreMirror, utc
from kmsgate.text import utc_timestamp

_PREFIX = "kmg"
_ID = re.compile(r"[0-9a-f]{16}")
"""A token's id: 8 random bytes in hex (not secret: lists, logs and audit records show it)."""


def token_id_of(text: str) -> str | None:
    """The token id `text` is, or names as a whole token (`kmg.<id>.<secret>`); None if
    it is neither."""
    parts = text.split(".")
    candidate = parts[1] if len(parts) == 3 and parts[0] == _PREFIX else text
    return candidate if _ID.fullmatch(candidate) else None


_ROLE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.:")
_MAX_ROLES = 32
_TOKEN_ID = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: str
    roles: tuple[str, ...]
    description: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    secret_hash: str = field(repr=False)
    created_by: str | None = None
    """The principal that made it; None for a token made before kmsgate recorded makers."""
    parent: str | None = None
    """The id of the token whose revocation revokes this one: the token that made it,
    unless it was made an orphan (or by a principal that is no token)."""
    session_start: str = field(init=False, repr=False, compare=False)
    """When the token's session began, as policies read it (`claims.session_start`, RFC
    3339): its creation (formatted once, not on every request)."""
    ends: str | None = field(init=False, repr=False, compare=False)
    """When it expires, as policies read it (`claims.expires_at`, RFC 3339), or None."""

    def __post_init__(self) -> None:
        started = utc_timestamp(self.created_at)
        object.__setattr__(self, "session_start", started)
        ends = utc_timestamp(self.expires_at) if self.expires_at else None
        object.__setattr__(self, "ends", ends)

    def to_dict(self) -> dict[str, object]:
        """The REST representation: never the secret or its hash."""
        return {
            "id": self.id,
            "roles": list(self.roles),
            "description": self.description,
            "created_at": utc_timestamp(self.created_at),
            "expires_at": utc_timestamp(self.expires_at) if self.expires_at else None,
            "revoked_at": utc_timestamp(self.revoked_at) if self.revoked_at else None,
            "created_by": self.created_by,
            "parent": self.parent,
        }


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def validate_roles(roles: Sequence[str]) -> tuple[str, ...]:
    """Roles as a sorted tuple. Raises InvalidRequest for none, too many or odd characters."""
    if not roles or len(roles) > _MAX_ROLES:
        raise InvalidRequest(f"a token needs 1 to {_MAX_ROLES} roles")
    for role in roles:
        if not role or len(role) > 64 or not set(role) <= _ROLE_CHARS:
            raise InvalidRequest(f"invalid role {role!r}: use [a-z0-9-_.:], 1-64 characters")
    return tuple(sorted(set(roles)))


def _info_from_row(row: Row) -> TokenInfo:
    created = utc(row["created_at"])
    assert created is not None
    return TokenInfo(
        id=row["id"],
        roles=tuple(row["roles"]),
        description=row["description"],
        created_at=created,
        expires_at=utc(row["expires_at"]),
        revoked_at=utc(row["revoked_at"]),
        secret_hash=row["secret_hash"],
        created_by=row["created_by"],
        parent=row["parent"],
    )


class TokenRegistry(StoreMirror):
    """Issues, caches, checks and revokes API tokens."""

    aggregate = "tokens"

    def __init__(
        self, store: Store, *, read_through_per_second: float = READ_THROUGH_PER_SECOND
    ) -> None:
        self._tokens: dict[str, TokenInfo] = {}
        super().__init__(store, read_through_per_second=read_through_per_second)

    def _load(self) -> None:
        self._tokens = {row["id"]: _info_from_row(row) for row in self._store.tokens.all()}

    def _load_item(self, item: str) -> None:
        self._load_items([item])

    reads_in_batches = True

    def _load_items(self, items: list[str]) -> None:
        rows = self._store.tokens.get_many(items)
        for item in items:
            row = rows.get(item)
            if row is None:
                self._tokens.pop(item, None)
            else:
                self._tokens[item] = _info_from_row(row)

    def _find(self, token_id: str) -> TokenInfo | None:
        """The token `token_id` from memory, or read through to the store (a token created
        through another worker or replica works at once). Raises Unavailable."""
        info = self._tokens.get(token_id)
        if info is None and _TOKEN_ID.fullmatch(token_id) and self._read_through(token_id):
            info = self._tokens.get(token_id)
        return info

    def create(
        self,
        roles: Sequence[str],
        *,
        ttl: timedelta | None,
        description: str = "",
        created_by: str | None = None,
        parent: str | None = None,
    ) -> tuple[TokenInfo, str]:
        """A new token made by the principal `created_by` (None: not known), and its
        one-time secret string; revoking the token `parent` will revoke it. Raises
        InvalidRequest for bad roles, Unauthenticated if `parent` was revoked meanwhile."""
        if ttl is not None and ttl <= timedelta(0):
            raise InvalidRequest("ttl must be positive")
        if len(description) > 256:
            raise InvalidRequest("description is longer than 256 characters")
        now = datetime.now(UTC)
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        info = TokenInfo(
            id=token_id,
            roles=validate_roles(roles),
            description=description,
            created_at=now,
            expires_at=now + ttl if ttl else None,
            revoked_at=None,
            secret_hash=_hash_secret(secret),
            created_by=created_by,
            parent=parent,
        )
        with self._lock:  # a concurrent reload must not drop this token
            self._insert(info)
        return info, f"{_PREFIX}.{token_id}.{secret}"

    def _insert(self, info: TokenInfo) -> None:
        self._store.tokens.insert(
            {
                "id": info.id,
                "secret_hash": info.secret_hash,
                "roles": list(info.roles),
                "description": info.description,
                "created_at": info.created_at,
                "expires_at": info.expires_at,
                "revoked_at": None,
                "created_by": info.created_by,
                "parent": info.parent,
            }
        )
        self._tokens[info.id] = info

    kind: Final = "token"

    def authenticate(self, credentials: Credentials) -> Principal | None:
        """The principal the bearer token stands for; None without a bearer token or for
        another kind of bearer (an OIDC JWT).

        Raises Unauthenticated (one message for every failure, so a caller learns nothing
        about which part was wrong)."""
        if credentials.bearer is None or not credentials.bearer.startswith(_PREFIX + "."):
            return None  # no bearer, or another kind's (an OIDC JWT)
        parts = credentials.bearer.split(".")
        token_id, secret = (parts[1], parts[2]) if len(parts) == 3 else ("", "")
        info = self._find(token_id) if parts[0] == _PREFIX else None
        expected = info.secret_hash if info else "0" * 64
        matches = hmac.compare_digest(_hash_secret(secret), expected)
        if info is None or not matches or not self._is_live(info):
            raise Unauthenticated("missing, invalid, expired or revoked token")
        return Principal(
            id=f"token:{info.id}",
            kind="token",
            roles=info.roles,
            claims={"session_start": info.session_start, "expires_at": info.ends},
        )

    @staticmethod
    def _is_live(info: TokenInfo) -> bool:
        now = datetime.now(UTC)
        return info.revoked_at is None and (info.expires_at is None or now < info.expires_at)

    def list(self) -> list[TokenInfo]:
        return sorted(self._tokens.values(), key=lambda t: t.created_at)

    def get(self, token_id: str) -> TokenInfo | None:
        """The token `token_id` (live or not), or None. Raises Unavailable."""
        return self._find(token_id)

    def any_ended_before(self, moment: datetime) -> bool:
        """Whether a token known here was revoked, or expired, before `moment`."""
        return any(
            end is not None and end < moment
            for info in list(self._tokens.values())
            for end in (info.revoked_at, info.expires_at)
        )

    def delete_ended(self, ended_before: datetime, most: int) -> Sequence[str]:
        """Forget at most `most` tokens that expired or were revoked before `ended_before`
        (their rows deleted: every process drops them as it follows the store); their ids.
        Raises Unavailable."""
        deleted = self._store.tokens.delete_ended(ended_before, most)
        with self._lock:
            for token_id in deleted:
                self._tokens.pop(token_id, None)
        return deleted

    def revoke(self, token_id: str) -> tuple[TokenInfo, Sequence[str]]:
        """Revoke a token at once, and the tokens it made, theirs, and so on (not those made
        orphans): the token, and the ids of the others it ended. Raises NotFound if no live
        token has that id."""
        now = datetime.now(UTC)
        revoked = self._store.tokens.revoke(token_id, now)
        if not revoked:
            raise NotFound(f"no live token with id {token_id!r}")
        with self._lock:  # as the store now holds them, without reading each back
            self._load_item(token_id)
            for child in revoked[1:]:
                info = self._tokens.get(child)
                if info is not None:
                    self._tokens[child] = replace(info, revoked_at=now)
            return self._tokens[token_id], revoked[1:]
