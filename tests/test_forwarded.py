"""mTLS through a TLS-terminating proxy (kmsgate.auth.forwarded): Envoy's
`x-forwarded-client-cert` believed only from `tls.trusted_proxies`, the forwarded certificate
verified again against `tls.client_cas`, then judged like a connection's own; against a real
gateway whose requests come from two loopback addresses (one trusted, one not)."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from kmsgate.audit import AuditFile
from kmsgate.auth import Credentials
from kmsgate.auth.authenticator import AuthenticationFailed, Authenticators
from kmsgate.auth.forwarded import ForwardedMtlsAuthenticator, parse_xfcc
from kmsgate.auth.mtls import MtlsAuthenticator
from kmsgate.errors import Unauthenticated
from kmsgate.pki.csr import new_key_and_csr
from kmsgate.pki.issuer import key_usage
from tests.pki.ceremony import OfflineRoot
from tests.test_cli import Gateway, running_gateway

PROXY = "127.0.0.2"
"""The trusted proxy's address: requests bound to it come from the proxy, the others (from
127.0.0.1) from anyone."""
WORKLOAD = "spiffe://dev.lab/ns/ml/sa/signer"
TIMEOUT = 10.0


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def xfcc(cert: x509.Certificate | str, **extra: str) -> str:
    """An XFCC element as Envoy writes it: hash, quoted URL-encoded PEM, quoted subject."""
    pem = cert if isinstance(cert, str) else _pem(cert)
    fields = {
        "By": "spiffe://dev.lab/ns/kms/sa/kmsgate",
        "Hash": "0" * 64,
        "Cert": f'"{urllib.parse.quote(pem, safe="")}"',
        "Subject": '""',
        **extra,
    }
    return ";".join(f"{k}={v}" for k, v in fields.items())


# -- the header's grammar ----------------------------------------------------------------------


def test_an_envoy_header_parses_with_quotes_escapes_and_commas_inside_quotes() -> None:
    value = (
        'By=spiffe://td/gw;Hash=ab12;Subject="CN=a \\"b\\",O=Acme, Inc.";URI=spiffe://td/x;'
        "DNS=a.lab;DNS2=b.lab"
    )
    (element,) = parse_xfcc(value)
    assert element == {
        "by": "spiffe://td/gw",
        "hash": "ab12",
        "subject": 'CN=a "b",O=Acme, Inc.',
        "uri": "spiffe://td/x",
        "dns": "a.lab",
        "dns2": "b.lab",
    }
    assert len(parse_xfcc("Hash=1,Hash=2")) == 2


@pytest.mark.parametrize(
    "value",
    ['Cert="unterminated', "Hash=1;Hash=2", "novalue", "Hash=1;junk", "=x", 'Cert="a\\'],
)
def test_a_malformed_header_is_refused(value: str) -> None:
    with pytest.raises(Unauthenticated, match="malformed"):
        parse_xfcc(value)


@given(st.text(max_size=200))
def test_any_header_parses_or_is_refused_as_unauthenticated(value: str) -> None:
    try:
        elements = parse_xfcc(value)
    except Unauthenticated:
        return
    assert elements and all(isinstance(e, dict) for e in elements)


# -- the authenticator, with a CA made here ----------------------------------------------------


class LocalCa(OfflineRoot):
    """A CA made here (another than kmsgate's), issuing client certificates."""

    def leaf(
        self,
        uri: str = WORKLOAD,
        *,
        usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
        valid: tuple[timedelta, timedelta] = (timedelta(minutes=-1), timedelta(hours=1)),
        names: list[x509.GeneralName] | None = None,
        common_name: str | None = None,
    ) -> x509.Certificate:
        """A client certificate for `uri` (`names` instead, none if empty; a subject with
        `common_name` if given)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
        sans = [x509.UniformResourceIdentifier(uri)] if names is None else names
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + valid[0])
            .not_valid_after(now + valid[1])
        )
        if sans:
            san = x509.SubjectAlternativeName(sans)
            builder = builder.add_extension(san, critical=not subject)
        return (
            builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(key_usage(digital_signature=True), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )


@pytest.fixture(scope="module")
def local_ca() -> LocalCa:
    return LocalCa()


def _authenticator(ca: LocalCa) -> ForwardedMtlsAuthenticator:
    not_issued_by_kmsgate = MtlsAuthenticator(lambda _serial: None)
    return ForwardedMtlsAuthenticator(
        ["10.0.0.0/8", PROXY], lambda: [ca.cert], not_issued_by_kmsgate
    )


def test_a_trusted_proxy_forwards_an_identity(local_ca: LocalCa) -> None:
    forwarded = _authenticator(local_ca)
    for address in ("10.1.2.3", PROXY, f"::ffff:{PROXY}"):
        principal = forwarded.authenticate(
            Credentials(remote_addr=address, forwarded_cert=xfcc(local_ca.leaf()))
        )
        assert principal is not None
        assert (principal.id, principal.kind) == (WORKLOAD, "mtls")
        assert principal.claims["forwarded_by"] == address


def test_a_certificate_names_the_same_principal_directly_and_forwarded(
    local_ca: LocalCa,
) -> None:
    """Without a SPIFFE ID a certificate's principal is `cn:` and its CN, an id no API token
    (`token:`) or OIDC issuer (`<issuer>:`) can have: a CN copying an OIDC principal's id
    takes neither its grants nor its rules. A certificate without a subjectAltName, with
    two SPIFFE IDs or a malformed one (a `..` segment, say), names no principal, on a direct
    connection as through a proxy."""
    direct = MtlsAuthenticator(lambda _serial: None)
    forwarded = _authenticator(local_ca)

    def principals(cert: x509.Certificate) -> list[str]:
        ids = []
        for credentials in (
            Credentials(peer_chain=[cert]),
            Credentials(remote_addr=PROXY, forwarded_cert=xfcc(cert)),
        ):
            authenticator = direct if credentials.peer_chain else forwarded
            try:
                principal = authenticator.authenticate(credentials)
            except Unauthenticated as exc:
                ids.append(f"401 {exc.detail}")
                continue
            assert principal is not None and principal.kind == "mtls"
            ids.append(principal.id)
        return ids

    oidc_like = "gha:repo:acme/models:ref:refs/heads/main"
    named = local_ca.leaf(names=[x509.DNSName("ci.example")], common_name=oidc_like)
    assert principals(named) == [f"cn:{oidc_like}"] * 2
    assert principals(local_ca.leaf()) == [WORKLOAD] * 2
    bare = principals(local_ca.leaf(names=[], common_name=oidc_like))
    assert bare[0] == "401 the client certificate has no subjectAltName"
    assert bare[1].startswith("401")
    two = [x509.UniformResourceIdentifier(WORKLOAD), x509.UniformResourceIdentifier(f"{WORKLOAD}2")]
    assert (
        principals(local_ca.leaf(names=two))
        == ["401 the client certificate names more than one SPIFFE ID"] * 2
    )
    for malformed in (
        "spiffe://dev.lab/ns/ml/sa/server/../../admin",
        "spiffe://dev.lab/ns//sa",
        "spiffe://Dev.Lab/ns",
        "spiffe://dev.lab:8443/ns",
        "spiffe://dev.lab/ns?x=1",
        "spiffe://dev.lab/ns/",
    ):
        uri = [x509.UniformResourceIdentifier(malformed)]
        assert (
            principals(local_ca.leaf(names=uri))
            == ["401 the client certificate's SPIFFE ID is malformed"] * 2
        ), malformed
    assert (
        principals(local_ca.leaf(names=[x509.UniformResourceIdentifier("spiffe://dev.lab")]))
        == ["spiffe://dev.lab"] * 2
    )
    # a DNS name spelled like a SPIFFE ID is none (a CA in client_cas that issues
    # requester-chosen DNS names could otherwise mint any SPIFFE principal)
    admin = [x509.DNSName("spiffe://dev.lab/ns/kms/sa/admin")]
    assert principals(local_ca.leaf(names=admin, common_name="partner")) == ["cn:partner"] * 2


def test_anyone_else_forwarding_is_not_believed(local_ca: LocalCa) -> None:
    forwarded = _authenticator(local_ca)
    header = xfcc(local_ca.leaf())
    for address in ("127.0.0.1", "11.0.0.1", None, "not-an-address"):
        assert (
            forwarded.authenticate(Credentials(remote_addr=address, forwarded_cert=header)) is None
        )
    # a bearer token is judged by itself, whoever forwards
    assert (
        forwarded.authenticate(Credentials("kmg.x.y", remote_addr=PROXY, forwarded_cert=header))
        is None
    )


def test_a_trusted_proxy_speaks_for_its_clients_never_for_itself(local_ca: LocalCa) -> None:
    """The certificate of a trusted proxy's own connection (an Envoy with an upstream SVID)
    never identifies a request: one it forwards no certificate for is refused, or every
    client that showed the proxy none would act as the proxy. From any other address, the
    connection's certificate is the client's. A refused forwarded certificate is named by
    its own serial in the refusal (the audit record), never by the proxy's."""
    proxy_cert = local_ca.leaf("spiffe://dev.lab/ns/mesh/sa/envoy")
    chain = Authenticators([_authenticator(local_ca), MtlsAuthenticator(lambda _serial: None)])
    with pytest.raises(AuthenticationFailed, match="forwarded no client certificate") as refused:
        chain.authenticate(Credentials(peer_chain=(proxy_cert,), remote_addr=PROXY))
    assert (refused.value.kind, refused.value.subject) == ("mtls", None)
    direct = chain.authenticate(Credentials(peer_chain=(proxy_cert,), remote_addr="127.0.0.1"))
    assert direct.id == "spiffe://dev.lab/ns/mesh/sa/envoy"

    expired = local_ca.leaf(valid=(timedelta(hours=-2), timedelta(hours=-1)))
    forwarded = Credentials(
        peer_chain=(proxy_cert,), remote_addr=PROXY, forwarded_cert=xfcc(expired)
    )
    with pytest.raises(AuthenticationFailed, match="does not verify") as refused:
        chain.authenticate(forwarded)
    assert refused.value.subject == f"{expired.serial_number:x}"
    malformed = forwarded._replace(forwarded_cert="By=spiffe://x;Hash=00")
    with pytest.raises(AuthenticationFailed, match="no Cert") as refused:
        chain.authenticate(malformed)
    assert refused.value.subject is None


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda ca: xfcc(ca.leaf(valid=(timedelta(hours=-2), timedelta(hours=-1)))), "verify"),
        (lambda ca: xfcc(ca.leaf(valid=(timedelta(hours=1), timedelta(hours=2)))), "verify"),
        (lambda ca: xfcc(ca.leaf(usage=ExtendedKeyUsageOID.SERVER_AUTH)), "verify"),
        (lambda ca: xfcc(LocalCa("stranger").leaf()), "verify"),
        (lambda ca: xfcc(ca.leaf()) + "," + xfcc(ca.leaf()), "exactly one element"),
        (lambda ca: "By=spiffe://x;Hash=00", "no Cert"),
        (lambda ca: xfcc("not a certificate"), "no readable certificate"),
        (lambda ca: xfcc(_pem(ca.leaf()) + _pem(ca.leaf())), "one certificate"),
        (lambda ca: 'Cert="' + "a" * 70_000 + '"', "too large"),
    ],
)
def test_a_forwarded_certificate_that_proves_nothing_is_refused(
    local_ca: LocalCa, make: object, problem: str
) -> None:
    header = make(local_ca)  # type: ignore[operator]
    with pytest.raises(Unauthenticated, match=problem):
        _authenticator(local_ca).authenticate(Credentials(remote_addr=PROXY, forwarded_cert=header))


# -- against a gateway -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxied_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A dev gateway on plain HTTP behind a proxy at PROXY that terminates TLS."""
    base = tmp_path_factory.mktemp("forwarded")
    config = base / "kmsgate.yaml"
    config.write_text(json.dumps({"tls": {"trusted_proxies": [PROXY], "client_cas": ["dev"]}}))
    with running_gateway(base, "--config", str(config)) as gw:
        yield gw


def _issue(gw: Gateway, spiffe_id: str) -> tuple[x509.Certificate, str]:
    _, csr = new_key_and_csr([spiffe_id])
    issued = httpx.post(
        f"{gw.addr}/v1/pki/cas/dev/issue",
        json={"csr": csr.public_bytes(serialization.Encoding.PEM).decode(), "profile": "workload"},
        headers={"authorization": f"Bearer {gw.root_token}"},
        timeout=TIMEOUT,
    )
    assert issued.status_code == 200, issued.text
    body = issued.json()
    return x509.load_pem_x509_certificate(body["certificate"].encode()), body["serial"]


def _whoami(gw: Gateway, header: str, source: str = PROXY) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=TIMEOUT) as client:
        return client.get(f"{gw.addr}/v1/sys/whoami", headers={"x-forwarded-client-cert": header})


def test_the_proxy_forwards_a_workload_until_its_certificate_is_revoked(
    proxied_gateway: Gateway,
) -> None:
    gw = proxied_gateway
    cert, serial = _issue(gw, WORKLOAD)
    metrics = httpx.get(
        f"{gw.addr}/metrics", headers={"authorization": f"Bearer {gw.root_token}"}, timeout=TIMEOUT
    ).text
    assert "kmsgate_certificates_expiring_7d 1.0" in metrics.splitlines()
    assert "kmsgate_keys_rotation_overdue 0.0" in metrics.splitlines()
    me = _whoami(gw, xfcc(cert, URI=WORKLOAD))
    assert me.status_code == 200, me.text
    body = me.json()
    assert (body["id"], body["kind"]) == (WORKLOAD, "mtls")
    assert body["claims"]["profile"] == "workload" and body["claims"]["forwarded_by"] == PROXY
    assert body["claims"]["serial"] == serial

    # the same header, not from the proxy: no credentials at all
    assert _whoami(gw, xfcc(cert), source="127.0.0.1").status_code == 401
    # from the proxy, without the header: refused, whatever the proxy's connection shows
    bare = _whoami(gw, "")
    assert bare.status_code == 401 and "forwarded no client certificate" in bare.json()["detail"]
    # a certificate kmsgate's dev CA did not issue
    stranger = LocalCa("stranger").leaf()
    assert _whoami(gw, xfcc(stranger)).status_code == 401

    revoked = httpx.post(
        f"{gw.addr}/v1/pki/certs/{serial}/revoke",
        json={"reason": "keyCompromise"},
        headers={"authorization": f"Bearer {gw.root_token}"},
        timeout=TIMEOUT,
    )
    assert revoked.status_code == 200, revoked.text
    refused = _whoami(gw, xfcc(cert))
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    metrics = httpx.get(
        f"{gw.addr}/metrics", headers={"authorization": f"Bearer {gw.root_token}"}, timeout=TIMEOUT
    ).text.splitlines()
    assert "kmsgate_certificates_revoked 1.0" in metrics
    assert "kmsgate_certificates_valid 0.0" in metrics
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics if " " in line
              and not line.startswith("#")}  # fmt: skip
    assert 0 <= values["kmsgate_crl_age_seconds"] < 3600
    assert values['kmsgate_policy_decisions_total{result="allow"}'] >= 3
    assert values['kmsgate_policy_decisions_total{result="deny"}'] >= 0
    assert values["kmsgate_audit_fsync_seconds_count"] >= 1
    assert 0 <= values["kmsgate_audit_unsynced_records"] < 1000

    records = AuditFile(gw.data_dir / "audit.log").search(action="principal.read").records
    assert any(
        r["principal"] == WORKLOAD and r["principal_kind"] == "mtls" and r["outcome"] == "ok"
        for r in records
    )


def test_plain_http_is_refused_off_loopback_unless_a_proxy_terminates_tls(tmp_path: Path) -> None:
    from tests.test_cli import assert_one_line_error, clean_env, run_cli

    refused = run_cli(
        ("serve", "--dev", "--data-dir", str(tmp_path / "d"), "--host", "0.0.0.0"), clean_env()
    )
    assert_one_line_error(refused, "refusing to serve plain HTTP on 0.0.0.0", rc=2)
    assert not (tmp_path / "d").exists()  # refused before anything is created
