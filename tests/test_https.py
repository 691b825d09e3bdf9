"""HTTPS serving (kmsgate.servertls), against real clients: curl and openssl for the
handshake, Python ssl for the certificate a connection gets; the certificate renewed by the
gateway itself while it serves."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import ssl
import subprocess
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kmsgate import servertls
from kmsgate.audit import AuditFile
from kmsgate.config import load_settings
from kmsgate.errors import ConfigError
from kmsgate.pki.csr import new_key_and_csr
from tests.components import LOOPBACK, free_port
from tests.helpers import issued_by, self_signed
from tests.test_cli import Gateway, Run, assert_one_line_error, clean_env, run_cli, running_gateway

TIMEOUT = 10.0


def _port(gw: Gateway) -> int:
    return int(gw.addr.rsplit(":", 1)[1])


def _served_certificate(gw: Gateway, server_name: str = "localhost") -> x509.Certificate:
    """The certificate a new connection to the gateway gets, verified against the dev root."""
    context = ssl.create_default_context(cafile=str(gw.data_dir / "dev-root.pem"))
    with (
        socket.create_connection((LOOPBACK, _port(gw)), TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def _curl(gw: Gateway, host: str) -> subprocess.CompletedProcess[str]:
    url = f"https://{host}:{_port(gw)}/v1/sys/health"
    root = str(gw.data_dir / "dev-root.pem")
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--fail",
            "--cacert",
            root,
            "--resolve",
            f"localhost:{_port(gw)}:{LOOPBACK}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _client_identity(
    directory: Path, issued_pem: str, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_file, key_file = directory / "client.pem", directory / "client.key"
    cert_file.write_text(issued_pem)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key, cert = self_signed("stranger")
    return _client_identity(directory, cert.public_bytes(serialization.Encoding.PEM).decode(), key)


def _health_reply(gw: Gateway, identity: tuple[Path, Path] | None) -> bytes:
    """The raw reply to a health check over a new TLS connection presenting `identity`; b""
    when the server refuses the connection (in TLS 1.3 a client learns of it only after
    its handshake, when the server sends an alert or closes)."""
    context = ssl.create_default_context(cafile=str(gw.data_dir / "dev-root.pem"))
    if identity is not None:
        context.load_cert_chain(*identity)
    with (
        socket.create_connection((LOOPBACK, _port(gw)), TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        reply = b""
        try:
            tls.sendall(b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while chunk := tls.recv(4096):
                reply += chunk
        except (ssl.SSLError, ConnectionResetError):
            return b""
    return reply


def _refusal_alert(gw: Gateway, identity: tuple[Path, Path], version: ssl.TLSVersion) -> str:
    """The reason of the TLS alert a client presenting `identity` over `version` gets."""
    context = ssl.create_default_context(cafile=str(gw.data_dir / "dev-root.pem"))
    context.minimum_version = context.maximum_version = version
    context.load_cert_chain(*identity)
    with socket.create_connection((LOOPBACK, _port(gw)), TIMEOUT) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n\r\n")
                tls.recv(4096)
        except ssl.SSLError as exc:
            return str(exc.reason)
    return "no alert"


def test_dev_tls_serves_https_from_the_dev_ca_with_tls_1_2_at_least(tmp_path: Path) -> None:
    with running_gateway(tmp_path, "--tls", https=True) as gw:
        for host in ("localhost", LOOPBACK):
            done = _curl(gw, host)
            assert done.returncode == 0 and json.loads(done.stdout) == {"status": "ok"}, done.stderr
        served = _served_certificate(gw)
        sans = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
        assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == [LOOPBACK]
        # TLS 1.1 is refused by the server (the client allows it: security level 0)
        old = subprocess.run(
            ["openssl", "s_client", "-connect", f"{LOOPBACK}:{_port(gw)}", "-tls1_1",
             "-cipher", "DEFAULT@SECLEVEL=0"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert "New, (NONE), Cipher is (NONE)" in old.stdout, old.stdout
        current = subprocess.run(
            ["openssl", "s_client", "-connect", f"{LOOPBACK}:{_port(gw)}", "-tls1_2"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert "New, TLSv1.2, Cipher is" in current.stdout, current.stdout
        # plain HTTP is not served on the HTTPS port: closed at once (nothing to tell it)
        started = time.monotonic()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{LOOPBACK}:{_port(gw)}/v1/sys/health", timeout=TIMEOUT)
        assert time.monotonic() - started < TIMEOUT / 2
        # client certificates are optional and checked: none, one from the dev CA, a stranger's
        key, csr = new_key_and_csr(["client.lab"])
        issued = httpx.post(
            f"{gw.addr}/v1/pki/cas/dev/issue",
            json={
                "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
                "profile": "client",
            },
            headers={"authorization": f"Bearer {gw.root_token}"},
            verify=ssl.create_default_context(cafile=str(gw.data_dir / "dev-root.pem")),
            timeout=TIMEOUT,
        )
        assert issued.status_code == 200, issued.text
        assert _health_reply(gw, None).startswith(b"HTTP/1.1 200 ")
        member = _client_identity(tmp_path, issued.json()["certificate"], key)
        assert _health_reply(gw, member).startswith(b"HTTP/1.1 200 ")
        stranger = _self_signed(tmp_path)
        assert _health_reply(gw, stranger) == b""
        # ... and told why, by the TLS alert OpenSSL wrote, in TLS 1.2 and 1.3 alike
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            assert _refusal_alert(gw, stranger, version) == "TLSV1_ALERT_UNKNOWN_CA"
        # the refusal is logged (the event loop's TLS layer says nothing of it)
        deadline = time.monotonic() + 5
        while "client certificate not trusted" not in (log := gw.output.read_text()):
            assert time.monotonic() < deadline, log
            time.sleep(0.1)
        assert "TLS handshake refused: client certificate not trusted: self-signed" in log, log
    # the gateway's certificate was issued like any other: audited, by the gateway itself
    records = AuditFile(gw.data_dir / "audit.log").search(action="cert.issue").records
    own = [r for r in records if r.get("principal") == "system"]
    assert own and own[0]["outcome"] in ("started", "ok")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_tls_handshake_not_finished_in_time_is_disconnected(tmp_path: Path, workers: str) -> None:
    """A client that opens a connection to the HTTPS port and does not finish its handshake
    is disconnected after `limits.body_read_seconds`, as one that never sends its request
    head (asyncio's own limit, 60 s, let a client hold a connection that long)."""
    config = tmp_path / "impatient.yaml"
    config.write_text("limits:\n  body_read_seconds: 1\n")
    args = ("--tls", "--config", str(config), "--workers", workers)
    with running_gateway(tmp_path, *args, https=True) as gw:
        # nothing at all; the first bytes of a ClientHello and no more
        for sends in (b"", b"\x16\x03\x01\x02\x00\x01\x00"):
            with socket.create_connection((LOOPBACK, _port(gw)), TIMEOUT) as raw:
                raw.sendall(sends)
                started = time.monotonic()
                with contextlib.suppress(ConnectionResetError):  # aborted: a reset
                    assert raw.recv(4096) == b""  # raises TimeoutError if still open
                waited = time.monotonic() - started
            assert 0.5 < waited < 5, waited
        # a client that does finish its handshake is served as before
        done = _curl(gw, "localhost")
        assert done.returncode == 0, done.stderr


def test_refused_handshakes_are_all_told_by_reason_at_most_a_line_a_second(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A burst is one line, then the refusals it could not show, counted by reason, on the
    next line, or on a line of their own once the second is over (the last refusals of a
    burst were never told, and a line named only the newest reason)."""
    monkeypatch.setattr(servertls, "REFUSAL_LOG_SECONDS", 0.3)
    refusals = servertls._Refusals(logging.WARNING)
    with caplog.at_level(logging.WARNING, logger="kmsgate"):
        refusals.note("certificate has expired")
        for reason in ("unknown ca", "certificate has expired", "unknown ca"):
            refusals.note(reason)
        deadline = time.monotonic() + 5
        while len(caplog.records) < 2:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
        time.sleep(0.4)
        refusals.note("unknown ca")
    assert [r.getMessage() for r in caplog.records] == [
        "TLS handshake refused: certificate has expired",
        "TLS handshake refused: 2 x unknown ca, 1 x certificate has expired",
        "TLS handshake refused: unknown ca",
    ]


def test_the_gateway_renews_its_certificate_while_serving(tmp_path: Path) -> None:
    config = tmp_path / "tls.yaml"
    config.write_text("tls:\n  ca: dev\n  ttl: 9s\n")
    with running_gateway(tmp_path, "--config", str(config), "--workers", "2", https=True) as gw:
        first = _served_certificate(gw)
        lifetime = first.not_valid_after_utc - first.not_valid_before_utc
        assert lifetime <= timedelta(seconds=9) + timedelta(minutes=1)
        assert _curl(gw, "localhost").returncode == 0
        deadline = time.monotonic() + 30
        serials = {first.serial_number}
        while time.monotonic() < deadline and len(serials) < 3:
            time.sleep(0.5)
            # every connection gets a current certificate, from either worker
            for _ in range(4):
                served = _served_certificate(gw)
                assert served.not_valid_after_utc > datetime.now(UTC)
                serials.add(served.serial_number)
        assert len(serials) >= 3, "the certificate was not renewed twice within 30 s"
        done = _curl(gw, "localhost")
        assert done.returncode == 0, done.stderr


def test_a_change_to_the_tls_settings_gets_a_new_certificate_at_the_next_start(
    tmp_path: Path,
) -> None:
    """A certificate issued for other names (or CA, profile, ttl) is replaced when the
    gateway starts, not kept until its renewal is due."""
    with running_gateway(tmp_path, "--tls", https=True) as gw:
        first = _served_certificate(gw)
        data_dir = gw.data_dir
    config = tmp_path / "tls.yaml"
    config.write_text("tls:\n  ca: dev\n  sans: [localhost, 127.0.0.1, kms.lab]\n")
    args = ("--config", str(config))
    for run in ("changed", "unchanged"):
        (tmp_path / run).mkdir()
        with running_gateway(tmp_path / run, *args, https=True, data_dir=data_dir) as gw:
            served = _served_certificate(gw, "kms.lab")  # verified for that name
            if run == "changed":
                assert served.serial_number != first.serial_number
                renewed = served.serial_number
            else:  # the same settings again: the certificate is kept
                assert served.serial_number == renewed


def test_a_renewal_cut_short_between_the_key_and_the_certificate_mends_itself(
    tmp_path: Path,
) -> None:
    """The gateway died after writing its new key and before its new certificate: the
    next start finds the pair does not match and issues a new one, instead of failing."""
    with running_gateway(tmp_path, "--tls", https=True) as gw:
        first = _served_certificate(gw)
        data_dir = gw.data_dir
    key_file = next(data_dir.rglob("server.key"))
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_file.write_bytes(other)  # the new key, the old certificate
    (tmp_path / "again").mkdir()
    with running_gateway(tmp_path / "again", "--tls", https=True, data_dir=data_dir) as gw:
        served = _served_certificate(gw)
    assert served.serial_number != first.serial_number


@pytest.mark.parametrize(
    ("tls", "problem"),
    [
        ({}, "either cert_file and key_file, or ca"),
        ({"ca": "dev", "cert_file": "c.pem", "key_file": "k.pem"}, "either cert_file"),
        ({"cert_file": "c.pem"}, "go together"),
        ({"ca": "dev", "client_auth": "required"}, "needs tls.client_cas"),
        ({"ca": "dev", "client_auth": "sometimes"}, "client_auth"),
        ({"ca": "dev", "ttl": "soon"}, "ttl"),
        ({"trusted_proxies": ["10.0.0.0/33"], "client_cas": ["dev"]}, "not an IP address"),
        ({"trusted_proxies": ["envoy.local"], "client_cas": ["dev"]}, "not an IP address"),
        ({"trusted_proxies": ["127.0.0.1"]}, "trusted_proxies needs tls.client_cas"),
        (
            {"trusted_proxies": ["127.0.0.1"], "client_cas": ["dev"], "client_auth": "optional"},
            "client_auth needs a certificate",
        ),
    ],
)
def test_tls_settings_name_what_is_wrong(tmp_path: Path, tls: dict[str, str], problem: str) -> None:
    config = tmp_path / "kmsgate.yaml"
    config.write_text(json.dumps({"tls": tls}))
    with pytest.raises(ConfigError, match=problem):
        load_settings(config)


def _serve_refused(tmp_path: Path, tls: dict[str, object]) -> Run:
    """`kmsgate serve --dev` with these `tls` settings, which must stop it: exit 2, no
    traceback."""
    config = tmp_path / "kmsgate.yaml"
    config.write_text(json.dumps({"tls": tls}))
    refused = run_cli(
        ("serve", "--dev", "--data-dir", str(tmp_path / "d"), "--config", str(config),
         "--port", str(free_port())),
        clean_env(),
    )  # fmt: skip
    assert refused.rc == 2 and "Traceback" not in refused.err, str(refused)
    return refused


def test_tls_outside_dev_needs_settings_and_a_bad_pair_is_one_error_line(tmp_path: Path) -> None:
    refused = run_cli(("serve", "--tls", "--data-dir", str(tmp_path)), clean_env())
    assert_one_line_error(refused, "--tls needs `tls` settings", rc=2)
    cert, _ = _self_signed(tmp_path)
    other_key = tmp_path / "other.key"
    other_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pair = {"cert_file": str(cert), "key_file": str(other_key)}
    exposed = _serve_refused(tmp_path, pair)  # the umask's 0644: anyone could read the key
    assert_one_line_error(exposed, f"TLS key file {other_key} must not be accessible", rc=2)
    other_key.chmod(0o600)
    mismatched = _serve_refused(tmp_path, pair)
    assert "error: cannot load the TLS certificate" in mismatched.err, str(mismatched)


@pytest.mark.parametrize(
    ("tls", "problem"),
    [
        ({"ca": "nosuchca"}, "no CA named 'nosuchca'"),
        ({"ca": "dev", "profile": "nope"}, "no certificate profile named 'nope'"),
        ({"ca": "dev", "sans": ["evil.example.com"]}, "evil.example.com"),
        ({"ca": "dev", "ttl": "30d"}, "exceeds the maximum"),
    ],
)
def test_a_gateway_certificate_its_ca_cannot_issue_is_one_error_line(
    tmp_path: Path, tls: dict[str, object], problem: str
) -> None:
    refused = _serve_refused(tmp_path, tls)
    assert_one_line_error(refused, "cannot issue the gateway's certificate", problem, rc=2)


def test_the_cli_talks_to_an_https_gateway_trusting_cacert(tmp_path: Path) -> None:
    with running_gateway(tmp_path, "--tls", https=True) as gw:
        root = str(gw.data_dir / "dev-root.pem")
        untrusted = run_cli(("keys", "list"), gw.env())
        assert_one_line_error(untrusted, "CERTIFICATE_VERIFY_FAILED")
        for args, env in (
            (("--cacert", root, "keys", "list"), gw.env()),
            (("keys", "list"), gw.env(KMSGATE_CACERT=root)),
        ):
            done = run_cli(args, env)
            assert done.rc == 0 and "ca.dev" in done.out, str(done)
        missing = run_cli(("--cacert", str(tmp_path / "nope.pem"), "keys", "list"), gw.env())
        assert_one_line_error(missing, "--cacert", "No such file")


MTLS_POLICY = """package kmsgate.authz

import rego.v1

default allow := false

allow if "admin" in input.principal.roles

# a workload may sign with its own key, and only that
allow if {
    input.principal.kind == "mtls"
    input.principal.id == "spiffe://dev.lab/ns/ml/sa/signer"
    input.principal.claims.profile == "workload"
    input.action == "sign"
    input.resource.name == "signer-key"
}
"""


def _workload_identity(
    gw: Gateway,
    directory: Path,
    spiffe_id: str,
    ttl: str | None = None,
    *,
    ca: str = "dev",
    chain: str = "",
) -> tuple[tuple[Path, Path], str]:
    """A workload certificate for `spiffe_id` from CA `ca` (key made here; for `ttl` if
    given), written to `directory` followed by `chain`; and its serial."""
    key, csr = new_key_and_csr([spiffe_id])
    pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    issued = httpx.post(
        f"{gw.addr}/v1/pki/cas/{ca}/issue",
        json={"csr": pem, "profile": "workload", **({"ttl": ttl} if ttl else {})},
        headers={"authorization": f"Bearer {gw.root_token}"},
        verify=ssl.create_default_context(cafile=str(gw.data_dir / "dev-root.pem")),
        timeout=TIMEOUT,
    )
    assert issued.status_code == 200, issued.text
    directory.mkdir()
    certificate = issued.json()["certificate"] + chain
    return _client_identity(directory, certificate, key), issued.json()["serial"]


def _sign_as(gw: Gateway, identity: tuple[Path, Path]) -> httpx.Response:
    context = ssl.create_default_context(cafile=str(gw.data_dir / "dev-root.pem"))
    context.load_cert_chain(*identity)
    return httpx.post(
        f"{gw.addr}/v1/keys/signer-key/sign",
        json={"input": "aGVsbG8="},
        verify=context,
        timeout=TIMEOUT,
    )


def test_a_client_certificate_is_the_principal_until_it_is_revoked(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "authz.rego").write_text(MTLS_POLICY)
    with running_gateway(tmp_path, "--tls", https=True, KMSGATE_POLICY_DIR=str(policies)) as gw:
        root = {"authorization": f"Bearer {gw.root_token}"}
        trust = ssl.create_default_context(cafile=str(gw.data_dir / "dev-root.pem"))
        created = httpx.post(
            f"{gw.addr}/v1/keys",
            json={"name": "signer-key", "type": "ecdsa-p256", "purpose": "model-sign"},
            headers=root,
            verify=trust,
        )
        assert created.status_code == 201, created.text
        signer, serial = _workload_identity(
            gw, tmp_path / "signer", "spiffe://dev.lab/ns/ml/sa/signer"
        )
        other, _ = _workload_identity(gw, tmp_path / "other", "spiffe://dev.lab/ns/ml/sa/other")

        signed = _sign_as(gw, signer)
        assert signed.status_code == 200, signed.text
        assert _sign_as(gw, other).status_code == 403
        no_certificate = httpx.post(
            f"{gw.addr}/v1/keys/signer-key/sign", json={"input": "aGVsbG8="}, verify=trust
        )
        assert no_certificate.status_code == 401

        revoked = httpx.post(
            f"{gw.addr}/v1/pki/certs/{serial}/revoke",
            json={"reason": "keyCompromise"},
            headers=root,
            verify=trust,
        )
        assert revoked.status_code == 200, revoked.text
        deadline = time.monotonic() + 5  # every process follows the inventory within ~1 s
        while (status := _sign_as(gw, signer).status_code) == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status == 401
    records = AuditFile(gw.data_dir / "audit.log").search(key="signer-key", action="sign").records
    by_outcome = {
        (r["principal_kind"], r["principal"], r["outcome"]) for r in records if "principal" in r
    }
    assert ("mtls", "spiffe://dev.lab/ns/ml/sa/signer", "ok") in by_outcome
    assert ("mtls", "spiffe://dev.lab/ns/ml/sa/other", "policy_denied") in by_outcome
    refusals = AuditFile(gw.data_dir / "audit.log").search(action="authn").records
    revoked = [r for r in refusals if r["resource"] == {"kind": "mtls", "name": serial}]
    assert revoked and revoked[0]["detail"]["reason"] == "the client certificate is revoked"


def _renew(
    gw: Gateway, identity: tuple[Path, Path] | None, sans: list[str], ttl: str | None = None
) -> httpx.Response:
    context = ssl.create_default_context(cafile=str(gw.data_dir / "dev-root.pem"))
    headers = {}
    if identity is not None:
        context.load_cert_chain(*identity)
    else:
        headers = {"authorization": f"Bearer {gw.root_token}"}
    _, csr = new_key_and_csr(sans)
    return httpx.post(
        f"{gw.addr}/v1/pki/renew",
        json={
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            **({"ttl": ttl} if ttl else {}),
        },
        headers=headers,
        verify=context,
        timeout=TIMEOUT,
    )


def test_a_workload_renews_its_certificate_over_mtls_keeping_its_names(tmp_path: Path) -> None:
    spiffe_id = "spiffe://dev.lab/ns/ml/sa/renewer"
    with running_gateway(tmp_path, "--tls", https=True) as gw:
        current, serial = _workload_identity(gw, tmp_path / "current", spiffe_id, ttl="10m")
        renewed = _renew(gw, current, [spiffe_id])
        assert renewed.status_code == 200, renewed.text
        new = x509.load_pem_x509_certificate(renewed.json()["certificate"].encode())
        # a renewal lasts as long as the certificate it renews, also when it asks for more
        # (kmsgate backdates not_before by a minute)
        longer = _renew(gw, current, [spiffe_id], ttl="24h")
        for reply in (renewed, longer):
            cert = x509.load_pem_x509_certificate(reply.json()["certificate"].encode())
            assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(minutes=11)
        assert renewed.json()["serial"] != serial
        sans = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id]
        record = httpx.get(
            f"{gw.addr}/v1/pki/certs/{renewed.json()['serial']}",
            headers={"authorization": f"Bearer {gw.root_token}"},
            verify=ssl.create_default_context(cafile=str(gw.data_dir / "dev-root.pem")),
        ).json()
        assert (record["profile"], record["ca"], record["owner"]) == ("workload", "dev", spiffe_id)

        other_names = _renew(gw, current, ["spiffe://dev.lab/ns/ml/sa/admin"])
        assert (
            other_names.status_code == 400 and "keeps the certificate's names" in other_names.text
        )
        assert _renew(gw, None, [spiffe_id]).status_code == 401  # a token does not renew

        revoked = httpx.post(
            f"{gw.addr}/v1/pki/certs/{serial}/revoke",
            json={"reason": "superseded"},
            headers={"authorization": f"Bearer {gw.root_token}"},
            verify=ssl.create_default_context(cafile=str(gw.data_dir / "dev-root.pem")),
        )
        assert revoked.status_code == 200, revoked.text
        deadline = time.monotonic() + 5
        while (status := _renew(gw, current, [spiffe_id]).status_code) == 200:
            assert time.monotonic() < deadline, "a revoked certificate still renews"
            time.sleep(0.2)
        assert status == 401
    renewals = AuditFile(gw.data_dir / "audit.log").search(action="cert.renew").records
    assert {(r["principal"], r["outcome"]) for r in renewals} >= {(spiffe_id, "ok")}
    # each renewal names the certificate it renews: the trail leads from one to its heirs
    lineage = {
        r["detail"]["serial"]: r["detail"]["renews"] for r in renewals if r["outcome"] == "ok"
    }
    assert lineage[renewed.json()["serial"]] == serial
    # `serial` is only ever the certificate issued: a started record has none yet
    started = [r["detail"] for r in renewals if r["outcome"] == "started"]
    assert started and all("serial" not in d and d["renews"] for d in started), started


def test_the_spiffe_trust_bundle_verifies_a_workload_certificate(tmp_path: Path) -> None:
    with running_gateway(tmp_path, "--tls", https=True) as gw:
        trust = ssl.create_default_context(cafile=str(gw.data_dir / "dev-root.pem"))
        (cert_file, _), _ = _workload_identity(gw, tmp_path / "svid", "spiffe://dev.lab/ns/a/sa/b")
        bundle = httpx.get(f"{gw.addr}/v1/pki/cas/dev/bundle", verify=trust)  # no token
        pem = httpx.get(
            f"{gw.addr}/v1/pki/cas/dev/bundle",
            headers={"accept": "application/x-pem-file"},
            verify=trust,
        )
        chain = httpx.get(f"{gw.addr}/v1/pki/cas/dev/chain", verify=trust)
        missing = httpx.get(f"{gw.addr}/v1/pki/cas/nope/bundle", verify=trust)
    assert bundle.status_code == 200 and missing.status_code == 404
    assert pem.status_code == 200 and pem.text == chain.text
    body = bundle.json()
    assert isinstance(body["spiffe_sequence"], int) and body["spiffe_sequence"] > 0
    certs = []
    for key in body["keys"]:
        assert key["use"] == "x509-svid" and len(key["x5c"]) == 1
        cert = x509.load_der_x509_certificate(base64.b64decode(key["x5c"][0]))
        numbers = cert.public_key().public_numbers()
        assert isinstance(numbers, ec.EllipticCurvePublicNumbers)
        size = (cert.public_key().key_size + 7) // 8
        assert base64.urlsafe_b64decode(key["x"] + "==") == numbers.x.to_bytes(size, "big")
        certs.append(cert)
    assert [c.public_bytes(serialization.Encoding.PEM).decode() for c in certs] == [
        c.public_bytes(serialization.Encoding.PEM).decode()
        for c in x509.load_pem_x509_certificates(chain.content)
    ]
    # a relying party that knows only the bundle verifies the workload's certificate
    anchors, intermediates = tmp_path / "anchors.pem", tmp_path / "intermediates.pem"
    anchors.write_bytes(certs[-1].public_bytes(serialization.Encoding.PEM))
    intermediates.write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs[:-1])
    )
    command = ["openssl", "verify", "-CAfile", str(anchors), "-untrusted", str(intermediates)]
    verified = subprocess.run(
        [*command, str(cert_file)], capture_output=True, text=True, timeout=30
    )
    assert verified.returncode == 0 and verified.stdout.strip().endswith(": OK"), verified


def test_another_trusted_cas_certificate_with_a_kmsgate_serial_is_not_taken_for_it(
    tmp_path: Path,
) -> None:
    outsider_key, outsider_ca = self_signed("another trusted CA", ca=True)
    bundle = tmp_path / "other-ca.pem"
    bundle.write_bytes(outsider_ca.public_bytes(serialization.Encoding.PEM))
    config = tmp_path / "tls.yaml"
    tls = {"ca": "dev", "client_auth": "optional", "client_cas": ["dev", str(bundle)]}
    config.write_text(json.dumps({"tls": tls}))
    victim_id = "spiffe://dev.lab/ns/ml/sa/victim"
    with running_gateway(tmp_path, "--config", str(config), https=True) as gw:
        _, serial = _workload_identity(gw, tmp_path / "victim", victim_id)
        # the other CA mints a certificate with the victim's serial, for another identity
        mallory_id = x509.UniformResourceIdentifier("spiffe://dev.lab/ns/ml/sa/mallory")
        key, lookalike = issued_by(outsider_ca, outsider_key, mallory_id, serial=int(serial, 16))
        (tmp_path / "mallory").mkdir()
        mallory = _client_identity(
            tmp_path / "mallory", lookalike.public_bytes(serialization.Encoding.PEM).decode(), key
        )
        assert _health_reply(gw, mallory).startswith(b"HTTP/1.1 200 ")  # the CA is trusted
        stolen = _renew(gw, mallory, [victim_id])
        assert stolen.status_code == 400, stolen.text
        assert "not issued by this gateway" in stolen.text
    records = AuditFile(gw.data_dir / "audit.log").search(action="cert.renew").records
    assert all(r.get("outcome") != "ok" for r in records)


def test_a_sibling_cas_certificate_under_the_same_root_is_not_trusted(tmp_path: Path) -> None:
    """`client_cas: [dev]` trusts what the dev CA issued, not what another CA signed by the
    same root issued: the root signed both, and was a trust anchor (a certificate from any
    CA under it authenticated, directly and forwarded by a trusted proxy)."""
    config = tmp_path / "tls.yaml"
    tls = {
        "ca": "dev",
        "client_auth": "optional",
        "client_cas": ["dev"],
        "trusted_proxies": [LOOPBACK],
    }
    config.write_text(json.dumps({"tls": tls}))
    with running_gateway(tmp_path, "--config", str(config), https=True) as gw:
        work, data = tmp_path / "sib", gw.data_dir
        work.mkdir()
        trusting = {"KMSGATE_CACERT": str(data / "dev-root.pem")}
        gw.ok(
            "ca",
            "create",
            "sib",
            "--subject",
            "sib",
            "--csr-out",
            str(work / "sib.csr"),
            **trusting,
        )
        gw.ok(
            "ca", "sign-intermediate", "--root-cert", str(data / "dev-root.pem"),
            "--root-key", str(data / "dev-root-key.pem"),
            "--passphrase-file", str(data / "dev-root-key.passphrase"),
            "--csr", str(work / "sib.csr"), "--out", str(work / "sib.pem"),
        )  # fmt: skip
        chain = str(data / "dev-root.pem")
        gw.ok("ca", "import", "sib", "--cert", str(work / "sib.pem"), "--chain", chain, **trusting)
        sibling = (work / "sib.pem").read_text()
        spiffe_id = "spiffe://dev.lab/ns/ml/sa/server"
        identity, _ = _workload_identity(gw, work / "id", spiffe_id, ca="sib", chain=sibling)
        leaf = identity[0].read_text().removesuffix(sibling)
        assert _health_reply(gw, identity) == b""  # refused in the handshake
        own, _ = _workload_identity(gw, work / "own", "spiffe://dev.lab/ns/ml/sa/own")
        assert _health_reply(gw, own).startswith(b"HTTP/1.1 200 ")  # the dev CA's: trusted
        header = (
            f'Cert="{urllib.parse.quote(leaf, safe="")}";'
            f'Chain="{urllib.parse.quote(leaf + sibling, safe="")}"'
        )
        forwarded = httpx.get(
            f"{gw.addr}/v1/sys/whoami",
            headers={"x-forwarded-client-cert": header},
            verify=ssl.create_default_context(cafile=str(data / "dev-root.pem")),
            timeout=TIMEOUT,
        )
        assert forwarded.status_code == 401, forwarded.text
