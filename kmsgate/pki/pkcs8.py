"""A private key as a PEM `ENCRYPTED PRIVATE KEY` (PKCS#8 `EncryptedPrivateKeyInfo`) whose
PBES2 key derivation is scrypt (RFC 7914 section 7) and whose cipher is AES-256-CBC (RFC 8018):
what `openssl pkcs8 -topk8 -scrypt` writes. `cryptography` reads this form but writes PKCS#8
only with PBKDF2 at 2,048 iterations, which makes a guessed passphrase cheap to try.

The scrypt cost is the most OpenSSL 3 agrees to read back (it refuses more than 32 MiB for a
PKCS#8 key, so N = 2^14 with r = 8, 16 MiB), made slower by p = 16: each guess costs about
0.8 s of one core and 16 MiB. Only the structure is written here (a few fixed DER fields);
the key derivation, the cipher and the padding are `cryptography`'s.
"""

from __future__ import annotations

import base64
import os
import textwrap

from cryptography.hazmat.primitives import padding, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

__all__ = ["SCRYPT_N", "SCRYPT_P", "SCRYPT_R", "scrypt_encrypted_pem"]

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 16
_SALT_BYTES, _KEY_BYTES = 16, 32
_PBES2 = "1.2.840.113549.1.5.13"
_SCRYPT = "1.3.6.1.4.1.11591.4.11"
_AES_256_CBC = "2.16.840.1.101.3.4.1.42"
_LABEL = "ENCRYPTED PRIVATE KEY"


def scrypt_encrypted_pem(key: PrivateKeyTypes, passphrase: bytes) -> bytes:
    """`key` encrypted under `passphrase`, as PEM."""
    plain = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    salt, iv = os.urandom(_SALT_BYTES), os.urandom(16)
    secret = Scrypt(salt, _KEY_BYTES, SCRYPT_N, SCRYPT_R, SCRYPT_P).derive(passphrase)
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(secret), modes.CBC(iv)).encryptor()
    sealed = encryptor.update(padder.update(plain) + padder.finalize()) + encryptor.finalize()
    scrypt_params = _sequence(
        _octets(salt), _integer(SCRYPT_N), _integer(SCRYPT_R), _integer(SCRYPT_P)
    )
    pbes2_params = _sequence(
        _sequence(_oid(_SCRYPT), scrypt_params),
        _sequence(_oid(_AES_256_CBC), _octets(iv)),
    )
    der = _sequence(_sequence(_oid(_PBES2), pbes2_params), _octets(sealed))
    lines = textwrap.wrap(base64.b64encode(der).decode(), 64)
    return "\n".join([f"-----BEGIN {_LABEL}-----", *lines, f"-----END {_LABEL}-----", ""]).encode()


def _tlv(tag: int, value: bytes) -> bytes:
    """One DER element: its tag, its length (short or long form), its value."""
    n = len(value)
    if n < 0x80:
        return bytes([tag, n]) + value
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + value


def _sequence(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


def _octets(value: bytes) -> bytes:
    return _tlv(0x04, value)


def _integer(value: int) -> bytes:
    """A non-negative INTEGER, with a leading zero byte where the high bit is set."""
    return _tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _oid(dotted: str) -> bytes:
    first, second, *rest = (int(arc) for arc in dotted.split("."))
    body = bytearray([40 * first + second])
    for arc in rest:
        chunk = [arc & 0x7F]
        while arc := arc >> 7:
            chunk.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(chunk))
    return _tlv(0x06, bytes(body))
