"""Backend key references: `<scheme>:<rest>` strings, and the PKCS#11 URI of RFC 7512.

A `BackendKey.ref` names one key version inside a backend (`softkms:<name>/<version>`,
`pkcs11:token=...;id=%01;type=private`, ...). `split_ref` gives its scheme; the percent
codecs here are shared by every scheme whose references carry percent-encoded values.

`Pkcs11Uri.parse` is a strict reader of RFC 7512 section 2.3:

- attribute names are ABNF literals, so they match case-insensitively (RFC 5234 section 2.3)
  and are kept in lower case; a name given twice (in any case) is refused;
- every value is percent-decoded to bytes; a `%` not followed by two hex digits, a character
  outside the component's allowed set (pk11-pchar in the path, pk11-qchar in the query), or a
  text attribute that is not UTF-8 is refused;
- a name outside RFC 7512 is refused unless the caller allows it as a vendor attribute;
- `library-version`, `slot-id` and `type` are checked against their grammar.

`Pkcs11Uri.parse_key_reference` additionally refuses everything a *key reference* must not
carry: the PIN (`pin-value`, `pin-source`) and the module (`module-path`, `module-name`) come
from configuration only, never from a reference a client or a ceremony tool supplied.

Error messages name attributes, never values: a reference may hold a PIN.
"""

from __future__ import annotations

import string
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from kmsgate.errors import InvalidRequest

__all__ = [
    "OBJECT_TYPES",
    "PATH_ATTRIBUTES",
    "PKCS11_SCHEME",
    "QUERY_ATTRIBUTES",
    "Pkcs11Uri",
    "percent_decode",
    "percent_encode",
    "split_ref",
]

MAX_REF_LENGTH = 4096
"""Longer references are refused before any parsing."""

PKCS11_SCHEME = "pkcs11"

# RFC 3986 section 2.3 unreserved characters.
UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# RFC 7512 section 2.3: reserved characters that need no encoding inside a component value.
_PK11_RES_AVAIL = frozenset(":[]@!$'()*+,=")
PATH_CHARS = UNRESERVED | _PK11_RES_AVAIL | {"&"}
"""pk11-pchar without pct-encoded: what a path value may hold unencoded."""
QUERY_CHARS = UNRESERVED | _PK11_RES_AVAIL | {"/", "?", "|"}
"""pk11-qchar without pct-encoded: what a query value may hold unencoded."""
_VENDOR_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "-_")
_HEX = frozenset(string.hexdigits)

# Path attributes in the order `format` writes them.
PATH_ATTRIBUTES: tuple[str, ...] = (
    "library-manufacturer",
    "library-description",
    "library-version",
    "slot-manufacturer",
    "slot-description",
    "slot-id",
    "manufacturer",
    "model",
    "serial",
    "token",
    "object",
    "id",
    "type",
)
QUERY_ATTRIBUTES: tuple[str, ...] = ("pin-source", "pin-value", "module-name", "module-path")
OBJECT_TYPES: tuple[str, ...] = ("public", "private", "cert", "secret-key", "data")

# Values that are opaque bytes; every other standard value is UTF-8 text.
_BINARY_ATTRIBUTES = frozenset({"id"})
# Attributes whose grammar has no pct-encoded alternative.
_PLAIN_ATTRIBUTES = frozenset({"library-version", "slot-id", "type"})
_KEY_REFERENCE_FORBIDDEN = frozenset(QUERY_ATTRIBUTES)
_MAX_SLOT_ID = 2**64 - 1


def split_ref(ref: str) -> tuple[str, str]:
    """`(scheme, rest)` of a backend reference; the scheme in lower case.

    Raises InvalidRequest if there is no RFC 3986 scheme or the reference is too long.
    """
    if len(ref) > MAX_REF_LENGTH:
        raise InvalidRequest(f"key reference longer than {MAX_REF_LENGTH} characters")
    scheme, sep, rest = ref.partition(":")
    if (
        not sep
        or not scheme
        or scheme[0] not in string.ascii_letters
        or not all(c in string.ascii_letters + string.digits + "+-." for c in scheme)
    ):
        raise InvalidRequest("key reference has no scheme (expected '<scheme>:...')")
    return scheme.lower(), rest


def percent_decode(text: str, allowed: Collection[str], what: str) -> bytes:
    """The bytes `text` spells with RFC 3986 percent-encoding.

    Every character must be in `allowed` or be part of a `%HH` triplet (either case).
    Raises InvalidRequest naming `what` (never echoing `text`).
    """
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == "%":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or not all(h in _HEX for h in pair):
                raise InvalidRequest(f"{what}: '%' must be followed by two hex digits")
            out.append(int(pair, 16))
            i += 3
            continue
        if c not in allowed:
            raise InvalidRequest(f"{what}: character {_describe(c)} must be percent-encoded")
        out.append(ord(c))
        i += 1
    return bytes(out)


def percent_encode(value: bytes, safe: Collection[str] = UNRESERVED) -> str:
    """`value` with every byte outside `safe` (ASCII characters) written as `%HH`."""
    return "".join(
        chr(b) if b < 0x80 and chr(b) in safe and chr(b) != "%" else f"%{b:02X}" for b in value
    )


def _describe(c: str) -> str:
    return repr(c) if c.isprintable() and c.isascii() else f"U+{ord(c):04X}"


@dataclass(frozen=True, slots=True)
class Pkcs11Uri:
    """A parsed RFC 7512 PKCS#11 URI: percent-decoded path and query attributes.

    Build one with `parse` / `parse_key_reference`, or directly (then `format` writes it).
    Attribute names are lower case; values are the decoded bytes.
    """

    path: Mapping[str, bytes] = field(default_factory=dict)
    query: Mapping[str, bytes] = field(default_factory=dict)

    # -- reading ---------------------------------------------------------------------------

    @classmethod
    def parse(cls, uri: str, *, vendor_attributes: Collection[str] = ()) -> Pkcs11Uri:
        """Parse `uri` strictly (see the module docstring).

        `vendor_attributes` names the non-standard attributes the caller understands (in
        either component); any other unknown name is refused.
        Raises InvalidRequest.
        """
        scheme, rest = split_ref(uri)
        if scheme != PKCS11_SCHEME:
            raise InvalidRequest(f"not a PKCS#11 URI (scheme {scheme!r}, expected 'pkcs11')")
        if "#" in rest:
            raise InvalidRequest("a PKCS#11 URI has no fragment: '#' must be percent-encoded")
        path_text, has_query, query_text = rest.partition("?")
        vendors = {name.lower() for name in vendor_attributes}
        for name in vendors:
            if name in PATH_ATTRIBUTES or name in QUERY_ATTRIBUTES:
                raise ValueError(f"{name!r} is a standard attribute, not a vendor attribute")
        path = cls._component(path_text, ";", PATH_ATTRIBUTES, PATH_CHARS, "path", vendors)
        query: dict[str, bytes] = {}
        if has_query:
            if not query_text:
                raise InvalidRequest("PKCS#11 URI has an empty query after '?'")
            query = cls._component(query_text, "&", QUERY_ATTRIBUTES, QUERY_CHARS, "query", vendors)
        return cls(path, query)

    @classmethod
    def parse_key_reference(cls, uri: str, *, vendor_attributes: Collection[str] = ()) -> Pkcs11Uri:
        """Parse a reference to one key: `parse`, then refuse `pin-value`, `pin-source`,
        `module-path` and `module-name` (configuration only), any query attribute, and a
        reference that names no object (neither `id` nor `object`).

        Raises InvalidRequest.
        """
        parsed = cls.parse(uri, vendor_attributes=vendor_attributes)
        for name in sorted(parsed.query):
            if name in _KEY_REFERENCE_FORBIDDEN:
                raise InvalidRequest(
                    f"'{name}' is not allowed in a key reference: the PKCS#11 module and PIN "
                    "come from the backend configuration"
                )
            raise InvalidRequest(f"query attribute '{name}' is not allowed in a key reference")
        if "id" not in parsed.path and "object" not in parsed.path:
            raise InvalidRequest("a key reference must name the object by 'id' or 'object'")
        return parsed

    @staticmethod
    def _component(
        text: str,
        separator: str,
        standard: tuple[str, ...],
        allowed: frozenset[str],
        component: str,
        vendors: set[str],
    ) -> dict[str, bytes]:
        attributes: dict[str, bytes] = {}
        if not text:
            return attributes
        other = QUERY_ATTRIBUTES if component == "path" else PATH_ATTRIBUTES
        for item in text.split(separator):
            if not item:
                raise InvalidRequest(f"PKCS#11 URI {component} has an empty attribute")
            raw_name, has_value, raw_value = item.partition("=")
            if not has_value:
                raise InvalidRequest(f"PKCS#11 URI {component} attribute without '='")
            if not raw_name or not all(c in _VENDOR_NAME_CHARS for c in raw_name):
                raise InvalidRequest(f"PKCS#11 URI {component} has a malformed attribute name")
            name = raw_name.lower()
            if name in other:
                raise InvalidRequest(
                    f"'{name}' belongs in the {'query' if component == 'path' else 'path'} "
                    f"of a PKCS#11 URI, not the {component}"
                )
            if name not in standard and name not in vendors:
                raise InvalidRequest(f"unknown PKCS#11 URI attribute '{name}'")
            if name in attributes:
                raise InvalidRequest(f"PKCS#11 URI attribute '{name}' appears more than once")
            attributes[name] = _decode_value(name, raw_value, allowed)
        return attributes

    # -- typed access ----------------------------------------------------------------------

    def text(self, name: str) -> str | None:
        """A path attribute as text (None if absent). Raises InvalidRequest if not UTF-8."""
        value = self.path.get(name)
        return None if value is None else _utf8(name, value)

    @property
    def token(self) -> str | None:
        return self.text("token")

    @property
    def serial(self) -> str | None:
        return self.text("serial")

    @property
    def object(self) -> str | None:
        """The object label (CKA_LABEL)."""
        return self.text("object")

    @property
    def id(self) -> bytes | None:
        """The object id (CKA_ID), raw bytes."""
        return self.path.get("id")

    @property
    def type(self) -> str | None:
        """`public`, `private`, `cert`, `secret-key` or `data`."""
        return self.text("type")

    @property
    def slot_id(self) -> int | None:
        value = self.text("slot-id")
        return None if value is None else int(value)

    # -- writing ---------------------------------------------------------------------------

    def format(self) -> str:
        """The URI text: standard path attributes in a fixed order, then vendor ones sorted;
        `id` fully percent-encoded, other values encoded where RFC 7512 requires it.

        Raises InvalidRequest for a value the grammar cannot carry (bad `type`, ...).
        """
        path = self._format_component(self.path, PATH_ATTRIBUTES, PATH_CHARS, ";")
        query = self._format_component(self.query, QUERY_ATTRIBUTES, QUERY_CHARS, "&")
        return f"{PKCS11_SCHEME}:{path}" + (f"?{query}" if query else "")

    @staticmethod
    def _format_component(
        attributes: Mapping[str, bytes],
        standard: tuple[str, ...],
        safe: frozenset[str],
        separator: str,
    ) -> str:
        ordered = [n for n in standard if n in attributes]
        ordered += sorted(n for n in attributes if n not in standard)
        parts = []
        for name in ordered:
            if name != name.lower() or not all(c in _VENDOR_NAME_CHARS for c in name):
                raise InvalidRequest("PKCS#11 URI attribute names are lower-case ASCII")
            value = attributes[name]
            if name in _PLAIN_ATTRIBUTES:
                encoded = value.decode("ascii", errors="replace")
                _decode_value(name, encoded, safe)  # checks the grammar
            elif name in _BINARY_ATTRIBUTES:
                encoded = percent_encode(value, safe=())
            else:
                encoded = percent_encode(value, safe)
            parts.append(f"{name}={encoded}")
        return separator.join(parts)

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        # never show query values (a PIN may be there)
        return f"Pkcs11Uri(path={sorted(self.path)}, query={sorted(self.query)})"


def _decode_value(name: str, raw: str, allowed: frozenset[str]) -> bytes:
    what = f"PKCS#11 URI attribute '{name}'"
    if name == "library-version":
        major, dot, minor = raw.partition(".")
        if not (major.isdigit() and major.isascii()) or (
            dot and not (minor.isdigit() and minor.isascii())
        ):
            raise InvalidRequest(f"{what} must be digits with an optional '.digits'")
        return raw.encode()
    if name == "slot-id":
        if not (raw.isdigit() and raw.isascii()) or int(raw) > _MAX_SLOT_ID:
            raise InvalidRequest(f"{what} must be a decimal slot number")
        return raw.encode()
    if name == "type":
        if raw.lower() not in OBJECT_TYPES:
            raise InvalidRequest(f"{what} must be one of {', '.join(OBJECT_TYPES)}")
        return raw.lower().encode()
    value = percent_decode(raw, allowed, what)
    if name not in _BINARY_ATTRIBUTES and (name in PATH_ATTRIBUTES or name in QUERY_ATTRIBUTES):
        _utf8(name, value)
    return value


def _utf8(name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"PKCS#11 URI attribute '{name}' is not UTF-8 text") from None
