"""`kmsgate ca` and `kmsgate cert` against a real `kmsgate serve --dev`, as a user runs them.

The gateway is a subprocess (as in tests/test_cli.py); every command is its own process
through the installed `kmsgate` script. Certificates are checked with the openssl CLI and in
a Python `ssl` mutual TLS handshake. The dev CA set-up itself (`kmsgate.bootstrap`) is also
exercised in-process, for what a subprocess cannot easily show (restarts, interrupted starts).
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from kmsgate.bootstrap import (
    DEV_CA,
    DEV_ROOT_CERT_FILE,
    DEV_ROOT_KEY_FILE,
    DEV_ROOT_PASSPHRASE_FILE,
    build_service,
    ensure_dev_ca,
    prepare_dev_data_dir,
)
from kmsgate.config import load_settings
from kmsgate.pki.authorities import CaState
from kmsgate.pki.csr import parse_san
from kmsgate.pki.root import load_root
from tests.components import LOOPBACK
from tests.softhsm import softhsm_session
from tests.test_cli import (
    Gateway,
    Run,
    assert_one_line_error,
    clean_env,
    kmsgate_script,
    run_cli,
    run_into_full,
    running_gateway,
)

DEV_ROOT_SUBJECT = "CN=kmsgate dev root (DEV ONLY - not for production)"
PASSPHRASE = "a long ceremony passphrase"
OPENSSL_TIMEOUT = 30.0
CRL_WAIT = 30.0  # seconds until a new CA has its first CRL


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("pki-gateway")) as gateway:
        yield gateway


def openssl(openssl_bin: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [openssl_bin, *map(str, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=OPENSSL_TIMEOUT,
        check=False,
    )


def assert_verifies(openssl_bin: str, root: Path, chain: Path, leaf: Path, *extra: str) -> None:
    result = openssl(openssl_bin, "verify", "-CAfile", root, "-untrusted", chain, *extra, leaf)
    assert result.returncode == 0 and f"{leaf}: OK" in result.stdout, result.stdout + result.stderr


def issue(gw: Gateway, tmp_path: Path, name: str, profile: str, *sans: str, ca: str = DEV_CA):
    """(key, certificate, chain) files of a certificate issued with a local key; the run."""
    key, cert, chain = (tmp_path / f"{name}-{part}.pem" for part in ("key", "cert", "chain"))
    args = ["cert", "issue", "--ca", ca, "--profile", profile, "--key-out", str(key)]
    for san in sans:
        args += ["--san", san]
    result = gw.ok(*args, "--out", str(cert), "--chain-out", str(chain))
    return key, cert, chain, result


def serial_of(result: Run) -> str:
    line = result.err.strip().splitlines()[-1]
    assert line.startswith("serial "), str(result)
    return line.split()[1]


def leaf(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def table(result: Run) -> list[dict[str, str]]:
    """A piped table: a header line, then tab-separated rows."""
    header, *rows = result.out.splitlines()
    return [dict(zip(header.split("\t"), row.split("\t"), strict=True)) for row in rows]


# --------------------------------------------------------------------------------------------
# the dev CA
# --------------------------------------------------------------------------------------------


def test_the_dev_gateway_has_an_active_dev_ca_under_its_dev_root(gw: Gateway) -> None:
    data = gw.data_dir
    for name in (DEV_ROOT_KEY_FILE, DEV_ROOT_PASSPHRASE_FILE):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    root = leaf(data / DEV_ROOT_CERT_FILE)
    assert root.subject.rfc4514_string() == DEV_ROOT_SUBJECT
    key = load_root(data / DEV_ROOT_KEY_FILE, (data / DEV_ROOT_PASSPHRASE_FILE).read_bytes())
    assert key.public_key() == root.public_key()
    with pytest.raises(TypeError):  # the key file is encrypted
        serialization.load_pem_private_key((data / DEV_ROOT_KEY_FILE).read_bytes(), None)

    rows = {row["name"]: row for row in table(gw.ok("ca", "list"))}
    assert rows[DEV_CA]["state"] == "active"
    assert rows[DEV_CA]["parent"] == DEV_ROOT_SUBJECT
    shown = json.loads(gw.ok("ca", "show", DEV_CA).out)
    assert (shown["name"], shown["state"], shown["key"]) == (DEV_CA, "active", "ca.dev")
    chain = x509.load_pem_x509_certificates(gw.ok("ca", "chain", DEV_CA, token="").out.encode())
    assert [c.subject.rfc4514_string() for c in chain[1:]] == [DEV_ROOT_SUBJECT]
    assert chain[-1] == root
    chain[0].verify_directly_issued_by(root)
    profiles = httpx.get(
        f"{gw.addr}/v1/pki/profiles",
        headers={"authorization": f"Bearer {gw.root_token}"},
        timeout=10,
    ).json()["profiles"]
    assert {"server", "client", "workload"} <= {p["name"] for p in profiles}
    records = [json.loads(line) for line in (data / "audit.log").read_text().splitlines()]
    made = [(r["action"], r["principal"]) for r in records if r["action"].startswith("ca.")]
    assert ("ca.create", "system") in made and ("ca.import", "system") in made


def test_issue_from_the_dev_ca_show_list_and_revoke(
    gw: Gateway, tmp_path: Path, openssl_bin: str
) -> None:
    key = tmp_path / "k.pem"
    cert, chain = tmp_path / "c.pem", tmp_path / "chain.pem"
    result = gw.ok(
        "cert",
        "issue",
        "--ca",
        "dev",
        "--profile",
        "server",
        "--key-out",
        str(key),
        "--san",
        "web.lab",
        "--out",
        str(cert),
        "--chain-out",
        str(chain),
    )
    serial = serial_of(result)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp256r1"
    assert leaf(cert).public_key() == private.public_key()
    root = gw.data_dir / DEV_ROOT_CERT_FILE
    assert_verifies(openssl_bin, root, chain, cert, "-purpose", "sslserver")
    sans = leaf(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.DNSName("web.lab")]

    listed = {row["serial"]: row for row in table(gw.ok("cert", "list", "--san", "web.lab"))}
    assert listed[serial]["status"] == "valid"
    assert (listed[serial]["ca"], listed[serial]["profile"]) == ("dev", "server")
    revoked = json.loads(gw.ok("cert", "revoke", serial, "--reason", "keyCompromise").out)
    assert (revoked["status"], revoked["reason"]) == ("revoked", "keyCompromise")
    shown = json.loads(gw.ok("cert", "show", serial).out)
    assert shown["status"] == "revoked" and shown["revoked_at"]
    assert x509.load_pem_x509_certificate(shown["certificate"].encode()) == leaf(cert)
    revoked_rows = table(gw.ok("cert", "list", "--ca", "dev", "--status", "revoked", "--all"))
    assert serial in {row["serial"] for row in revoked_rows}
    assert_one_line_error(gw.run("cert", "revoke", serial), "conflict", "revoked already")
    assert_one_line_error(gw.run("cert", "revoke", serial, "--reason", "bogus"), "keyCompromise")

    # an existing --out or --chain-out is refused before anything is issued, --force replaces
    # it; an existing --key-out is never replaced
    csr = tmp_path / "again.csr"
    request = x509.CertificateSigningRequestBuilder(x509.Name([])).add_extension(
        x509.SubjectAlternativeName([x509.DNSName("web.lab")]), critical=False
    )
    csr.write_bytes(request.sign(private, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    issue_again = ["cert", "issue", "--ca", "dev", "--profile", "server"]
    before = len(table(gw.ok("cert", "list", "--san", "web.lab", "--all")))
    for outputs in (["--out", str(cert)], ["--chain-out", str(chain)]):
        assert_one_line_error(gw.run(*issue_again, "--csr", str(csr), *outputs), "--force")
    new_key = ["--key-out", str(key), "--san", "web.lab", "--force"]
    assert_one_line_error(gw.run(*issue_again, *new_key), "--force")
    kept = serialization.load_pem_private_key(key.read_bytes(), None)
    assert kept.public_key() == private.public_key()
    assert len(table(gw.ok("cert", "list", "--san", "web.lab", "--all"))) == before
    outputs = ["--out", str(cert), "--chain-out", str(chain), "--force"]
    replaced = serial_of(gw.ok(*issue_again, "--csr", str(csr), *outputs))
    assert replaced != serial and leaf(cert).public_key() == private.public_key()
    assert_verifies(openssl_bin, root, chain, cert, "-purpose", "sslserver")


def test_mutual_tls_with_server_and_client_certificates_of_the_dev_ca(
    gw: Gateway, tmp_path: Path
) -> None:
    server_key, server_cert, server_chain, _ = issue(
        gw, tmp_path, "server", "server", "localhost", "127.0.0.1"
    )
    client_key, client_cert, client_chain, _ = issue(gw, tmp_path, "client", "client", "agent.lab")
    root = str(gw.data_dir / DEV_ROOT_CERT_FILE)
    server_bundle = tmp_path / "server-bundle.pem"
    server_bundle.write_text(server_cert.read_text() + server_chain.read_text())
    client_bundle = tmp_path / "client-bundle.pem"
    client_bundle.write_text(client_cert.read_text() + client_chain.read_text())
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=root)
    server_ctx.load_cert_chain(server_bundle, server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=root)
    client_ctx.load_cert_chain(client_bundle, client_key)

    seen: dict[str, object] = {}
    with socket.create_server((LOOPBACK, 0)) as listener:
        listener.settimeout(20)
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(20)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["peer"] = tls.getpeercert()
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection((LOOPBACK, port), timeout=20) as raw,
            client_ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.recv(2) == b"ok"
            server_sans = tls.getpeercert()["subjectAltName"]
        thread.join(timeout=20)
    assert ("DNS", "localhost") in server_sans
    peer = seen["peer"]
    assert isinstance(peer, dict)
    assert peer["subjectAltName"] == (("DNS", "agent.lab"),)


def test_a_workload_certificate_carries_exactly_its_spiffe_uri(
    gw: Gateway, tmp_path: Path, openssl_bin: str
) -> None:
    spiffe = "spiffe://dev.lab/ns/payments/sa/api"
    _, cert, chain, _ = issue(gw, tmp_path, "workload", "workload", spiffe)
    sans = leaf(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.UniformResourceIdentifier(spiffe)]
    ekus = leaf(cert).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(ekus) == {
        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
        x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    assert_verifies(openssl_bin, gw.data_dir / DEV_ROOT_CERT_FILE, chain, cert)


def test_issue_for_a_csr_with_a_ttl(gw: Gateway, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "csr.lab")]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("csr.lab")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    csr_file = tmp_path / "req.csr"
    csr_file.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    result = gw.ok(
        "cert", "issue", "--ca", "dev", "--profile", "server", "--csr", str(csr_file), "--ttl", "2h"
    )
    cert = x509.load_pem_x509_certificate(result.out.encode())  # stdout without --out
    assert cert.public_key() == key.public_key()
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 2 * 3600 <= lifetime.total_seconds() <= 2 * 3600 + 120
    serial = serial_of(result)
    soon = {row["serial"] for row in table(gw.ok("cert", "expiring", "--within", "3h"))}
    assert serial in soon
    later = {row["serial"] for row in table(gw.ok("cert", "expiring", "--within", "1h"))}
    assert serial not in later


def test_cert_list_pages(gw: Gateway, tmp_path: Path) -> None:
    for n in range(3):
        issue(gw, tmp_path, f"page{n}", "client", f"page{n}.lab")
    first = gw.ok("cert", "list", "--profile", "client", "--limit", "1")
    assert len(table(first)) == 1
    assert "--all" in first.err
    every = table(gw.ok("cert", "list", "--profile", "client", "--limit", "1", "--all"))
    assert {"dns:page0.lab", "dns:page1.lab", "dns:page2.lab"} <= {row["sans"] for row in every}
    assert [row["serial"] for row in every] == sorted(row["serial"] for row in every)


def test_crl_of_the_dev_ca(gw: Gateway, tmp_path: Path, openssl_bin: str) -> None:
    probe = httpx.get(f"{gw.addr}/v1/pki/cas/{DEV_CA}/crl", timeout=10)
    if probe.status_code == 404:
        pytest.skip("this gateway serves no CRL yet (GET /v1/pki/cas/{ca}/crl)")
    der = tmp_path / "dev.crl"
    deadline = time.monotonic() + CRL_WAIT
    while (fetched := gw.run("ca", "crl", DEV_CA, "--out", str(der), token="")).rc != 0:
        assert "unavailable" in fetched.err, str(fetched)  # built by a job soon after start
        assert time.monotonic() < deadline, str(fetched)
        time.sleep(0.5)
    crl = x509.load_der_x509_crl(der.read_bytes())
    chain = x509.load_pem_x509_certificates(gw.ok("ca", "chain", DEV_CA).out.encode())
    assert crl.is_signature_valid(chain[0].public_key())  # type: ignore[arg-type]
    pem = x509.load_pem_x509_crl(gw.ok("ca", "crl", DEV_CA).out.encode())
    assert pem == crl
    with pytest.raises(x509.ExtensionNotFound):
        crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
    delta = x509.load_pem_x509_crl(gw.ok("ca", "crl", DEV_CA, "--delta").out.encode())
    assert delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator).critical
    chain_file = tmp_path / "dev-chain.pem"
    chain_file.write_text(gw.ok("ca", "chain", DEV_CA).out)
    checked = openssl(
        openssl_bin, "crl", "-inform", "DER", "-in", der, "-CAfile", chain_file, "-noout"
    )
    assert checked.returncode == 0 and "verify OK" in checked.stderr + checked.stdout, (
        checked.stdout + checked.stderr
    )


# --------------------------------------------------------------------------------------------
# the offline root ceremony
# --------------------------------------------------------------------------------------------


def test_root_ceremony_end_to_end(gw: Gateway, tmp_path: Path, openssl_bin: str) -> None:
    passphrase = tmp_path / "passphrase"
    passphrase.write_text(PASSPHRASE + "\n")
    passphrase.chmod(0o644)
    root_key, root_cert = tmp_path / "root-key.pem", tmp_path / "root.pem"
    init_root = (
        "ca",
        "init-root",
        "--key-out",
        str(root_key),
        "--cert-out",
        str(root_cert),
        "--subject",
        "CN=Lab Root,O=kmsgate tests",
        "--passphrase-file",
        str(passphrase),
    )
    # a passphrase file others can read is a secret file like the gateway's: refused
    exposed = run_cli(init_root, clean_env())
    assert_one_line_error(
        exposed, "passphrase file", "must not be accessible by", f"(chmod 600 {passphrase})"
    )
    assert not root_key.exists() and not root_cert.exists()
    passphrase.chmod(0o600)
    made = run_cli(init_root, clean_env())  # no gateway: neither KMSGATE_ADDR nor a token
    assert made.rc == 0, str(made)
    fingerprint = openssl(
        openssl_bin, "x509", "-noout", "-fingerprint", "-sha256", "-in", root_cert
    )
    assert made.out.strip() == fingerprint.stdout.strip()
    assert stat.S_IMODE(root_key.stat().st_mode) == 0o600
    again = run_cli(
        (
            "ca",
            "init-root",
            "--key-out",
            str(root_key),
            "--cert-out",
            str(tmp_path / "x.pem"),
            "--subject",
            "Again",
            "--passphrase-file",
            str(passphrase),
        ),
        clean_env(),
    )
    assert_one_line_error(again, "exists")

    csr = tmp_path / "lab.csr"
    gw.ok(
        "ca",
        "create",
        "lab",
        "--backend",
        "local",
        "--key-type",
        "ecdsa-p256",
        "--subject",
        "CN=Lab Issuing CA",
        "--csr-out",
        str(csr),
    )
    pending = {row["name"]: row["state"] for row in table(gw.ok("ca", "list"))}
    assert pending["lab"] == "pending"
    lab_cert = tmp_path / "lab.pem"
    sign = (
        "ca",
        "sign-intermediate",
        "--root-key",
        str(root_key),
        "--root-cert",
        str(root_cert),
        "--csr",
        str(csr),
        "--out",
        str(lab_cert),
        "--days",
        "365",
        "--permit-dns",
        "lab",
        "--crl-url",
        "http://pki.lab/root.crl",
    )
    wrong = tmp_path / "wrong"
    wrong.write_text("not the ceremony passphrase\n")
    wrong.chmod(0o600)
    assert_one_line_error(
        run_cli((*sign, "--passphrase-file", str(wrong)), clean_env()), "wrong passphrase"
    )
    assert not lab_cert.exists()
    # --force never writes over the root's files or the other inputs (once: the root's key)
    kept = {path: path.read_bytes() for path in (root_key, root_cert, csr, passphrase)}
    for path in kept:
        over = (*sign[:9], str(path), *sign[10:], "--force")  # --out PATH
        refused = run_cli((*over, "--passphrase-file", str(passphrase)), clean_env())
        assert_one_line_error(refused, f"{path} is an input of this command")
    assert {path: path.read_bytes() for path in kept} == kept
    signed = run_cli((*sign, "--passphrase-file", str(passphrase)), clean_env())
    assert signed.rc == 0, str(signed)
    intermediate = leaf(lab_cert)
    assert intermediate.extensions.get_extension_for_class(x509.NameConstraints).critical
    verified = openssl(openssl_bin, "verify", "-CAfile", root_cert, lab_cert)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    imported = json.loads(
        gw.ok("ca", "import", "lab", "--cert", str(lab_cert), "--chain", str(root_cert)).out
    )
    assert (imported["state"], imported["parent"]) == ("active", "CN=Lab Root,O=kmsgate tests")
    _, cert, chain, _ = issue(gw, tmp_path, "from-lab", "server", "dns:api.lab", ca="lab")
    assert_verifies(openssl_bin, root_cert, chain, cert, "-purpose", "sslserver")
    points = intermediate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [n.value for p in points for n in p.full_name or ()] == ["http://pki.lab/root.crl"]
    _root_crl_revokes_the_intermediate(gw, tmp_path, openssl_bin, passphrase, lab_cert)


def _root_crl_revokes_the_intermediate(
    gw: Gateway, tmp_path: Path, openssl_bin: str, passphrase: Path, lab_cert: Path
) -> None:
    """`ca root-crl`: with the root's CRL and the intermediate's, openssl's -crl_check_all
    accepts the chain; once the root revokes the intermediate, it refuses it."""
    root_cert, lab_crl = tmp_path / "root.pem", tmp_path / "lab.crl"
    deadline = time.monotonic() + CRL_WAIT
    while gw.run("ca", "crl", "lab", "--out", str(lab_crl), token="").rc != 0:
        assert time.monotonic() < deadline, "the lab CA's CRL was never built"
        time.sleep(0.5)
    lab_crl.write_text(openssl(openssl_bin, "crl", "-inform", "DER", "-in", lab_crl).stdout)
    root = ("ca", "root-crl", "--root-cert", str(root_cert), "--root-key",
            str(tmp_path / "root-key.pem"), "--passphrase-file", str(passphrase))  # fmt: skip
    first, second = tmp_path / "root-1.crl", tmp_path / "root-2.crl"
    lifted = run_cli((*root, "--out", str(first)), clean_env())  # neither --first nor --previous
    assert_one_line_error(lifted, "give exactly one of --previous")
    made = run_cli((*root, "--first", "--out", str(first)), clean_env())
    assert made.rc == 0 and "CRL number 1: 0 revoked" in made.err, str(made)
    cert, chain = tmp_path / "from-lab-cert.pem", tmp_path / "from-lab-chain.pem"
    check_all = ("-crl_check_all", "-CRLfile", lab_crl, "-CRLfile")
    assert_verifies(openssl_bin, root_cert, chain, cert, *check_all, first)

    serial = format(leaf(lab_cert).serial_number, "X")
    revoke = ("--revoke", serial, "--reason", "cACompromise", "--previous", str(first))
    made = run_cli((*root, *revoke, "--out", str(second)), clean_env())
    assert made.rc == 0 and "CRL number 2: 1 revoked" in made.err, str(made)
    refused = openssl(openssl_bin, "verify", "-CAfile", root_cert, "-untrusted", chain,
                      *check_all, second, cert)  # fmt: skip
    assert refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr
    again = run_cli((*root, *revoke[:4], "--previous", str(second), "--out", str(first),
                     "--force"), clean_env())  # fmt: skip
    assert_one_line_error(again, "in the previous CRL already")
    onto = run_cli((*root, *revoke[:4], "--previous", str(second), "--out", str(second),
                    "--force"), clean_env())  # fmt: skip
    assert_one_line_error(onto, f"{second} is an input of this command")
    crl = x509.load_pem_x509_crl(second.read_bytes())
    entry = crl.get_revoked_certificate_by_serial_number(int(serial, 16))
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.ca_compromise


@pytest.mark.parametrize("key_type", ["ecdsa-p384", "rsa-3072"])
def test_root_ceremony_with_the_root_key_on_a_pkcs11_token(
    gw: Gateway,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    openssl_bin: str,
    key_type: str,
) -> None:
    """The root key made on a (SoftHSM) token, sensitive and never extractable; the root
    certificate and an intermediate signed through the token verify with openssl, and the
    gateway issues under that intermediate."""
    token = softhsm_session(tmp_path_factory).init_token(f"root-{key_type}")
    query = f"module-path={token.hsm.module}&pin-source=file:{token.pin_file}"
    root_cert = tmp_path / "root.pem"
    root_uri = f"pkcs11:token={token.label};object=lab-root?{query}"
    init = ("ca", "init-root", "--key-type", key_type, "--token", root_uri)
    made = run_cli((*init, "--cert-out", str(root_cert), "--subject", "CN=Token Root"), clean_env())
    assert made.rc == 0, str(made)
    fingerprint = openssl(
        openssl_bin, "x509", "-noout", "-fingerprint", "-sha256", "-in", root_cert
    )
    assert made.out.strip() == fingerprint.stdout.strip()
    self_signed = openssl(openssl_bin, "verify", "-CAfile", root_cert, root_cert)
    assert self_signed.returncode == 0, self_signed.stdout + self_signed.stderr
    private = [o for o in token.list_objects() if o["kind"].startswith("Private Key")]
    assert [o["label"] for o in private] == ["lab-root.v1"]
    access = [a.strip() for a in private[0]["Access"].split(",")]
    assert "sensitive" in access and "never extractable" in access
    reference = made.err.split("root key on the token: ")[1].split()[0]
    assert reference.startswith(f"pkcs11:token={token.label};object=lab-root.v1;id=")

    again = run_cli(
        (*init, "--cert-out", str(tmp_path / "again.pem"), "--subject", "Again"), clean_env()
    )
    assert_one_line_error(again, "already")
    assert len([o for o in token.list_objects() if o["kind"].startswith("Private Key")]) == 1
    assert not (tmp_path / "again.pem").exists()

    name = f"tok{key_type.replace('-', '')}"
    csr = tmp_path / "int.csr"
    gw.ok("ca", "create", name, "--backend", "local", "--key-type", "ecdsa-p256",
          "--subject", f"CN={name}", "--csr-out", str(csr))  # fmt: skip
    intermediate = tmp_path / "int.pem"
    sign = ("ca", "sign-intermediate", "--root-cert", str(root_cert), "--csr", str(csr),
            "--out", str(intermediate))  # fmt: skip
    typed_wrong = run_cli(
        (*sign, "--token", f"{reference}?module-path={token.hsm.module}"),
        clean_env(),
        stdin=b"not-the-pin\n",
    )
    # the prompt (and getpass's note that stdin is no terminal) precede the one error line
    assert typed_wrong.rc == 2, str(typed_wrong)
    assert typed_wrong.err.strip().splitlines()[-1].startswith("error: the token rejected")
    assert "not-the-pin" not in typed_wrong.out + typed_wrong.err
    assert not intermediate.exists()
    typed = run_cli(
        (*sign, "--token", f"{reference}?module-path={token.hsm.module}"),
        clean_env(),
        stdin=f"{token.pin}\n".encode(),
    )
    assert typed.rc == 0, str(typed)
    assert token.pin not in typed.out + typed.err
    verified = openssl(openssl_bin, "verify", "-CAfile", root_cert, intermediate)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    gw.ok("ca", "import", name, "--cert", str(intermediate), "--chain", str(root_cert))
    _, cert, chain, _ = issue(gw, tmp_path, "from-token", "server", "dns:tok.lab", ca=name)
    assert_verifies(openssl_bin, root_cert, chain, cert, "-purpose", "sslserver")


def test_a_token_uri_without_module_or_with_a_pin_is_refused(tmp_path: Path) -> None:
    cert = tmp_path / "root.pem"
    base = ("ca", "init-root", "--cert-out", str(cert), "--subject", "R", "--token")
    no_module = run_cli((*base, "pkcs11:token=t"), clean_env())
    assert_one_line_error(no_module, "module-path")
    with_pin = run_cli(
        (*base, "pkcs11:token=t?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=1234"),
        clean_env(),
    )
    assert_one_line_error(with_pin, "never written in a URI")
    assert "1234" not in with_pin.out + with_pin.err
    both = run_cli((*base, "pkcs11:token=t", "--key-out", str(tmp_path / "k.pem")), clean_env())
    assert_one_line_error(both, "exactly one")
    assert not cert.exists()


def test_an_interrupted_root_ceremony_or_issue_leaves_no_key_without_its_certificate(
    gw: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (SIGTERM alike: the CLI raises the same exit) while the certificate is being
    written: the key written just before is removed, and `cert issue` says which
    certificate to revoke (before, the key stayed, and a rerun of init-root was refused)."""
    from kmsgate.cli import app, ca, certs

    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ca, "write_bytes", interrupted)
    monkeypatch.setattr(certs, "write_files", interrupted)
    passphrase = tmp_path / "passphrase"
    passphrase.write_text(PASSPHRASE + "\n")
    passphrase.chmod(0o600)
    key, cert = tmp_path / "r.pem", tmp_path / "r-cert.pem"
    runner = CliRunner()
    init = ["ca", "init-root", "--key-out", str(key), "--cert-out", str(cert), "--subject", "R"]
    root = runner.invoke(app, [*init, "--passphrase-file", str(passphrase)])
    assert root.exit_code == 130, root.output
    assert not key.exists() and not cert.exists()
    leaf_key, leaf_cert = tmp_path / "w.key", tmp_path / "w.pem"
    env = {"KMSGATE_ADDR": gw.addr, "KMSGATE_TOKEN": gw.root_token}
    issued = runner.invoke(app, ["cert", "issue", "--ca", DEV_CA, "--profile", "server", "--san",
                                 "cut.lab", "--key-out", str(leaf_key), "--out", str(leaf_cert)],
                           env=env)  # fmt: skip
    assert issued.exit_code == 130, issued.output
    assert not leaf_key.exists() and not leaf_cert.exists()
    [listed] = table(gw.ok("cert", "list", "--san", "cut.lab"))
    assert f"kmsgate cert revoke {listed['serial']}" in issued.stderr


def test_init_root_prompts_twice_for_the_passphrase(tmp_path: Path) -> None:
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    args = ("ca", "init-root", "--key-out", str(key), "--cert-out", str(cert), "--subject", "R")
    typed = f"{PASSPHRASE}\n{PASSPHRASE}\n".encode()
    result = run_cli(args, clean_env(), stdin=typed)
    assert result.rc == 0, str(result)
    assert PASSPHRASE not in result.out
    assert load_root(key, PASSPHRASE.encode()).public_key() == leaf(cert).public_key()


def test_init_root_at_its_prompt_exits_130_on_ctrl_c_and_2_at_the_end_of_input(
    tmp_path: Path,
) -> None:
    """Both were "Aborted!", exit 1 (a negative answer, by the exit status table)."""
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    args = ("ca", "init-root", "--key-out", str(key), "--cert-out", str(cert), "--subject", "R")
    ended = run_cli(args, clean_env(), stdin=b"")
    assert ended.rc == 2 and "Aborted" not in ended.err + ended.out, str(ended)
    said = "error: no root key passphrase typed (the input ended): give --passphrase-file FILE"
    assert ended.err.strip().splitlines()[-1] == said, str(ended)
    assert "Warning" not in ended.err, str(ended)  # getpass's, with a path of Python's

    stderr = tmp_path / "stderr"
    with stderr.open("wb") as sink:
        proc = subprocess.Popen(
            [kmsgate_script(), *args], stdin=subprocess.PIPE, stderr=sink, env=clean_env()
        )
    try:
        deadline = time.monotonic() + 30
        while b"Root key passphrase" not in stderr.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(timeout=30) == 130, stderr.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdin is not None
        proc.stdin.close()
    assert "Aborted" not in stderr.read_text() and not key.exists() and not cert.exists()


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_issue_errors_are_one_line_and_leave_no_key_behind(gw: Gateway, tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    base = ("cert", "issue", "--ca", "dev", "--profile", "server")
    assert_one_line_error(gw.run(*base), "--csr")
    assert_one_line_error(gw.run(*base, "--csr", "x", "--key-out", str(key)), "either")
    assert_one_line_error(gw.run(*base, "--key-out", str(key)), "--san")
    assert_one_line_error(gw.run(*base, "--key-out", str(key), "--san", "ip:300.1.1.1"), "IP")
    refused = gw.run(*base, "--key-out", str(key), "--san", "evil.example")
    assert_one_line_error(refused, "invalid_request", "evil.example")
    assert not key.exists()
    same = tmp_path / "both.pem"  # the certificate and the chain cannot share a file
    twice = gw.run(*base, "--key-out", str(key), "--san", "web.lab", "--out", str(same),
                   "--chain-out", str(same))  # fmt: skip
    assert_one_line_error(twice, "given for two outputs")
    assert not key.exists() and not same.exists()
    assert_one_line_error(
        gw.run(
            "cert",
            "issue",
            "--ca",
            "nope",
            "--profile",
            "server",
            "--key-out",
            str(key),
            "--san",
            "web.lab",
        ),
        "not_found",
    )
    assert not key.exists()
    key.write_text("mine")
    assert_one_line_error(gw.run(*base, "--key-out", str(key), "--san", "web.lab"), "exists")
    assert key.read_text() == "mine"
    # a common name over 64 characters: a clear 400, and no Python warning on the server's
    # stderr beside its JSON log
    long_name = "a" * 61 + ".lab"
    csr = tmp_path / "long.csr"
    with pytest.warns(UserWarning, match="length"):  # cryptography warns of what we build
        attribute = x509.NameAttribute(NameOID.COMMON_NAME, long_name, _validate=False)
    subject = x509.Name([attribute])
    request = x509.CertificateSigningRequestBuilder(subject).add_extension(
        x509.SubjectAlternativeName([x509.DNSName(long_name)]), critical=False
    )
    signer = ec.generate_private_key(ec.SECP256R1())
    csr.write_bytes(request.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    assert_one_line_error(gw.run(*base, "--csr", str(csr)), "CN must be 1-64 bytes")
    assert "Warning" not in gw.output.read_text()
    assert_one_line_error(gw.run("ca", "show", "nope"), "not_found")
    assert_one_line_error(gw.run("cert", "expiring", "--within", "soon"), "--within")
    assert_one_line_error(gw.run("ca", "list", token=""), "unauthenticated")


def test_an_output_that_cannot_be_written_is_refused_before_the_gateway_is_asked(
    gw: Gateway, tmp_path: Path
) -> None:
    """An --out, --chain-out or --csr-out whose directory cannot take a file (here: under a
    regular file, ENOTDIR; a read-only file system alike) is refused before anything is
    issued or created."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    key = tmp_path / "w7.key"
    base = ("cert", "issue", "--ca", DEV_CA, "--profile", "server", "--san", "preflight.lab")
    for output in ("--out", "--chain-out"):
        refused = gw.run(*base, "--key-out", str(key), output, str(blocker / "x.pem"))
        assert_one_line_error(refused, f"cannot write {blocker / 'x.pem'}: Not a directory")
        assert not key.exists()
    assert table(gw.ok("cert", "list", "--san", "preflight.lab")) == []  # nothing issued
    csr = blocker / "x.csr"
    refused = gw.run("ca", "create", "preflight", "--subject", "CN=x", "--csr-out", str(csr))
    assert_one_line_error(refused, f"cannot write {csr}: Not a directory")
    assert_one_line_error(gw.run("ca", "show", "preflight"), "not_found")  # not created


def test_an_existing_key_file_is_never_replaced_and_the_error_says_so(
    gw: Gateway, tmp_path: Path
) -> None:
    """Even with --force (which replaces --out and --chain-out): the message does not send
    the user to --force."""
    key, cert = tmp_path / "w7.key", tmp_path / "w7.pem"
    key.write_text("mine")
    base = ("cert", "issue", "--ca", DEV_CA, "--profile", "server", "--san", "preflight.lab")
    for force in ((), ("--force",)):
        refused = gw.run(*base, "--key-out", str(key), "--out", str(cert), *force)
        assert_one_line_error(refused, f"{key} exists: refusing to replace it", "never replaced")
        assert "use --force" not in refused.err
    assert key.read_text() == "mine" and not cert.exists()
    assert table(gw.ok("cert", "list", "--san", "preflight.lab")) == []


def test_a_key_and_a_certificate_given_one_file_are_refused_before_issuing(
    gw: Gateway, tmp_path: Path
) -> None:
    """--key-out and --out (or --chain-out) naming one file, however written: refused
    before the gateway is asked (a certificate was issued, then lost to "exists" or, with
    --force, written over the new key)."""
    base = ("cert", "issue", "--ca", DEV_CA, "--profile", "server", "--san", "shared.lab")
    for other in ("--out", "--chain-out"):
        for force in ((), ("--force",)):
            refused = gw.run(
                *base, "--key-out", "same.pem", other, str(tmp_path / "same.pem"), *force,
                cwd=tmp_path,
            )  # fmt: skip
            assert_one_line_error(refused, "given for two outputs")
    assert list(tmp_path.iterdir()) == []
    assert table(gw.ok("cert", "list", "--san", "shared.lab")) == []


def test_a_write_that_fails_once_issued_names_the_serial_and_writes_nothing(
    gw: Gateway, tmp_path: Path
) -> None:
    """/dev/full passes every check and fails the write (ENOSPC), as a full disk does once
    the gateway has issued: the error names the serial, the new key is removed (nothing
    certifies it any more), the other outputs are not written, and a created CA is named."""
    key, cert, chain = tmp_path / "k.pem", tmp_path / "c.pem", tmp_path / "chain.pem"
    base = ("cert", "issue", "--ca", DEV_CA, "--profile", "server", "--san", "full.lab")
    refused = gw.run(*base, "--key-out", str(key), "--out", "/dev/full", "--chain-out", str(chain))
    assert_one_line_error(refused, "cannot write /dev/full: No space left on device", "revoke")
    serial = refused.err.split("certificate ")[1].split()[0]
    assert f"kmsgate cert revoke {serial}" in refused.err
    assert json.loads(gw.ok("cert", "show", serial).out)["status"] == "valid"  # issued indeed
    assert sorted(tmp_path.iterdir()) == []  # no key, no chain, no temporary file

    csr = tmp_path / "req.csr"
    private = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("full.lab")]), critical=False)
        .sign(private, hashes.SHA256())
    )
    csr.write_bytes(request.public_bytes(serialization.Encoding.PEM))
    refused = gw.run(*base[:-2], "--csr", str(csr), "--out", str(cert), "--chain-out", "/dev/full")
    assert_one_line_error(refused, "No space left on device", "kmsgate cert show")
    assert sorted(tmp_path.iterdir()) == [csr]  # the certificate is not written without its chain

    refused = gw.run("ca", "create", "full-ca", "--subject", "CN=x", "--csr-out", "/dev/full")
    assert_one_line_error(refused, "No space left on device", "CA full-ca was created, pending")


def test_a_certificate_that_cannot_be_printed_names_the_serial_and_leaves_no_key(
    gw: Gateway, tmp_path: Path
) -> None:
    """With stdout on /dev/full (no --out), as with --out /dev/full: the error names the
    serial to revoke, the new key is removed, --chain-out is not written (the certificate
    was lost without a word and the key stayed)."""
    key, chain = tmp_path / "k.key", tmp_path / "chain.pem"
    base = ("cert", "issue", "--ca", DEV_CA, "--profile", "server", "--san", "full.lab")
    refused = run_into_full(gw, *base, "--key-out", str(key), "--chain-out", str(chain))
    assert_one_line_error(refused, "cannot write stdout: No space left on device", "revoke")
    serial = refused.err.split("certificate ")[1].split()[0]
    assert f"kmsgate cert revoke {serial}" in refused.err
    assert json.loads(gw.ok("cert", "show", serial).out)["status"] == "valid"
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("web.lab", x509.DNSName("web.lab")),
        ("dns:web.lab", x509.DNSName("web.lab")),
        ("127.0.0.1", x509.IPAddress(ip_address("127.0.0.1"))),
        ("ip:::1", x509.IPAddress(ip_address("::1"))),
        ("::1", x509.IPAddress(ip_address("::1"))),
        ("spiffe://dev.lab/x", x509.UniformResourceIdentifier("spiffe://dev.lab/x")),
        ("uri:spiffe://dev.lab/x", x509.UniformResourceIdentifier("spiffe://dev.lab/x")),
        ("URI:https://a.lab/", x509.UniformResourceIdentifier("https://a.lab/")),
    ],
)
def test_san_values_and_their_guessed_types(value: str, name: x509.GeneralName) -> None:
    assert parse_san(value) == name


# --------------------------------------------------------------------------------------------
# the dev CA set-up, in-process
# --------------------------------------------------------------------------------------------


def test_dev_ca_setup_is_idempotent_and_finishes_an_interrupted_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = load_settings(dev=True, data_dir=data)
    prepare_dev_data_dir(settings)
    # an earlier start stopped after writing the root key but before its certificate
    (data / DEV_ROOT_KEY_FILE).write_text("stale")
    (data / DEV_ROOT_PASSPHRASE_FILE).write_text("stale")
    service = build_service(settings)
    try:
        assert ensure_dev_ca(service, data) is True
        root = (data / DEV_ROOT_CERT_FILE).read_bytes()
        assert ensure_dev_ca(service, data) is False
    finally:
        service.close()
    service = build_service(settings)  # a restart
    try:
        assert ensure_dev_ca(service, data) is False
        ca = service.pki.authorities.get(DEV_CA)
        assert ca.state is CaState.ACTIVE
        assert ca.chain[-1] == x509.load_pem_x509_certificate(root)
        assert (data / DEV_ROOT_CERT_FILE).read_bytes() == root
    finally:
        service.close()


def test_a_pending_dev_ca_is_activated_on_the_next_start(tmp_path: Path) -> None:
    from kmsgate.auth import SYSTEM
    from kmsgate.policy import Decision
    from kmsgate.service import Ctx
    from kmsgate.service.requests import NewCa

    data = tmp_path / "data"
    settings = load_settings(dev=True, data_dir=data)
    prepare_dev_data_dir(settings)
    service = build_service(settings)
    try:
        new = NewCa(DEV_CA, "CN=half made", "ecdsa-p256", "local")
        decision = Decision(allow=True, reasons=("test: a start stopped half-way",))
        service.pki.create_ca(SYSTEM, Ctx("test"), new, decision=decision)
        assert ensure_dev_ca(service, data) is True
        ca = service.pki.authorities.get(DEV_CA)
        assert ca.state is CaState.ACTIVE and ca.subject == "CN=half made"
    finally:
        service.close()
