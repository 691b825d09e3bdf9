"""Conformance profile: the awskms backend against a real moto_server over HTTP.

Keys never leave KMS, so there is nothing to extract (`extract=None`). moto is not a faithful
KMS, and some AWS API limits differ from the suite's expectations; both are handled here, in
the open, by `_MotoProfileBackend` (the real backend, with a hook before or after the calls
concerned). Every exclusion **first checks what can be checked**, then skips the test with a
reason naming the gap; nothing is ever faked into passing. docs/backends/awskms.md has the
table.

moto gaps (measured, moto 5.2):

1. `MessageType=DIGEST` is ignored: moto hashes the digest again, so the signature is over
   H(digest). Every Sign request kmsgate sends as DIGEST (prehashed input; ECDSA with a hash
   other than the curve's own, which kmsgate sends as a fitted digest) cannot verify. The
   hook sends the real request (the HTTP path is exercised), then skips. The request shape
   is asserted in tests/test_awskms_gateway.py::test_digest_request_shape, and
   ::test_moto_still_ignores_digest fails the day moto fixes it (then drop this exclusion).
2. RSA-PSS: moto signs with salt = maximum length; AWS (and kmsgate's strict verifier,
   kmsgate.algorithms) use salt = hash length. The hook signs over HTTP, checks the
   signature *is* a valid PSS/MGF1 signature over the message (salt length auto-detected),
   then skips the strict-verification test. PKCS#1 v1.5 and ECDSA (RAW) are fully checked.
3. Ed25519: moto rejects KeySpec ECC_NIST_EDWARDS25519 (ValidationException), which the
   backend reports as NotSupported: the profile leaves ed25519 out of `key_types` and
   test_create_key checks that NotSupported.

AWS API limits (not moto gaps; AWS behaves the same):

4. GenerateMac takes 1-4096 bytes: an empty message cannot be MACed by KMS. The hook checks
   that the backend refuses it with InvalidRequest (without a request), then skips
   test_mac_of_empty_input.
5. Encrypt takes 1-4096 bytes: an empty secret cannot be wrapped. Same treatment for the
   size-0 case of test_wrap_round_trip.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pydantic import SecretStr

from kmsgate.algorithms import HashName, KeyType, Scheme, SignAlg
from kmsgate.backends.awskms import AwsKmsBackend, AwsKmsSettings, sign_plan
from kmsgate.backends.base import BackendKey, KeyBackend
from kmsgate.errors import InvalidRequest
from tests.backends.profile import BackendProfile
from tests.moto import DUMMY_CREDENTIALS, REGION, running_moto

_HASHES: dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

DIGEST_REASON = (
    "moto ignores MessageType=DIGEST (signs H(digest)); request shape checked in "
    "tests/test_awskms_gateway.py::test_digest_request_shape"
)
PSS_REASON = (
    "moto signs RSA-PSS with the maximum salt, AWS and kmsgate use salt = hash length; "
    "signature checked as PSS with auto-detected salt, strict verification not possible"
)


class _MotoProfileBackend(AwsKmsBackend):
    """The real backend; the documented exclusions are applied around the calls."""

    def sign(self, key: BackendKey, data: bytes, alg: SignAlg, *, prehashed: bool) -> bytes:
        signature = super().sign(key, data, alg, prehashed=prehashed)
        plan = sign_plan(key.key_type, alg, data, prehashed=prehashed)
        if plan.message_type == "DIGEST":
            pytest.skip(DIGEST_REASON)
        if alg.scheme is Scheme.RSA_PSS:
            assert alg.hash is not None and key.public_key_pem is not None
            public = serialization.load_pem_public_key(key.public_key_pem.encode())
            assert isinstance(public, rsa.RSAPublicKey)
            h = _HASHES[alg.hash.value]
            try:
                public.verify(
                    signature,
                    data,
                    padding.PSS(mgf=padding.MGF1(h()), salt_length=padding.PSS.AUTO),
                    h(),
                )
            except InvalidSignature:
                pytest.fail("moto's RSA-PSS signature is not even a PSS signature over the message")
            pytest.skip(PSS_REASON)
        return signature

    def mac(self, key: BackendKey, data: bytes, hash_name: HashName) -> bytes:
        if data == b"" and key.key_type.usage.value == "mac":
            requests = self.requests
            with pytest.raises(InvalidRequest):
                super().mac(key, data, hash_name)
            assert self.requests == requests, "refused locally, without a request"
            pytest.skip("AWS KMS GenerateMac takes 1-4096 bytes: empty input is refused")
        return super().mac(key, data, hash_name)

    def wrap(self, key: BackendKey, plaintext: bytes, aad: bytes) -> bytes:
        if plaintext == b"" and key.key_type is KeyType.AES_256_GCM:
            requests = self.requests
            with pytest.raises(InvalidRequest):
                super().wrap(key, plaintext, aad)
            assert self.requests == requests, "refused locally, without a request"
            pytest.skip("AWS KMS Encrypt takes 1-4096 bytes: an empty secret is refused")
        return super().wrap(key, plaintext, aad)


@contextlib.contextmanager
def _start(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyBackend]:
    with running_moto(tmp_path_factory.mktemp("moto-conformance")) as server:
        settings = AwsKmsSettings(
            region=REGION,
            endpoint_url=server.endpoint,
            access_key_id=DUMMY_CREDENTIALS["access_key_id"],
            secret_access_key=SecretStr(DUMMY_CREDENTIALS["secret_access_key"]),
            pending_window_days=7,
        )
        backend = _MotoProfileBackend("awskms", settings)
        try:
            yield backend
        finally:
            backend.close()


PROFILE = BackendProfile(
    start=_start,
    key_types=frozenset(KeyType) - {KeyType.ED25519},
    extract=None,
)
