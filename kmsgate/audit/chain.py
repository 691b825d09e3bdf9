"""How records are hashed and chained, whatever stores them.

A record's ``hash`` is the sha256 of its canonical JSON without ``hash`` (sorted keys, no
spaces, UTF-8), and its ``prev`` is the previous record's hash; the stored line is that
canonical JSON with ``"hash"`` appended as the last member.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

import orjson

__all__ = ["GENESIS_HASH", "canonical", "decode", "seal_problem", "sealed_line"]

GENESIS_HASH = "0" * 64
"""The ``prev`` of the first record."""

_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
_ORJSON_OPTIONS = (
    orjson.OPT_SORT_KEYS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
)


def _is_plain(values: Iterable[object]) -> bool:
    """True if only str, int, bool, None, dict, list and tuple occur (exact types, any depth)."""
    for value in values:
        kind = type(value)
        if kind is str or kind is int or kind is bool or value is None:
            continue
        if type(value) is dict:
            if not _is_plain(value.values()):
                return False
        elif type(value) is list or type(value) is tuple:
            if not _is_plain(value):
                return False
        else:
            return False
    return True


def canonical(obj: Mapping[str, object]) -> bytes:
    """``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()``.

    For plain values orjson emits the same bytes about ten times faster, so it is used
    for them; floats (formatted differently), subclasses, non-str keys and ints beyond 64
    bits go through the json module. Raises TypeError/ValueError if JSON cannot encode obj.
    """
    if _is_plain(obj.values()):
        try:
            return orjson.dumps(obj, option=_ORJSON_OPTIONS)
        except TypeError:
            pass
    return _ENCODER.encode(obj).encode()


def sealed_line(body: bytes, digest: str) -> bytes:
    """The stored line (without newline): canonical body with ``"hash"`` appended last."""
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}'


def decode(raw: bytes) -> dict[str, object]:
    """Parse one line (newline stripped). Raises ValueError if it is not a JSON object."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ValueError("not valid JSON") from exc
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


def seal_problem(raw: bytes, record: Mapping[str, object]) -> str | None:
    """Why `raw` (newline stripped) is not a correctly sealed record, or None if it is."""
    seq, prev, digest = record.get("seq"), record.get("prev"), record.get("hash")
    if type(seq) is not int or not isinstance(prev, str) or not isinstance(digest, str):
        return "missing or malformed seq/prev/hash"
    try:
        body = canonical({k: v for k, v in record.items() if k != "hash"})
    except (TypeError, ValueError):
        return "not in canonical form (edited)"
    if hashlib.sha256(body).hexdigest() != digest:
        return "hash mismatch (edited)"
    if sealed_line(body, digest) != raw:
        return "not in canonical form (edited)"
    return None
