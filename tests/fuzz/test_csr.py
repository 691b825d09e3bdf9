"""Fuzz CSR intake as `POST /v1/pki/cas/{ca}/issue` runs it before signing: the PEM read
(`IssueRequest.to_input`), the SANs named to the policy, and `Profile.check` under each dev
profile. Every refusal is InvalidRequest.

Inputs are PEM (when they start with `-----`) or DER wrapped in PEM. Besides mutants of the
corpus, CSRs are assembled here field by field (subject, key, extensions in any number and
order, repeated or garbled) and signed with the key they name, so that they get past the
signature check; some have their signed part mutated before signing.
"""

from __future__ import annotations

import base64
import functools
import textwrap
from collections.abc import Sequence

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509 import BasicConstraints
from hypothesis import example, given
from hypothesis import strategies as st

from kmsgate.config import PkiSettings
from kmsgate.errors import InvalidRequest
from kmsgate.pki.inventory import requested_sans
from kmsgate.pki.profiles import load_profiles
from kmsgate.schemas import IssueRequest
from tests.fuzz import der
from tests.fuzz.harness import (
    FUZZ,
    Input,
    Mutant,
    Target,
    check_corpus,
    edits,
    feed,
    pure,
    rarely,
)

PROFILES = tuple(load_profiles(PkiSettings()).values())
EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
COMMON_NAME = "2.5.4.3"
SAN = "2.5.29.17"
EKU = "2.5.29.37"


def pem_of(data: bytes) -> str:
    """`data` as the `csr` field of an issue request: PEM as given, else DER made PEM."""
    if data.startswith(b"-----"):
        return data.decode("latin-1")
    body = "\n".join(textwrap.wrap(base64.b64encode(data).decode(), 64))
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n"


def intake(data: bytes) -> bool:
    """Whether some dev profile approves the CSR."""
    try:
        request = IssueRequest(csr=pem_of(data), profile="server").to_input()
    except InvalidRequest:
        return False
    requested_sans(request.csr)
    approved = False
    for profile in PROFILES:
        try:
            profile.check(request.csr)
            approved = True
        except InvalidRequest:
            pass
    return approved


@functools.cache
def signing_keys() -> tuple[CertificateIssuerPrivateKeyTypes, ...]:
    """Keys the profiles take and keys they refuse (made once: RSA is slow to make)."""
    return (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        ec.generate_private_key(ec.SECP521R1()),
        ed25519.Ed25519PrivateKey.generate(),
        ed448.Ed448PrivateKey.generate(),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa.generate_private_key(public_exponent=3, key_size=3072),
    )


def signed(key: CertificateIssuerPrivateKeyTypes, info: bytes) -> bytes:
    """The CertificationRequest of `info` signed by `key`."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm, signature = "1.2.840.10045.4.3.2", key.sign(info, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        algorithm, signature = "1.3.101.112", key.sign(info)
    elif isinstance(key, ed448.Ed448PrivateKey):
        algorithm, signature = "1.3.101.113", key.sign(info)
    else:
        assert isinstance(key, rsa.RSAPrivateKey)
        algorithm = "1.2.840.113549.1.1.11"
        signature = key.sign(info, padding.PKCS1v15(), hashes.SHA256())
    rsa_null = isinstance(key, rsa.RSAPrivateKey)
    return der.tlv(
        der.SEQUENCE,
        info,
        der.algorithm(algorithm, null_parameters=rsa_null),
        der.tlv(der.BIT_STRING, b"\x00" + signature),
    )


_TEXT = st.sampled_from(
    ["a.lab", "API.lab", "*.lab", "a.b.lab", "localhost", "spiffe://dev.lab/x", "spiffe://dev.lab/"]
) | st.text(max_size=20)
# UTF8String mostly; Printable, IA5, BMP, Universal, and an OCTET STRING where none belongs
_STRING_TAGS = st.sampled_from([0x0C, 0x0C, 0x0C, 0x13, 0x16, 0x1E, 0x1C, 0x04])


@st.composite
def _value(draw: st.DrawFn) -> bytes:
    """Text as UTF-8 (lone surrogates kept), or any bytes."""
    return draw(_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")) | st.binary(max_size=20))


@st.composite
def general_names(draw: st.DrawFn) -> bytes:
    """A GeneralName of any kind: DNS, URI, IP (4, 8, 16 or 32 bytes), email, OID, or junk."""
    tag = draw(st.sampled_from([0x82, 0x82, 0x86, 0x86, 0x87, 0x81, 0x88, 0xA4, 0xA0]))
    if tag == 0x87:
        return der.tlv(tag, draw(st.sampled_from([b"\x7f\x00\x00\x01", bytes(8), bytes(16)])))
    return der.tlv(tag, draw(_value()))


@st.composite
def extensions(draw: st.DrawFn) -> bytes:
    """An extension a CSR may ask for: names, CA, key usage, EKU, unknown, or garbled."""
    kind = draw(st.sampled_from(["san", "san", "ca", "usage", "eku", "junk"]))
    critical = draw(st.booleans())
    if kind == "san":
        names = draw(st.lists(general_names(), max_size=4))
        return der.extension(SAN, critical, der.tlv(der.SEQUENCE, *names))
    if kind == "ca":
        value = BasicConstraints(ca=draw(st.booleans()), path_length=None).public_bytes()
        return der.extension("2.5.29.19", critical, value)
    if kind == "usage":
        bits = draw(st.sampled_from([b"\x01\x06", b"\x07\x80", b"\x00\xff\x80"]) | st.binary())
        return der.extension("2.5.29.15", critical, der.tlv(der.BIT_STRING, bits))
    if kind == "eku":
        oids = draw(st.lists(st.sampled_from(["1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.9", "2.5"])))
        return der.extension(EKU, critical, der.tlv(der.SEQUENCE, *map(der.oid, oids)))
    oid = draw(st.sampled_from([SAN, EKU, "2.5.29.19", "2.5.29.15", "1.2.3.4"]))
    return der.extension(oid, critical, draw(st.binary(max_size=16)))


def request_info(
    key: CertificateIssuerPrivateKeyTypes,
    version: int = 0,
    names: Sequence[bytes] = (),
    requested: Sequence[bytes] = (),
) -> bytes:
    """A CertificationRequestInfo: `version`, a subject of RDNs `names`, `key`'s public key and
    an extensionRequest of `requested` extensions (when there are any)."""
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    attribute = der.tlv(
        der.SEQUENCE,
        der.oid(EXTENSION_REQUEST),
        der.tlv(der.SET, der.tlv(der.SEQUENCE, *requested)),
    )
    return der.tlv(
        der.SEQUENCE,
        der.integer(version),
        der.tlv(der.SEQUENCE, *names),
        spki,
        der.context(0, attribute if requested else b""),
    )


@st.composite
def csrs(draw: st.DrawFn) -> bytes:
    """A CSR of drawn subject CNs, key and extensions, perhaps with its signed part mutated,
    signed by the key it names."""
    key = signing_keys()[draw(st.integers(0, len(signing_keys()) - 1))]
    cns = [
        der.tlv(der.SET, der.tlv(der.SEQUENCE, der.oid(COMMON_NAME), der.tlv(tag, value)))
        for tag, value in draw(st.lists(st.tuples(_STRING_TAGS, _value()), max_size=2))
    ]
    requested = draw(st.lists(extensions(), max_size=4))
    version = draw(st.sampled_from([0, 0, 0, 1, -1]))
    info = request_info(key, version, cns, requested)
    info = Mutant(0, tuple(draw(rarely(edits())))).apply([info])
    return signed(key, info)


HARNESS = pure("csr", intake, csrs())


def _one_off_csr(version: int = 0, *requested: bytes) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return signed(key, request_info(key, version, (), requested))


_A_LAB = der.extension(SAN, False, der.tlv(der.SEQUENCE, der.tlv(0x82, b"a.lab")))
REPEATED_SAN = _one_off_csr(0, _A_LAB, _A_LAB)
"""Found by this harness: the SANs named to the policy were read with DuplicateExtension
let through (a 500 from the issue route)."""
VERSION_2 = _one_off_csr(1, _A_LAB)


def test_the_corpus_parses_as_labelled(target: Target) -> None:
    check_corpus(HARNESS, target)


def test_a_csr_of_another_version_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest):
        IssueRequest(csr=pem_of(VERSION_2), profile="server").to_input()


@FUZZ
@given(value=HARNESS.inputs())
@example(value=b"-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n")
@example(value=REPEATED_SAN)
@example(value=VERSION_2)
def test_csr_intake_refuses_only_with_invalid_request(target: Target, value: Input) -> None:
    feed(target, value)
