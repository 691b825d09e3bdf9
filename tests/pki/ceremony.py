"""Test helpers of the PKI: an offline root made in the test, and an intermediate created on
the gateway, signed by that root and imported (the ceremony, through the REST API)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kmsgate.pki.issuer import key_usage
from tests.components import run_openssl
from tests.gateway import Api

PEM = serialization.Encoding.PEM


def ca_key_usage(*, digital_signature: bool) -> x509.KeyUsage:
    """keyCertSign and cRLSign (and digitalSignature if asked): a CA's key usage."""
    return key_usage(digital_signature=digital_signature, key_cert_sign=True, crl_sign=True)


class OfflineRoot:
    """A self-signed root whose key stays in the test (as it stays offline in real life)."""

    def __init__(self, name: str = "Test Root") -> None:
        self.key = ec.generate_private_key(ec.SECP384R1())
        now = datetime.now(UTC)
        subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(ca_key_usage(digital_signature=False), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA384())
        )

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(PEM).decode()

    def sign_intermediate(
        self,
        csr_pem: str,
        days: int = 365,
        constraints: x509.NameConstraints | None = None,
        key_id: bytes | None = None,
    ) -> str:
        """The intermediate's certificate (path length 0, `constraints` if given, its
        subjectKeyIdentifier `key_id` if given, else the SHA-1 of its key) for `csr_pem`,
        PEM."""
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        assert csr.is_signature_valid
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(ca_key_usage(digital_signature=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier(key_id)
                if key_id
                else x509.SubjectKeyIdentifier.from_public_key(csr.public_key()),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if constraints is not None:
            cert = cert.add_extension(constraints, critical=True)
        return cert.sign(self.key, hashes.SHA384()).public_bytes(PEM).decode()


def make_intermediate(
    api: Api,
    token: str,
    root: OfflineRoot,
    name: str = "issuing",
    constraints: x509.NameConstraints | None = None,
    key_id: bytes | None = None,
    **key: Any,
) -> dict[str, Any]:
    """Create CA `name` on the gateway (key `key`, default ecdsa-p256 on the default
    backend), sign its CSR with `root` (with name `constraints` and subjectKeyIdentifier
    `key_id` if given) and import it; the active CA as JSON."""
    body = {"name": name, "subject": f"CN={name} CA,O=kmsgate tests", "key": key}
    created = api.call("POST", "/v1/pki/cas", token, json=body)
    assert created.status_code == 201, created.text
    assert created.json()["state"] == "pending"
    cert = root.sign_intermediate(created.json()["csr"], constraints=constraints, key_id=key_id)
    imported = api.call(
        "POST",
        f"/v1/pki/cas/{name}/certificate",
        token,
        json={"certificate": cert, "chain": root.pem},
    )
    assert imported.status_code == 200, imported.text
    active: dict[str, Any] = imported.json()
    return active


def leaf_csr(
    *sans: x509.GeneralName, cn: str | None = None
) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A fresh P-256 key and a CSR for it naming `sans` (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)] if cn else [])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return key, builder.sign(key, hashes.SHA256()).public_bytes(PEM).decode()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def openssl_verifies(
    binary: str, directory: Path, root: OfflineRoot, issued: dict[str, Any], *options: str
) -> None:
    """Assert that `openssl verify` (with `options`, such as `-purpose sslserver`) accepts
    the certificate of an issue reply `issued` against `root`, its chain untrusted."""
    verified = run_openssl(
        binary,
        "verify",
        "-CAfile",
        write(directory / "root.pem", root.pem),
        "-untrusted",
        write(directory / "chain.pem", issued["chain"]),
        *options,
        write(directory / "leaf.pem", issued["certificate"]),
    )
    assert verified.returncode == 0 and ": OK" in verified.stdout, verified.stdout + verified.stderr
