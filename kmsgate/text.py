"""Text a person reads (a listing, a reason, a certificate's subject, a PEM document): the
characters that must never reach it as they are; what a key's name may be; how a time is
written."""

from __future__ import annotations

import re
from datetime import UTC, datetime

HIDDEN = (
    r"\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"
    r"\u2028\u2029\u200b\u200e\u200f\u061c\ufeff\u00ad"
)
"""Control characters (C0, DEL, C1), the bidirectional embeddings, overrides, isolates and
marks, the line and paragraph separators, and the invisible ones that join nothing (zero
width space, BOM, soft hyphen), as a regex character-class body (the OpenAPI document's
patterns use it too: plain code points, as every regex dialect reads them): in free text
they forge rows in a listing or hide what a reviewer reads. The zero width joiners, which
some scripts need, are not among them."""
_HIDDEN_CHARACTER = re.compile(f"[{HIDDEN}]")


def several_pem_blocks(value: str) -> bool:
    """Whether `value` holds more than one PEM block: a reader of PEM takes the first and
    ignores the rest, so two would let a reviewer see another key or request than the one
    used."""
    return value.count("-----BEGIN ") > 1


def has_hidden(value: str) -> bool:
    """Whether `value` holds one of the `HIDDEN` characters."""
    return _HIDDEN_CHARACTER.search(value) is not None


def shown(value: str) -> str:
    """`value` with each `HIDDEN` character written as its escape (`\\n`, `\\u202e`)."""
    return _HIDDEN_CHARACTER.sub(lambda m: m.group().encode("unicode_escape").decode(), value)


def quoted(value: str, limit: int = 64) -> str:
    """A caller's `value` as an error detail echoes it: quoted, cut to its first `limit`
    characters (then `...`: a detail never grows with the request), and every character
    that is not printable (`HIDDEN` ones among them) escaped, as `repr` writes them."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


MAX_PRINCIPAL_ID = 256
"""The longest principal id (`token:<id>`, `<issuer>:<sub>`, a SPIFFE ID) the gateway takes:
the store's columns that name a principal (a grant's, a certificate's owner) hold no more."""

KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""What a key's name may be (`fullmatch`): a name in a request path that is not one names no
key, and is refused before it reaches a policy decision, an audit record or a log line."""

CA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
"""What a CA's name may be (`fullmatch`); refused like a `KEY_NAME` that is not one."""


def utc_timestamp(when: datetime) -> str:
    """`when` (aware) as RFC 3339 in UTC with `Z` and microseconds, the one way replies,
    audit records, signed statements and log lines write a time
    (`2026-12-04T20:33:27.318024Z`): fixed width, so such times sort as text."""
    return when.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
