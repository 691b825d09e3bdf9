"""Base64 as the REST API writes it: standard alphabet, with padding. Shared by the server's
edge, the SDK and the model-signing client, so it depends on nothing but the standard library."""

from __future__ import annotations

import base64
import binascii
import re

_B64_RE = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")


def b64decode_strict(value: str) -> bytes:
    """Decode standard base64 with padding. Raises ValueError for anything else."""
    if len(value) % 4 or not _B64_RE.match(value):
        raise ValueError("not standard base64 with padding")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError("not standard base64 with padding") from exc


def b64encode(value: bytes) -> str:
    """`value` as standard base64 with padding."""
    return base64.b64encode(value).decode("ascii")
