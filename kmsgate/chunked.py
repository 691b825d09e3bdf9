"""C2SP chunked encryption, instantiated as Cobblestone-256 (c2sp.org/chunked-encryption).

AES-256-GCM over 16 KiB chunks; a per-message key, base nonce and 32-byte key commitment
derived with HKDF-Expand(SHA-512) from the input key, a random 24-byte salt and the
application's context. The final chunk is always shorter than 16 KiB (possibly empty), which
authenticates the message length; each chunk's nonce is the base nonce XOR its index, which
stops reordering. Ciphertext = salt (24) || commitment (32) || encrypted chunks.

Streaming in constant memory: `encrypt_stream` and `decrypt_stream` hold one block of
`BLOCK_CHUNKS` chunks (about 1 MiB) at a time. Decryption checks the commitment before any
chunk and releases a chunk's plaintext only after its tag verified; an error found later
(truncation, trailing data, a bad tag) still raises, so callers that must not keep partial
plaintext write to a temporary file and discard it on error.

Raw mode (spec appendix) exists only as the private `_Chunks` engine used here and by tests.
"""

from __future__ import annotations

import hmac
import io
import os
from collections.abc import Callable, Iterator
from typing import BinaryIO, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

AEAD_NAME: Final = b"AEAD_AES_256_GCM"
INFO_PREFIX: Final = b"c2sp.org/chunked-encryption@v1+"
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
SALT_BYTES: Final = 24
COMMITMENT_BYTES: Final = 32
HEADER_BYTES: Final = SALT_BYTES + COMMITMENT_BYTES  # 56
CHUNK_BYTES: Final = 16 * 1024
SEALED_CHUNK_BYTES: Final = CHUNK_BYTES + TAG_BYTES
MAX_CHUNKS: Final = 1 << 38
BLOCK_CHUNKS: Final = 64  # chunks per read/write in the stream helpers (~1 MiB)

Progress = Callable[[int], None]
"""Called with the number of input bytes consumed since the last call."""


class ChunkedDecryptionError(Exception):
    """The ciphertext is not authentic under this key and context, or is truncated or
    extended. The message never says which byte was wrong."""


def derive(key: bytes, salt: bytes, context: bytes) -> tuple[bytes, bytes, bytes]:
    """(AEAD key, base nonce, commitment) for one message. Raises ValueError if the input key
    is not 32 bytes or the salt not 24."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"the input key must be {KEY_BYTES} bytes")
    if len(salt) != SALT_BYTES:
        raise ValueError(f"the salt must be {SALT_BYTES} bytes")
    info = INFO_PREFIX + AEAD_NAME + b"\x00" + salt + context
    okm = HKDFExpand(hashes.SHA512(), KEY_BYTES + NONCE_BYTES + COMMITMENT_BYTES, info).derive(key)
    return okm[:KEY_BYTES], okm[KEY_BYTES : KEY_BYTES + NONCE_BYTES], okm[-COMMITMENT_BYTES:]


class _Chunks:
    """Raw mode: seals or opens chunk number `index` with the AEAD key and base nonce."""

    __slots__ = ("_aead", "_base", "index")

    def __init__(self, aead_key: bytes, base_nonce: bytes) -> None:
        self._aead = AESGCM(aead_key)
        self._base = int.from_bytes(base_nonce, "big")
        self.index = 0

    def _nonce(self) -> bytes:
        if self.index >= MAX_CHUNKS:
            raise OverflowError("message exceeds 2**38 chunks")
        nonce = (self._base ^ self.index).to_bytes(NONCE_BYTES, "big")
        self.index += 1
        return nonce

    def seal(self, chunk: bytes | memoryview) -> bytes:
        return self._aead.encrypt(self._nonce(), chunk, None)

    def seal_into(self, chunk: memoryview, out: memoryview) -> None:
        """Seal `chunk` into `out` (exactly len(chunk) + 16 bytes): no allocation."""
        self._aead.encrypt_into(self._nonce(), chunk, None, out)

    def open(self, sealed: bytes | memoryview) -> bytes:
        """Raises ChunkedDecryptionError if the tag does not verify."""
        try:
            return self._aead.decrypt(self._nonce(), sealed, None)
        except InvalidTag:
            raise ChunkedDecryptionError("chunk failed authentication") from None

    def open_into(self, sealed: memoryview, out: memoryview) -> None:
        """Open `sealed` into `out` (len(sealed) - 16 bytes). Raises ChunkedDecryptionError;
        `out` then holds unauthenticated bytes that must not be released."""
        try:
            self._aead.decrypt_into(self._nonce(), sealed, None, out)
        except InvalidTag:
            raise ChunkedDecryptionError("chunk failed authentication") from None


def _read_full(src: BinaryIO, buf: memoryview) -> int:
    """Fill `buf` from `src`; fewer bytes only at end of stream (pipes return short reads)."""
    filled = 0
    while filled < len(buf):
        n = src.readinto(buf[filled:])  # type: ignore[attr-defined]
        if not n:
            break
        filled += n
    return filled


class Encryptor:
    """Push-style encryption of one message: `header()`, then `update()` any number of
    times, then `finalize()` once. Output concatenated in that order is the ciphertext."""

    def __init__(self, key: bytes, context: bytes = b"", *, salt: bytes | None = None) -> None:
        """`salt` is for known-answer tests only; leave it out (a random salt is drawn).
        Raises ValueError for a key that is not 32 bytes."""
        self._salt = os.urandom(SALT_BYTES) if salt is None else salt
        aead_key, base_nonce, self._commitment = derive(key, self._salt, context)
        self._chunks = _Chunks(aead_key, base_nonce)
        self._pending = bytearray()
        self._done = False

    def header(self) -> bytes:
        return self._salt + self._commitment

    def update(self, data: bytes | memoryview) -> bytes:
        """Ciphertext for every chunk completed by `data` (holds back a partial chunk)."""
        if self._done:
            raise ValueError("encryptor already finalized")
        self._pending += data
        out = []
        full = len(self._pending) // CHUNK_BYTES * CHUNK_BYTES
        view = memoryview(self._pending)
        for start in range(0, full, CHUNK_BYTES):
            out.append(self._chunks.seal(view[start : start + CHUNK_BYTES]))
        view.release()
        del self._pending[:full]
        return b"".join(out)

    def finalize(self) -> bytes:
        """The final, short (maybe empty) chunk."""
        if self._done:
            raise ValueError("encryptor already finalized")
        self._done = True
        final = self._chunks.seal(bytes(self._pending))
        self._pending.clear()
        return final


def encrypt(key: bytes, plaintext: bytes, context: bytes = b"") -> bytes:
    """The whole ciphertext of `plaintext` (in memory; for streams use `encrypt_stream`)."""
    enc = Encryptor(key, context)
    return enc.header() + enc.update(plaintext) + enc.finalize()


def encrypt_stream(
    key: bytes,
    context: bytes,
    src: BinaryIO,
    dst: BinaryIO,
    *,
    progress: Progress | None = None,
    salt: bytes | None = None,
) -> int:
    """Encrypt `src` to `dst` until end of stream in constant memory; the plaintext length.
    Raises ValueError for a bad key; OSError from the streams."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    aead_key, base_nonce, commitment = derive(key, salt, context)
    chunks = _Chunks(aead_key, base_nonce)
    dst.write(salt + commitment)
    view = memoryview(bytearray(CHUNK_BYTES * BLOCK_CHUNKS))
    out = memoryview(bytearray(SEALED_CHUNK_BYTES * BLOCK_CHUNKS))
    total = 0
    while True:
        n = _read_full(src, view)
        total += n
        full = n // CHUNK_BYTES
        for i in range(full):
            chunks.seal_into(
                view[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES],
                out[i * SEALED_CHUNK_BYTES : (i + 1) * SEALED_CHUNK_BYTES],
            )
        end = full * SEALED_CHUNK_BYTES
        if n < len(view):  # end of stream: the final chunk is short, maybe empty
            rest = n - full * CHUNK_BYTES
            chunks.seal_into(view[full * CHUNK_BYTES : n], out[end : end + rest + TAG_BYTES])
            end += rest + TAG_BYTES
        dst.write(out[:end])
        if progress is not None:
            progress(n)
        if n < len(view):
            return total


class Decryptor:
    """Streaming decryption of one message.

    `plaintext(src)` yields authenticated plaintext per block (a memoryview into a reused
    buffer: consume it before asking for the next) and raises ChunkedDecryptionError when
    the stream turns out to be invalid; once it has failed, every later use raises again.
    """

    def __init__(self, key: bytes, context: bytes = b"") -> None:
        """Raises ValueError for a key that is not 32 bytes."""
        if len(key) != KEY_BYTES:
            raise ValueError(f"the input key must be {KEY_BYTES} bytes")
        self._key = key
        self._context = context
        self._failed = False
        self._used = False

    def _fail(self, reason: str) -> ChunkedDecryptionError:
        self._failed = True
        return ChunkedDecryptionError(reason)

    def plaintext(self, src: BinaryIO, progress: Progress | None = None) -> Iterator[memoryview]:
        if self._failed:
            raise ChunkedDecryptionError("decryption already failed")
        if self._used:
            raise ValueError("a Decryptor decrypts one message")
        self._used = True
        header = bytearray(HEADER_BYTES)
        if _read_full(src, memoryview(header)) < HEADER_BYTES:
            raise self._fail("ciphertext too short for its header")
        salt, commitment = bytes(header[:SALT_BYTES]), bytes(header[SALT_BYTES:])
        aead_key, base_nonce, expected = derive(self._key, salt, self._context)
        if not hmac.compare_digest(commitment, expected):
            raise self._fail("wrong key or context (commitment mismatch)")
        chunks = _Chunks(aead_key, base_nonce)
        view = memoryview(bytearray(SEALED_CHUNK_BYTES * BLOCK_CHUNKS))
        out = memoryview(bytearray(CHUNK_BYTES * BLOCK_CHUNKS))
        while True:
            n = _read_full(src, view)
            full = n // SEALED_CHUNK_BYTES
            opened = 0  # plaintext bytes of this block that verified
            try:
                for i in range(full):
                    chunks.open_into(
                        view[i * SEALED_CHUNK_BYTES : (i + 1) * SEALED_CHUNK_BYTES],
                        out[opened : opened + CHUNK_BYTES],
                    )
                    opened += CHUNK_BYTES
                if n < len(view):  # end of stream: what is left is the short final chunk
                    rest = n - full * SEALED_CHUNK_BYTES
                    if rest < TAG_BYTES:
                        raise ChunkedDecryptionError("truncated: no short final chunk")
                    chunks.open_into(
                        view[full * SEALED_CHUNK_BYTES : n], out[opened : opened + rest - TAG_BYTES]
                    )
                    opened += rest - TAG_BYTES
            except (ChunkedDecryptionError, OverflowError) as exc:
                self._failed = True
                if opened:  # the chunks before the bad one verified (streaming prefix)
                    yield out[:opened]
                raise ChunkedDecryptionError(str(exc)) from None
            if progress is not None:
                progress(n)
            yield out[:opened]
            if n < len(view):
                return


def decrypt(key: bytes, ciphertext: bytes, context: bytes = b"") -> bytes:
    """The whole plaintext (in memory). Raises ChunkedDecryptionError, ValueError (key size)."""
    return b"".join(bytes(b) for b in Decryptor(key, context).plaintext(io.BytesIO(ciphertext)))


def decrypt_stream(
    key: bytes,
    context: bytes,
    src: BinaryIO,
    dst: BinaryIO,
    *,
    progress: Progress | None = None,
) -> int:
    """Decrypt `src` to `dst` in constant memory; the plaintext length. Authenticated chunks
    reach `dst` before the end is checked: on ChunkedDecryptionError discard `dst`."""
    total = 0
    for block in Decryptor(key, context).plaintext(src, progress):
        dst.write(block)
        total += len(block)
    return total
