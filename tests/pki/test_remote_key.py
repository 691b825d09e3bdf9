"""CA keys held by a backend (`kmsgate.pki.remote_key`) signing through cryptography's builders.

For each key type a real softkms key signs a self-signed CA certificate, a leaf certificate, a
CSR, a CRL and an OCSP response; each is checked with the public key in Python and, for the
certificates, CSR, CRL and OCSP response, with the `openssl` CLI. One case does the same for a
certificate signed by a key on a SoftHSM token (pkcs11 backend). No mocks.
"""

from __future__ import annotations

import copy
import datetime as dt
import secrets
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from kmsgate.algorithms import KeyType
from kmsgate.backends.base import BackendKey, KeyBackend, KeySpec
from kmsgate.backends.softkms import SoftKmsBackend
from kmsgate.config import BackendSettings
from kmsgate.errors import InvalidRequest, NotSupported
from kmsgate.pki.remote_key import (
    RemoteEcPrivateKey,
    RemoteEd25519PrivateKey,
    RemotePrivateKey,
    RemoteRsaPrivateKey,
    remote_private_key,
)
from tests.components import run_openssl
from tests.pki.ceremony import ca_key_usage
from tests.softhsm import softhsm_token

pytestmark = pytest.mark.timeout(120)

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass(frozen=True)
class Case:
    key_type: KeyType
    hash: hashes.SHA256 | hashes.SHA384 | None  # None for Ed25519
    pss: bool = False  # RSA: PSS (salt = hash length) instead of PKCS#1 v1.5
    openssl_alg: str = ""  # what `openssl x509 -text` prints as the signature algorithm

    @property
    def id(self) -> str:
        return f"{self.key_type}{'-pss' if self.pss else ''}"

    def sign_kwargs(self) -> dict[str, Any]:
        """rsa_padding for the builders that take it (not OCSP)."""
        if not self.pss:
            return {}
        assert self.hash is not None
        return {"rsa_padding": padding.PSS(padding.MGF1(self.hash), padding.PSS.DIGEST_LENGTH)}


CASES = [
    Case(KeyType.ECDSA_P256, hashes.SHA256(), openssl_alg="ecdsa-with-SHA256"),
    Case(KeyType.ECDSA_P384, hashes.SHA384(), openssl_alg="ecdsa-with-SHA384"),
    Case(KeyType.RSA_3072, hashes.SHA256(), openssl_alg="sha256WithRSAEncryption"),
    Case(KeyType.RSA_3072, hashes.SHA384(), pss=True, openssl_alg="rsassaPss"),
    Case(KeyType.ED25519, None, openssl_alg="ED25519"),
]


# -- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def softkms() -> Iterator[SoftKmsBackend]:
    backend = SoftKmsBackend("local", secrets.token_bytes(32))
    yield backend
    backend.close()


def public_of(key: BackendKey) -> PublicKeyTypes:
    assert key.public_key_pem is not None
    return serialization.load_pem_public_key(key.public_key_pem.encode())


@pytest.fixture(scope="module")
def ca_key(softkms: SoftKmsBackend) -> Callable[[KeyType], RemotePrivateKey]:
    """One wrapped softkms key per type (RSA keygen is the slow part), made on first use."""
    made: dict[KeyType, RemotePrivateKey] = {}

    def get(key_type: KeyType) -> RemotePrivateKey:
        if key_type not in made:
            key = softkms.create_key(KeySpec(f"ca-{key_type}", 1, key_type))
            made[key_type] = remote_private_key(softkms, key, public_of(key))
        return made[key_type]

    return get


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def ca_certificate(key: RemotePrivateKey, case: Case) -> x509.Certificate:
    """A self-signed root: CA:TRUE, keyCertSign and cRLSign, SKI/AKI."""
    pub = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(pub)
    return (
        x509.CertificateBuilder()
        .subject_name(name(f"kmsgate test root {case.id}"))
        .issuer_name(name(f"kmsgate test root {case.id}"))
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            ca_key_usage(digital_signature=True),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, case.hash, **case.sign_kwargs())
    )


def leaf_certificate(key: RemotePrivateKey, ca: x509.Certificate, case: Case) -> x509.Certificate:
    """An end-entity certificate for a fresh local P-256 key, issued by `ca`."""
    subject_key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("leaf.kmsgate.test"))
        .issuer_name(ca.subject)
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("leaf.kmsgate.test")]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, case.hash, **case.sign_kwargs())
    )
    return cert


def verify_signature(
    pub: PublicKeyTypes,
    signature: bytes,
    data: bytes,
    hash_alg: hashes.HashAlgorithm | None,
    pss: bool = False,
) -> None:
    """Raises InvalidSignature unless `signature` is `pub`'s over `data`."""
    if isinstance(pub, ed25519.Ed25519PublicKey):
        pub.verify(signature, data)
        return
    assert hash_alg is not None
    if isinstance(pub, ec.EllipticCurvePublicKey):
        pub.verify(signature, data, ec.ECDSA(hash_alg))
        return
    assert isinstance(pub, rsa.RSAPublicKey)
    pad: padding.AsymmetricPadding = (
        padding.PSS(padding.MGF1(hash_alg), hash_alg.digest_size) if pss else padding.PKCS1v15()
    )
    pub.verify(signature, data, pad, hash_alg)


def openssl(openssl_bin: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`run_openssl`, asserting it succeeded."""
    proc = run_openssl(openssl_bin, *args)
    assert proc.returncode == 0, f"openssl {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc


def write_pem(path: Path, obj: x509.Certificate | x509.CertificateRevocationList) -> str:
    path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    return str(path)


def openssl_checks_certificate(
    openssl_bin: str, tmp_path: Path, ca: x509.Certificate, case: Case
) -> str:
    """`openssl x509 -text` shows the expected algorithm; `openssl verify` accepts the
    self-signed root. Returns the path of the root's PEM file."""
    ca_pem = write_pem(tmp_path / "ca.pem", ca)
    text = openssl(openssl_bin, "x509", "-noout", "-text", "-in", ca_pem).stdout
    assert f"Signature Algorithm: {case.openssl_alg}" in text
    assert "CA:TRUE" in text
    if case.pss:
        assert case.hash is not None
        assert f"Salt Length: 0x{case.hash.digest_size:02X}" in text
    out = openssl(openssl_bin, "verify", "-x509_strict", "-CAfile", ca_pem, ca_pem).stdout
    assert out.strip() == f"{ca_pem}: OK"
    return ca_pem


# -- every artefact a CA signs, per key type (softkms) --------------------------------------


@pytest.mark.interop
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_softkms_key_signs_certificates_csr_crl_and_ocsp(
    case: Case,
    ca_key: Callable[[KeyType], RemotePrivateKey],
    openssl_bin: str,
    tmp_path: Path,
) -> None:
    key = ca_key(case.key_type)
    pub = key.public_key()

    # Self-signed root and a leaf it issues.
    ca = ca_certificate(key, case)
    ca.verify_directly_issued_by(ca)
    assert ca.public_key() == pub
    leaf = leaf_certificate(key, ca, case)
    leaf.verify_directly_issued_by(ca)

    # A CSR signed by the CA key (e.g. for cross-signing).
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(ca.subject)
        .sign(key, case.hash, **case.sign_kwargs())
    )
    assert csr.is_signature_valid
    assert csr.public_key() == pub

    # A CRL revoking the leaf.
    revoked = (
        x509.RevokedCertificateBuilder()
        .serial_number(leaf.serial_number)
        .revocation_date(NOW)
        .build()
    )
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(NOW)
        .next_update(NOW + dt.timedelta(days=1))
        .add_revoked_certificate(revoked)
        .add_extension(x509.CRLNumber(1), critical=False)
        .sign(key, case.hash, **case.sign_kwargs())
    )
    assert crl.is_signature_valid(pub)
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None

    # An OCSP response about the leaf, signed by the CA itself (the builder takes no padding:
    # RSA is PKCS#1 v1.5 there).
    response = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=leaf,
            issuer=ca,
            algorithm=hashes.SHA256(),
            cert_status=ocsp.OCSPCertStatus.REVOKED,
            this_update=NOW,
            next_update=NOW + dt.timedelta(hours=1),
            revocation_time=NOW,
            revocation_reason=None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, ca)
        .sign(key, case.hash)
    )
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    verify_signature(
        pub, response.signature, response.tbs_response_bytes, response.signature_hash_algorithm
    )

    # The same artefacts through the openssl CLI.
    ca_pem = openssl_checks_certificate(openssl_bin, tmp_path, ca, case)
    leaf_pem = write_pem(tmp_path / "leaf.pem", leaf)
    out = openssl(openssl_bin, "verify", "-x509_strict", "-CAfile", ca_pem, leaf_pem).stdout
    assert out.strip() == f"{leaf_pem}: OK"

    csr_pem = tmp_path / "ca.csr"
    csr_pem.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    checked = openssl(openssl_bin, "req", "-verify", "-noout", "-in", str(csr_pem))
    assert "verify OK" in checked.stdout + checked.stderr

    crl_pem = write_pem(tmp_path / "ca.crl", crl)
    checked = openssl(openssl_bin, "crl", "-noout", "-in", crl_pem, "-CAfile", ca_pem)
    assert "verify OK" in checked.stdout + checked.stderr

    response_der = tmp_path / "ocsp.der"
    response_der.write_bytes(response.public_bytes(serialization.Encoding.DER))
    checked = openssl(
        openssl_bin,
        "ocsp",
        "-respin",
        str(response_der),
        "-CAfile",
        ca_pem,
        "-issuer",
        ca_pem,
        "-sha256",  # the CertID hash the response uses
        "-cert",
        leaf_pem,
    )
    output = checked.stdout + checked.stderr
    assert "Response verify OK" in output
    assert f"{leaf_pem}: revoked" in output


# -- the pkcs11 backend (SoftHSM) -----------------------------------------------------------


@pytest.fixture(scope="module")
def hsm_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyBackend]:
    with softhsm_token(tmp_path_factory, "kmsgate-pki-remote-key") as token:
        from kmsgate.backends.pkcs11 import Pkcs11Backend  # python-pkcs11 is there (checked)

        backend = Pkcs11Backend.from_config("hsm", BackendSettings(**token.backend_config()))
        try:
            yield backend
        finally:
            backend.close()


HSM_CASES = [c for c in CASES if c.key_type in (KeyType.ECDSA_P384, KeyType.ED25519) or c.pss]


@pytest.mark.interop
@pytest.mark.parametrize("case", HSM_CASES, ids=[c.id for c in HSM_CASES])
def test_hsm_key_signs_a_certificate_openssl_verifies(
    case: Case, hsm_backend: KeyBackend, openssl_bin: str, tmp_path: Path
) -> None:
    backend_key = hsm_backend.create_key(KeySpec(f"hsm-ca-{case.id}", 1, case.key_type))
    assert backend_key.ref.startswith("pkcs11:")
    key = remote_private_key(hsm_backend, backend_key, public_of(backend_key))
    ca = ca_certificate(key, case)
    ca.verify_directly_issued_by(ca)
    openssl_checks_certificate(openssl_bin, tmp_path, ca, case)
    with pytest.raises(NotSupported, match="never leaves it"):
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


# -- what the wrapper refuses ---------------------------------------------------------------


def test_private_half_never_leaves_the_backend(
    ca_key: Callable[[KeyType], RemotePrivateKey],
) -> None:
    ec_key = ca_key(KeyType.ECDSA_P256)
    rsa_key = ca_key(KeyType.RSA_3072)
    ed_key = ca_key(KeyType.ED25519)
    assert isinstance(ec_key, RemoteEcPrivateKey) and isinstance(ec_key, ec.EllipticCurvePrivateKey)
    assert isinstance(rsa_key, RemoteRsaPrivateKey) and isinstance(rsa_key, rsa.RSAPrivateKey)
    assert isinstance(ed_key, RemoteEd25519PrivateKey)
    assert isinstance(ed_key, ed25519.Ed25519PrivateKey)

    for key in (ec_key, rsa_key, ed_key):
        for fmt, enc in [
            (serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            (
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            ),
        ]:
            with pytest.raises(NotSupported, match="held by backend 'local' and never leaves"):
                key.private_bytes(serialization.Encoding.PEM, fmt, enc)
        assert copy.copy(key) is key and copy.deepcopy(key) is key
        assert "local" in repr(key) and key.backend_key.ref in repr(key)

    with pytest.raises(NotSupported):
        ec_key.private_numbers()
    with pytest.raises(NotSupported):
        ec_key.exchange(ec.ECDH(), ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(NotSupported):
        rsa_key.private_numbers()
    with pytest.raises(NotSupported):
        rsa_key.decrypt(b"\x00" * 384, padding.PKCS1v15())
    with pytest.raises(NotSupported):
        ed_key.private_bytes_raw()

    assert isinstance(ec_key, RemoteEcPrivateKey)
    assert ec_key.curve.name == "secp256r1" and ec_key.key_size == 256
    assert rsa_key.key_size == 3072


def test_builders_pass_refusals_through(ca_key: Callable[[KeyType], RemotePrivateKey]) -> None:
    """What the backend cannot do fails with NotSupported out of the Rust builders."""
    rsa_key = ca_key(KeyType.RSA_3072)
    assert isinstance(rsa_key, RemoteRsaPrivateKey)
    ec_key = ca_key(KeyType.ECDSA_P256)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name("refused"))
        .issuer_name(name("refused"))
        .public_key(rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=1))
    )
    sha256 = hashes.SHA256()
    with pytest.raises(NotSupported, match="salt"):
        builder.sign(
            rsa_key, sha256, rsa_padding=padding.PSS(padding.MGF1(sha256), padding.PSS.MAX_LENGTH)
        )
    with pytest.raises(NotSupported, match="salt"):
        builder.sign(rsa_key, sha256, rsa_padding=padding.PSS(padding.MGF1(sha256), 20))
    with pytest.raises(NotSupported, match="MGF1"):
        builder.sign(rsa_key, sha256, rsa_padding=padding.PSS(padding.MGF1(hashes.SHA512()), 32))
    with pytest.raises(NotSupported, match="sha3-256"):
        builder.sign(rsa_key, hashes.SHA3_256())
    with pytest.raises(NotSupported, match="deterministic"):
        builder.sign(ec_key, sha256, ecdsa_deterministic=True)
    with pytest.raises(NotSupported, match="OAEP"):
        rsa_key.sign(b"m", padding.OAEP(padding.MGF1(sha256), sha256, None), sha256)
    with pytest.raises(NotSupported):
        rsa_key.sign(b"m", padding.PKCS1v15(), utils.NoDigestInfo())

    # An integer salt equal to the hash length is the same algorithm as DIGEST_LENGTH.
    cert = builder.sign(rsa_key, sha256, rsa_padding=padding.PSS(padding.MGF1(sha256), 32))
    cert.verify_directly_issued_by(cert)


def test_prehashed_digest_is_signed_as_a_digest(
    ca_key: Callable[[KeyType], RemotePrivateKey],
) -> None:
    message = b"kmsgate remote key prehashed message"
    h = hashes.Hash(hashes.SHA384())
    h.update(message)
    digest = h.finalize()
    ec_key = ca_key(KeyType.ECDSA_P384)
    assert isinstance(ec_key, RemoteEcPrivateKey)
    signature = ec_key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA384())))
    verify_signature(ec_key.public_key(), signature, message, hashes.SHA384())

    rsa_key = ca_key(KeyType.RSA_3072)
    assert isinstance(rsa_key, RemoteRsaPrivateKey)
    pss = padding.PSS(padding.MGF1(hashes.SHA384()), padding.PSS.DIGEST_LENGTH)
    signature = rsa_key.sign(digest, pss, utils.Prehashed(hashes.SHA384()))
    verify_signature(rsa_key.public_key(), signature, message, hashes.SHA384(), pss=True)


def test_wrapping_checks_the_public_key(softkms: SoftKmsBackend) -> None:
    key = softkms.create_key(KeySpec("check-p256", 1, KeyType.ECDSA_P256))
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(InvalidRequest, match="not the backend's"):
        remote_private_key(softkms, key, other)
    with pytest.raises(InvalidRequest, match="is not ecdsa-p256"):
        remote_private_key(softkms, key, ec.generate_private_key(ec.SECP384R1()).public_key())
    with pytest.raises(InvalidRequest, match="is not ecdsa-p256"):
        remote_private_key(softkms, key, ed25519.Ed25519PrivateKey.generate().public_key())
    hmac_key = softkms.create_key(KeySpec("check-hmac", 1, KeyType.HMAC_SHA256))
    with pytest.raises(InvalidRequest, match="cannot sign"):
        remote_private_key(softkms, hmac_key, other)
