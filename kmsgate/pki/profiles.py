"""Certificate profiles: what a certificate issued from a CSR may name, for how long, with
which key, and which extensions it carries.

Only the profile decides the extensions. A CSR contributes its public key, its subject
alternative names (each checked against the profile's rules) and its CN (which must repeat
one of those names); every other extension it asks for is never copied, and asking for a CA
certificate, a CA key usage or an extended key usage the profile does not grant is refused.

Matching rules (docs/operations.md, "Certificate profiles"):
- DNS: `name` matches itself; `*.base` matches exactly one label under `base` (`a.base`,
  not `a.b.base` nor `base`); `**.base` matches one or more labels under `base`. Names are
  compared lower-case; a requested wildcard name (`*.x`) is never issued.
- IP: an address or a CIDR network; a requested address must lie in one of them.
- URI: `scheme://authority/path` matches itself only; `scheme://authority/path/*` matches
  one or more further path segments of `[A-Za-z0-9._-]` (no `.`/`..`, empty segments,
  query or fragment). Comparison is exact and case-sensitive.
"""

from __future__ import annotations

import ipaddress
import re
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from kmsgate.algorithms import KeyType, KeyUsage, key_type_of_public_key, parse_key_type
from kmsgate.config import PkiSettings, ProfileSettings, Settings
from kmsgate.durations import format_duration
from kmsgate.errors import ConfigError, InvalidRequest
from kmsgate.pki.csr import check_csr_signature
from kmsgate.pki.extensions import extension_value
from kmsgate.pki.issuer import key_usage
from kmsgate.spiffe import SPIFFE_PREFIX, is_spiffe_id
from kmsgate.text import quoted

MAX_SANS = 100
"""The most subject alternative names one certificate may carry."""

LeafPublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_EKU_OIDS = {
    "server_auth": ExtendedKeyUsageOID.SERVER_AUTH,
    "client_auth": ExtendedKeyUsageOID.CLIENT_AUTH,
}
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}
_ACCEPTED_KEYS = "use ECDSA P-256/P-384, Ed25519, RSA-3072 or RSA-4096"
_MIN_RSA_BITS = 3072
_MIN_RSA_EXPONENT = 65537
_MAX_RSA_EXPONENT = 2**31 - 1
"""What Go's crypto/rsa accepts (BoringSSL's limit is 33 bits)."""
_MAX_CN_BYTES = 64  # ub-common-name (RFC 5280), counted in UTF-8 as cryptography does
# cryptography warns on stderr, outside the JSON log, when it reads a longer CN in a CSR;
# `_subject` refuses such a CSR with a 400 instead
warnings.filterwarnings("ignore", "Attribute's length must be", UserWarning)
_PROFILE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_AUTHORITY = re.compile(r"[a-z0-9._-]+(?::[0-9]{1,5})?")
_SPIFFE_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")


def _is_hostname(name: str) -> bool:
    return len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def _is_path(path: str) -> bool:
    return all(_SEGMENT.fullmatch(s) and s not in (".", "..") for s in path.split("/"))


@dataclass(frozen=True)
class _DnsRule:
    pattern: str
    kind: Literal["exact", "one", "any"]
    base: str

    @classmethod
    def parse(cls, pattern: str) -> _DnsRule:
        """Raises ConfigError for anything but `name`, `*.name` or `**.name`."""
        lowered = pattern.lower()
        kind: Literal["exact", "one", "any"] = "exact"
        base = lowered
        if lowered.startswith("**."):
            kind, base = "any", lowered[3:]
        elif lowered.startswith("*."):
            kind, base = "one", lowered[2:]
        if not _is_hostname(base):
            raise ConfigError(
                f"bad DNS pattern {pattern!r}: use a host name, *.name (exactly one label "
                "under name) or **.name (one or more labels)"
            )
        return cls(pattern, kind, base)

    def matches(self, name: str) -> bool:
        """Whether the valid, lower-case host name `name` fits this rule."""
        if self.kind == "exact":
            return name == self.base
        _head, dot, tail = name.partition(".")
        if self.kind == "one":
            return bool(dot) and tail == self.base
        return name.endswith("." + self.base)


@dataclass(frozen=True)
class _UriRule:
    pattern: str
    prefix: str | None  # `spiffe://dev.lab/` for `spiffe://dev.lab/*`; None: exact match

    @classmethod
    def parse(cls, pattern: str) -> _UriRule:
        """Raises ConfigError unless `pattern` is `scheme://authority[/path][/*]`."""
        body = pattern.removesuffix("/*")
        scheme, sep, rest = body.partition("://")
        authority, slash, path = rest.partition("/")
        authority_re = _SPIFFE_TRUST_DOMAIN if scheme == "spiffe" else _AUTHORITY
        if not (
            sep
            and _SCHEME.fullmatch(scheme)
            and authority_re.fullmatch(authority)
            and (not slash or _is_path(path))
        ):
            raise ConfigError(
                f"bad URI pattern {pattern!r}: use scheme://authority/path (exact) or "
                "scheme://authority/path/* (one or more further path segments)"
            )
        return cls(pattern, body + "/" if body != pattern else None)

    def matches(self, uri: str) -> bool:
        if self.prefix is None:
            return uri == self.pattern
        rest = uri[len(self.prefix) :]
        return uri.startswith(self.prefix) and bool(rest) and _is_path(rest)


def _ip_network(pattern: str) -> IpNetwork:
    try:
        return ipaddress.ip_network(pattern, strict=True)
    except ValueError as exc:
        raise ConfigError(f"bad IP pattern {pattern!r}: use an address or a network") from exc


def _show_network(network: IpNetwork) -> str:
    single = network.prefixlen == network.max_prefixlen
    return str(network.network_address) if single else str(network)


@dataclass(frozen=True)
class Approved:
    """What a checked CSR may receive: the subject, names, lifetime and key to certify."""

    profile: str
    subject: x509.Name
    sans: tuple[x509.GeneralName, ...]
    ttl: timedelta
    key_type: KeyType
    public_key: LeafPublicKey


@dataclass(frozen=True)
class Profile:
    """A certificate profile, checked and compiled from its `ProfileSettings`."""

    name: str
    ekus: tuple[str, ...]
    dns: tuple[_DnsRule, ...]
    ip: tuple[IpNetwork, ...]
    uri: tuple[_UriRule, ...]
    exactly_one_uri: bool
    max_ttl: timedelta
    default_ttl: timedelta
    key_types: tuple[KeyType, ...]

    @classmethod
    def from_settings(cls, name: str, settings: ProfileSettings) -> Profile:
        """Raises ConfigError for a bad name, pattern or key type, or a profile that can
        name nothing."""
        try:
            return cls._build(name, settings)
        except ConfigError as exc:
            raise ConfigError(f"pki.profiles.{name}: {exc}") from exc

    @classmethod
    def _build(cls, name: str, settings: ProfileSettings) -> Profile:
        if not _PROFILE_NAME.fullmatch(name):
            raise ConfigError("a profile name is 1-63 of a-z, 0-9, '_' and '-'")
        key_types: list[KeyType] = []
        for type_name in settings.key_types:
            try:
                key_type = parse_key_type(type_name)
            except InvalidRequest as exc:
                raise ConfigError(exc.detail) from exc
            if key_type.usage is not KeyUsage.SIGN:
                raise ConfigError(f"key type {type_name!r} cannot hold a certificate's key")
            if key_type not in key_types:
                key_types.append(key_type)
        profile = cls(
            name=name,
            ekus=tuple(dict.fromkeys(settings.ekus)),
            dns=tuple(_DnsRule.parse(p) for p in settings.dns),
            ip=tuple(_ip_network(p) for p in settings.ip),
            uri=tuple(_UriRule.parse(p) for p in settings.uri),
            exactly_one_uri=settings.exactly_one_uri,
            max_ttl=settings.max_ttl,
            default_ttl=settings.default_ttl,
            key_types=tuple(key_types),
        )
        if not (profile.dns or profile.ip or profile.uri):
            raise ConfigError("no dns, ip or uri pattern: the profile could name nothing")
        if profile.exactly_one_uri and not profile.uri:
            raise ConfigError("exactly_one_uri needs at least one uri pattern")
        return profile

    def describe(self) -> dict[str, object]:
        """The profile for `GET /v1/pki/profiles`; TTLs as duration strings (`7d`, `8h`)."""
        return {
            "name": self.name,
            "ekus": list(self.ekus),
            "san_rules": {
                "dns": [rule.pattern for rule in self.dns],
                "ip": [_show_network(network) for network in self.ip],
                "uri": [rule.pattern for rule in self.uri],
                "exactly_one_uri": self.exactly_one_uri,
            },
            "max_ttl": format_duration(self.max_ttl),
            "default_ttl": format_duration(self.default_ttl),
            "key_types": [str(key_type) for key_type in self.key_types],
        }

    def check(self, csr: x509.CertificateSigningRequest, ttl: timedelta | None = None) -> Approved:
        """What `csr` may receive for `ttl` (the profile's default_ttl when None).

        Raises InvalidRequest naming the offending value: a signature that does not verify,
        a refused key, a CA or extended key usage the profile does not grant, no SAN or a
        SAN outside the profile's rules, a CN that is not one of the SANs, a TTL above
        max_ttl.
        """
        lifetime = self._ttl(ttl)
        check_csr_signature(csr)
        public_key, key_type = self._key(csr)
        requested = _requested_extensions(csr)
        self._refuse_asked_extensions(requested)
        sans = self._sans(requested)
        return Approved(
            profile=self.name,
            subject=_subject(csr, sans),
            sans=sans,
            ttl=lifetime,
            key_type=key_type,
            public_key=public_key,
        )

    def extensions(
        self, approved: Approved, authority_key_id: x509.AuthorityKeyIdentifier
    ) -> list[tuple[x509.ExtensionType, bool]]:
        """The (extension, critical) pairs of a certificate issued for `approved` by the
        issuer that `authority_key_id` names (`kmsgate.pki.extensions.
        authority_key_identifier`: its certificate's own key id, however that was made).

        keyUsage is digitalSignature alone for every key type (TLS 1.3 and ECDHE need no
        keyEncipherment; RSA key transport is not supported). The subjectAltName is
        critical when the subject is empty (RFC 5280 4.2.1.6).
        """
        return [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (key_usage(digital_signature=True), True),
            (x509.ExtendedKeyUsage([_EKU_OIDS[eku] for eku in self.ekus]), False),
            (x509.SubjectAlternativeName(approved.sans), len(approved.subject) == 0),
            (x509.SubjectKeyIdentifier.from_public_key(approved.public_key), False),
            (authority_key_id, False),
        ]

    def departures(self, certificate: x509.Certificate) -> list[str]:
        """How `certificate` (made elsewhere: a Vault PKI role signs by its own settings)
        departs from the extended key usage, key usage and basic constraints this profile
        gives; empty if it does not."""
        found: list[str] = []
        extensions = certificate.extensions
        wanted = {_EKU_OIDS[eku] for eku in self.ekus}
        ekus = set(extension_value(extensions, x509.ExtendedKeyUsage) or ())
        if ekus != wanted:
            names = sorted(getattr(oid, "_name", oid.dotted_string) for oid in ekus)
            found.append(f"extended key usage {names}, not {sorted(self.ekus)}")
        if extension_value(extensions, x509.KeyUsage) != key_usage(digital_signature=True):
            found.append("key usage other than digitalSignature alone")
        basic = extension_value(extensions, x509.BasicConstraints)
        if basic is None or basic.ca:
            found.append("no basicConstraints CA:FALSE")
        return found

    def _ttl(self, ttl: timedelta | None) -> timedelta:
        if ttl is None:
            return self.default_ttl
        if ttl <= timedelta(0) or ttl.microseconds:
            raise InvalidRequest("ttl must be a positive whole number of seconds")
        if ttl > self.max_ttl:
            raise InvalidRequest(
                f"ttl {format_duration(ttl)} exceeds the maximum of profile {self.name!r}, "
                f"{format_duration(self.max_ttl)}"
            )
        return ttl

    def _key(self, csr: x509.CertificateSigningRequest) -> tuple[LeafPublicKey, KeyType]:
        try:
            public_key = csr.public_key()
        except (UnsupportedAlgorithm, ValueError) as exc:
            raise InvalidRequest(
                f"the CSR's public key is not supported: {_ACCEPTED_KEYS}"
            ) from exc
        try:
            key_type = key_type_of_public_key(public_key)
        except InvalidRequest:
            raise InvalidRequest(_refused_key(public_key)) from None
        if not isinstance(
            public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
        ):
            raise InvalidRequest(_refused_key(public_key))
        if isinstance(public_key, rsa.RSAPublicKey):
            if not _presented_as_is(public_key, csr):  # rsassaPss: kept as rsaEncryption,
                raise InvalidRequest(  # the key would lose its PSS-only restriction
                    "the CSR's key is an RSA-PSS-only key (rsassaPss), which kmsgate does not "
                    "certify: use an RSA key of type rsaEncryption"
                )
            exponent = public_key.public_numbers().e
            if not _MIN_RSA_EXPONENT <= exponent <= _MAX_RSA_EXPONENT or exponent % 2 == 0:
                raise InvalidRequest(
                    "the CSR's RSA public exponent must be odd, from 65537 to 2^31-1 "
                    "(larger ones are refused by Go and BoringSSL clients)"
                )
        if key_type not in self.key_types:
            allowed = ", ".join(self.key_types)
            raise InvalidRequest(
                f"{key_type} keys are not allowed by profile {self.name!r} (allowed: {allowed})"
            )
        return public_key, key_type

    def _refuse_asked_extensions(self, requested: x509.Extensions) -> None:
        granted = {_EKU_OIDS[eku] for eku in self.ekus}
        for extension in requested:
            value = extension.value
            if isinstance(value, x509.BasicConstraints) and value.ca:
                raise InvalidRequest(
                    "the CSR asks for a CA certificate (basicConstraints ca=true): profile "
                    f"{self.name!r} issues end-entity certificates only"
                )
            if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
                raise InvalidRequest(
                    "the CSR asks for a CA key usage (keyCertSign or cRLSign): profile "
                    f"{self.name!r} issues end-entity certificates only"
                )
            if isinstance(value, x509.ExtendedKeyUsage):
                for oid in value:
                    if oid not in granted:
                        raise InvalidRequest(
                            f"the CSR asks for extended key usage {_eku_name(oid)}, which "
                            f"profile {self.name!r} does not grant"
                        )

    def _sans(self, requested: x509.Extensions) -> tuple[x509.GeneralName, ...]:
        names = list(extension_value(requested, x509.SubjectAlternativeName) or ())
        if not names:
            kinds = [
                kind
                for kind, rules in (("DNS", self.dns), ("IP", self.ip), ("URI", self.uri))
                if rules
            ]
            raise InvalidRequest(
                f"the CSR has no subjectAltName: profile {self.name!r} needs at least one "
                f"({' or '.join(kinds)} name)"
            )
        if len(names) > MAX_SANS:
            raise InvalidRequest(f"the CSR has {len(names)} SANs; at most {MAX_SANS} are issued")
        approved = list(dict.fromkeys(self._approve(name) for name in names))
        uris = sum(isinstance(name, x509.UniformResourceIdentifier) for name in approved)
        if self.exactly_one_uri and uris != 1:
            raise InvalidRequest(
                f"profile {self.name!r} needs exactly one URI SAN; the CSR has {uris}"
            )
        return tuple(approved)

    def _approve(self, name: x509.GeneralName) -> x509.GeneralName:
        refused = f"is not allowed by profile {self.name!r}"
        if isinstance(name, x509.DNSName):
            host = name.value.lower()
            if "*" in host:
                raise InvalidRequest(
                    f"DNS name {quoted(name.value)}: wildcard names are not issued"
                )
            if not _is_hostname(host):
                raise InvalidRequest(f"DNS name {quoted(name.value)} is not a valid host name")
            if not any(rule.matches(host) for rule in self.dns):
                raise InvalidRequest(f"DNS name {quoted(name.value)} {refused}")
            return x509.DNSName(host)
        if isinstance(name, x509.IPAddress):
            address = name.value
            if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
                raise InvalidRequest(f"IP SAN {address} is a network, not an address")
            if not any(address in network for network in self.ip):
                raise InvalidRequest(f"IP address {address} {refused}")
            return name
        if isinstance(name, x509.UniformResourceIdentifier):
            if not any(rule.matches(name.value) for rule in self.uri):
                raise InvalidRequest(f"URI {quoted(name.value)} {refused}")
            if name.value.startswith(SPIFFE_PREFIX) and not is_spiffe_id(name.value):
                # what the pattern allows may still be too long to authenticate with
                raise InvalidRequest(
                    f"URI {quoted(name.value)} is not a SPIFFE ID (at most 2048 bytes)"
                )
            return name
        shown = f" {quoted(name.value)}" if isinstance(name, x509.RFC822Name) else ""
        raise InvalidRequest(
            f"{type(name).__name__} SAN{shown} {refused}: DNS, IP and URI names only"
        )


def load_profiles(settings: Settings | PkiSettings) -> dict[str, Profile]:
    """The configured profiles by name. Raises ConfigError for a bad profile."""
    pki = settings.pki if isinstance(settings, Settings) else settings
    return {name: Profile.from_settings(name, spec) for name, spec in pki.profiles.items()}


def _presented_as_is(public_key: rsa.RSAPublicKey, csr: x509.CertificateSigningRequest) -> bool:
    """Whether the certificate would carry `public_key` as `csr` presents it: its
    rsaEncryption SubjectPublicKeyInfo is the one in the CSR (an RSA-PSS key's is not)."""
    info = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return info in csr.tbs_certrequest_bytes


def _requested_extensions(csr: x509.CertificateSigningRequest) -> x509.Extensions:
    try:
        return csr.extensions
    except x509.DuplicateExtension as exc:
        raise InvalidRequest(f"the CSR repeats the extension {exc.oid.dotted_string}") from exc
    except ValueError as exc:
        raise InvalidRequest("the CSR's requested extensions are malformed") from exc


def _subject(csr: x509.CertificateSigningRequest, sans: tuple[x509.GeneralName, ...]) -> x509.Name:
    """The CSR's CN alone, or an empty name. Raises InvalidRequest unless the CN repeats
    one of the approved SANs (an mTLS principal without a SPIFFE URI is named by it)."""
    try:
        common_names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as exc:
        raise InvalidRequest("the CSR's subject is malformed") from exc
    if not common_names:
        return x509.Name([])
    if len(common_names) > 1:
        raise InvalidRequest("the CSR's subject has more than one CN")
    cn = common_names[0].value
    if not isinstance(cn, str) or not 0 < len(cn.encode()) <= _MAX_CN_BYTES:
        raise InvalidRequest(f"the CSR's CN must be 1-{_MAX_CN_BYTES} bytes (UTF-8), or absent")
    named = next((text for san in sans if (text := _common_name(san, cn)) is not None), None)
    if named is None:
        raise InvalidRequest(f"the CSR's CN {quoted(cn)} is not one of its SANs")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, named)])


def _common_name(san: x509.GeneralName, cn: str) -> str | None:
    """The CN a certificate carries for the CSR's `cn` if it names the approved `san`: the
    SAN's own text (a lower-case DNS name, an IP address in its usual form), so that the
    subject, and the mTLS principal `cn:...` made from it, is the SAN and never a look-alike
    of it (a case variant, a Kelvin sign); None if `cn` names something else."""
    if isinstance(san, x509.DNSName):
        return san.value if cn.isascii() and cn.lower() == san.value else None
    if isinstance(san, x509.IPAddress):
        try:
            same = ipaddress.ip_address(cn) == san.value
        except ValueError:
            return None
        return str(san.value) if same else None
    if isinstance(san, x509.UniformResourceIdentifier) and cn == san.value:
        return cn
    return None


def _eku_name(oid: ObjectIdentifier) -> str:
    name = _EKU_NAMES.get(oid)
    return f"{name} ({oid.dotted_string})" if name else oid.dotted_string


def _refused_key(public_key: object) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        bits = public_key.key_size
        why = "refused (too small)" if bits < _MIN_RSA_BITS else "not supported"
        return f"RSA-{bits} keys are {why}: {_ACCEPTED_KEYS}"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"ECDSA {public_key.curve.name} keys are not supported: {_ACCEPTED_KEYS}"
    kinds: tuple[tuple[type, str], ...] = (
        (dsa.DSAPublicKey, "DSA"),
        (ed448.Ed448PublicKey, "Ed448"),
        (x25519.X25519PublicKey, "X25519"),
        (x448.X448PublicKey, "X448"),
    )
    kind = next((label for cls, label in kinds if isinstance(public_key, cls)), "this kind of")
    return f"{kind} keys are not supported: {_ACCEPTED_KEYS}"
