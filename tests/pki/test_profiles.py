"""Certificate profiles on real CSRs: the dev profiles accept what they should, refuse the
rest with a reason naming the offending value, and build the extensions openssl reads back."""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kmsgate.algorithms import KeyType
from kmsgate.config import PkiSettings, ProfileSettings, load_settings
from kmsgate.errors import ConfigError, InvalidRequest
from kmsgate.pki.issuer import key_usage
from kmsgate.pki.profiles import Profile, load_profiles

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
HOUR = timedelta(hours=1)


@cache
def key(kind: str) -> PrivateKey:
    """One key per kind for the whole module (RSA generation is slow)."""
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "p521":
        return ec.generate_private_key(ec.SECP521R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=int(kind.removeprefix("rsa")))


def csr(
    *sans: x509.GeneralName,
    cn: str | None = None,
    kind: str = "p256",
    extensions: Sequence[x509.ExtensionType] = (),
) -> x509.CertificateSigningRequest:
    private = key(kind)
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    algorithm = None if isinstance(private, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(private, algorithm)


def dns(name: str) -> x509.DNSName:
    return x509.DNSName(name)


def ip(address: str) -> x509.IPAddress:
    return x509.IPAddress(ipaddress.ip_address(address))


def uri(value: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(value)


@pytest.fixture(scope="module")
def profiles() -> dict[str, Profile]:
    return load_profiles(load_settings())


def custom(**fields: object) -> Profile:
    spec = {"ekus": ["server_auth"], "max_ttl": "1d", "default_ttl": "1h", **fields}
    return Profile.from_settings("custom", ProfileSettings.model_validate(spec))


def refused(profile: Profile, request: x509.CertificateSigningRequest, **kw: object) -> str:
    with pytest.raises(InvalidRequest) as caught:
        profile.check(request, **kw)
    return caught.value.detail


# -- the dev profiles accept correct CSRs --------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "key_type"),
    [
        ("p256", KeyType.ECDSA_P256),
        ("p384", KeyType.ECDSA_P384),
        ("ed25519", KeyType.ED25519),
        ("rsa3072", KeyType.RSA_3072),
    ],
)
def test_server_accepts(profiles, kind, key_type):
    request = csr(dns("Web.lab"), dns("localhost"), ip("127.0.0.1"), cn="web.lab", kind=kind)
    approved = profiles["server"].check(request, None)
    assert approved.profile == "server"
    assert approved.sans == (dns("web.lab"), dns("localhost"), ip("127.0.0.1"))
    assert approved.subject.rfc4514_string() == "CN=web.lab"
    assert approved.ttl == 24 * HOUR
    assert approved.key_type is key_type
    assert approved.public_key == key(kind).public_key()


def test_client_accepts_without_cn(profiles):
    approved = profiles["client"].check(csr(dns("alice.lab"), kind="ed25519"), 2 * HOUR)
    assert (approved.subject, approved.sans, approved.ttl) == (
        x509.Name([]),
        (dns("alice.lab"),),
        2 * HOUR,
    )


def test_workload_accepts_one_spiffe_id(profiles):
    spiffe = "spiffe://dev.lab/ns/prod/sa/api"
    approved = profiles["workload"].check(csr(uri(spiffe), kind="p384"), 24 * HOUR)
    assert approved.sans == (uri(spiffe),)
    assert approved.ttl == 24 * HOUR  # exactly max_ttl is allowed
    assert approved.key_type is KeyType.ECDSA_P384
    longest = "spiffe://dev.lab/" + "a" * 2031  # 2048 bytes, the most a SPIFFE ID has
    assert profiles["workload"].check(csr(uri(longest))).sans == (uri(longest),)


def test_duplicate_sans_are_issued_once(profiles):
    approved = profiles["server"].check(csr(dns("a.lab"), dns("A.lab"), ip("127.0.0.1")))
    assert approved.sans == (dns("a.lab"), ip("127.0.0.1"))


def test_asked_extensions_within_the_profile_are_not_refused(profiles):
    asked = [
        x509.BasicConstraints(ca=False, path_length=None),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
    ]
    approved = profiles["workload"].check(csr(uri("spiffe://dev.lab/x"), extensions=asked))
    assert approved.ttl == HOUR


# -- refusals, each with its reason ---------------------------------------------------------


def tampered(request: x509.CertificateSigningRequest) -> x509.CertificateSigningRequest:
    der = bytearray(request.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature
    return x509.load_der_x509_csr(bytes(der))


CODE_SIGNING = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING])
CA_TRUE = x509.BasicConstraints(ca=True, path_length=None)
CERT_SIGN = key_usage(digital_signature=True, key_cert_sign=True)
Refusal = tuple[str, Callable[[], x509.CertificateSigningRequest], timedelta | None, str]
REFUSALS: dict[str, Refusal] = {
    "SAN outside the profile": (
        "server",
        lambda: csr(dns("web.lab"), dns("web.example.com")),
        None,
        "DNS name 'web.example.com' is not allowed by profile 'server'",
    ),
    "no SAN": ("server", lambda: csr(cn="web.lab"), None, "the CSR has no subjectAltName"),
    "bad signature": (
        "server",
        lambda: tampered(csr(dns("web.lab"))),
        None,
        "CSR signature does not verify",
    ),
    "bad Ed25519 signature": (
        "client",
        lambda: tampered(csr(dns("web.lab"), kind="ed25519")),
        None,
        "CSR signature does not verify",
    ),
    "CA=true": (
        "server",
        lambda: csr(dns("web.lab"), extensions=[CA_TRUE]),
        None,
        r"asks for a CA certificate \(basicConstraints ca=true\)",
    ),
    "keyCertSign": (
        "server",
        lambda: csr(dns("web.lab"), extensions=[CERT_SIGN]),
        None,
        "asks for a CA key usage",
    ),
    "EKU outside the profile": (
        "server",
        lambda: csr(dns("web.lab"), extensions=[CODE_SIGNING]),
        None,
        r"extended key usage codeSigning \(1.3.6.1.5.5.7.3.3\), which profile 'server'",
    ),
    "serverAuth from the client profile": (
        "client",
        lambda: csr(
            dns("a.lab"), extensions=[x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])]
        ),
        None,
        r"serverAuth \(1.3.6.1.5.5.7.3.1\), which profile 'client' does not grant",
    ),
    "TTL above max": (
        "server",
        lambda: csr(dns("web.lab")),
        timedelta(days=8),
        "ttl 8d exceeds the maximum of profile 'server', 7d",
    ),
    "zero TTL": (
        "server",
        lambda: csr(dns("web.lab")),
        timedelta(0),
        "ttl must be a positive whole number of seconds",
    ),
    "RSA-2048": (
        "server",
        lambda: csr(dns("web.lab"), kind="rsa2048"),
        None,
        r"RSA-2048 keys are refused \(too small\): use ECDSA P-256/P-384, Ed25519, RSA-3072",
    ),
    "P-521": (
        "server",
        lambda: csr(dns("web.lab"), kind="p521"),
        None,
        "ECDSA secp521r1 keys are not supported",
    ),
    "two URIs for workload": (
        "workload",
        lambda: csr(uri("spiffe://dev.lab/a"), uri("spiffe://dev.lab/b")),
        None,
        "profile 'workload' needs exactly one URI SAN; the CSR has 2",
    ),
    "DNS name for workload": (
        "workload",
        lambda: csr(uri("spiffe://dev.lab/a"), dns("a.lab")),
        None,
        "DNS name 'a.lab' is not allowed by profile 'workload'",
    ),
    "other trust domain": (
        "workload",
        lambda: csr(uri("spiffe://prod.lab/a")),
        None,
        "URI 'spiffe://prod.lab/a' is not allowed",
    ),
    "a SPIFFE ID too long to authenticate with": (
        "workload",
        lambda: csr(uri("spiffe://dev.lab/" + "a" * 2032)),  # 2049 bytes
        None,
        r"is not a SPIFFE ID \(at most 2048 bytes\)",
    ),
    "CN not among the SANs": (
        "client",
        lambda: csr(dns("alice.lab"), cn="admin"),
        None,
        "the CSR's CN 'admin' is not one of its SANs",
    ),
    "wildcard request": (
        "server",
        lambda: csr(dns("*.lab")),
        None,
        "DNS name '\\*.lab': wildcard names are not issued",
    ),
    "email SAN": (
        "client",
        lambda: csr(dns("a.lab"), x509.RFC822Name("a@dev.lab")),
        None,
        "RFC822Name SAN 'a@dev.lab' is not allowed",
    ),
    "IP outside": (
        "server",
        lambda: csr(ip("10.0.0.1")),
        None,
        "IP address 10.0.0.1 is not allowed by profile 'server'",
    ),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_refusals_name_the_reason(profiles, case):
    profile, build, ttl, reason = REFUSALS[case]
    with pytest.raises(InvalidRequest, match=reason):
        profiles[profile].check(build(), ttl)


@pytest.mark.parametrize(
    ("pattern", "name", "allowed"),
    [
        ("*.lab", "a.lab", True),
        ("*.lab", "A.LAB", True),
        ("*.lab", "a.b.lab", False),  # `*.` is exactly one label
        ("*.lab", "lab", False),
        ("*.lab", "xlab", False),
        ("*.lab", "a.lab.evil", False),
        ("**.lab", "a.lab", True),
        ("**.lab", "a.b.lab", True),  # `**.` is one or more labels
        ("**.lab", "lab", False),
        ("**.lab", "a.xlab", False),
        ("*.svc.lab", "api.svc.lab", True),
        ("*.svc.lab", "api.lab", False),
        ("localhost", "localhost", True),
        ("localhost", "a.localhost", False),
    ],
)
def test_dns_patterns(pattern, name, allowed):
    profile = custom(dns=[pattern])
    request = csr(dns(name))
    if allowed:
        assert profile.check(request).sans == (dns(name.lower()),)
    else:
        assert "is not allowed by profile 'custom'" in refused(profile, request)


@pytest.mark.parametrize("name", ["a..lab", "-a.lab", "a_b.lab", "a.lab.", "é.lab"])
def test_invalid_host_names_are_refused(name):
    request = csr(x509.DNSName._init_without_validation(name))
    assert "is not a valid host name" in refused(custom(dns=["**.lab"]), request)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("10.1.2.3", True),
        ("10.255.255.255", True),
        ("11.0.0.1", False),
        ("127.0.0.1", True),
        ("127.0.0.2", False),
        ("fd00::1", True),
        ("fe80::1", False),
        ("::ffff:10.0.0.1", False),  # a mapped IPv4 address is not in an IPv4 network
    ],
)
def test_ip_ranges(address, allowed):
    profile = custom(ip=["10.0.0.0/8", "127.0.0.1", "fd00::/8"])
    request = csr(ip(address))
    if allowed:
        assert profile.check(request).sans == (ip(address),)
    else:
        shown = ipaddress.ip_address(address)
        assert f"IP address {shown} is not allowed" in refused(profile, request)


def test_ip_cn_must_be_the_ip_san():
    profile = custom(ip=["fd00::/8"])
    approved = profile.check(csr(ip("fd00::1"), cn="fd00:0::1"))
    assert approved.subject.rfc4514_string() == "CN=fd00::1"  # written as the SAN is


def test_the_cn_written_is_the_san_it_names_never_a_look_alike():
    """The subject names the mTLS principal (`cn:...`): it is the SAN's own text."""
    profile = custom(dns=["*.lab"])
    approved = profile.check(csr(dns("web.lab"), cn="WEB.Lab"))
    assert approved.subject.rfc4514_string() == "CN=web.lab"
    kelvin = "\u212a.lab"  # lower-cases to "k.lab"
    assert "is not one of its SANs" in refused(profile, csr(dns("k.lab"), cn=kelvin))


def openssl_csr(
    openssl_bin: str, tmp_path: Path, *key_options: str, digest: str = "-sha256"
) -> x509.CertificateSigningRequest:
    """A CSR for `dns:a.lab` on a key `openssl genpkey` makes with `key_options`, signed
    with `digest` (keys and hashes cryptography will not sign with)."""
    key_path, csr_path = tmp_path / "k.pem", tmp_path / "k.csr"
    for command in (
        ["genpkey", *key_options, "-out", str(key_path)],
        ["req", "-new", digest, "-key", str(key_path), "-subj", "/", "-addext",
         "subjectAltName=DNS:a.lab", "-out", str(csr_path)],
    ):  # fmt: skip
        done = subprocess.run([openssl_bin, *command], capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr
    return x509.load_pem_x509_csr(csr_path.read_bytes())


def test_an_rsa_pss_only_key_is_refused(tmp_path, openssl_bin):
    """Written back as rsaEncryption it would lose its PSS-only restriction (RFC 4055)."""
    pss = ("-algorithm", "RSA-PSS", "-pkeyopt", "rsa_keygen_bits:3072")
    request = openssl_csr(openssl_bin, tmp_path, *pss)
    assert "RSA-PSS-only key" in refused(custom(dns=["*.lab"], key_types=["rsa-3072"]), request)


@pytest.mark.parametrize(
    ("key_options", "digest", "named"),
    [
        (("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"), "-sha1", "SHA-1"),
        (("-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072"), "-sha1", "SHA-1"),
        (("-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072"), "-md5", "MD5"),
    ],
)
def test_a_csr_signed_with_a_broken_hash_is_refused_by_its_name(
    key_options, digest, named, tmp_path, openssl_bin
):
    """Its signature is sound, but made over a hash whose collisions are practical: the
    refusal says so, where "does not verify" would send its sender looking for damage."""
    request = openssl_csr(openssl_bin, tmp_path, *key_options, digest=digest)
    profile = custom(dns=["*.lab"], key_types=["ecdsa-p256", "rsa-3072"])
    assert f"the CSR is signed with {named}, which is refused" in refused(profile, request)


@pytest.mark.parametrize("exponent", ["0x80000001", "0x1000000000000000000000001"])
def test_an_rsa_exponent_clients_refuse_is_refused(exponent, tmp_path, openssl_bin):
    request = openssl_csr(
        openssl_bin, tmp_path, "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072",
        "-pkeyopt", f"rsa_keygen_pubexp:{exponent}",
    )  # fmt: skip
    profile = custom(dns=["*.lab"], key_types=["rsa-3072"])
    assert "exponent must be odd, from 65537 to 2^31-1" in refused(profile, request)


# -- configuration ---------------------------------------------------------------------------


def test_dev_profiles_describe(profiles):
    assert set(profiles) == {"server", "client", "workload"}
    assert profiles["server"].describe() == {
        "name": "server",
        "ekus": ["server_auth"],
        "san_rules": {
            "dns": ["*.lab", "localhost"],
            "ip": ["127.0.0.1"],
            "uri": [],
            "exactly_one_uri": False,
        },
        "max_ttl": "7d",
        "default_ttl": "1d",
        "key_types": ["ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-3072", "rsa-4096"],
    }
    workload = profiles["workload"].describe()
    assert workload["ekus"] == ["server_auth", "client_auth"]
    assert (workload["max_ttl"], workload["default_ttl"]) == ("1d", "1h")


def test_profiles_from_a_config_file(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text(
        "pki:\n"
        "  public_url: http://127.0.0.1:8200/\n"
        "  profiles:\n"
        "    db:\n"
        "      ekus: [server_auth, client_auth]\n"
        "      dns: ['**.db.internal']\n"
        "      ip: [10.20.0.0/16]\n"
        "      max_ttl: 36h\n"
        "      default_ttl: 90m\n"
        "      key_types: [ecdsa-p384]\n"
    )
    settings = load_settings(config)
    assert settings.pki.public_url == "http://127.0.0.1:8200"
    profiles = load_profiles(settings)
    assert list(profiles) == ["db"]  # the configured mapping replaces the dev profiles
    described = profiles["db"].describe()
    assert (described["max_ttl"], described["default_ttl"]) == ("36h", "90m")
    approved = profiles["db"].check(csr(dns("a.b.db.internal"), ip("10.20.1.1"), kind="p384"))
    assert approved.ttl == timedelta(minutes=90)
    monkeypatch.setenv("KMSGATE_PKI__PUBLIC_URL", "https://pki.example")
    assert load_settings(config).pki.public_url == "https://pki.example"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"dns": ["a.*.lab"]}, "bad DNS pattern 'a.\\*.lab'"),
        ({"dns": ["*"]}, "bad DNS pattern"),
        ({"dns": ["*lab"]}, "bad DNS pattern"),
        ({"ip": ["10.0.0.1/8"]}, "bad IP pattern '10.0.0.1/8'"),
        ({"ip": ["10.0.0"]}, "bad IP pattern"),
        ({"uri": ["spiffe://dev.lab/*/x"]}, "bad URI pattern"),
        ({"uri": ["spiffe://Dev.lab/*"]}, "bad URI pattern"),
        ({"uri": ["spiffe:dev.lab/*"]}, "bad URI pattern"),
        ({"uri": ["spiffe://dev.lab/a?b"]}, "bad URI pattern"),
        ({"dns": ["a.lab"], "key_types": ["hmac-sha256"]}, "cannot hold a certificate's key"),
        ({"dns": ["a.lab"], "key_types": ["rsa-2048"]}, "unknown key type|rsa-2048"),
        ({}, "could name nothing"),
        ({"dns": ["a.lab"], "exactly_one_uri": True}, "exactly_one_uri needs"),
    ],
)
def test_bad_profiles_are_config_errors(fields, reason):
    with pytest.raises(ConfigError, match=reason) as caught:
        custom(**fields)
    assert str(caught.value).startswith("pki.profiles.custom: ")


def test_bad_profile_name():
    spec = ProfileSettings(ekus=["client_auth"], dns=["a.lab"], max_ttl=HOUR, default_ttl=HOUR)
    with pytest.raises(ConfigError, match="profile name"):
        load_profiles(PkiSettings(profiles={"Bad Name": spec}))


@pytest.mark.parametrize(
    "profile_yaml",
    [
        "{ekus: [server_auth], dns: [a.lab], max_ttl: 1h, default_ttl: 2h}",
        "{ekus: [server_auth], dns: [a.lab], max_ttl: 5w, default_ttl: 1h}",
        "{ekus: [code_signing], dns: [a.lab], max_ttl: 1h, default_ttl: 1h}",
        "{ekus: [], dns: [a.lab], max_ttl: 1h, default_ttl: 1h}",
        "{ekus: [server_auth], dns: [a.lab], default_ttl: 1h}",
        "{ekus: [server_auth], dns: [a.lab], max_ttl: 1h, default_ttl: 1h, extra: 1}",
    ],
)
def test_bad_profile_settings_stop_loading(tmp_path, profile_yaml):
    config = tmp_path / "c.yaml"
    config.write_text(f"pki:\n  profiles:\n    p: {profile_yaml}\n")
    with pytest.raises(ConfigError):
        load_settings(config)


def test_bad_public_url(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("pki: {public_url: 'ftp://x'}\n")
    with pytest.raises(ConfigError, match="public_url"):
        load_settings(config)


# -- the extensions, read back by cryptography and by openssl ---------------------------------


def issue(profile: Profile, request: x509.CertificateSigningRequest) -> x509.Certificate:
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    approved = profile.check(request)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test issuer")]))
        .subject_name(approved.subject)
        .public_key(approved.public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + approved.ttl)
    )
    authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    for extension, critical in profile.extensions(approved, authority_key_id):
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def critical_flags(cert: x509.Certificate) -> dict[str, bool]:
    return {type(ext.value).__name__: ext.critical for ext in cert.extensions}


def test_extensions_of_a_server_certificate(profiles):
    cert = issue(profiles["server"], csr(dns("web.lab"), ip("127.0.0.1"), cn="web.lab"))
    assert critical_flags(cert) == {
        "BasicConstraints": True,
        "KeyUsage": True,
        "ExtendedKeyUsage": False,
        "SubjectAlternativeName": False,  # the subject is not empty
        "SubjectKeyIdentifier": False,
        "AuthorityKeyIdentifier": False,
    }
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert key_usage.digital_signature and not key_usage.key_encipherment
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]


def test_empty_subject_makes_the_san_critical(profiles):
    cert = issue(profiles["workload"], csr(uri("spiffe://dev.lab/w")))
    assert cert.subject == x509.Name([])
    assert critical_flags(cert)["SubjectAlternativeName"] is True


def openssl_text(openssl_bin: str, cert: x509.Certificate, tmp_path: Path) -> str:
    path = tmp_path / "cert.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    done = subprocess.run(
        [openssl_bin, "x509", "-in", str(path), "-noout", "-text"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def section(text: str, heading: str) -> str:
    """The line after `heading` in openssl's text dump (the extension's value)."""
    lines = text.splitlines()
    index = next(i for i, line in enumerate(lines) if heading in line)
    return f"{lines[index].strip()} | {lines[index + 1].strip()}"


@pytest.mark.interop
@pytest.mark.parametrize(
    ("profile", "sans", "cn", "expect"),
    [
        (
            "server",
            [dns("web.lab"), dns("localhost"), ip("127.0.0.1")],
            "web.lab",
            {
                "X509v3 Extended Key Usage": "TLS Web Server Authentication",
                "X509v3 Subject Alternative Name": (
                    "DNS:web.lab, DNS:localhost, IP Address:127.0.0.1"
                ),
            },
        ),
        (
            "client",
            [dns("alice.lab")],
            "alice.lab",
            {
                "X509v3 Extended Key Usage": "TLS Web Client Authentication",
                "X509v3 Subject Alternative Name": "DNS:alice.lab",
            },
        ),
        (
            "workload",
            [uri("spiffe://dev.lab/ns/prod/sa/api")],
            None,
            {
                "X509v3 Extended Key Usage": (
                    "TLS Web Server Authentication, TLS Web Client Authentication"
                ),
                "X509v3 Subject Alternative Name": "critical | URI:spiffe://dev.lab/ns/prod/sa/api",
            },
        ),
    ],
)
def test_openssl_reads_the_extensions(openssl_bin, profiles, tmp_path, profile, sans, cn, expect):
    text = openssl_text(openssl_bin, issue(profiles[profile], csr(*sans, cn=cn)), tmp_path)
    assert "critical | CA:FALSE" in section(text, "X509v3 Basic Constraints")
    assert "critical | Digital Signature" in section(text, "X509v3 Key Usage")
    assert "X509v3 Subject Key Identifier" in text
    assert "X509v3 Authority Key Identifier" in text
    for heading, value in expect.items():
        line = section(text, heading)
        assert line.endswith(value), line
    assert "Key Encipherment" not in text
