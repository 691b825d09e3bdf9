"""Envelope formats: the server-side ciphertext, the streaming file header, and the canonical
encoding of encryption contexts. Byte layouts are documented in docs/formats.md.

Server-side ciphertext (`encrypt`, `datakey`), all integers big-endian:

    "KGE" | 0x01 format | kind (1 message, 2 data key) | u8 len + key name
    | u32 key version | u16 len + wrapped DEK | [message: 12-byte nonce | AES-256-GCM body]

The DEK is wrapped by the key's backend (`WrapCapable.wrap`) with AAD = `wrap_aad(...)`,
which binds the kind, key name, key version and context. The message body is sealed under
the DEK with AAD = `data_aad(context)`, which does not name the key: `rewrap` replaces only
the wrapped DEK (and the name and version), never the body.

Streaming file (`kmsgate encrypt-file`):

    "KMSGATE\\n" | 0x01 format | u16 len + canonical context        <- bound part
    | u16 len + data-key ciphertext (a kind-2 server-side ciphertext)
    | C2SP chunked-encryption body (Cobblestone-256)

The body's input key is the data key and its context is the bound part of the header
(everything before the data-key ciphertext), so a migration to another key rewrites only
the data-key field.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsgate.errors import DecryptionFailed, InvalidRequest

MAGIC: Final = b"KGE"
FORMAT_VERSION: Final = 1
DEK_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
MAX_KEY_NAME: Final = 128
MAX_WRAPPED: Final = 4096
MAX_CONTEXT_ENTRIES: Final = 32
MAX_CONTEXT_STRING: Final = 256

FILE_MAGIC: Final = b"KMSGATE\n"
FILE_FORMAT_VERSION: Final = 1
MAX_FILE_HEADER: Final = 8 + 1 + 2 + 0xFFFF + 2 + 0xFFFF

_WRAP_DOMAIN: Final = b"kmsgate/envelope/v1/dek\x00"
_DATA_DOMAIN: Final = b"kmsgate/envelope/v1/data\x00"


class Kind(enum.IntEnum):
    MESSAGE = 1
    DATA_KEY = 2


def check_context(context: Mapping[str, str] | None) -> dict[str, str]:
    """A copy of `context`, checked: at most 32 entries, keys 1-256 and values 0-256
    characters, valid Unicode. Raises ValueError."""
    if context is None:
        return {}
    if len(context) > MAX_CONTEXT_ENTRIES:
        raise ValueError(f"context has more than {MAX_CONTEXT_ENTRIES} entries")
    for k, v in context.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError("context keys and values must be strings")
        if not 1 <= len(k) <= MAX_CONTEXT_STRING or len(v) > MAX_CONTEXT_STRING:
            raise ValueError(
                f"context keys must be 1-{MAX_CONTEXT_STRING} characters, "
                f"values at most {MAX_CONTEXT_STRING}"
            )
        try:
            k.encode("utf-8")
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("context strings must be valid Unicode") from None
    return dict(context)


def encode_context(context: Mapping[str, str] | None) -> bytes:
    """The canonical AAD encoding of a context: u16 entry count, then for each entry sorted by
    the UTF-8 bytes of its key: u16 len + key, u16 len + value (UTF-8). Missing = empty."""
    items = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in (context or {}).items())
    parts = [struct.pack(">H", len(items))]
    for k, v in items:
        parts += [struct.pack(">H", len(k)), k, struct.pack(">H", len(v)), v]
    return b"".join(parts)


def file_context(context: Mapping[str, str] | None) -> bytes:
    """`encode_context`, for a file header, which holds at most 65,535 bytes of it (32
    entries of 256 four-byte characters take more). Raises InvalidRequest beyond, and for
    a string that is not Unicode text (an argument's undecodable bytes)."""
    try:
        encoded = encode_context(context)
    except UnicodeEncodeError:
        raise InvalidRequest("context strings must be valid Unicode text") from None
    if len(encoded) > 0xFFFF:
        raise InvalidRequest(
            f"the encryption context takes {len(encoded)} bytes encoded; a file header holds "
            "at most 65535"
        )
    return encoded


def decode_context(data: bytes) -> dict[str, str]:
    """Reverse `encode_context`, insisting on the canonical form. Raises ValueError."""
    reader = _Reader(data, ValueError)
    count = reader.u16()
    out: dict[str, str] = {}
    previous: bytes | None = None
    for _ in range(count):
        k, v = reader.take(reader.u16()), reader.take(reader.u16())
        if previous is not None and k <= previous:
            raise ValueError("context entries are not sorted and unique")
        previous = k
        out[k.decode("utf-8")] = v.decode("utf-8")
    reader.end()
    check_context(out)
    return out


def wrap_aad(kind: Kind, key_name: str, key_version: int, context_aad: bytes) -> bytes:
    """AAD under which the backend wraps a DEK."""
    name = key_name.encode("ascii")
    return (
        _WRAP_DOMAIN
        + bytes([kind, len(name)])
        + name
        + struct.pack(">I", key_version)
        + context_aad
    )


def data_aad(context_aad: bytes) -> bytes:
    """AAD of a message body sealed under its DEK."""
    return _DATA_DOMAIN + context_aad


class _Reader:
    """Reads `data` front to back; reading past its end raises `error`."""

    def __init__(self, data: bytes, error: type[Exception]) -> None:
        self._data = bytes(data)  # the same object when `data` is bytes: no copy
        self._pos = 0
        self._error = error

    def _advance(self, n: int) -> int:
        """The position before moving `n` bytes on."""
        start = self._pos
        if start + n > len(self._data):
            raise self._error("ciphertext is truncated or malformed")
        self._pos = start + n
        return start

    def take(self, n: int) -> bytes:
        start = self._advance(n)
        return self._data[start : start + n]

    def u8(self) -> int:
        return self._data[self._advance(1)]

    def u16(self) -> int:
        value: int = _U16.unpack_from(self._data, self._advance(2))[0]
        return value

    def u32(self) -> int:
        value: int = _U32.unpack_from(self._data, self._advance(4))[0]
        return value

    def rest(self) -> bytes:
        return self.take(len(self._data) - self._pos)

    def end(self) -> None:
        if self._pos != len(self._data):
            raise self._error("trailing bytes")


_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_KINDS: Final = {kind.value: kind for kind in Kind}


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed server-side ciphertext. `nonce` and `body` are empty for a data key."""

    kind: Kind
    key_name: str
    key_version: int
    wrapped_dek: bytes
    nonce: bytes = b""
    body: bytes = b""

    def to_bytes(self) -> bytes:
        name = self.key_name.encode("ascii")
        if not 1 <= len(name) <= MAX_KEY_NAME or not 1 <= len(self.wrapped_dek) <= MAX_WRAPPED:
            raise InvalidRequest("key name or wrapped key out of range for the format")
        head = MAGIC + bytes([FORMAT_VERSION, self.kind, len(name)]) + name
        head += struct.pack(">IH", self.key_version, len(self.wrapped_dek)) + self.wrapped_dek
        return head + self.nonce + self.body if self.kind is Kind.MESSAGE else head

    @classmethod
    def parse(cls, data: bytes) -> Envelope:
        """Raises DecryptionFailed for anything but a well-formed kmsgate ciphertext: what
        `to_bytes` writes (a key name of 1-128 ASCII characters, a key version of at least 1,
        a wrapped DEK of 1-4096 bytes, a message body of at least a tag)."""
        r = _Reader(data, DecryptionFailed)
        if r.take(3) != MAGIC or r.u8() != FORMAT_VERSION:
            raise DecryptionFailed("not a kmsgate ciphertext (or an unknown format version)")
        kind = _KINDS.get(r.u8())
        if kind is None:
            raise DecryptionFailed("unknown ciphertext kind")
        raw_name = r.take(r.u8())
        version = r.u32()
        wrapped = r.take(r.u16())
        try:
            name = raw_name.decode("ascii")
        except UnicodeDecodeError:
            raise DecryptionFailed("malformed key name") from None
        in_range = 1 <= len(name) <= MAX_KEY_NAME and 1 <= len(wrapped) <= MAX_WRAPPED
        if not in_range or version < 1:
            raise DecryptionFailed("malformed ciphertext header")
        if kind is Kind.DATA_KEY:
            r.end()
            return cls(kind, name, version, wrapped)
        nonce = r.take(NONCE_BYTES)
        body = r.rest()
        if len(body) < TAG_BYTES:
            raise DecryptionFailed("ciphertext is truncated")
        return cls(kind, name, version, wrapped, nonce, body)


def seal_message(plaintext: bytes, context_aad: bytes) -> tuple[bytes, bytes, bytes]:
    """(dek, nonce, body): `plaintext` sealed under a fresh single-use DEK. The DEK and the
    nonce come from one read of the kernel's generator (a getrandom call costs several
    microseconds on a virtual machine)."""
    fresh = os.urandom(DEK_BYTES + NONCE_BYTES)
    dek, nonce = fresh[:DEK_BYTES], fresh[DEK_BYTES:]
    return dek, nonce, AESGCM(dek).encrypt(nonce, plaintext, data_aad(context_aad))


def open_message(dek: bytes, envelope: Envelope, context_aad: bytes) -> bytes:
    """Raises DecryptionFailed if the body or context is wrong."""
    try:
        return AESGCM(dek).decrypt(envelope.nonce, envelope.body, data_aad(context_aad))
    except (InvalidTag, ValueError):
        raise DecryptionFailed() from None


# -- streaming file header --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileHeader:
    """The kmsgate header of an encrypted file."""

    context: dict[str, str]
    data_key: bytes
    """The data-key ciphertext (a kind-2 `Envelope`) as returned by `datakey`."""

    @property
    def bound(self) -> bytes:
        """The header bytes bound as the C2SP context: magic, format, context. Raises
        InvalidRequest for a context too large for the header (`file_context`)."""
        ctx = file_context(self.context)
        return FILE_MAGIC + bytes([FILE_FORMAT_VERSION]) + struct.pack(">H", len(ctx)) + ctx

    def to_bytes(self) -> bytes:
        if len(self.data_key) > 0xFFFF:
            raise ValueError("data-key ciphertext too long")
        return self.bound + struct.pack(">H", len(self.data_key)) + self.data_key

    def envelope(self) -> Envelope:
        """The parsed data-key ciphertext (names the key and version). Raises DecryptionFailed."""
        env = Envelope.parse(self.data_key)
        if env.kind is not Kind.DATA_KEY:
            raise DecryptionFailed("file header does not hold a data key")
        return env

    @classmethod
    def read(cls, src: BinaryIO) -> FileHeader:
        """Read exactly the header from `src`. Raises DecryptionFailed if it is not one."""

        def take(n: int) -> bytes:
            data = b""
            while len(data) < n:
                more = src.read(n - len(data))
                if not more:
                    raise DecryptionFailed("not a kmsgate encrypted file (truncated header)")
                data += more
            return data

        if take(len(FILE_MAGIC)) != FILE_MAGIC:
            raise DecryptionFailed("not a kmsgate encrypted file")
        if take(1)[0] != FILE_FORMAT_VERSION:
            raise DecryptionFailed("unknown kmsgate file format version")
        ctx_bytes = take(struct.unpack(">H", take(2))[0])
        data_key = take(struct.unpack(">H", take(2))[0])
        try:
            context = decode_context(ctx_bytes)
        except (ValueError, UnicodeDecodeError):
            raise DecryptionFailed("malformed context in file header") from None
        header = cls(context, data_key)
        header.envelope()
        return header
