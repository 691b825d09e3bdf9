"""kmsgate.chunked (C2SP chunked encryption, Cobblestone-256) against every Wycheproof vector,
the AES-256-GCM vectors through the same chunk engine, and streaming properties (constant
block size, tampering, truncation, reordering, errors that stay errors)."""

from __future__ import annotations

import hashlib
import io
import os
import zlib

import pytest

from kmsgate import chunked
from kmsgate.chunked import (
    CHUNK_BYTES,
    HEADER_BYTES,
    SEALED_CHUNK_BYTES,
    ChunkedDecryptionError,
    Decryptor,
    Encryptor,
)
from tests.wycheproof import load_vectors

C2SP_FILE = "c2sp_chunked_encryption_aes_256_gcm_test.json"
GCM_FILE = "aes_gcm_test.json"


C2SP = load_vectors(C2SP_FILE)
C2SP_CASES = [(g, t) for g in C2SP["testGroups"] for t in g["tests"]]


def test_vector_file_is_the_expected_instantiation():
    assert C2SP["algorithm"] == "Cobblestone-256"
    assert len(C2SP_CASES) == C2SP["numberOfTests"] == 35
    for group, _ in C2SP_CASES:
        assert (group["aead"], group["sha"]) == ("AEAD_AES_256_GCM", "SHA-512")


def _ct(test: dict) -> bytes:
    return zlib.decompress(bytes.fromhex(test["ct"]))


def _stream_decrypt(key: bytes, ct: bytes, ctx: bytes) -> tuple[bytes, Exception | None, Decryptor]:
    """Decrypt through the streaming interface; the plaintext released before any error."""
    out = bytearray()
    dec = Decryptor(key, ctx)
    try:
        for block in dec.plaintext(io.BytesIO(ct)):
            out += block
    except ChunkedDecryptionError as exc:
        return bytes(out), exc, dec
    return bytes(out), None, dec


@pytest.mark.parametrize(
    ("group", "test"), C2SP_CASES, ids=[f"tc{t['tcId']}" for _, t in C2SP_CASES]
)
def test_c2sp_wycheproof(group, test):
    key, ctx, ct = bytes.fromhex(test["key"]), bytes.fromhex(test["ctx"]), _ct(test)
    flags = set(test["flags"])
    if "InvalidKeySize" in flags:
        assert test["result"] == "invalid"
        with pytest.raises(ValueError):
            Decryptor(key, ctx)
        with pytest.raises(ValueError):
            Encryptor(key, ctx)
        return
    if "aeadKey" in test:  # the derivation itself, from the header's salt
        aead_key, base_nonce, commitment = chunked.derive(key, ct[:24], ctx)
        assert aead_key.hex() == test["aeadKey"]
        assert base_nonce.hex() == test["baseNonce"]
        if "HeaderFailure" not in flags and test["result"] == "valid":
            assert commitment == ct[24:56]
    released, error, dec = _stream_decrypt(key, ct, ctx)
    if test["result"] == "valid":
        assert error is None, error
        assert len(released) == test["msgLength"]
        assert hashlib.sha512(released).hexdigest() == test["msgSha512"]
        # whole-message API agrees
        assert chunked.decrypt(key, ct, ctx) == released
        # deterministic re-encryption with the vector's salt reproduces `ct` exactly
        again = io.BytesIO()
        n = chunked.encrypt_stream(key, ctx, io.BytesIO(released), again, salt=ct[:24])
        assert n == len(released)
        assert again.getvalue() == ct
        enc = Encryptor(key, ctx, salt=ct[:24])
        pieces = [enc.header()]
        for i in range(0, len(released), 7000):  # odd-sized pushes
            pieces.append(enc.update(released[i : i + 7000]))
        pieces.append(enc.finalize())
        assert b"".join(pieces) == ct
        # round trip with a random salt
        assert chunked.decrypt(key, chunked.encrypt(key, released, ctx), ctx) == released
        return
    assert test["result"] == "invalid"
    assert error is not None, "an invalid vector decrypted"
    with pytest.raises(ChunkedDecryptionError):
        chunked.decrypt(key, ct, ctx)
    if "HeaderFailure" in flags:
        assert released == b"", "nothing may be released before the commitment check"
    if "PartialPlaintext" in flags:
        # a streaming decryptor may release at most the valid prefix, and only that prefix
        assert len(released) <= test["msgLength"]
        full = hashlib.sha512(released).hexdigest() == test["msgSha512"]
        assert full or len(released) < test["msgLength"]
    else:
        assert released == b"" or "ValidFinalChunk" in flags or len(released) % CHUNK_BYTES == 0
    # the error sticks: further reads keep failing
    with pytest.raises(ChunkedDecryptionError):
        next(dec.plaintext(io.BytesIO(ct)))


def test_raw_mode_reencryption_matches_vectors():
    """Raw mode (spec appendix, Wycheproof 'Raw mode'): the chunk engine alone, fed the
    vector's aeadKey and baseNonce, reproduces the ciphertext after its 56-byte header."""
    checked = 0
    for _, test in C2SP_CASES:
        if test["result"] != "valid":
            continue
        ct = _ct(test)
        message = chunked.decrypt(bytes.fromhex(test["key"]), ct, bytes.fromhex(test["ctx"]))
        engine = chunked._Chunks(bytes.fromhex(test["aeadKey"]), bytes.fromhex(test["baseNonce"]))
        body = [
            engine.seal(message[i : i + CHUNK_BYTES])
            for i in range(0, len(message) // CHUNK_BYTES * CHUNK_BYTES, CHUNK_BYTES)
        ]
        body.append(engine.seal(message[len(message) // CHUNK_BYTES * CHUNK_BYTES :]))
        assert b"".join(body) == ct[HEADER_BYTES:]
        checked += 1
    assert checked == 10


def _gcm_cases():
    data = load_vectors(GCM_FILE)
    for group in data["testGroups"]:
        for test in group["tests"]:
            yield group, test


GCM_CASES = [
    (g, t)
    for g, t in _gcm_cases()
    if g["keySize"] == 256 and g["ivSize"] == 96 and g["tagSize"] == 128
]


def test_gcm_cases_present():
    assert len(GCM_CASES) > 20


@pytest.mark.parametrize(("group", "test"), GCM_CASES, ids=[f"tc{t['tcId']}" for _, t in GCM_CASES])
def test_aes_gcm_wycheproof_through_chunk_engine(group, test):
    """AES-256-GCM with 96-bit nonces (the only shape kmsgate uses) through `_Chunks`: with
    base nonce = iv and index 0 the chunk nonce is the iv itself. Vectors with AAD exercise
    the AEAD the server-side envelope uses (`kmsgate.envelope`), through cryptography."""
    key, iv = bytes.fromhex(test["key"]), bytes.fromhex(test["iv"])
    msg, aad = bytes.fromhex(test["msg"]), bytes.fromhex(test["aad"])
    sealed = bytes.fromhex(test["ct"]) + bytes.fromhex(test["tag"])
    if aad:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if test["result"] == "valid":
            assert AESGCM(key).decrypt(iv, sealed, aad) == msg
            assert AESGCM(key).encrypt(iv, msg, aad) == sealed
        else:
            with pytest.raises(InvalidTag):
                AESGCM(key).decrypt(iv, sealed, aad)
        return
    if test["result"] == "valid":
        assert chunked._Chunks(key, iv).open(sealed) == msg
        assert chunked._Chunks(key, iv).seal(msg) == sealed
    else:
        with pytest.raises(ChunkedDecryptionError):
            chunked._Chunks(key, iv).open(sealed)


# -- properties of the implementation -------------------------------------------------------


KEY = bytes(range(32))


@pytest.mark.parametrize(
    "size",
    [
        0,
        1,
        CHUNK_BYTES - 1,
        CHUNK_BYTES,
        CHUNK_BYTES + 1,
        64 * CHUNK_BYTES,
        64 * CHUNK_BYTES + 5,
        130 * CHUNK_BYTES,
    ],
)
def test_stream_round_trip_and_length(size):
    msg = os.urandom(size)
    out = io.BytesIO()
    assert chunked.encrypt_stream(KEY, b"ctx", io.BytesIO(msg), out) == size
    ct = out.getvalue()
    chunks = size // CHUNK_BYTES + 1
    assert len(ct) == HEADER_BYTES + size + chunks * 16
    back = io.BytesIO()
    assert chunked.decrypt_stream(KEY, b"ctx", io.BytesIO(ct), back) == size
    assert back.getvalue() == msg


class _Trickle(io.RawIOBase):
    """A pipe-like reader that returns at most 1000 bytes per read."""

    def __init__(self, data: bytes) -> None:
        self._src = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        chunk = self._src.read(min(len(b), 1000))
        b[: len(chunk)] = chunk
        return len(chunk)


def test_short_reads_are_not_mistaken_for_the_end():
    msg = os.urandom(3 * CHUNK_BYTES + 10)
    out = io.BytesIO()
    chunked.encrypt_stream(KEY, b"", _Trickle(msg), out)
    assert chunked.decrypt(KEY, out.getvalue()) == msg
    back = io.BytesIO()
    chunked.decrypt_stream(KEY, b"", _Trickle(out.getvalue()), back)
    assert back.getvalue() == msg


def test_every_byte_flip_truncation_and_swap_fail():
    msg = os.urandom(2 * CHUNK_BYTES + 100)
    ct = chunked.encrypt(KEY, msg, b"c")
    step = 97  # every region (salt, commitment, each chunk body and tag), not all 33k bytes
    for i in [*range(0, HEADER_BYTES), *range(HEADER_BYTES, len(ct), step), len(ct) - 1]:
        bad = bytearray(ct)
        bad[i] ^= 0x80
        with pytest.raises(ChunkedDecryptionError):
            chunked.decrypt(KEY, bytes(bad), b"c")
    for cut in (1, 15, 16, 17, 100, SEALED_CHUNK_BYTES, len(ct) - HEADER_BYTES):
        with pytest.raises(ChunkedDecryptionError):
            chunked.decrypt(KEY, ct[:-cut], b"c")
    c0 = ct[HEADER_BYTES : HEADER_BYTES + SEALED_CHUNK_BYTES]
    c1 = ct[HEADER_BYTES + SEALED_CHUNK_BYTES : HEADER_BYTES + 2 * SEALED_CHUNK_BYTES]
    rest = ct[HEADER_BYTES + 2 * SEALED_CHUNK_BYTES :]
    with pytest.raises(ChunkedDecryptionError):
        chunked.decrypt(KEY, ct[:HEADER_BYTES] + c1 + c0 + rest, b"c")
    with pytest.raises(ChunkedDecryptionError):
        chunked.decrypt(KEY, ct + b"\x00", b"c")
    with pytest.raises(ChunkedDecryptionError):
        chunked.decrypt(KEY, ct, b"d")
    assert chunked.decrypt(KEY, ct, b"c") == msg


def test_random_salt_each_message():
    assert chunked.encrypt(KEY, b"x")[:24] != chunked.encrypt(KEY, b"x")[:24]


def test_encryptor_single_use():
    enc = Encryptor(KEY)
    enc.finalize()
    with pytest.raises(ValueError):
        enc.update(b"x")
    with pytest.raises(ValueError):
        enc.finalize()
