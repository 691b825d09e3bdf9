"""Base64 as the REST API writes it: standard alphabet, with padding. Shared by the server's
edge, the SDK and the model-signing client, so it depends on nothing but the standard library."""

from __future__ import annotations

import base64
import binascii

B64_PATTERN = (
    r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$"
)
"""Canonical standard base64 with padding (RFC 4648 3.5: the bits the padding leaves over
are zero, so one byte string has one encoding), as a regular expression and a JSON Schema
pattern."""
_NOT_STANDARD = "not standard base64 with padding"
_LAST_BEFORE_TWO_PADS = frozenset("AQgw")
_LAST_BEFORE_ONE_PAD = frozenset("AEIMQUYcgkosw048")
"""The characters that may end canonical base64 before its padding (unused bits zero)."""


def b64decode_strict(value: str) -> bytes:
    """Decode canonical standard base64 with padding: what `B64_PATTERN` matches (checked in
    C, without the regular expression, which costs ~10 us per KiB). Raises ValueError for
    anything else (`aGl=` is not `aGk=`)."""
    if len(value) % 4:  # binascii's strict mode lets `AAAA=` through
        raise ValueError(_NOT_STANDARD)
    try:
        decoded = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError: a character that is not ASCII
        raise ValueError(_NOT_STANDARD) from None
    if value.endswith("=="):
        canonical = value[-3] in _LAST_BEFORE_TWO_PADS
    else:
        canonical = not value.endswith("=") or value[-2] in _LAST_BEFORE_ONE_PAD
    if not canonical:
        raise ValueError(_NOT_STANDARD)
    return decoded


def b64encode(value: bytes) -> str:
    """`value` as standard base64 with padding."""
    return base64.b64encode(value).decode("ascii")
