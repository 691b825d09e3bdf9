"""Base64 as the REST API writes it: standard alphabet, with padding. Shared by the server's
edge, the SDK and the model-signing client, so it depends on nothing but the standard library."""

from __future__ import annotations

import base64
import binascii
import re

B64_PATTERN = (
    r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$"
)
"""Canonical standard base64 with padding (RFC 4648 3.5: the bits the padding leaves over
are zero, so one byte string has one encoding), as a regular expression and a JSON Schema
pattern."""
_B64_RE = re.compile(B64_PATTERN)


def b64decode_strict(value: str) -> bytes:
    """Decode canonical standard base64 with padding. Raises ValueError for anything else
    (`aGl=` is not `aGk=`)."""
    if not _B64_RE.match(value):
        raise ValueError("not standard base64 with padding")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError("not standard base64 with padding") from exc


def b64encode(value: bytes) -> str:
    """`value` as standard base64 with padding."""
    return base64.b64encode(value).decode("ascii")
