"""Name constraints (RFC 5280 4.2.1.10) of the CA certificates above a leaf: a certificate
is refused before it is signed when one of its names falls outside them, instead of being
issued and then rejected by every relying party ("permitted subtree violation").

Each constraint applies to names of its own type only: a name must lie in one of the
permitted subtrees of its type, if the CA lists any, and in none of the excluded ones.
DNS names and URI hosts compare without regard to case; a DNS constraint `example.com`
covers that name and every name below it, `.example.com` only the names below it (as
OpenSSL reads it); a URI constraint names a host exactly, or with a leading `.` the hosts
below it; an IP constraint is a network. The subject, when it is not empty, is held to
directoryName constraints (the subtree's RDNs must begin it). A certificate without a DNS
SAN has its CN held to the DNS constraints too when the CN looks like a host name (dotted
letters, digits, `-` and `_`: an IP address does), as openssl checks it.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID

from kmsgate.errors import InvalidRequest
from kmsgate.pki.extensions import extension_value

_JUDGED = (x509.DNSName, x509.IPAddress, x509.UniformResourceIdentifier, x509.DirectoryName)
"""The name types judged: those kmsgate issues (profiles refuse the others)."""
_LABEL = r"[A-Za-z0-9_]+(?:-+[A-Za-z0-9_]+)*"
_HOST_LIKE = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
"""A CN openssl holds to DNS name constraints (`cn2dnsid`): two or more labels of letters,
digits, `_` and inner `-`."""


def refuse_outside_constraints(
    subject: x509.Name, sans: Sequence[x509.GeneralName], cas: Sequence[x509.Certificate]
) -> None:
    """Raise InvalidRequest naming the first name of `subject` or `sans` that the name
    constraints of one of the CA certificates `cas` (the issuer and those above it) do not
    allow."""
    names: list[tuple[x509.GeneralName, str]] | None = None
    for ca in cas:
        constraints = _constraints(ca)
        if constraints is None:
            continue
        names = names if names is not None else _judged(subject, sans)
        for name, shown in names:
            if not _allowed(name, constraints):
                raise InvalidRequest(
                    f"{shown} is outside the name constraints of CA certificate "
                    f"{ca.subject.rfc4514_string()!r}"
                )


def _judged(
    subject: x509.Name, sans: Sequence[x509.GeneralName]
) -> list[tuple[x509.GeneralName, str]]:
    """The names a relying party holds to name constraints, each with how a refusal names
    it: the SANs of the types kmsgate issues, the subject, and a host-like CN when there is
    no DNS SAN."""
    names: list[tuple[x509.GeneralName, str]] = [
        (san, _shown(san)) for san in sans if isinstance(san, _JUDGED)
    ]
    if not len(subject):
        return names
    names.append((x509.DirectoryName(subject), f"subject {subject.rfc4514_string()!r}"))
    if not any(isinstance(san, x509.DNSName) for san in sans):
        for attribute in subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            cn = attribute.value
            if isinstance(cn, str) and _HOST_LIKE.fullmatch(cn):
                shown = (
                    f"CN {cn!r} (openssl checks a CN that looks like a host name as a DNS "
                    "name when there is no DNS SAN: leave the CN out)"
                )
                names.append((x509.DNSName(cn), shown))
    return names


@functools.lru_cache(maxsize=64)
def _constraints(ca: x509.Certificate) -> x509.NameConstraints | None:
    return extension_value(ca.extensions, x509.NameConstraints)


def _allowed(name: x509.GeneralName, constraints: x509.NameConstraints) -> bool:
    kind = type(name)
    permitted = [tree for tree in constraints.permitted_subtrees or () if type(tree) is kind]
    excluded = [tree for tree in constraints.excluded_subtrees or () if type(tree) is kind]
    if permitted and not any(_within(name, tree) for tree in permitted):
        return False
    return not any(_within(name, tree) for tree in excluded)


def _within(name: x509.GeneralName, tree: x509.GeneralName) -> bool:
    """Whether `name` lies in the subtree `tree` (of the same type)."""
    if isinstance(name, x509.DNSName) and isinstance(tree, x509.DNSName):
        return _dns_within(name.value, tree.value)
    if isinstance(name, x509.IPAddress) and isinstance(tree, x509.IPAddress):
        address, network = name.value, tree.value
        if not isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
            return False
        return address.version == network.version and address in network
    if isinstance(name, x509.UniformResourceIdentifier) and isinstance(
        tree, x509.UniformResourceIdentifier
    ):
        host = urlsplit(name.value).hostname or ""
        base = tree.value.lower()
        return host.endswith(base) if base.startswith(".") else host == base
    if isinstance(name, x509.DirectoryName) and isinstance(tree, x509.DirectoryName):
        return name.value.rdns[: len(tree.value.rdns)] == tree.value.rdns
    return False


def _dns_within(name: str, base: str) -> bool:
    name, base = name.lower(), base.lower()
    if not base:
        return True
    if base.startswith("."):
        return name.endswith(base)
    return name == base or name.endswith("." + base)


def _shown(name: x509.GeneralName) -> str:
    kind = {x509.DNSName: "DNS", x509.IPAddress: "IP", x509.UniformResourceIdentifier: "URI"}
    return f"{kind.get(type(name), type(name).__name__)} SAN {str(name.value)!r}"
