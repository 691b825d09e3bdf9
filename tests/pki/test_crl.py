"""CRLs from `kmsgate.pki.crl`, checked by the real `openssl` CLI.

A root and an intermediate CA are built here with cryptography; the intermediate signs the
CRLs. `openssl crl` must list the entries, `openssl verify -crl_check` must reject a revoked
leaf and accept another, and a CRL of 100,000 entries must build in under 2 s.

The PKI helpers at the top are shared with `test_ocsp.py`.
"""

from __future__ import annotations

import datetime
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from kmsgate.errors import InvalidRequest
from kmsgate.pki.crl import (
    CA_REVOCATION_REASONS,
    LEAF_REVOCATION_REASONS,
    REASONS,
    KeptEntries,
    RevokedEntry,
    build_crl,
    parse_reason,
)
from kmsgate.pki.issuer import key_usage
from tests.pki.ceremony import ca_key_usage

pytestmark = pytest.mark.interop

OPENSSL_TIMEOUT = 30.0
UTC = datetime.UTC
NOW = datetime.datetime.now(UTC).replace(microsecond=0)
DAY = datetime.timedelta(days=1)


# --- shared PKI helpers ------------------------------------------------------------------------


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issue(
    subject: str,
    public_key: Any,
    *,
    issuer: x509.Certificate | None,
    issuer_key: Any,
    ca: bool,
    serial: int | None = None,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> x509.Certificate:
    """A certificate for `public_key`, self-signed when `issuer` is None."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(subject))
        .issuer_name(issuer.subject if issuer is not None else name(subject))
        .public_key(public_key)
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    authority = issuer.public_key() if issuer is not None else public_key
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(authority), critical=False
    )
    if ca:
        builder = builder.add_extension(
            ca_key_usage(digital_signature=True),
            critical=True,
        )
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    algorithm = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(issuer_key, algorithm)


@dataclass
class Pki:
    """Root -> intermediate -> leaves, with PEM files in `dir`."""

    dir: Path
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    ca: x509.Certificate  # the intermediate: issues the leaves, signs CRLs and OCSP
    ca_key: ec.EllipticCurvePrivateKey
    leaves: dict[int, Path]  # serial -> PEM file

    def pem(self, filename: str, cert: x509.Certificate) -> Path:
        path = self.dir / filename
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    @property
    def root_pem(self) -> Path:
        return self.dir / "root.pem"

    @property
    def ca_pem(self) -> Path:
        return self.dir / "ca.pem"


LEAF_SERIALS = (0x1001, 0x1002, 0x1003, 0x1004)


def make_pki(directory: Path) -> Pki:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = issue("Test Root", root_key.public_key(), issuer=None, issuer_key=root_key, ca=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("Test Issuing CA", ca_key.public_key(), issuer=root, issuer_key=root_key, ca=True)
    pki = Pki(directory, root, root_key, ca, ca_key, {})
    pki.pem("root.pem", root)
    pki.pem("ca.pem", ca)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    for serial in LEAF_SERIALS:
        leaf = issue(
            f"leaf {serial:#x}",
            leaf_key.public_key(),
            issuer=ca,
            issuer_key=ca_key,
            ca=False,
            serial=serial,
        )
        pki.leaves[serial] = pki.pem(f"leaf-{serial:x}.pem", leaf)
    return pki


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=OPENSSL_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )


class RemoteKey(ec.EllipticCurvePrivateKey):
    """A stand-in for an HSM/KMS-held CA key: only `sign` and `public_key` do anything."""

    def __init__(self, inner: ec.EllipticCurvePrivateKey) -> None:
        self._inner = inner
        self.sign_calls = 0

    def sign(self, data: bytes, signature_algorithm: Any) -> bytes:
        self.sign_calls += 1
        return self._inner.sign(data, signature_algorithm)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._inner.public_key()

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._inner.curve

    @property
    def key_size(self) -> int:
        return self._inner.key_size

    def exchange(self, algorithm: Any, peer_public_key: Any) -> bytes:
        raise AssertionError("a CA key never does key agreement")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise AssertionError("a remote key never reveals its private part")

    def private_bytes(self, *args: Any) -> bytes:
        raise AssertionError("a remote key never reveals its private part")

    def __copy__(self) -> RemoteKey:
        return self

    def __deepcopy__(self, memo: Any) -> RemoteKey:
        return self


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


THREE_REVOKED = [
    RevokedEntry(0x1001, NOW - 2 * DAY, x509.ReasonFlags.key_compromise),
    RevokedEntry(0x1002, NOW - DAY, x509.ReasonFlags.superseded),
    RevokedEntry(0x1003, NOW - DAY, None),
]


def full_crl(pki: Pki, **overrides: Any) -> bytes:
    args: dict[str, Any] = {
        "issuer": pki.ca,
        "key": pki.ca_key,
        "revoked": THREE_REVOKED,
        "number": 7,
        "this_update": NOW,
        "next_update": NOW + DAY,
        "freshest_url": "http://crl.example.test/delta.crl",
        "hash_alg": hashes.SHA256(),
    }
    args.update(overrides)
    return build_crl(**args)


def write_pem_crl(path: Path, der: bytes) -> Path:
    crl = x509.load_der_x509_crl(der)
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


# --- full CRL ----------------------------------------------------------------------------------


def test_full_crl_lists_the_entries_for_openssl(pki: Pki, openssl_bin: str, tmp_path: Path):
    der = full_crl(pki)
    (tmp_path / "crl.der").write_bytes(der)
    out = run(openssl_bin, "crl", "-inform", "DER", "-in", tmp_path / "crl.der", "-noout", "-text")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for serial in ("1001", "1002", "1003"):
        assert f"Serial Number: {serial}" in text
    assert "1004" not in text
    assert "Key Compromise" in text
    assert "Superseded" in text
    assert "X509v3 CRL Number" in text and "\n                7\n" in text
    assert "X509v3 Authority Key Identifier" in text
    assert "X509v3 Freshest CRL" in text and "URI:http://crl.example.test/delta.crl" in text
    assert "Delta CRL Indicator" not in text

    crl = x509.load_der_x509_crl(der)
    assert crl.is_signature_valid(pki.ca_key.public_key())
    assert crl.issuer == pki.ca.subject
    assert crl.last_update_utc == NOW and crl.next_update_utc == NOW + DAY
    ski = pki.ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    entry = crl.get_revoked_certificate_by_serial_number(0x1001)
    assert entry is not None and entry.revocation_date_utc == NOW - 2 * DAY
    no_reason = crl.get_revoked_certificate_by_serial_number(0x1003)
    assert no_reason is not None and len(no_reason.extensions) == 0


def test_openssl_verify_rejects_a_revoked_leaf(pki: Pki, openssl_bin: str, tmp_path: Path):
    crl_pem = write_pem_crl(tmp_path / "crl.pem", full_crl(pki))
    verify = [
        openssl_bin,
        "verify",
        "-crl_check",
        "-CAfile",
        pki.root_pem,
        "-untrusted",
        pki.ca_pem,
        "-CRLfile",
        crl_pem,
    ]
    revoked = run(*verify, pki.leaves[0x1001])
    assert revoked.returncode != 0
    assert "certificate revoked" in revoked.stdout + revoked.stderr
    good = run(*verify, pki.leaves[0x1004])
    assert good.returncode == 0, good.stdout + good.stderr
    assert ": OK" in good.stdout


def test_no_freshest_pointer_without_a_delta_url(pki: Pki):
    crl = x509.load_der_x509_crl(full_crl(pki, freshest_url=None))
    with pytest.raises(x509.ExtensionNotFound):
        crl.extensions.get_extension_for_class(x509.FreshestCRL)


def test_unspecified_reason_is_left_out(pki: Pki):
    der = full_crl(pki, revoked=[RevokedEntry(5, NOW, x509.ReasonFlags.unspecified)])
    entry = x509.load_der_x509_crl(der)[0]
    assert len(entry.extensions) == 0


# --- delta CRL ---------------------------------------------------------------------------------


def test_delta_crl_carries_the_indicator_and_only_its_entries(
    pki: Pki, openssl_bin: str, tmp_path: Path
):
    delta_entries = [
        RevokedEntry(0x1004, NOW, x509.ReasonFlags.cessation_of_operation),
        RevokedEntry(0x1002, NOW, x509.ReasonFlags.remove_from_crl),
    ]
    der = full_crl(pki, revoked=delta_entries, number=8, delta_base=7, freshest_url=None)
    crl = x509.load_der_x509_crl(der)
    indicator = crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
    assert indicator.critical and indicator.value.crl_number == 7
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 8
    assert sorted(r.serial_number for r in crl) == [0x1002, 0x1004]
    assert crl.is_signature_valid(pki.ca_key.public_key())

    (tmp_path / "delta.der").write_bytes(der)
    out = run(
        openssl_bin, "crl", "-inform", "DER", "-in", tmp_path / "delta.der", "-noout", "-text"
    )
    assert out.returncode == 0, out.stderr
    assert "X509v3 Delta CRL Indicator: critical" in out.stdout
    assert "Remove From CRL" in out.stdout
    assert "Freshest CRL" not in out.stdout


def test_delta_crl_rules(pki: Pki):
    with pytest.raises(InvalidRequest, match="freshest"):
        full_crl(pki, number=8, delta_base=7)  # full_crl sets a freshest_url
    with pytest.raises(InvalidRequest, match="delta_base"):
        full_crl(pki, number=7, delta_base=7, freshest_url=None)
    with pytest.raises(InvalidRequest, match="removeFromCRL"):
        full_crl(pki, revoked=[RevokedEntry(3, NOW, x509.ReasonFlags.remove_from_crl)])


# --- the 100k requirement ----------------------------------------------------------------------


def test_100k_entries_build(pki: Pki):
    # a mix of reasons (and none), with serials as large as random 16-octet ones
    reasons = [None, *(r for r in x509.ReasonFlags if r is not x509.ReasonFlags.remove_from_crl)]
    revoked = [
        RevokedEntry((1 << 120) + serial * 7919, NOW - DAY, reasons[serial % len(reasons)])
        for serial in range(100_000)
    ]

    der = full_crl(pki, revoked=revoked)  # how fast: scripts/bench.py --scenarios pki

    crl = x509.load_der_x509_crl(der)
    assert len(crl) == 100_000
    assert crl.is_signature_valid(pki.ca_key.public_key())
    for serial in (1, 5, 99_999):
        entry = crl.get_revoked_certificate_by_serial_number((1 << 120) + serial * 7919)
        assert entry is not None and entry.revocation_date_utc == NOW - DAY
        reason = reasons[serial % len(reasons)]
        present = [e.value.reason for e in entry.extensions if isinstance(e.value, x509.CRLReason)]
        # RFC 5280 §5.3.1: `unspecified` is written as no reason code at all
        unstated = reason in (None, x509.ReasonFlags.unspecified)
        assert present == ([] if unstated else [reason])


def test_kept_entries_are_taken_again_and_follow_each_build(pki: Pki):
    kept = KeptEntries()
    first = x509.load_der_x509_crl(full_crl(pki, revoked=THREE_REVOKED, kept=kept))
    again = x509.load_der_x509_crl(full_crl(pki, revoked=THREE_REVOKED))
    assert first.tbs_certlist_bytes == again.tbs_certlist_bytes  # what is signed: the same
    taken = dict(kept.entries)
    assert list(taken) == THREE_REVOKED

    # one entry gone, one with another reason, one new: only the unchanged ones are taken
    changed = RevokedEntry(0x1002, NOW - DAY, x509.ReasonFlags.key_compromise)
    new = RevokedEntry(0x1004, NOW, x509.ReasonFlags.affiliation_changed)
    crl = x509.load_der_x509_crl(
        full_crl(pki, revoked=[THREE_REVOKED[0], changed, THREE_REVOKED[2], new], kept=kept)
    )
    assert list(kept.entries) == [THREE_REVOKED[0], changed, THREE_REVOKED[2], new]
    assert kept.entries[THREE_REVOKED[0]] is taken[THREE_REVOKED[0]]
    assert kept.entries[THREE_REVOKED[2]] is taken[THREE_REVOKED[2]]
    reasons = {e.serial_number: e.extensions for e in crl}
    assert reasons[0x1002].get_extension_for_class(x509.CRLReason).value.reason is (
        x509.ReasonFlags.key_compromise
    )
    assert sorted(reasons) == [0x1001, 0x1002, 0x1003, 0x1004]

    # a build refused keeps what the last good one kept
    with pytest.raises(InvalidRequest, match="listed twice"):
        full_crl(pki, revoked=[new, new], kept=kept)
    assert len(kept.entries) == 4


# --- keys, reasons, validation -----------------------------------------------------------------


def test_a_remote_key_signs_once_through_the_builder(pki: Pki):
    remote = RemoteKey(pki.ca_key)
    crl = x509.load_der_x509_crl(full_crl(pki, key=remote))
    assert remote.sign_calls == 1
    assert crl.is_signature_valid(pki.ca_key.public_key())


def test_ed25519_ca_signs_without_a_hash(tmp_path: Path):
    key = ed25519.Ed25519PrivateKey.generate()
    ca = issue("Ed CA", key.public_key(), issuer=None, issuer_key=key, ca=True)
    der = build_crl(
        issuer=ca,
        key=key,
        revoked=THREE_REVOKED,
        number=1,
        this_update=NOW,
        next_update=NOW + DAY,
        hash_alg=None,
    )
    assert x509.load_der_x509_crl(der).is_signature_valid(key.public_key())


def test_reason_names_are_rfc5280():
    assert len(REASONS) == 10
    for flag in x509.ReasonFlags:
        assert flag in REASONS.values()
    assert parse_reason("keyCompromise") is x509.ReasonFlags.key_compromise
    assert parse_reason("aACompromise") is x509.ReasonFlags.aa_compromise
    assert parse_reason("removeFromCRL") is x509.ReasonFlags.remove_from_crl
    with pytest.raises(InvalidRequest) as caught:
        parse_reason("key_compromise")
    assert "keyCompromise" in caught.value.detail and "cACompromise" in caught.value.detail
    assert parse_reason("cACompromise", CA_REVOCATION_REASONS) is x509.ReasonFlags.ca_compromise
    for names, refused in (
        (CA_REVOCATION_REASONS, ("certificateHold", "aACompromise", "removeFromCRL")),
        (LEAF_REVOCATION_REASONS, ("cACompromise", "certificateHold", "aACompromise")),
    ):
        for name in refused:
            with pytest.raises(InvalidRequest, match="does not apply here"):
                parse_reason(name, names)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"key": ec.generate_private_key(ec.SECP256R1())}, "does not match"),
        ({"this_update": NOW.replace(tzinfo=None)}, "timezone"),
        ({"next_update": NOW}, "after"),
        ({"number": -1}, "CRL number"),
        ({"number": 1 << 159}, "CRL number"),
        ({"revoked": [RevokedEntry(0, NOW)]}, "out of range"),
        ({"revoked": [RevokedEntry(9, NOW), RevokedEntry(9, NOW)]}, "twice"),
        ({"revoked": [RevokedEntry(9, NOW.replace(tzinfo=None))]}, "timezone"),
    ],
)
def test_bad_input_is_refused(pki: Pki, overrides: dict[str, Any], message: str):
    with pytest.raises(InvalidRequest, match=message):
        full_crl(pki, **overrides)


def test_an_issuer_without_crl_sign_is_refused(pki: Pki):
    key = ec.generate_private_key(ec.SECP256R1())
    no_crl_sign = key_usage(digital_signature=True)
    leafish = issue(
        "not a CRL signer",
        key.public_key(),
        issuer=pki.ca,
        issuer_key=pki.ca_key,
        ca=False,
        extensions=[(no_crl_sign, True)],
    )
    with pytest.raises(InvalidRequest, match="cRLSign"):
        full_crl(pki, issuer=leafish, key=key)
