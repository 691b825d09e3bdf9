"""SPIFFE IDs (the SPIFFE ID specification, section 2): what one may be."""

from __future__ import annotations

import re

__all__ = ["SPIFFE_PREFIX", "is_spiffe_id"]

SPIFFE_PREFIX = "spiffe://"
_MAX_BYTES = 2048
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def is_spiffe_id(value: str) -> bool:
    """Whether `value` is a SPIFFE ID: `spiffe://`, a trust domain of lower-case letters,
    digits, `.`, `_` and `-`, then a path (possibly none) of segments of letters, digits,
    `.`, `_` and `-`, none empty, `.` or `..`; no port, user, query or fragment; at most
    2048 bytes."""
    if not value.startswith(SPIFFE_PREFIX) or len(value.encode()) > _MAX_BYTES:
        return False
    domain, slash, path = value[len(SPIFFE_PREFIX) :].partition("/")
    if not _TRUST_DOMAIN.fullmatch(domain):
        return False
    if not slash:
        return True
    return all(_SEGMENT.fullmatch(s) and s not in (".", "..") for s in path.split("/"))
