"""Text a person reads (a listing, a reason, a certificate's subject): the characters that
must never reach it as they are; and what a key's name may be."""

from __future__ import annotations

import re

HIDDEN = r"\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"
"""Control characters (C0, DEL, C1) and the bidirectional embeddings, overrides and isolates
(a regex character-class body): in free text they forge rows in a listing or hide what a
reviewer reads."""
_HIDDEN_CHARACTER = re.compile(f"[{HIDDEN}]")


def has_hidden(value: str) -> bool:
    """Whether `value` holds one of the `HIDDEN` characters."""
    return _HIDDEN_CHARACTER.search(value) is not None


def shown(value: str) -> str:
    """`value` with each `HIDDEN` character written as its escape (`\\n`, `\\u202e`)."""
    return _HIDDEN_CHARACTER.sub(lambda m: m.group().encode("unicode_escape").decode(), value)


KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""What a key's name may be (`fullmatch`): a name in a request path that is not one names no
key, and is refused before it reaches a policy decision, an audit record or a log line."""

CA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
"""What a CA's name may be (`fullmatch`); refused like a `KEY_NAME` that is not one."""
