"""Name constraints (RFC 5280 4.2.1.10) as kmsgate applies them before issuing."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509

from kmsgate.errors import InvalidRequest
from kmsgate.pki.constraints import refuse_outside_constraints
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
