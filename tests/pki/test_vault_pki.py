"""A `hashivault-pki` CA: a real OpenBao PKI engine signs and revokes, while kmsgate keeps the
profile checks, the policy, the audit and the inventory."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from tests.components import run_openssl
from tests.gateway import open_gateway
from tests.openbao import OpenBaoServer
from tests.pki.ceremony import leaf_csr, write
from tests.test_hashivault_gateway import token_file, vault_config
from tests.test_openapi_replies import Replies

pytestmark = pytest.mark.interop


ROLE = {
    "allowed_domains": "lab",
    "allow_subdomains": True,
    "allow_ip_sans": True,
    "max_ttl": "72h",
    "key_type": "any",
    "require_cn": False,
}
"""A role for names under `lab` (of Vault's defaults: both EKUs, key encipherment too)."""
SERVER_ROLE = {
    **ROLE,
    "server_flag": True,
    "client_flag": False,
    "key_usage": ["DigitalSignature"],
    "basic_constraints_valid_for_non_ca": True,
}
"""The same role made to give what kmsgate's `server` profile gives."""


@contextlib.contextmanager
def vault_gateway(server: OpenBaoServer, tmp_path: Path) -> Iterator[tuple[Any, str]]:
    """A gateway with backend `vault` on `server` (and `local`): its API and admin token."""
    vault = vault_config(
        server.addr, "kmsgate-", token_file=str(token_file(tmp_path, server.root_token))
    )
    with open_gateway(tmp_path, backends={"local": {"type": "softkms"}, "vault": vault}) as pair:
        yield pair


@pytest.fixture
def pki_mount(openbao_server: OpenBaoServer) -> str:
    """A fresh PKI engine with an internal root, a role `web` that issues as kmsgate's
    `server` profile does and a role `loose` with Vault's defaults."""
    mount = f"pki-{secrets.token_hex(4)}"
    client = openbao_server.client()
    client.sys.enable_secrets_engine("pki", path=mount, config={"max_lease_ttl": "87600h"})
    client.write(f"{mount}/root/generate/internal", common_name="OpenBao Test Root", ttl="8760h")
    client.write(f"{mount}/roles/web", **SERVER_ROLE)
    client.write(f"{mount}/roles/loose", **ROLE)
    return mount


def test_a_vault_pki_ca_issues_and_revokes(
    openbao_server: OpenBaoServer, pki_mount: str, tmp_path: Path, openssl_bin: str
) -> None:
    with vault_gateway(openbao_server, tmp_path) as (api, admin):
        created = api.call(
            "POST",
            "/v1/pki/cas",
            admin,
            json={
                "name": "bao",
                "type": "hashivault-pki",
                "key": {"backend": "vault"},
                "mount": pki_mount,
                "role": "web",
            },
        )
        assert created.status_code == 201, created.text
        assert (created.json()["state"], created.json()["type"]) == ("active", "hashivault-pki")
        assert "OpenBao Test Root" in created.json()["subject"]

        _, csr = leaf_csr(x509.DNSName("api.lab"))
        issued = api.call(
            "POST", "/v1/pki/cas/bao/issue", admin, json={"csr": csr, "profile": "server"}
        )
        assert issued.status_code == 200, issued.text
        body = issued.json()
        ca_pem = api.call("GET", "/v1/pki/cas/bao/chain", None).text
        ca_file = write(tmp_path / "bao-ca.pem", ca_pem)
        leaf = write(tmp_path / "leaf.pem", body["certificate"])
        ok = run_openssl(openssl_bin, "verify", "-CAfile", ca_file, leaf)
        assert ok.returncode == 0, ok.stdout + ok.stderr

        # a name outside kmsgate's profile never reaches Vault
        _, outside = leaf_csr(x509.DNSName("api.example.com"))
        refused = api.call(
            "POST", "/v1/pki/cas/bao/issue", admin, json={"csr": outside, "profile": "server"}
        )
        assert refused.status_code == 400

        serial = body["serial"]
        revoked = api.call(
            "POST", f"/v1/pki/certs/{serial}/revoke", admin, json={"reason": "keyCompromise"}
        )
        assert revoked.status_code == 200, revoked.text
        listed = {
            c["serial"]: c["status"]
            for c in api.call("GET", "/v1/pki/certs", admin).json()["certs"]
        }
        assert listed == {serial: "revoked"}

        fetched = api.call("GET", "/v1/pki/cas/bao/crl", None)  # Vault's CRL, through kmsgate
        assert fetched.status_code == 200, fetched.text
        assert fetched.headers["content-type"] == "application/pkix-crl"
        crl_der = fetched.content
        crl = x509.load_der_x509_crl(crl_der)
        assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
        crl_file = tmp_path / "bao.crl.pem"
        crl_file.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        rejected = run_openssl(
            openssl_bin, "verify", "-crl_check", "-CRLfile", crl_file, "-CAfile", ca_file, leaf
        )
        assert rejected.returncode != 0 and "revoked" in rejected.stdout + rejected.stderr


def test_ocsp_for_a_vault_ca_is_always_an_ocsp_answer(
    openbao_server: OpenBaoServer, pki_mount: str, tmp_path: Path
) -> None:
    """Vault answers a well-formed request; a malformed one gets malformedRequest, as for the
    gateway's own CAs; when Vault cannot answer (here: its PKI mount is gone), tryLater.
    Never a problem+json: OCSP clients read only OCSP responses."""
    with vault_gateway(openbao_server, tmp_path) as (api, admin):
        body = {"name": "bao", "type": "hashivault-pki", "key": {"backend": "vault"}}
        created = api.call(
            "POST", "/v1/pki/cas", admin, json={**body, "mount": pki_mount, "role": "web"}
        )
        assert created.status_code == 201, created.text
        _, csr = leaf_csr(x509.DNSName("ocsp.lab"))
        issued = api.call(
            "POST", "/v1/pki/cas/bao/issue", admin, json={"csr": csr, "profile": "server"}
        )
        assert issued.status_code == 200, issued.text
        leaf = x509.load_pem_x509_certificate(issued.json()["certificate"].encode())
        issuer = x509.load_pem_x509_certificates(issued.json()["chain"].encode())[0]
        request = (
            ocsp.OCSPRequestBuilder()
            .add_certificate(leaf, issuer, hashes.SHA1())
            .build()
            .public_bytes(serialization.Encoding.DER)
        )

        def ask(der: bytes) -> ocsp.OCSPResponse:
            reply = api.call(
                "POST",
                "/v1/pki/cas/bao/ocsp",
                None,
                content=der,
                headers={"content-type": "application/ocsp-request"},
            )
            assert reply.status_code == 200, reply.text
            assert reply.headers["content-type"] == "application/ocsp-response"
            return ocsp.load_der_ocsp_response(reply.content)

        answer = ask(request)
        assert answer.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
        assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD
        assert answer.serial_number == leaf.serial_number
        for garbage in (b"hello", b""):
            assert ask(garbage).response_status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
        openbao_server.client().sys.disable_secrets_engine(pki_mount)
        assert ask(request).response_status is ocsp.OCSPResponseStatus.TRY_LATER


def test_a_vault_role_that_would_give_other_extensions_is_refused(
    openbao_server: OpenBaoServer, pki_mount: str, tmp_path: Path
) -> None:
    """The profile alone decides the extensions: a CA over a missing role, or a role whose
    key usage or basic constraints differ, is refused at creation; a certificate the role
    gave other EKUs than the profile's is revoked in Vault and not handed out."""
    client = openbao_server.client()
    with vault_gateway(openbao_server, tmp_path) as (api, admin):

        def create(name: str, role: str, mount: str = pki_mount) -> Any:
            body = {"name": name, "type": "hashivault-pki", "key": {"backend": "vault"}}
            return api.call(
                "POST", "/v1/pki/cas", admin, json={**body, "mount": mount, "role": role}
            )

        local = api.call(
            "POST",
            "/v1/pki/cas",
            admin,
            json={"name": "soft", "type": "hashivault-pki", "key": {"backend": "local"},
                  "mount": pki_mount, "role": "web"},
        )  # fmt: skip
        assert local.status_code == 400 and "fronts no PKI engine" in local.text, local.text
        missing = create("nope", "no-such-role")
        assert missing.status_code == 400 and "no PKI role 'no-such-role'" in missing.text
        no_mount = create("nomount", "web", mount="pki-missing")
        assert no_mount.status_code == 400 and "no PKI role 'web'" in no_mount.text
        loose = create("loose", "loose")
        assert loose.status_code == 400, loose.text
        assert "key_usage" in loose.text and "basic_constraints_valid_for_non_ca" in loose.text

        # a role whose EKUs differ from the profile's: refused before Vault issues anything
        both = {**SERVER_ROLE, "client_flag": True}  # serverAuth and clientAuth
        client.write(f"{pki_mount}/roles/both", **both)
        assert create("both", "both").status_code == 201
        _, csr = leaf_csr(x509.DNSName("two.lab"))

        def issue(ca: str) -> Any:
            body = {"csr": csr, "profile": "server"}
            return api.call("POST", f"/v1/pki/cas/{ca}/issue", admin, json=body)

        def issued_in_vault() -> int:
            return len(client.list(f"{pki_mount}/certs")["data"]["keys"])

        before = issued_in_vault()
        early = issue("both")
        assert early.status_code == 400, early.text
        assert "'client_auth', 'server_auth'" in early.json()["detail"]
        assert issued_in_vault() == before
        # a role changed in Vault after the CA was made: Vault issues, kmsgate refuses the
        # certificate and revokes it there
        client.write(f"{pki_mount}/roles/changing", **SERVER_ROLE)
        assert create("changing", "changing").status_code == 201
        client.write(f"{pki_mount}/roles/changing", **both)
        refused = issue("changing")
        assert refused.status_code == 502, refused.text
        assert "unlike profile 'server'" in refused.json()["detail"]
        assert api.call("GET", "/v1/pki/certs", admin).json()["certs"] == []
        revoked = client.list(f"{pki_mount}/certs/revoked")["data"]["keys"]
        assert len(revoked) == 1

        assert create("bao", "web").status_code == 201
        issued = api.call(
            "POST", "/v1/pki/cas/bao/issue", admin, json={"csr": csr, "profile": "server"}
        )
        assert issued.status_code == 200, issued.text
        cert = x509.load_pem_x509_certificate(issued.json()["certificate"].encode())
        ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(ekus) == [x509.ExtendedKeyUsageOID.SERVER_AUTH]
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert basic.ca is False

        # the profile allows 5d; the role's max_ttl (72h) would cut it short without a word
        listed = len(api.call("GET", "/v1/pki/certs", admin).json()["certs"])
        body = {"csr": csr, "profile": "server", "ttl": "5d"}
        short = api.call("POST", "/v1/pki/cas/bao/issue", admin, json=body)
        assert short.status_code == 400, short.text
        assert "cuts certificates short" in short.json()["detail"]
        assert "valid for 3d more" in short.json()["detail"]  # 72h
        assert len(api.call("GET", "/v1/pki/certs", admin).json()["certs"]) == listed
        assert len(client.list(f"{pki_mount}/certs/revoked")["data"]["keys"]) == 2
        body["ttl"] = "72h"
        assert api.call("POST", "/v1/pki/cas/bao/issue", admin, json=body).status_code == 200


def test_the_replies_of_a_vault_pki_ca_match_the_openapi_document(
    openbao_server: OpenBaoServer, pki_mount: str, tmp_path: Path
) -> None:
    """A `hashivault-pki` CA is active at once, without a kmsgate key or a CSR, which the
    document says; the records of its certificates are as any other's."""
    with vault_gateway(openbao_server, tmp_path) as (api, admin):
        replies = Replies(api, admin)
        body = {
            "name": "bao",
            "type": "hashivault-pki",
            "key": {"backend": "vault"},
            "mount": pki_mount,
            "role": "web",
        }
        created = replies.call("POST", "/v1/pki/cas", 201, json=body)
        assert (created["state"], created["key"], created["csr"]) == ("active", None, None)
        replies.call("GET", "/v1/pki/cas")
        issue = {"csr": leaf_csr(x509.DNSName("api.lab"))[1], "profile": "server"}
        serial = replies.call("POST", "/v1/pki/cas/{ca}/issue", ca="bao", json=issue)["serial"]
        replies.call("GET", "/v1/pki/certs/{serial}", serial=serial)
        revoke = {"reason": "keyCompromise"}
        replies.call("POST", "/v1/pki/certs/{serial}/revoke", serial=serial, json=revoke)
        replies.call("GET", "/v1/pki/certs", params={"ca": "bao"})
