"""Name constraints (RFC 5280 4.2.1.10) as kmsgate applies them before issuing."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kmsgate.errors import InvalidRequest
from kmsgate.pki.constraints import refuse_outside_constraints
from tests.components import run_openssl
from tests.helpers import self_signed

NOBODY = x509.Name([])


def ca(permitted=None, excluded=None, name: str = "Constrained CA") -> x509.Certificate:
    constrained = permitted is not None or excluded is not None
    extensions = [x509.NameConstraints(permitted, excluded)] if constrained else []
    return self_signed(name, ca=True, extensions=extensions)[1]


DNS, IP, URI = x509.DNSName, x509.IPAddress, x509.UniformResourceIdentifier


def ip(text: str) -> x509.IPAddress:
    return IP(ipaddress.ip_address(text))


def net(text: str) -> x509.IPAddress:
    return IP(ipaddress.ip_network(text))


@pytest.mark.parametrize(
    ("permitted", "excluded", "name", "allowed"),
    [
        ([DNS("example.com")], None, DNS("example.com"), True),
        ([DNS("example.com")], None, DNS("a.b.Example.COM"), True),
        ([DNS("example.com")], None, DNS("badexample.com"), False),
        ([DNS(".example.com")], None, DNS("example.com"), False),
        ([DNS(".example.com")], None, DNS("www.example.com"), True),
        ([DNS("example.com")], [DNS("secret.example.com")], DNS("x.secret.example.com"), False),
        (None, [DNS("example.com")], DNS("other.org"), True),
        ([DNS("example.com")], None, ip("192.0.2.1"), True),  # no IP constraint
        ([net("192.0.2.0/24")], None, ip("192.0.2.77"), True),
        ([net("192.0.2.0/24")], None, ip("198.51.100.1"), False),
        ([net("192.0.2.0/24")], None, ip("::1"), False),
        ([URI("td.example")], None, URI("spiffe://td.example/ns/a"), True),
        ([URI("td.example")], None, URI("spiffe://other.example/ns/a"), False),
        ([URI(".example")], None, URI("spiffe://td.example/x"), True),
        ([URI(".example")], None, URI("spiffe://example/x"), False),
        ([URI("td.example")], None, URI("urn:no-host"), False),
    ],
)
def test_one_name_against_one_cas_constraints(permitted, excluded, name, allowed):
    cas = [ca(permitted, excluded)]
    if allowed:
        refuse_outside_constraints(NOBODY, [name], cas)
    else:
        with pytest.raises(InvalidRequest, match="is outside the name constraints"):
            refuse_outside_constraints(NOBODY, [name], cas)


def test_every_ca_above_the_leaf_is_held_to_its_constraints():
    cas = [ca(), ca([DNS("lab")], name="Upper CA")]
    refuse_outside_constraints(NOBODY, [DNS("web.lab")], cas)
    with pytest.raises(InvalidRequest, match="'CN=Upper CA'"):
        refuse_outside_constraints(NOBODY, [DNS("web.org")], cas)


def test_a_subject_is_held_to_directory_name_constraints():
    org = x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "Lab")])
    cas = [ca([x509.DirectoryName(org)])]
    inside = x509.Name(
        [
            *org.rdns,
            x509.RelativeDistinguishedName([x509.NameAttribute(x509.NameOID.COMMON_NAME, "web")]),
        ]
    )
    refuse_outside_constraints(inside, [DNS("web.lab")], cas)
    refuse_outside_constraints(NOBODY, [DNS("web.lab")], cas)  # an empty subject is not judged
    cn_only = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "web")])
    with pytest.raises(InvalidRequest, match="subject 'CN=web'"):
        refuse_outside_constraints(cn_only, [DNS("web.lab")], cas)


@pytest.mark.parametrize(
    ("cn", "sans"),
    [
        ("127.0.0.1", [ip("127.0.0.1")]),  # host-like, no DNS SAN: openssl judges it
        ("10.20.0.1", [ip("10.20.0.1")]),
        ("localhost", [ip("127.0.0.1")]),  # one label: not judged
        ("web.lab", [ip("127.0.0.1")]),  # judged, and inside
        ("127.0.0.1", [ip("127.0.0.1"), DNS("web.lab")]),  # a DNS SAN: the CN is not judged
        ("spiffe://td/x", [URI("spiffe://td/x")]),
    ],
)
def test_a_host_like_cn_is_judged_as_openssl_judges_it(cn, sans, tmp_path, openssl_bin):
    """Without a DNS SAN, openssl holds a CN that looks like a host name to the DNS
    constraints: kmsgate refuses exactly the leaves openssl would refuse."""
    only_lab = x509.NameConstraints([DNS("lab")], None)
    ca_key, ca_cert = self_signed("Lab CA", ca=True, extensions=[only_lab])
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])
    now = datetime.now(UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (tmp_path / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    verified = run_openssl(
        openssl_bin, "verify", "-CAfile", tmp_path / "ca.pem", tmp_path / "leaf.pem"
    )
    try:
        refuse_outside_constraints(subject, sans, [ca_cert])
        refused = False
    except InvalidRequest as exc:
        refused = True
        assert f"CN {cn!r}" in exc.detail and "leave the CN out" in exc.detail
    assert refused == (verified.returncode != 0), verified.stdout + verified.stderr
