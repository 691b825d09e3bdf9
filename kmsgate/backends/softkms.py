"""softkms: the embedded software backend.

Keys are generated in-process with `cryptography`. Private and secret keys are sealed with
AES-256-GCM under the root key, with AAD binding the key name and version, and stored by the
catalogue; they are unsealed once and cached in memory. The root key comes from a file
(mode 0600) and never leaves the process.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from pathlib import Path
from typing import ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsgate.algorithms import HashName, KeyType, KeyUsage, SignAlg, sign_with_private_key
from kmsgate.backends.base import BackendKey, KeyBackend, KeySpec, MacCapable, WrapCapable
from kmsgate.errors import (
    BackendError,
    ConfigError,
    DecryptionFailed,
    InvalidRequest,
    KeyDestroyed,
)
from kmsgate.files import write_new
from kmsgate.secret_files import read_secret_file

ROOT_KEY_BYTES = 32
_SEAL_VERSION = b"\x01"
_NONCE_BYTES = 12
_TAG_BYTES = 16
_SECRET_BYTES: dict[KeyType, int] = {
    KeyType.HMAC_SHA256: 32,
    KeyType.HMAC_SHA384: 48,
    KeyType.HMAC_SHA512: 64,
    KeyType.AES_256_GCM: 32,
}


def create_root_key_file(path: Path) -> None:
    """Write a fresh random root key to `path` (mode 0600, synced; nothing is left behind if
    that fails). Raises FileExistsError if present, OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_new(path, secrets.token_bytes(ROOT_KEY_BYTES))  # synced: the key's only copy


def read_root_key_file(path: Path) -> bytes:
    """The root key in `path`. Raises ConfigError if missing, exposed (`exposure`), or
    malformed."""
    data = read_secret_file(path, "root key")
    if len(data) != ROOT_KEY_BYTES:
        raise ConfigError(f"root key file {path} must hold exactly {ROOT_KEY_BYTES} bytes")
    return data


def _generate_private_key(key_type: KeyType) -> PrivateKeyTypes:
    match key_type:
        case KeyType.ED25519:
            return ed25519.Ed25519PrivateKey.generate()
        case KeyType.ECDSA_P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyType.ECDSA_P384:
            return ec.generate_private_key(ec.SECP384R1())
        case KeyType.RSA_3072:
            return rsa.generate_private_key(public_exponent=65537, key_size=3072)
        case KeyType.RSA_4096:
            return rsa.generate_private_key(public_exponent=65537, key_size=4096)
    raise AssertionError(f"not an asymmetric key type: {key_type}")


class SoftKmsBackend(KeyBackend, MacCapable, WrapCapable):
    """Software keys sealed under a root key; unsealed once, then served from memory."""

    scheme: ClassVar[str] = "softkms"
    blocking: ClassVar[bool] = False

    def __init__(self, name: str, root_key: bytes) -> None:
        super().__init__(name)
        self._root = AESGCM(root_key)
        self._loaded: dict[str, PrivateKeyTypes | bytes] = {}
        self._lock = threading.Lock()

    # -- sealing ---------------------------------------------------------------------------

    @staticmethod
    def _aad(name: str, version: int) -> bytes:
        return b"kmsgate/softkms/v1\x00" + name.encode() + b"\x00" + str(version).encode()

    def seal(self, secret: bytes, name: str, version: int) -> bytes:
        """`secret` encrypted under the root key, bound to the key name and version."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return _SEAL_VERSION + nonce + self._root.encrypt(nonce, secret, self._aad(name, version))

    def unseal(self, sealed: bytes, name: str, version: int) -> bytes:
        """Reverse `seal`. Raises BackendError if the blob was altered or the root key differs."""
        if not sealed.startswith(_SEAL_VERSION) or len(sealed) < 1 + _NONCE_BYTES + _TAG_BYTES:
            raise BackendError("sealed key material has an unknown format")
        nonce, body = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
        try:
            return self._root.decrypt(nonce, body, self._aad(name, version))
        except InvalidTag:
            raise BackendError("sealed key material failed authentication") from None

    # -- KeyBackend ------------------------------------------------------------------------

    def create_key(self, spec: KeySpec) -> BackendKey:
        ref = f"softkms:{spec.name}/{spec.version}"
        if spec.key_type in _SECRET_BYTES:
            secret = secrets.token_bytes(_SECRET_BYTES[spec.key_type])
            return BackendKey(
                ref,
                spec.key_type,
                spec.name,
                spec.version,
                self.seal(secret, spec.name, spec.version),
            )
        private = _generate_private_key(spec.key_type)
        der = private.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        pem = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        # not cached here: until the catalogue holds this version, a request racing on the
        # same name may hold another key under the same reference (the first use unseals)
        return BackendKey(
            ref,
            spec.key_type,
            spec.name,
            spec.version,
            self.seal(der, spec.name, spec.version),
            pem.decode(),
        )

    def _load(self, key: BackendKey) -> PrivateKeyTypes | bytes:
        """The unsealed key (cached). Raises KeyDestroyed if its material was dropped,
        BackendError if the material does not unseal."""
        cached = self._loaded.get(key.ref)
        if cached is not None:
            return cached
        if key.material is None:
            raise KeyDestroyed(f"version {key.version} of {key.name!r} has no key material")
        with self._lock:
            cached = self._loaded.get(key.ref)
            if cached is None:
                plain = self.unseal(key.material, key.name, key.version)
                # The material was produced by us and authenticated by AES-GCM just now, so
                # the expensive RSA consistency checks (~220 ms per key) add nothing.
                cached = (
                    plain
                    if key.key_type in _SECRET_BYTES
                    else serialization.load_der_private_key(
                        plain, password=None, unsafe_skip_rsa_key_validation=True
                    )
                )
                self._loaded[key.ref] = cached
        return cached

    def _private_key(self, key: BackendKey) -> PrivateKeyTypes:
        """Raises KeyDestroyed, BackendError (see `_load`; also for a secret key)."""
        loaded = self._load(key)
        if isinstance(loaded, bytes):
            raise BackendError("key material is not a private key")
        return loaded

    def _secret(self, key: BackendKey, usage: KeyUsage) -> bytes:
        """The secret key for `usage`. Raises InvalidRequest if the key type has another use,
        KeyDestroyed, BackendError (see `_load`)."""
        if key.key_type.usage is not usage:
            raise InvalidRequest(f"a {key.key_type} key cannot be used to {usage}")
        loaded = self._load(key)
        if not isinstance(loaded, bytes):
            raise BackendError("key material is not a secret key")
        return loaded

    def sign(self, key: BackendKey, data: bytes, alg: SignAlg, *, prehashed: bool) -> bytes:
        return sign_with_private_key(self._private_key(key), alg, data, prehashed=prehashed)

    def destroy(self, key: BackendKey) -> None:
        """Forget the cached key; the catalogue deletes the sealed material."""
        self._loaded.pop(key.ref, None)

    def close(self) -> None:
        self._loaded.clear()

    # -- MacCapable ------------------------------------------------------------------------

    def mac(self, key: BackendKey, data: bytes, hash_name: HashName) -> bytes:
        return hmac.digest(self._secret(key, KeyUsage.MAC), data, hash_name.value)

    def verify_mac(self, key: BackendKey, data: bytes, mac: bytes, hash_name: HashName) -> bool:
        return hmac.compare_digest(self.mac(key, data, hash_name), mac)

    # -- WrapCapable -----------------------------------------------------------------------

    def wrap(self, key: BackendKey, plaintext: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return nonce + AESGCM(self._secret(key, KeyUsage.ENCRYPT)).encrypt(nonce, plaintext, aad)

    def unwrap(self, key: BackendKey, ciphertext: bytes, aad: bytes) -> bytes:
        nonce, body = ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:]
        try:
            return AESGCM(self._secret(key, KeyUsage.ENCRYPT)).decrypt(nonce, body, aad)
        except (InvalidTag, ValueError):
            raise DecryptionFailed() from None
