"""A CA private key held by a backend, in the shape of a `cryptography` private key.

`remote_private_key` wraps a backend key so that cryptography's builders
(`x509.CertificateBuilder`, `CertificateSigningRequestBuilder`,
`CertificateRevocationListBuilder`, `ocsp.OCSPResponseBuilder`) sign with it: they call
`sign()`, which turns cryptography's arguments into a kmsgate `SignAlg` and asks the backend.
One CA implementation thus serves every backend. The private half never leaves the backend:
serialisation, key agreement and decryption raise NotSupported.

`sign()` calls the backend synchronously; with a blocking backend (network, HSM), call the
builder from a worker thread.

What the builders pass, and what is accepted: ECDSA with SHA-256/384/512 (randomised: the
`ecdsa_deterministic=True` option is refused, no backend promises RFC 6979); RSA PKCS#1 v1.5,
or PSS with MGF1 of the same hash and a salt as long as the hash (`PSS.DIGEST_LENGTH` or that
number; `MAX_LENGTH` is refused since kmsgate's RSA-PSS fixes the salt length); Ed25519.
A `utils.Prehashed` hash makes the backend sign the digest given as data.
`ocsp.OCSPResponseBuilder.sign` takes no padding: with RSA it is PKCS#1 v1.5.

The hash inside `Prehashed` and `MGF1`, and PSS's salt length, are read from private
attributes (`_algorithm`, `_salt_length`): cryptography 50 offers no public accessor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.utils import Buffer

from kmsgate.algorithms import (
    HashName,
    Scheme,
    SignAlg,
    key_type_of_public_key,
    sign_algorithm_for,
)
from kmsgate.backends.base import BackendKey, KeyBackend
from kmsgate.errors import InvalidRequest, NotSupported

__all__ = [
    "RemoteEcPrivateKey",
    "RemoteEd25519PrivateKey",
    "RemotePrivateKey",
    "RemoteRsaPrivateKey",
    "remote_private_key",
]


def _hash_name(algorithm: hashes.HashAlgorithm) -> HashName:
    """Raises NotSupported for a hash kmsgate does not sign with."""
    try:
        return HashName(algorithm.name)
    except ValueError:
        known = ", ".join(h.value for h in HashName)
        raise NotSupported(f"hash {algorithm.name} is not supported; use {known}") from None


def _hash_arg(algorithm: object) -> tuple[HashName, bool]:
    """The hash and whether the data is already its digest. Raises NotSupported for
    anything but a hash or `utils.Prehashed` (e.g. RSA's `NoDigestInfo`)."""
    if isinstance(algorithm, utils.Prehashed):
        return _hash_name(algorithm._algorithm), True
    if isinstance(algorithm, hashes.HashAlgorithm):
        return _hash_name(algorithm), False
    raise NotSupported(f"cannot sign with hash argument {type(algorithm).__name__}")


class _BackendHeld:
    """What the three key classes share: the backend, the key reference, the public key,
    and refusals for everything that would need the private half."""

    def __init__(self, backend: KeyBackend, key: BackendKey) -> None:
        self._backend = backend
        self._key = key
        self.on_sign: Callable[[], None] | None = None
        """Called after each signature the backend made (to count the key's use)."""

    @property
    def backend(self) -> KeyBackend:
        return self._backend

    @property
    def backend_key(self) -> BackendKey:
        return self._key

    def _sign(self, data: Buffer, scheme: Scheme, hash_name: HashName | None, pre: bool) -> bytes:
        """Raises what `sign_algorithm_for` and the backend's `sign` raise."""
        alg: SignAlg = sign_algorithm_for(self._key.key_type, scheme, hash_name)
        return self.sign_as(bytes(data), alg, prehashed=pre)

    def sign_as(self, data: bytes, alg: SignAlg, *, prehashed: bool) -> bytes:
        """Sign with `alg`, already chosen (for a stand-in of this key in another process,
        see `kmsgate.pki.crl_apart`). Raises what the backend's `sign` raises."""
        signature = self._backend.sign_one_checked(self._key, data, alg, prehashed=prehashed)
        if self.on_sign is not None:
            self.on_sign()
        return signature

    def _refuse(self, what: str) -> NoReturn:
        raise NotSupported(
            f"key {self._key.ref} is held by backend {self._backend.name!r} and never leaves "
            f"it: cannot {what}"
        )

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        """Always raises NotSupported."""
        self._refuse("serialise the private key")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._key.ref} on backend {self._backend.name!r}>"


class RemoteEcPrivateKey(_BackendHeld, ec.EllipticCurvePrivateKey):
    """An ECDSA key (P-256, P-384) held by a backend."""

    def __init__(
        self, backend: KeyBackend, key: BackendKey, public_key: ec.EllipticCurvePublicKey
    ) -> None:
        super().__init__(backend, key)
        self._public = public_key

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """A DER ECDSA signature. Raises NotSupported for another algorithm, an unsupported
        hash or deterministic ECDSA, and what the backend's `sign` raises."""
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise NotSupported(f"cannot sign with {type(signature_algorithm).__name__}")
        if signature_algorithm.deterministic_signing:
            self._refuse("promise deterministic ECDSA (RFC 6979)")
        hash_name, pre = _hash_arg(signature_algorithm.algorithm)
        return self._sign(data, Scheme.ECDSA, hash_name, pre)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        """Always raises NotSupported."""
        self._refuse("perform ECDH")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        """Always raises NotSupported."""
        self._refuse("reveal the private numbers")

    def __copy__(self) -> RemoteEcPrivateKey:
        return self  # immutable handle

    def __deepcopy__(self, memo: dict[int, object]) -> RemoteEcPrivateKey:
        return self


class RemoteRsaPrivateKey(_BackendHeld, rsa.RSAPrivateKey):
    """An RSA key (3072, 4096 bits) held by a backend."""

    def __init__(self, backend: KeyBackend, key: BackendKey, public_key: rsa.RSAPublicKey) -> None:
        super().__init__(backend, key)
        self._public = public_key

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def sign(
        self,
        data: bytes,
        padding: AsymmetricPadding,
        algorithm: utils.Prehashed | hashes.HashAlgorithm | utils.NoDigestInfo,
    ) -> bytes:
        """An RSA signature, PKCS#1 v1.5 or PSS. Raises NotSupported for another padding, a PSS
        salt length other than the hash length, an MGF1 hash other than the message hash, an
        unsupported hash, and what the backend's `sign` raises."""
        hash_name, pre = _hash_arg(algorithm)
        return self._sign(data, _rsa_scheme(padding, hash_name), hash_name, pre)

    def decrypt(self, ciphertext: bytes, padding: AsymmetricPadding) -> bytes:
        """Always raises NotSupported."""
        self._refuse("decrypt")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        """Always raises NotSupported."""
        self._refuse("reveal the private numbers")

    def __copy__(self) -> RemoteRsaPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> RemoteRsaPrivateKey:
        return self


def _rsa_scheme(pad: AsymmetricPadding, hash_name: HashName) -> Scheme:
    """The kmsgate scheme for a padding. Raises NotSupported (see RemoteRsaPrivateKey.sign)."""
    if isinstance(pad, padding.PKCS1v15):
        return Scheme.RSA_PKCS1
    if not isinstance(pad, padding.PSS):
        raise NotSupported(f"cannot sign with RSA padding {pad.name}")
    mgf = pad.mgf
    if not isinstance(mgf, padding.MGF1) or mgf._algorithm.name != hash_name.value:
        raise NotSupported("RSA-PSS signs with MGF1 of the message hash only")
    salt = pad._salt_length
    if not (salt is padding.PSS.DIGEST_LENGTH or salt == hash_name.digest_size):
        raise NotSupported(
            "RSA-PSS signs with a salt as long as the hash only: use PSS.DIGEST_LENGTH"
        )
    return Scheme.RSA_PSS


class RemoteEd25519PrivateKey(_BackendHeld, ed25519.Ed25519PrivateKey):
    """An Ed25519 key held by a backend."""

    def __init__(
        self, backend: KeyBackend, key: BackendKey, public_key: ed25519.Ed25519PublicKey
    ) -> None:
        super().__init__(backend, key)
        self._public = public_key

    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._public

    def sign(self, data: Buffer) -> bytes:
        """A raw 64-byte Ed25519 signature. Raises what the backend's `sign` raises."""
        return self._sign(data, Scheme.ED25519, None, False)

    def private_bytes_raw(self) -> bytes:
        """Always raises NotSupported."""
        self._refuse("serialise the private key")

    def __copy__(self) -> RemoteEd25519PrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> RemoteEd25519PrivateKey:
        return self


RemotePrivateKey = RemoteEcPrivateKey | RemoteRsaPrivateKey | RemoteEd25519PrivateKey


def _same_public_key(a: PublicKeyTypes, b: PublicKeyTypes) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return a.public_bytes(enc, fmt) == b.public_bytes(enc, fmt)


def remote_private_key(
    backend: KeyBackend,
    key: BackendKey,
    public_key: PublicKeyTypes,
    on_sign: Callable[[], None] | None = None,
) -> RemotePrivateKey:
    """A private key object that signs with `key` in `backend`; `public_key` is its public half;
    `on_sign` is called after each signature.

    Raises InvalidRequest if the key cannot sign, the public key is of another type than the
    key, or it differs from the public key the backend recorded (`key.public_key_pem`).
    """
    if not key.key_type.is_asymmetric:
        raise InvalidRequest(f"{key.key_type} keys cannot sign certificates")
    if key_type_of_public_key(public_key) is not key.key_type:
        raise InvalidRequest(f"the public key given for {key.ref} is not {key.key_type}")
    if key.public_key_pem is not None and not _same_public_key(
        public_key, serialization.load_pem_public_key(key.public_key_pem.encode())
    ):
        raise InvalidRequest(f"the public key given for {key.ref} is not the backend's")
    signer: RemotePrivateKey
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        signer = RemoteEcPrivateKey(backend, key, public_key)
    elif isinstance(public_key, rsa.RSAPublicKey):
        signer = RemoteRsaPrivateKey(backend, key, public_key)
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        signer = RemoteEd25519PrivateKey(backend, key, public_key)
    else:
        raise AssertionError(f"unexpected key type {key.key_type}")  # key_type_of_public_key
    signer.on_sign = on_sign
    return signer
