"""The offline root (`kmsgate.pki.root`): the encrypted key file, the self-signed root and
the intermediates it signs, checked with cryptography and the openssl CLI."""

from __future__ import annotations

import stat
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kmsgate.errors import Conflict, InvalidRequest
from kmsgate.pki.root import (
    MIN_PASSPHRASE_BYTES,
    init_root,
    load_root,
    root_crl,
    sha256_fingerprint,
    sign_intermediate,
)
from kmsgate.pki.token_root import RootToken
from tests.components import run_openssl
from tests.helpers import issued_by
from tests.pki.test_profiles import openssl_csr

PASSPHRASE = b"correct horse battery staple"
PEM = serialization.Encoding.PEM


def intermediate_csr(
    name: str = "Issuing CA", *extensions: x509.ExtensionType
) -> tuple[ec.EllipticCurvePrivateKey, x509.CertificateSigningRequest]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return key, builder.sign(key, hashes.SHA256())


@pytest.fixture
def root(tmp_path: Path) -> tuple[Path, x509.Certificate]:
    """(key file, certificate) of a fresh root."""
    key_file = tmp_path / "root-key.pem"
    return key_file, init_root(key_file, PASSPHRASE, "CN=Test Root,O=kmsgate tests")[1]


def test_init_root_writes_an_encrypted_0600_key_and_a_self_signed_ca(root, openssl_bin) -> None:
    key_file, cert = root
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    data = key_file.read_bytes()
    assert data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(TypeError):  # no passphrase: cryptography refuses an encrypted key
        serialization.load_pem_private_key(data, None)
    with pytest.raises(ValueError):
        serialization.load_pem_private_key(data, b"not the passphrase")
    with pytest.raises(InvalidRequest, match="wrong passphrase"):
        load_root(key_file, b"not the passphrase")
    key = load_root(key_file, PASSPHRASE)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert key.public_key() == cert.public_key()
    # PKCS#8 PBES2 with scrypt (N = 2^14, r = 8, p = 16) and AES-256-CBC, which openssl reads
    parsed = run_openssl(openssl_bin, "asn1parse", "-in", key_file).stdout
    for field in (":PBES2", ":scrypt", "INTEGER           :4000", ":08", ":10", ":aes-256-cbc"):
        assert field in parsed, (field, parsed)
    pass_arg = f"pass:{PASSPHRASE.decode()}"
    decrypted = run_openssl(openssl_bin, "pkey", "-in", key_file, "-passin", pass_arg, "-pubout")
    assert decrypted.returncode == 0, decrypted.stderr
    assert serialization.load_pem_public_key(decrypted.stdout.encode()) == cert.public_key()
    wrong = run_openssl(openssl_bin, "pkey", "-in", key_file, "-passin", "pass:wrong", "-pubout")
    assert wrong.returncode != 0

    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "CN=Test Root,O=kmsgate tests"
    cert.verify_directly_issued_by(cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length is None
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=3650) <= lifetime <= timedelta(days=3650, minutes=2)
    openssl = subprocess.run(
        [openssl_bin, "x509", "-noout", "-fingerprint", "-sha256"],
        input=cert.public_bytes(PEM).decode(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert openssl.stdout.strip() == f"sha256 Fingerprint={sha256_fingerprint(cert)}"


def test_init_root_never_replaces_a_key_file(root) -> None:
    key_file, _ = root
    before = key_file.read_bytes()
    with pytest.raises(Conflict, match="exists"):
        init_root(key_file, PASSPHRASE, "Another Root")
    assert key_file.read_bytes() == before


@pytest.mark.parametrize(
    ("passphrase", "subject", "options", "message"),
    [
        (b"x" * (MIN_PASSPHRASE_BYTES - 1), "Root", {}, "passphrase"),
        (PASSPHRASE, "CN=", {}, "subject"),
        (PASSPHRASE, "Root", {"key_type": "ed25519"}, "root key is one of"),
        (PASSPHRASE, "Root", {"days": 0}, "days"),
        (PASSPHRASE, "Root", {"path_length": -1}, "path length"),
    ],
)
def test_init_root_refuses_bad_input_and_writes_nothing(
    tmp_path, passphrase, subject, options, message
) -> None:
    key_file = tmp_path / "k.pem"
    with pytest.raises(InvalidRequest, match=message):
        init_root(key_file, passphrase, subject, **options)
    assert not key_file.exists()


def test_load_root_reads_a_key_encrypted_with_pbkdf2(tmp_path) -> None:
    """A root key file as kmsgate wrote it before scrypt (cryptography's best available
    encryption: PBKDF2) still loads."""
    key = ec.generate_private_key(ec.SECP384R1())
    key_file = tmp_path / "old-root-key.pem"
    encryption = serialization.BestAvailableEncryption(PASSPHRASE)
    key_file.write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, encryption))
    assert load_root(key_file, PASSPHRASE).public_key() == key.public_key()


def test_load_root_refuses_an_empty_passphrase(root) -> None:
    key_file, _ = root
    with pytest.raises(InvalidRequest, match="empty"):
        load_root(key_file, b"")


def test_load_root_refuses_an_unencrypted_key(tmp_path) -> None:
    plain = tmp_path / "plain.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    plain.write_bytes(
        key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(InvalidRequest, match="not an encrypted private key"):
        load_root(plain, PASSPHRASE)


def test_sign_intermediate_copies_only_the_subject_and_the_key(root) -> None:
    key_file, root_cert = root
    asked = [
        x509.BasicConstraints(ca=True, path_length=5),
        x509.SubjectAlternativeName([x509.DNSName("evil.example")]),
        x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
    ]
    _, csr = intermediate_csr("Issuing CA", *asked)
    cert = sign_intermediate(load_root(key_file, PASSPHRASE), root_cert, csr, days=365)
    assert cert.subject == csr.subject
    assert cert.issuer == root_cert.subject
    assert cert.public_key() == csr.public_key()
    cert.verify_directly_issued_by(root_cert)
    assert {type(e.value) for e in cert.extensions} == {
        x509.BasicConstraints,
        x509.KeyUsage,
        x509.SubjectKeyIdentifier,
        x509.AuthorityKeyIdentifier,
    }
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value == x509.BasicConstraints(True, 0)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and usage.digital_signature
    root_ski = root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(csr.public_key())
    assert cert.serial_number.bit_length() <= 159


def test_an_intermediate_never_outlives_its_root(tmp_path) -> None:
    key_file = tmp_path / "short-root.pem"
    _, root_cert = init_root(key_file, PASSPHRASE, "Short Root", days=30)
    _, csr = intermediate_csr()
    cert = sign_intermediate(load_root(key_file, PASSPHRASE), root_cert, csr, days=3650)
    assert cert.not_valid_after_utc == root_cert.not_valid_after_utc


def test_sign_intermediate_refuses_a_tampered_csr(root) -> None:
    key_file, root_cert = root
    _, csr = intermediate_csr("Issuing CA")
    der = csr.public_bytes(serialization.Encoding.DER)
    tampered = x509.load_der_x509_csr(der.replace(b"Issuing CA", b"Issuing CB"))
    assert tampered.subject != csr.subject
    with pytest.raises(InvalidRequest, match="CSR signature does not verify"):
        sign_intermediate(load_root(key_file, PASSPHRASE), root_cert, tampered, days=365)


def test_a_csr_signed_with_sha1_is_refused_by_its_name(root, tmp_path, openssl_bin) -> None:
    key_file, root_cert = root
    ec_key = ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    sha1 = openssl_csr(openssl_bin, tmp_path, *ec_key, digest="-sha1")
    with pytest.raises(InvalidRequest, match="the CSR is signed with SHA-1, which is refused"):
        sign_intermediate(load_root(key_file, PASSPHRASE), root_cert, sha1, days=365)


def test_name_constraints_only_when_asked_and_openssl_enforces_them(
    root, tmp_path, openssl_bin
) -> None:
    key_file, root_cert = root
    root_key = load_root(key_file, PASSPHRASE)
    inter_key, csr = intermediate_csr()
    plain = sign_intermediate(root_key, root_cert, csr, days=365)
    with pytest.raises(x509.ExtensionNotFound):
        plain.extensions.get_extension_for_class(x509.NameConstraints)
    cert = sign_intermediate(
        root_key, root_cert, csr, days=365, permitted_dns=["lab", ".example.com"]
    )
    constraints = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    assert constraints.value.permitted_subtrees == [
        x509.DNSName("lab"),
        x509.DNSName(".example.com"),  # kept as given: the names below it, not itself
    ]
    assert constraints.value.excluded_subtrees is None

    root_file = tmp_path / "root.pem"
    root_file.write_bytes(root_cert.public_bytes(PEM))
    inter_file = tmp_path / "inter.pem"
    inter_file.write_bytes(cert.public_bytes(PEM))
    verified = run_openssl(openssl_bin, "verify", "-CAfile", root_file, inter_file)
    assert verified.returncode == 0 and ": OK" in verified.stdout, verified.stderr

    def leaf(name: str) -> Path:
        _, built = issued_by(cert, inter_key, x509.DNSName(name))
        path = tmp_path / f"{name}.pem"
        path.write_bytes(built.public_bytes(PEM))
        return path

    chain = ("-CAfile", root_file, "-untrusted", inter_file)
    inside = run_openssl(openssl_bin, "verify", *chain, leaf("web.lab"))
    assert inside.returncode == 0, inside.stdout + inside.stderr
    assert run_openssl(openssl_bin, "verify", *chain, leaf("www.example.com")).returncode == 0
    for name in ("web.other", "example.com"):
        outside = run_openssl(openssl_bin, "verify", *chain, leaf(name))
        assert outside.returncode != 0, name
        assert "permitted subtree violation" in outside.stdout + outside.stderr


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("other key", "does not belong to the root certificate"),
        ("root pathlen 0", "cannot sign intermediates"),
        ("unlimited below a pathlen 1 root", "path length below it"),
        ("empty subject", "empty subject"),
        ("bad dns", "not a DNS name"),
    ],
)
def test_sign_intermediate_refusals(tmp_path, case, message) -> None:
    path_length = {"root pathlen 0": 0, "unlimited below a pathlen 1 root": 1}.get(case)
    key_file = tmp_path / "root.pem"
    _, root_cert = init_root(key_file, PASSPHRASE, "Root", path_length=path_length)
    root_key = load_root(key_file, PASSPHRASE)
    options: dict[str, object] = {"days": 365}
    if case == "other key":
        init_root(tmp_path / "other.pem", PASSPHRASE, "Other")
        root_key = load_root(tmp_path / "other.pem", PASSPHRASE)
    if case == "unlimited below a pathlen 1 root":
        options["path_length"] = None
    if case == "bad dns":
        options["permitted_dns"] = ["*.lab"]
    _, csr = intermediate_csr()
    if case == "empty subject":
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .sign(key, hashes.SHA256())
        )
    with pytest.raises(InvalidRequest, match=message):
        sign_intermediate(root_key, root_cert, csr, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("pkcs11:token=t", "module-path"),
        ("pkcs11:object=k?module-path=/m.so", "token="),
        ("pkcs11:token=t?module-path=/m.so&pin-value=1234", "never written"),
        ("pkcs11:token=t?module-path=/m.so&pin-source=relative/pin", "absolute"),
        ("pkcs11:token=t?module-path=/m.so&pin-source=file://host/pin", "local file"),
    ],
)
def test_a_root_token_uri_is_checked(uri: str, reason: str) -> None:
    with pytest.raises(InvalidRequest, match=reason):
        RootToken.parse(uri)


def test_a_root_token_uri_names_its_pin_file_and_key() -> None:
    token = RootToken.parse(
        "pkcs11:token=root;object=r.v1;type=private"
        "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/kmsgate/root%20pin"
    )
    assert token.pin_file() == Path("/etc/kmsgate/root pin")
    assert token.key_reference == "pkcs11:token=root;object=r.v1;type=private"


def test_a_root_crl_follows_only_the_roots_own_full_crl(root, tmp_path) -> None:
    key_file, root_cert = root
    root_key = load_root(key_file, PASSPHRASE)
    first = root_crl(root_key, root_cert, revoke=[(0x1234, x509.ReasonFlags.superseded)], days=30)
    assert first.is_signature_valid(root_cert.public_key())  # type: ignore[arg-type]
    second = root_crl(root_key, root_cert, previous=first, days=30)
    assert second.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    kept = second.get_revoked_certificate_by_serial_number(0x1234)
    assert kept is not None and kept.revocation_date_utc == next(iter(first)).revocation_date_utc
    other_file = tmp_path / "other.pem"
    other_key, other_cert = init_root(other_file, PASSPHRASE, "CN=Test Root,O=kmsgate tests")
    foreign = root_crl(other_key, other_cert, days=30)
    with pytest.raises(InvalidRequest, match="not signed by this root"):
        root_crl(root_key, root_cert, previous=foreign, days=30)  # same name, other key
    with pytest.raises(InvalidRequest, match="does not belong to the root"):
        root_crl(load_root(other_file, PASSPHRASE), root_cert, days=30)
    with pytest.raises(InvalidRequest, match="not an http"):
        sign_intermediate(root_key, root_cert, intermediate_csr()[1], days=1, crl_url="ldap://x")
