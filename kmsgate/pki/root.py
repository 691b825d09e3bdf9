"""The offline root CA: its key in a passphrase-encrypted PKCS#8 file, its self-signed
certificate, the intermediate CA certificates it signs and its CRL. Nothing here talks to a
gateway: it runs on the machine that keeps the root (`kmsgate ca init-root`,
`ca sign-intermediate`, `ca root-crl`).

The key file is a PEM `ENCRYPTED PRIVATE KEY` (PKCS#8 `EncryptedPrivateKeyInfo`, PBES2 with
scrypt and AES-256-CBC, see pkcs8.py); `init_root` refuses a passphrase shorter than
`MIN_PASSPHRASE_BYTES`. `load_root` also reads a key encrypted with PBKDF2 (as kmsgate wrote
them before, and as `cryptography` and `openssl pkcs8 -topk8 -v2 aes-256-cbc` write them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kmsgate.errors import Conflict, InvalidRequest
from kmsgate.files import write_new
from kmsgate.pki.crl import RevokedEntry, build_crl
from kmsgate.pki.csr import check_csr_signature
from kmsgate.pki.extensions import authority_key_identifier, extension_value
from kmsgate.pki.issuer import (
    BACKDATE,
    build_certificate,
    crl_distribution_point,
    key_usage,
    new_serial,
    signature_hash,
    validity,
)
from kmsgate.pki.pkcs8 import scrypt_encrypted_pem
from kmsgate.text import has_hidden, quoted

RootKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
"""A root's private key: ECDSA or RSA (what every TLS stack accepts in a chain)."""

ROOT_KEY_TYPES: dict[str, Callable[[], RootKey]] = {
    "ecdsa-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ecdsa-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "rsa-3072": lambda: rsa.generate_private_key(public_exponent=65537, key_size=3072),
    "rsa-4096": lambda: rsa.generate_private_key(public_exponent=65537, key_size=4096),
}
MIN_PASSPHRASE_BYTES = 12


def parse_subject(text: str) -> x509.Name:
    """A name from an RFC 4514 string (`CN=Root,O=Example`) or a bare common name.
    Raises InvalidRequest for a name that does not parse, is empty or holds control
    characters or bidirectional overrides (which forge rows where the name is listed)."""
    if has_hidden(text):
        raise InvalidRequest("a subject cannot hold control characters or bidirectional overrides")
    try:
        name = (
            x509.Name.from_rfc4514_string(text)
            if "=" in text
            else x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, text)])
        )
    except ValueError:
        raise InvalidRequest(f"subject {quoted(text)} is not an RFC 4514 name") from None
    if not name.rdns or not text.strip():
        raise InvalidRequest("a CA needs a non-empty subject")
    return name


def sha256_fingerprint(cert: x509.Certificate) -> str:
    """`AB:CD:...`: the SHA-256 of the certificate's DER, as `openssl x509 -fingerprint`
    prints it."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def init_root(
    key_path: Path,
    passphrase: bytes,
    subject: str | x509.Name,
    *,
    key_type: str = "ecdsa-p384",
    days: int = 3650,
    path_length: int | None = None,
) -> tuple[RootKey, x509.Certificate]:
    """Create a root key in `key_path` (encrypted PKCS#8, mode 0600) and return it with its
    self-signed certificate (see `self_signed_root`): a caller that signs with it at once
    need not decrypt it again (scrypt, made slow on purpose).

    Raises InvalidRequest (subject, key type, days, path length, short passphrase), Conflict
    if `key_path` exists (a root key is never replaced), OSError if it cannot be written.
    """
    name = check_root_request(subject, key_type, days, path_length)
    if len(passphrase) < MIN_PASSPHRASE_BYTES:
        raise InvalidRequest(f"the passphrase needs at least {MIN_PASSPHRASE_BYTES} bytes")
    if key_path.exists():  # before a possibly slow key generation; O_EXCL decides below
        raise Conflict(f"{key_path} exists: refusing to replace a root key")
    key = ROOT_KEY_TYPES[key_type]()
    pem = scrypt_encrypted_pem(key, passphrase)
    cert = self_signed_root(key, name, days=days, path_length=path_length)
    write_private_file(key_path, pem)
    return key, cert


def check_root_request(
    subject: str | x509.Name, key_type: str, days: int, path_length: int | None
) -> x509.Name:
    """The root's subject, once the request for a new root is checked. Raises
    InvalidRequest (subject, key type, days, negative path length)."""
    name = parse_subject(subject) if isinstance(subject, str) else subject
    if key_type not in ROOT_KEY_TYPES:
        raise InvalidRequest(f"a root key is one of {', '.join(ROOT_KEY_TYPES)}, not {key_type!r}")
    _check_days(days)
    if path_length is not None and path_length < 0:
        raise InvalidRequest("the path length cannot be negative")
    return name


def self_signed_root(
    key: RootKey, name: x509.Name, *, days: int, path_length: int | None
) -> x509.Certificate:
    """The root certificate of `key` (a key in memory or on a token): basicConstraints CA
    with `path_length`, keyUsage keyCertSign and cRLSign, subjectKeyIdentifier, valid for
    `days`. Raises what the key's signer raises."""
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(new_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, signature_hash(key.public_key()))
    )


def write_private_file(path: Path, data: bytes) -> None:
    """Write `data` (a key, a passphrase) to a new file of mode 0600 and sync it; nothing is
    left behind on failure. Raises Conflict if `path` exists, OSError."""
    try:
        write_new(path, data)
    except FileExistsError:
        raise Conflict(f"{path} exists: refusing to replace it") from None


def load_root(key_path: Path, passphrase: bytes) -> RootKey:
    """The root key from its encrypted PKCS#8 file (PBKDF2 or scrypt).

    Raises InvalidRequest (empty or wrong passphrase, a key file that is not encrypted, not
    an ECDSA or RSA key), OSError if it cannot be read.
    """
    data = key_path.read_bytes()
    if not passphrase:
        raise InvalidRequest(f"the passphrase of {key_path} is empty")
    try:
        key = serialization.load_pem_private_key(data, passphrase)
    except TypeError:
        raise InvalidRequest(f"{key_path} is not an encrypted private key") from None
    except ValueError:
        raise InvalidRequest(
            f"cannot decrypt {key_path}: wrong passphrase, or not a PEM private key"
        ) from None
    if not isinstance(key, RootKey):
        raise InvalidRequest(f"{key_path} holds a {type(key).__name__}, not an ECDSA or RSA key")
    return key


def sign_intermediate(
    root_key: RootKey,
    root_cert: x509.Certificate,
    csr: x509.CertificateSigningRequest,
    *,
    days: int,
    path_length: int | None = 0,
    permitted_dns: Sequence[str] | None = None,
    crl_url: str | None = None,
    now: datetime | None = None,
) -> x509.Certificate:
    """An intermediate CA certificate for the CSR's subject and key, signed by the root.

    Only the subject and the public key come from the CSR, never its extensions. The
    certificate carries basicConstraints CA with `path_length` (None: no limit), keyUsage
    digitalSignature (for OCSP answers the CA signs itself), keyCertSign and cRLSign,
    subjectKeyIdentifier, an authorityKeyIdentifier naming the root's key and, with
    `permitted_dns`, critical name constraints permitting only those DNS subtrees, and with
    `crl_url` a CRL distribution point (where the root's CRL, `root_crl`, is published).
    Its not_after is `days` from now, never past the root's.

    Raises InvalidRequest: a CSR whose signature does not verify or whose subject is empty,
    a key that does not match the root certificate, a root that is not a CA, has expired or
    whose path length leaves no room for this intermediate, a bad `days`, path length or
    DNS name.
    """
    check_csr_signature(csr)
    if not csr.subject.rdns:
        raise InvalidRequest("the CSR has an empty subject; a CA needs one")
    if root_cert.public_key() != root_key.public_key():
        raise InvalidRequest("the root key does not belong to the root certificate")
    _check_days(days)
    if path_length is not None and path_length < 0:
        raise InvalidRequest("the path length cannot be negative")
    _check_room_below(root_cert, path_length)
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=True, path_length=path_length), True),
        (key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), True),
        (x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), False),
        (authority_key_identifier(root_cert), False),
    ]
    if permitted_dns:
        subtrees: list[x509.GeneralName] = [_dns_subtree(name) for name in permitted_dns]
        extensions.append((x509.NameConstraints(subtrees, None), True))
    if crl_url is not None:
        extensions.append((crl_distribution_point(_http_url(crl_url)), False))
    not_before, not_after = validity(root_cert, timedelta(days=days), now or datetime.now(UTC))
    return build_certificate(
        issuer=root_cert,
        key=root_key,
        subject=csr.subject,
        public_key=csr.public_key(),
        serial=new_serial(),
        not_before=not_before,
        not_after=not_after,
        extensions=extensions,
    )


def root_crl(
    root_key: RootKey,
    root_cert: x509.Certificate,
    *,
    revoke: Sequence[tuple[int, x509.ReasonFlags]] = (),
    previous: x509.CertificateRevocationList | None = None,
    days: int,
    now: datetime | None = None,
) -> x509.CertificateRevocationList:
    """The root's next full CRL: every entry of `previous` (the root's last CRL), and the
    serials of `revoke` revoked now, for their reasons; CRL number one above `previous`'s
    (1 without one), valid for `days`, never past the root's own end.

    Raises InvalidRequest: a key that does not match the root certificate, a `previous`
    that is not a full CRL the root signed, a serial listed already, a bad `days`.
    """
    if root_cert.public_key() != root_key.public_key():
        raise InvalidRequest("the root key does not belong to the root certificate")
    _check_days(days)
    at = (now or datetime.now(UTC)) - BACKDATE  # a relying party's clock may be behind
    entries = [RevokedEntry(serial, at, reason) for serial, reason in revoke]
    number = 1
    if previous is not None:
        number = _crl_number(previous, root_cert.subject, root_key.public_key()) + 1
        listed = {entry.serial_number for entry in previous}
        again = sorted(serial for serial, _ in revoke if serial in listed)
        if again:
            raise InvalidRequest(f"serial {again[0]:x} is in the previous CRL already")
        entries = [_carried(entry) for entry in previous] + entries
    next_update = min(at + BACKDATE + timedelta(days=days), root_cert.not_valid_after_utc)
    der = build_crl(
        issuer=root_cert,
        key=root_key,
        revoked=entries,
        number=number,
        this_update=at,
        next_update=next_update,
        hash_alg=signature_hash(root_cert.public_key()),
    )
    return x509.load_der_x509_crl(der)


def _crl_number(
    crl: x509.CertificateRevocationList,
    root: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
) -> int:
    """The number of `crl`, a full CRL of the root named `root` whose key is `public_key`.
    Raises InvalidRequest."""
    if crl.issuer != root or not crl.is_signature_valid(public_key):
        raise InvalidRequest("the previous CRL is not signed by this root")
    if extension_value(crl.extensions, x509.DeltaCRLIndicator) is not None:
        raise InvalidRequest("the previous CRL is a delta CRL; give the root's full CRL")
    number = extension_value(crl.extensions, x509.CRLNumber)
    if number is None:
        raise InvalidRequest("the previous CRL has no CRL number")
    return number.crl_number


def _carried(entry: x509.RevokedCertificate) -> RevokedEntry:
    """An entry of the previous CRL, as it was (its time and reason)."""
    reason = extension_value(entry.extensions, x509.CRLReason)
    return RevokedEntry(
        entry.serial_number, entry.revocation_date_utc, reason.reason if reason else None
    )


def _http_url(url: str) -> str:
    """`url` if it is an http(s) URL with a host (what relying parties fetch a CRL from).
    Raises InvalidRequest."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or has_hidden(url):
        raise InvalidRequest(f"{quoted(url)} is not an http(s) URL with a host")
    return url


def _check_days(days: int) -> None:
    if not 0 < days <= 36500:
        raise InvalidRequest("days must be between 1 and 36500")


def _check_room_below(root_cert: x509.Certificate, path_length: int | None) -> None:
    """Raises InvalidRequest unless the root is a CA whose path length admits an
    intermediate with `path_length`."""
    try:
        constraints = root_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise InvalidRequest("the root certificate has no basicConstraints") from None
    if not constraints.ca:
        raise InvalidRequest("the root certificate is not a CA certificate")
    limit = constraints.path_length
    if limit is None:
        return
    if limit == 0:
        raise InvalidRequest("the root's path length is 0: it cannot sign intermediates")
    if path_length is None or path_length >= limit:
        raise InvalidRequest(f"the root's path length {limit} needs a path length below it")


def _dns_subtree(name: str) -> x509.DNSName:
    """A permitted DNS subtree: `example.com` permits it and every name below it,
    `.example.com` only the names below it (as openssl reads a leading dot). Raises
    InvalidRequest for a name that is empty, not ASCII or not a host name."""
    text = name.strip().lower()
    label = text.removeprefix(".")
    if (
        not label
        or not label.isascii()
        or any(c in label for c in " */:@")
        or ".." in label
        or label.startswith(".")
    ):
        raise InvalidRequest(f"{name!r} is not a DNS name for a name constraint")
    return x509.DNSName(text)
