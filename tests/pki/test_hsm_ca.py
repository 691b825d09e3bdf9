"""An intermediate CA whose key lives on a SoftHSM token: it signs certificates, CRLs and OCSP
responder certificates that openssl verifies, and its key stays sensitive and never
extractable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmsgate.service import Ctx
from kmsgate.uri import Pkcs11Uri
from tests.components import run_openssl
from tests.gateway import open_gateway
from tests.pki.ceremony import OfflineRoot, leaf_csr, make_intermediate, openssl_verifies, write
from tests.softhsm import softhsm_session

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa-3072"])
def test_an_hsm_intermediate_signs_what_openssl_verifies(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, openssl_bin: str, key_type: str
) -> None:
    token = softhsm_session(tmp_path_factory).init_token(f"kmsgate-ca-{key_type}")
    root = OfflineRoot()
    backends = {"local": {"type": "softkms"}, "hsm": token.backend_config()}
    with open_gateway(tmp_path, backends=backends) as (api, admin):
        ca = make_intermediate(api, admin, root, name="hsm", backend="hsm", type=key_type)
        key = api.call("GET", f"/v1/keys/{ca['key']}", admin).json()
        assert (key["backend"], key["purpose"], key["type"]) == ("hsm", "ca", key_type)
        _, csr = leaf_csr(x509.DNSName("svc.lab"))
        issued = api.call(
            "POST", "/v1/pki/cas/hsm/issue", admin, json={"csr": csr, "profile": "server"}
        )
        assert issued.status_code == 200, issued.text
        body = issued.json()
        openssl_verifies(openssl_bin, tmp_path, root, body)
        check_hsm_crl_and_ocsp(api, admin, tmp_path, openssl_bin, root, body)
        version = api.service.catalogue.get(ca["key"]).versions[1]
    ref = Pkcs11Uri.parse_key_reference(version.backend_ref)
    private = [
        o
        for o in token.list_objects()
        if o.get("ID") == (ref.id or b"").hex() and o["kind"].startswith("Private Key")
    ]
    assert len(private) == 1, private
    access = [a.strip() for a in private[0]["Access"].split(",")]
    assert "sensitive" in access and "never extractable" in access
    assert "extractable" not in access


def openssl(binary: str, *args: str | Path) -> str:
    """What `openssl ARGS` printed (its verdicts go to either stream)."""
    done = run_openssl(binary, *args)
    return done.stdout + done.stderr


def check_hsm_crl_and_ocsp(
    api: Any, admin: str, tmp_path: Path, binary: str, root: OfflineRoot, body: dict[str, str]
) -> None:
    """After a revocation, the HSM CA's CRL (signed on the token) makes openssl reject the
    leaf, and its OCSP answer (a responder certificate the HSM CA signed) says revoked."""
    leaf = tmp_path / "leaf.pem"
    issuer = write(
        tmp_path / "issuer.pem",
        body["chain"].split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n",
    )
    revoked = api.call(
        "POST", f"/v1/pki/certs/{body['serial']}/revoke", admin, json={"reason": "keyCompromise"}
    )
    assert revoked.status_code == 200, revoked.text
    assert "hsm" in api.service.revocation.publish_due(Ctx("test"))  # the leader's job
    crl = api.call("GET", "/v1/pki/cas/hsm/crl", None)
    assert crl.status_code == 200, crl.text
    crl_pem = x509.load_der_x509_crl(crl.content).public_bytes(serialization.Encoding.PEM)
    (tmp_path / "hsm.crl.pem").write_bytes(crl_pem)
    text = openssl(
        binary, "verify", "-crl_check", "-CRLfile", tmp_path / "hsm.crl.pem",
        "-CAfile", tmp_path / "root.pem", "-untrusted", tmp_path / "chain.pem", leaf,
    )  # fmt: skip
    assert "certificate revoked" in text, text
    request = tmp_path / "ocsp.req"
    openssl(binary, "ocsp", "-issuer", issuer, "-cert", leaf, "-no_nonce", "-reqout", request)
    answer = api.client.post(
        "/v1/pki/cas/hsm/ocsp",
        content=request.read_bytes(),
        headers={"content-type": "application/ocsp-request"},
    )
    assert answer.status_code == 200
    (tmp_path / "ocsp.resp").write_bytes(answer.content)
    text = openssl(
        binary, "ocsp", "-respin", tmp_path / "ocsp.resp", "-issuer", issuer,
        "-verify_other", issuer, "-CAfile", tmp_path / "root.pem", "-cert", leaf, "-no_nonce",
    )  # fmt: skip
    assert "Response verify OK" in text and f"{leaf}: revoked" in text, text
