"""Certificates from the server, client and workload profiles in a real TLS handshake (Python
`ssl`, mutual authentication, over loopback)."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.pki.ceremony import OfflineRoot, leaf_csr, make_intermediate, write


def issue_pair(api, token, tmp_path: Path, name: str, profile: str, *sans: x509.GeneralName):
    """(key file, certificate+chain file) of a fresh certificate under `profile`."""
    key, csr = leaf_csr(*sans)
    r = api.call("POST", "/v1/pki/cas/issuing/issue", token, json={"csr": csr, "profile": profile})
    assert r.status_code == 200, r.text
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    body = r.json()
    return (
        write(tmp_path / f"{name}-key.pem", key_pem),
        write(tmp_path / f"{name}-cert.pem", body["certificate"] + body["chain"]),
    )


def test_mutual_tls_with_server_and_client_profiles(api, admin, tmp_path: Path) -> None:
    root = OfflineRoot()
    make_intermediate(api, admin, root)
    root_file = write(tmp_path / "root.pem", root.pem)
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    server_key, server_cert = issue_pair(
        api, admin, tmp_path, "server", "server", x509.DNSName("localhost"), loopback
    )
    client_key, client_cert = issue_pair(
        api, admin, tmp_path, "client", "client", x509.DNSName("agent.lab")
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(root_file))
    server_ctx.load_cert_chain(server_cert, server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(root_file))
    client_ctx.load_cert_chain(client_cert, client_key)

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            seen["peer"] = tls.getpeercert()
            tls.sendall(b"ok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client_ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.recv(2) == b"ok"
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    thread.join(timeout=10)
    listener.close()
    peer = seen["peer"]
    assert isinstance(peer, dict)
    assert ("DNS", "agent.lab") in peer["subjectAltName"]


def test_a_workload_certificate_carries_exactly_its_spiffe_id(api, admin, tmp_path: Path) -> None:
    make_intermediate(api, admin, OfflineRoot())
    spiffe = "spiffe://dev.lab/ns/payments/sa/api"
    _, cert_file = issue_pair(
        api, admin, tmp_path, "workload", "workload", x509.UniformResourceIdentifier(spiffe)
    )
    cert = x509.load_pem_x509_certificates(cert_file.read_bytes())[0]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.UniformResourceIdentifier(spiffe)]
    ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(ekus) == {
        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
        x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH,
    }
