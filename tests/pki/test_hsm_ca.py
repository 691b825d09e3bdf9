"""An intermediate CA whose key lives on a SoftHSM token: it signs certificates that openssl
verifies, and its key stays sensitive and never extractable."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from kmsgate.uri import Pkcs11Uri
from tests.gateway import open_gateway
from tests.pki.ceremony import OfflineRoot, leaf_csr, make_intermediate, write
from tests.softhsm import softhsm_session

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "rsa-3072"])
def test_an_hsm_intermediate_issues_certificates_openssl_verifies(
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
        verified = subprocess.run(
            [
                openssl_bin,
                "verify",
                "-CAfile",
                write(tmp_path / "root.pem", root.pem),
                "-untrusted",
                write(tmp_path / "chain.pem", body["chain"]),
                write(tmp_path / "leaf.pem", body["certificate"]),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr
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
