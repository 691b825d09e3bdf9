"""Issuing from a CSR through the REST API, checked with the real openssl and Python ssl."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kmsgate.auth import Credentials
from kmsgate.pki.issuer import key_usage
from kmsgate.service import Ctx
from kmsgate.service.requests import IssueInput
from kmsgate.store.sans import matches as san_matches
from tests.gateway import open_gateway
from tests.helpers import UTC_TIME
from tests.pki.ceremony import (
    OfflineRoot,
    ca_key_usage,
    leaf_csr,
    make_intermediate,
    openssl_verifies,
)

REPO = Path(__file__).resolve().parents[2]
PEM_TYPE = "application/x-pem-file"
PEM = serialization.Encoding.PEM


@pytest.fixture
def root() -> OfflineRoot:
    return OfflineRoot()


def issue(api, token, csr: str, profile: str, ca: str = "issuing", **extra):
    return api.call(
        "POST", f"/v1/pki/cas/{ca}/issue", token, json={"csr": csr, "profile": profile, **extra}
    )


def test_a_server_certificate_verifies_with_openssl(api, admin, root, tmp_path, openssl_bin):
    make_intermediate(api, admin, root)
    _, csr = leaf_csr(x509.DNSName("web.lab"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    r = issue(api, admin, csr, "server")
    assert r.status_code == 200, r.text
    body = r.json()
    openssl_verifies(openssl_bin, tmp_path, root, body, "-purpose", "sslserver")
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    assert format(cert.serial_number, "x") == body["serial"]
    assert cert.serial_number.bit_length() <= 159
    record = api.call("GET", f"/v1/pki/certs/{body['serial']}", admin).json()
    assert (record["profile"], record["status"], record["ca"]) == ("server", "valid", "issuing")
    assert record["sans"] == ["dns:web.lab", "ip:127.0.0.1"]
    assert record["owner"].startswith("token:")
    for when in (body["not_after"], record["not_before"], record["not_after"]):
        assert UTC_TIME.fullmatch(when), when
    assert (
        record["fingerprint"]
        == hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    )


def test_a_leaf_names_its_issuer_by_the_key_id_in_the_issuers_certificate(
    api, admin, root, tmp_path, openssl_bin
):
    """An intermediate whose subjectKeyIdentifier was not made the SHA-1 way (an explicit
    id, or RFC 7093's truncated SHA-256 as Go makes it): its leaves repeat that id, so
    openssl finds their issuer."""
    make_intermediate(api, admin, root, key_id=bytes(range(1, 9)))
    _, csr = leaf_csr(x509.DNSName("web.lab"))
    body = issue(api, admin, csr, "server").json()
    openssl_verifies(openssl_bin, tmp_path, root, body)
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == bytes(range(1, 9))


def test_the_ca_key_cannot_sign_raw_data(api, admin, root):
    ca = make_intermediate(api, admin, root)
    r = api.call("POST", f"/v1/keys/{ca['key']}/sign", admin, json={"input": "aGk="})
    assert (r.status_code, r.json()["code"]) == (400, "invalid_request")
    assert "is a ca key" in r.json()["detail"]


@pytest.mark.parametrize(
    ("profile", "sans", "extra", "reason"),
    [
        ("server", [x509.DNSName("evil.example")], {}, "evil.example"),
        ("server", [], {}, "subjectAltName"),
        ("server", [x509.DNSName("web.lab")], {"ttl": "400d"}, "ttl"),
        ("workload", [x509.DNSName("web.lab")], {}, "web.lab"),
    ],
)
def test_requests_outside_the_profile_are_refused_and_nothing_is_stored(
    api, admin, root, profile, sans, extra, reason
):
    make_intermediate(api, admin, root)
    _, csr = leaf_csr(*sans)
    r = issue(api, admin, csr, profile, **extra)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert reason.lower() in r.json()["detail"].lower()
    assert api.call("GET", "/v1/pki/certs", admin).json()["certs"] == []


def test_a_tampered_csr_is_refused(api, admin, root):
    make_intermediate(api, admin, root)
    _, csr = leaf_csr(x509.DNSName("web.lab"))
    der = bytearray(x509.load_pem_x509_csr(csr.encode()).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    tampered = (
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der)).decode()
        + "-----END CERTIFICATE REQUEST-----\n"
    )
    r = issue(api, admin, tampered, "server")
    assert r.status_code == 400, r.text
    assert "signature" in r.json()["detail"].lower()


def test_revocation_is_recorded_once(api, admin, root):
    make_intermediate(api, admin, root)
    _, csr = leaf_csr(x509.DNSName("web.lab"))
    serial = issue(api, admin, csr, "server").json()["serial"]
    r = api.call("POST", f"/v1/pki/certs/{serial}/revoke", admin, json={"reason": "keyCompromise"})
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["reason"]) == ("revoked", "keyCompromise")
    again = api.call("POST", f"/v1/pki/certs/{serial}/revoke", admin, json={"reason": "superseded"})
    assert again.status_code == 409
    bad = api.call("POST", f"/v1/pki/certs/{serial}/revoke", admin, json={"reason": "bored"})
    assert bad.status_code == 400 and "keyCompromise" in bad.json()["detail"]
    listed = api.call("GET", "/v1/pki/certs?status=revoked", admin).json()["certs"]
    assert [c["serial"] for c in listed] == [serial]


def test_a_pending_ca_repeats_its_csr_until_its_certificate_is_imported(api, admin, root):
    """The reply of `create` may be lost (an interrupted client): the listing repeats the
    CSR, which the root can sign to finish the CA."""
    body = {"name": "lost", "subject": "CN=Lost CA"}
    created = api.call("POST", "/v1/pki/cas", admin, json=body).json()

    def listed() -> dict:
        cas = api.call("GET", "/v1/pki/cas", admin).json()["cas"]
        return next(ca for ca in cas if ca["name"] == "lost")

    assert listed()["csr"] == created["csr"] and listed()["state"] == "pending"
    cert = root.sign_intermediate(listed()["csr"])
    body = {"certificate": cert, "chain": root.pem}
    assert api.call("POST", "/v1/pki/cas/lost/certificate", admin, json=body).status_code == 200
    assert listed()["state"] == "active" and "csr" not in listed()


def test_a_ca_key_type_that_cannot_sign_is_refused_before_any_key_is_made(api, admin):
    """Before, the CA's key was made, then refused: a purpose-`ca` key left behind, named
    by no audit record, and the CA's name blocked (409 for every later try)."""
    for key_type in ("hmac-sha256", "aes-256-gcm"):
        body = {"name": "orph", "subject": "CN=orph", "key": {"type": key_type}}
        refused = api.call("POST", "/v1/pki/cas", admin, json=body)
        assert refused.status_code == 400, refused.text
        assert f"{key_type} keys cannot be CA keys" in refused.json()["detail"]
        assert api.call("GET", "/v1/keys/ca.orph", admin).status_code == 404
    body = {"name": "orph", "subject": "CN=orph", "key": {"type": "ecdsa-p256"}}
    made = api.call("POST", "/v1/pki/cas", admin, json=body)
    assert made.status_code == 201, made.text
    [record] = [
        r for r in api.service.audit.search(action="ca.create").records if r["outcome"] == "ok"
    ]
    assert record["detail"]["key"] == "ca.orph"


def test_a_pending_ca_cannot_issue_and_a_foreign_chain_is_refused(api, admin, root):
    created = api.call(
        "POST", "/v1/pki/cas", admin, json={"name": "pending", "subject": "CN=Pending CA"}
    )
    assert created.status_code == 201
    _, csr = leaf_csr(x509.DNSName("web.lab"))
    assert issue(api, admin, csr, "server", ca="pending").status_code == 409
    other = OfflineRoot("Other Root")
    cert = other.sign_intermediate(created.json()["csr"])
    r = api.call(
        "POST",
        "/v1/pki/cas/pending/certificate",
        admin,
        json={"certificate": cert, "chain": root.pem},  # signed by `other`, chain says `root`
    )
    assert r.status_code == 400 and "not issued by" in r.json()["detail"]


def _certificate(
    issuer: tuple[ec.EllipticCurvePrivateKey, x509.Name],
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    *,
    ca: bool = True,
    path_length: int | None = None,
    usage: x509.KeyUsage | None = None,
    days: tuple[int, int] = (-1, 365),
) -> x509.Certificate:
    """A certificate `issuer` (key, name) signs for `subject`, valid from `days[0]` to
    `days[1]` days from now."""
    at = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[1])
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(at + timedelta(days=days[0]))
        .not_valid_after(at + timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(usage or ca_key_usage(digital_signature=False), critical=True)
    )
    return builder.sign(issuer[0], hashes.SHA256())


def test_a_chain_openssl_would_refuse_is_refused_at_import(api, admin, root, tmp_path, openssl_bin):
    """Each issuer above the imported CA must be a CA allowed to sign certificates, with a
    path length that leaves room for the CAs below it, and every link valid now; the
    imported one must also be allowed to sign CRLs. Each case is a 400 naming the link,
    the CA stays pending, and a good chain then imports and issues what openssl accepts."""
    created = api.call("POST", "/v1/pki/cas", admin, json={"name": "mid", "subject": "CN=Mid"})
    assert created.status_code == 201
    csr = x509.load_pem_x509_csr(created.json()["csr"].encode())
    ca_name, ca_key = csr.subject, csr.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    above = ec.generate_private_key(ec.SECP256R1())
    above_name = x509.Name.from_rfc4514_string("CN=Above")
    by_root = (root.key, root.cert.subject)
    signs_only = key_usage(digital_signature=True)
    cases = {
        "path length 0 allows 0": {"above": {"path_length": 0}},
        "not a CA certificate": {"above": {"ca": False}},
        "does not allow keyCertSign": {"above": {"usage": signs_only}},
        "does not allow cRLSign": {"ca": {"usage": key_usage(key_cert_sign=True)}},
        "not now": {"ca": {"days": (-30, -1)}},
    }
    for expected, options in cases.items():
        upper = _certificate(by_root, above_name, above.public_key(), **options.get("above", {}))
        cert = _certificate((above, above_name), ca_name, ca_key, **options.get("ca", {}))
        chain = [upper, root.cert]
        r = api.call(
            "POST",
            "/v1/pki/cas/mid/certificate",
            admin,
            json={
                "certificate": cert.public_bytes(PEM).decode(),
                "chain": "".join(c.public_bytes(PEM).decode() for c in chain),
            },
        )
        assert r.status_code == 400 and expected in r.json()["detail"], (expected, r.text)
    listed = api.call("GET", "/v1/pki/cas", admin).json()["cas"]
    assert {ca["name"]: ca["state"] for ca in listed}["mid"] == "pending"

    good = root.sign_intermediate(created.json()["csr"])
    r = api.call(
        "POST", "/v1/pki/cas/mid/certificate", admin, json={"certificate": good, "chain": root.pem}
    )
    assert r.status_code == 200 and r.json()["state"] == "active", r.text
    _, leaf = leaf_csr(x509.DNSName("web.lab"))
    issued = issue(api, admin, leaf, "server", ca="mid")
    assert issued.status_code == 200, issued.text
    openssl_verifies(openssl_bin, tmp_path, root, issued.json())


def test_a_cancelled_issuance_still_records_what_it_made(api, admin, root):
    """A request cancelled mid-issuance (a server shutting down) does not leave the audit
    and the inventory disagreeing: the work finishes, the certificate is in the inventory,
    and the outcome record (`interrupted`) names its serial and that it was stored."""
    make_intermediate(api, admin, root)
    _, csr = leaf_csr(x509.DNSName("cut.lab"))
    service = api.service
    ctx = Ctx("cancelled-issue")
    principal = service.gate.authenticate(Credentials(bearer=admin), ctx)
    request = IssueInput(x509.load_pem_x509_csr(csr.encode()), "server")

    async def cancel_midway() -> None:
        task = asyncio.ensure_future(service.pki.issue(principal, ctx, "issuing", request))
        await asyncio.sleep(0)  # the issuance has started
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    records = [
        r
        for r in service.audit.search(action="cert.issue").records
        if r["request_id"] == ctx.request_id
    ]
    assert [r["outcome"] for r in records] == ["started", "interrupted"]
    detail = records[-1]["detail"]
    assert detail["stored"] is True
    stored = api.call("GET", f"/v1/pki/certs/{detail['serial']}", admin)
    assert (stored.status_code, stored.json()["sans"]) == (200, ["dns:cut.lab"])


def test_a_denied_issuance_is_audited_with_the_names_it_asked_for(api, admin, root):
    """The trail shows what a principal tried to get, not only what was issued: the
    denial's record, and the `started` record of an allowed issuance, carry the profile,
    names and ttl asked for."""
    make_intermediate(api, admin, root)
    nobody = api.service.tokens.create(["nobody"], ttl=None)[1]
    _, csr = leaf_csr(x509.DNSName("payroll.lab"), x509.DNSName("API.lab"))
    denied = api.call(
        "POST",
        "/v1/pki/cas/issuing/issue",
        nobody,
        json={"csr": csr, "profile": "server", "ttl": "2h"},
    )
    assert denied.status_code == 403, denied.text
    assert issue(api, admin, csr, "client").status_code == 200
    records = api.service.audit.search(action="cert.issue").records
    by_outcome = {r["outcome"]: r["detail"] for r in records}
    asked = {"profile": "server", "sans": ["dns:payroll.lab", "dns:api.lab"], "ttl": 7200}
    assert by_outcome["policy_denied"] == asked
    assert by_outcome["started"]["profile"] == "client"
    assert by_outcome["started"]["sans"] == asked["sans"]
    # a CSR stuffed with names costs the trail no more than the names a profile could give
    many = [x509.DNSName(f"n{i}.lab") for i in range(150)]
    body = {"csr": leaf_csr(*many)[1], "profile": "server"}
    assert api.call("POST", "/v1/pki/cas/issuing/issue", nobody, json=body).status_code == 403
    last = api.service.audit.search(action="cert.issue").records[-1]["detail"]
    assert (len(last["sans"]), last["sans_asked"]) == (100, 150)


def test_the_public_chain_and_bundle_come_from_memory_once_the_ca_is_held(
    api, admin, root, monkeypatch
):
    active = make_intermediate(api, admin, root)
    authorities = api.service.pki.authorities
    chain = api.call("GET", "/v1/pki/cas/issuing/chain", None)
    assert chain.status_code == 200 and chain.headers["content-type"].startswith(PEM_TYPE)
    certificates = x509.load_pem_x509_certificates(chain.content)
    assert certificates[-1].public_bytes(serialization.Encoding.PEM).decode() == root.pem
    assert certificates[0].subject.rfc4514_string() == active["subject"]

    # the cache follows the CA's creation and import now: the refresher, woken by those
    # changes, would otherwise read them from the store while the request path is watched
    authorities.refresh()

    def store_read(*args: object) -> None:
        raise AssertionError("a CA this process holds was read from the store")

    monkeypatch.setattr(authorities, "_load_item", store_read)
    assert api.call("GET", "/v1/pki/cas/issuing/chain", None).content == chain.content
    bundle = api.call("GET", "/v1/pki/cas/issuing/bundle", None).json()
    assert [key["use"] for key in bundle["keys"]] == ["x509-svid"] * len(certificates)
    as_pem = api.client.get(
        "/v1/pki/cas/issuing/bundle", headers={"accept": "application/x-pem-file"}
    )
    assert as_pem.content == chain.content
    monkeypatch.undo()

    # a CA this process does not hold yet (made by another worker) is read from the store
    authorities._cas.pop("issuing")
    assert api.call("GET", "/v1/pki/cas/issuing/chain", None).content == chain.content
    assert api.call("GET", "/v1/pki/cas/nope/chain", None).status_code == 404
    assert api.call("GET", "/v1/pki/cas/nope/bundle", None).status_code == 404


def test_names_outside_the_cas_name_constraints_are_refused(
    api, admin, root, tmp_path, openssl_bin
):
    """An intermediate limited to DNS names under `lab` and to 10.0.0.0/8, except `bad.lab`:
    a name outside that is refused before signing (openssl would reject the certificate:
    "permitted subtree violation"), one inside verifies."""
    constraints = x509.NameConstraints(
        permitted_subtrees=[
            x509.DNSName("lab"),
            x509.IPAddress(ipaddress.ip_network("10.0.0.0/8")),
        ],
        excluded_subtrees=[x509.DNSName("bad.lab")],
    )
    make_intermediate(api, admin, root, constraints=constraints)
    for sans, shown in (
        ((x509.DNSName("localhost"),), "DNS SAN 'localhost'"),
        ((x509.DNSName("bad.lab"),), "DNS SAN 'bad.lab'"),
        (
            (x509.DNSName("web.lab"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
            "IP SAN '127.0.0.1'",
        ),
    ):
        refused = issue(api, admin, leaf_csr(*sans)[1], "server")
        assert refused.status_code == 400, refused.text
        assert refused.json()["detail"].startswith(f"{shown} is outside the name constraints")
    assert api.call("GET", "/v1/pki/certs", admin).json()["certs"] == []
    r = issue(api, admin, leaf_csr(x509.DNSName("web.LAB"))[1], "server")
    assert r.status_code == 200, r.text
    openssl_verifies(openssl_bin, tmp_path, root, r.json())
    # DNS names are recorded in lower case and found in any case
    listed = api.call("GET", "/v1/pki/certs?san=WEB.lab", admin).json()["certs"]
    assert [c["sans"] for c in listed] == [["dns:web.lab"]]
    assert len(api.call("GET", "/v1/pki/certs?san=.LAB", admin).json()["certs"]) == 1
    # and in the form the inventory (or openssl) prints them, which names the kind of SAN
    for wanted, found in (("dns:web.lab", 1), ("DNS:WEB.lab", 1), ("ip:web.lab", 0)):
        listed = api.call("GET", f"/v1/pki/certs?san={wanted}", admin).json()["certs"]
        assert len(listed) == found, wanted
    assert len(api.call("GET", "/v1/pki/certs?san=dns:.lab", admin).json()["certs"]) == 1


@pytest.mark.parametrize(
    ("wanted", "found"),
    [
        ("IP:0:0:0:0:0:0:0:1", True),  # as openssl prints it
        ("ip:::1", True),
        ("0000::0001", True),
        ("ip:::2", False),
        ("uri:spiffe://dev.lab/ns/Prod/sa/api", True),
        ("spiffe://dev.lab/ns/Prod/sa/api", True),
        ("uri:spiffe://dev.lab/ns/prod/sa/api", False),  # another SPIFFE ID
        ("SPIFFE://DEV.LAB/NS/PROD/SA/API", False),
        ("dns:WEB.lab", True),
        ("*.LAB", True),
    ],
)
def test_the_san_filter_compares_each_kind_of_name_as_it_should(wanted, found):
    sans = ["dns:web.lab", "ip:::1", "uri:spiffe://dev.lab/ns/Prod/sa/api"]
    assert san_matches(sans, wanted) is found


def test_serials_in_any_printed_form_and_inventory_filters_are_checked(api, admin, root):
    """A serial as openssl or a certificate viewer prints it (leading zeros, colons, upper
    case) finds the certificate; a serial that is no hex number, a status that does not
    exist, an `after` that is no serial and a reason no end-entity revocation gives are 4xx
    naming what is wrong."""
    make_intermediate(api, admin, root)
    r = issue(api, admin, leaf_csr(x509.DNSName("web.lab"))[1], "server")
    assert r.status_code == 200, r.text
    serial = r.json()["serial"]
    padded = serial.rjust(40, "0")
    colons = ":".join(padded[i : i + 2] for i in range(0, 40, 2)).upper()
    for form in ("00" + serial, colons, serial.upper()):
        found = api.call("GET", f"/v1/pki/certs/{form}", admin)
        assert found.status_code == 200 and found.json()["serial"] == serial, form
    for bad in ("zzzz", "-1", "0x1f", "1_f", "0"):
        refused = api.call("GET", f"/v1/pki/certs/{bad}", admin)
        assert refused.status_code == 400, (bad, refused.text)
        assert "serial" in refused.json()["detail"]
    too_long = api.call("GET", f"/v1/pki/certs/{'a' * 5000}", admin)
    assert too_long.status_code == 400
    assert too_long.json()["detail"] == "serial is 5000 characters long; at most 64 hex digits"
    assert api.call("GET", "/v1/pki/certs?status=bogus", admin).status_code == 422
    assert api.call("GET", "/v1/pki/certs?after=zzz", admin).status_code == 400
    revoke = f"/v1/pki/certs/{serial}/revoke"
    for reason in ("removeFromCRL", "certificateHold", "cACompromise", "aACompromise"):
        # a hold would be final here; the two compromises are a CA's and an attribute
        # authority's (RFC 5280 §5.3.1)
        refused = api.call("POST", revoke, admin, json={"reason": reason})
        assert refused.status_code == 400, (reason, refused.text)
        valid = refused.json()["detail"].partition("valid:")[2]
        assert "keyCompromise" in valid and reason not in valid, refused.text

    short = issue(api, admin, leaf_csr(x509.DNSName("brief.lab"))[1], "server", ttl="1s")
    assert short.status_code == 200, short.text
    time.sleep(1.2)

    def listed(status: str) -> list[str]:
        certs = api.call("GET", f"/v1/pki/certs?status={status}", admin).json()["certs"]
        return [c["serial"] for c in certs]

    assert listed("expired") == [short.json()["serial"]]
    assert listed("valid") == [serial]
    assert api.call("POST", revoke, admin, json={"reason": "superseded"}).status_code == 200
    assert (listed("valid"), listed("revoked")) == ([], [serial])


def test_a_body_with_two_csrs_is_refused(api, admin, root):
    make_intermediate(api, admin, root)
    pair = leaf_csr(x509.DNSName("a.lab"))[1] + leaf_csr(x509.DNSName("b.lab"))[1]
    refused = issue(api, admin, pair, "server")
    assert refused.status_code == 400 and "more than one PEM block" in refused.json()["detail"]
    assert api.call("GET", "/v1/pki/certs", admin).json()["certs"] == []


def test_the_ca_issuers_url_serves_the_issuing_certificate_in_der(api, admin, root):
    """RFC 5280 4.2.2.1: an HTTP caIssuers URI names a DER certificate (or certs-only CMS),
    which clients such as Windows and browsers fetch to complete a chain."""
    make_intermediate(api, admin, root)
    api.service.pki.public_url = "https://pki.example"
    r = issue(api, admin, leaf_csr(x509.DNSName("web.lab"))[1], "server")
    assert r.status_code == 200, r.text
    leaf = x509.load_pem_x509_certificate(r.json()["certificate"].encode())
    access = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    urls = {d.access_method: d.access_location.value for d in access}
    ca_issuers = urls[x509.AuthorityInformationAccessOID.CA_ISSUERS]
    assert ca_issuers == "https://pki.example/v1/pki/cas/issuing/certificate"
    fetched = api.call("GET", ca_issuers.removeprefix("https://pki.example"), None)
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == "application/pkix-cert"
    issuer = x509.load_der_x509_certificate(fetched.content)
    assert issuer == x509.load_pem_x509_certificates(r.json()["chain"].encode())[0]
    leaf.verify_directly_issued_by(issuer)
    assert api.call("GET", "/v1/pki/cas/nope/certificate", None).status_code == 404


def test_the_ca_key_counts_the_signatures_it_makes(api, admin, root):
    """A CA key's versions show their uses like any key's (an operator retiring a version
    needs to know it is idle): one per certificate."""
    ca = make_intermediate(api, admin, root)

    def uses() -> int:
        (version,) = api.call("GET", f"/v1/keys/{ca['key']}", admin).json()["versions"]
        assert version["last_used"] is not None  # its CSR was signed at creation
        return int(version["uses"])

    before = uses()
    for name in ("one", "two"):
        r = issue(api, admin, leaf_csr(x509.DNSName(f"{name}.lab"))[1], "server")
        assert r.status_code == 200, r.text
    assert uses() == before + 2


def test_a_ca_name_no_ca_can_have_is_404_never_echoed_nor_audited(api, admin, service, root):
    """A token pasted where a CA's name goes is refused before any decision: neither the
    reply nor the audit log (which keeps what it is given for good) holds it."""
    _, csr = leaf_csr(x509.DNSName("web.lab"))
    before = len(service.audit.search().records)
    for wrong in (admin, "a" * 64, "-dash", "dot.ted"):
        for method, path, body in (
            ("POST", f"/v1/pki/cas/{wrong}/issue", {"csr": csr, "profile": "server"}),
            (
                "POST",
                f"/v1/pki/cas/{wrong}/certificate",
                {"certificate": root.pem, "chain": root.pem},
            ),
        ):
            reply = api.call(method, path, admin, json=body)
            assert reply.status_code == 404, (path, reply.text)
            assert "1-63 letters" in reply.json()["detail"] and wrong not in reply.text
    assert len(service.audit.search().records) == before
    assert issue(api, admin, csr, "server", ca="nope").status_code == 404  # a possible name
    assert len(service.audit.search().records) > before  # is decided and audited as before


def test_a_rule_on_the_owner_lets_a_principal_list_its_own_certificates(tmp_path: Path) -> None:
    """The inventory list shows the policy its filters as the resource: a rule letting a
    principal read the certificates it owns lets it list them with `owner` set to itself,
    and still not everyone's."""
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    (policies / "team.rego").write_text(
        "package kmsgate.authz\nimport rego.v1\n"
        'allow if { "team" in input.principal.roles; input.action == "cert.issue" }\n'
        'allow if { "team" in input.principal.roles; input.action == "cert.read"\n'
        "  input.resource.owner == input.principal.id }\n"
    )
    root = OfflineRoot()
    with open_gateway(tmp_path, policy_dir=policies) as (api, admin):
        make_intermediate(api, admin, root)
        team = api.service.tokens.create(["team"], ttl=None)[1]
        me = api.call("GET", "/v1/sys/whoami", team).json()["id"]
        assert issue(api, team, leaf_csr(x509.DNSName("mine.lab"))[1], "server").status_code == 200
        assert (
            issue(api, admin, leaf_csr(x509.DNSName("other.lab"))[1], "server").status_code == 200
        )
        mine = api.call("GET", f"/v1/pki/certs?owner={me}", team)
        assert mine.status_code == 200, mine.text
        assert [c["sans"] for c in mine.json()["certs"]] == [["dns:mine.lab"]]
        assert api.call("GET", "/v1/pki/certs", team).status_code == 403
        assert (
            api.call("GET", "/v1/pki/certs?owner=token:0000000000000000", team).status_code == 403
        )
