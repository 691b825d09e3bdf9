"""How a search finds certificates by a SAN: the names kept for each certificate
(`certificate_names`) and what a search asks of them. A name is a SAN's value as it
compares (a DNS name in lower case, an IP address in its short form, a URI as it is),
reversed, so that a domain's suffix (`.lab`) is a prefix of its names: one index range.
The index narrows the search; `matches` decides, as it did alone before."""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable

import sqlalchemy as sa

from kmsgate.store import tables

_KINDS = frozenset({"dns", "ip", "uri"})


def _compared(kind: str, value: str) -> str:
    """`value`, of SAN kind `kind`, as names compare."""
    if kind == "dns":
        return value.lower()
    if kind == "ip":
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(value))
    return value


def san_names(sans: Iterable[str]) -> set[str]:
    """The names kept for a certificate with the inventory SANs `sans` (`kind:value`)."""
    return {_compared(*san.partition(":")[::2])[::-1] for san in sans}


def _wanted(wanted: str) -> tuple[frozenset[str], str, bool]:
    """(the SAN kinds `wanted` asks for, its value, whether it is a suffix): a `kind:`
    prefix (as the inventory or openssl prints SANs) asks for that kind only; a leading
    `*.` or `.` asks for names that end with it."""
    kind, sep, rest = wanted.partition(":")
    kinds = _KINDS
    if sep and kind.lower() in _KINDS:
        kinds, wanted = frozenset({kind.lower()}), rest
    if wanted.startswith("*."):
        wanted = wanted[1:]
    return kinds, wanted, wanted.startswith(".")


def matches(sans: list[str], wanted: str) -> bool:
    """Whether one of the inventory SANs `sans` is `wanted` (see `_wanted`): DNS names
    compare without regard to case, IP addresses in any notation (`0:0:0:0:0:0:0:1` as
    openssl prints it is `::1`), URIs exactly (`/ns/Prod` and `/ns/prod` are two SPIFFE
    IDs); a suffix matches the names that end with it."""
    kinds, value, suffix = _wanted(wanted)
    wants = {kind: _compared(kind, value) for kind in kinds}
    for san in sans:
        kind, _, have = san.partition(":")
        if kind not in wants:
            continue
        have, want = _compared(kind, have), wants[kind]
        if have.endswith(want) if suffix else have == want:
            return True
    return False


def serials_named(wanted: str) -> sa.Select[tuple[str]]:
    """The serials of the certificates that may have the SAN `wanted`: every one that
    does (`matches` tells which do), through the index of names."""
    kinds, value, suffix = _wanted(wanted)
    forms = {_compared(kind, value)[::-1] for kind in kinds}
    names = tables.certificate_names.c
    if not suffix:
        return sa.select(names.serial).where(names.name.in_(sorted(forms)))
    ranges = (names.name.startswith(form, autoescape=True) for form in sorted(forms))
    return sa.select(names.serial).where(sa.or_(*ranges))
