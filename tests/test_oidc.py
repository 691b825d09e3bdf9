"""OIDC authentication (kmsgate.auth.oidc) against a real gateway: JWTs made here by a test
issuer (its keys and JWKS file), every refusal a 401, a GitHub Actions-style token mapped by
Rego to what it may sign, and the audit naming issuer and subject."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import logging
import shutil
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kmsgate.audit import AuditFile
from kmsgate.auth import Credentials, oidc
from kmsgate.config import OidcIssuer, load_settings
from kmsgate.errors import ConfigError, Unauthenticated
from kmsgate.pki.csr import new_key_and_csr
from tests.test_cli import Gateway, assert_one_line_error, run_cli, running_gateway

ISSUER = "https://token.actions.githubusercontent.com"
AUDIENCE = "kmsgate"
SUBJECT = "repo:acme/models:ref:refs/heads/main"
REPOSITORY = Path(__file__).resolve().parent.parent
K8S_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_ACCOUNT = "system:serviceaccount:ml:model-server"


class Issuer:
    """An OIDC issuer made here: an RSA and an EC signing key, published in a JWKS file."""

    def __init__(self, directory: Path) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.jwks = directory / "jwks.json"
        keys = [
            {
                **json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key())),
                "kid": "rsa-1",
            },
            {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key())), "kid": "ec-1"},
        ]
        self.jwks.write_text(json.dumps({"keys": keys}))

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": SUBJECT,
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "repository": "acme/models",
            "ref": "refs/heads/main",
        }
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, algorithm: str = "RS256", kid: str = "rsa-1", **changes: Any) -> str:
        key = self.rsa if algorithm.startswith("RS") else self.ec
        return jwt.encode(self.claims(**changes), key, algorithm=algorithm, headers={"kid": kid})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A token made by hand: `alg: none` (no signature) or HMAC-SHA256 with `secret`."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    if secret is None:
        return signing_input + "."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


@pytest.fixture(scope="module")
def oidc_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Issuer]]:
    base = tmp_path_factory.mktemp("oidc")
    issuer = Issuer(base)
    # the shipped policies and the shipped example that maps GitHub claims to role ml-sec
    policies = base / "policies"
    shutil.copytree(REPOSITORY / "policies", policies)
    shutil.copy(REPOSITORY / "examples" / "policies" / "oidc_roles.rego", policies)
    config = base / "kmsgate.yaml"
    config.write_text(
        json.dumps(
            {
                "auth": {
                    "oidc": [
                        {
                            "name": "ci",
                            "issuer": ISSUER,
                            "audiences": [AUDIENCE],
                            "jwks_file": str(issuer.jwks),
                            "algorithms": ["RS256", "ES256"],
                            "leeway": "5s",
                        },
                        {  # a cluster's service-account tokens (same test keys)
                            "name": "k8s",
                            "issuer": K8S_ISSUER,
                            "audiences": [AUDIENCE],
                            "jwks_file": str(issuer.jwks),
                            "algorithms": ["RS256"],
                        },
                    ]
                }
            }
        )
    )
    with running_gateway(
        base, "--config", str(config), KMSGATE_POLICY_DIR=str(policies), KMSGATE_ENV="prod"
    ) as gw:
        for name, purpose in (("model-key", "model-sign"), ("other-key", "envelope-data")):
            created = httpx.post(
                f"{gw.addr}/v1/keys",
                json={"name": name, "type": "ecdsa-p256", "purpose": purpose},
                headers={"authorization": f"Bearer {gw.root_token}"},
            )
            assert created.status_code == 201, created.text
        yield gw, issuer


def _sign(gw: Gateway, token: str, key: str = "model-key") -> httpx.Response:
    return httpx.post(
        f"{gw.addr}/v1/keys/{key}/sign",
        json={"input": "aGVsbG8="},
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    )


def test_a_github_style_token_signs_with_the_key_policy_gives_it(
    oidc_gateway: tuple[Gateway, Issuer],
) -> None:
    gw, issuer = oidc_gateway
    for token in (issuer.token(), issuer.token("ES256", "ec-1")):
        signed = _sign(gw, token)
        assert signed.status_code == 200, signed.text
    assert _sign(gw, issuer.token(), "other-key").status_code == 403
    assert _sign(gw, issuer.token(ref="refs/heads/feature")).status_code == 403
    records = AuditFile(gw.data_dir / "audit.log").search(action="sign", key="model-key").records
    assert any(
        r.get("principal") == f"ci:{SUBJECT}" and r.get("principal_kind") == "oidc" for r in records
    )


def _issue(gw: Gateway, token: str, *names: str, ca: str = "dev") -> httpx.Response:
    _, csr = new_key_and_csr(list(names))
    return httpx.post(
        f"{gw.addr}/v1/pki/cas/{ca}/issue",
        json={"csr": csr.public_bytes(serialization.Encoding.PEM).decode(), "profile": "workload"},
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    )


def test_a_service_account_token_gets_a_certificate_for_its_own_spiffe_id_only(
    oidc_gateway: tuple[Gateway, Issuer],
) -> None:
    gw, issuer = oidc_gateway
    token = issuer.token(iss=K8S_ISSUER, sub=SERVICE_ACCOUNT, repository=None, ref=None)
    own = _issue(gw, token, "spiffe://dev.lab/ns/ml/sa/model-server")
    assert own.status_code == 200, own.text
    leaf = x509.load_pem_x509_certificate(own.json()["certificate"].encode())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://dev.lab/ns/ml/sa/model-server"
    ]
    for others in (
        ["spiffe://dev.lab/ns/ml/sa/other"],
        ["spiffe://dev.lab/ns/kms/sa/model-server"],
        ["spiffe://dev.lab/ns/ml/sa/model-server", "spiffe://dev.lab/ns/ml/sa/other"],
    ):
        assert _issue(gw, token, *others).status_code == 403, others
    # a CI job's token is no service account
    assert _issue(gw, issuer.token(), "spiffe://dev.lab/ns/ml/sa/model-server").status_code == 403
    # from the workload CA only: another name is refused without saying whether it exists
    own_name = "spiffe://dev.lab/ns/ml/sa/model-server"
    assert _issue(gw, token, own_name, ca="nope").status_code == 403
    records = AuditFile(gw.data_dir / "audit.log").search(action="cert.issue").records
    assert any(
        r.get("principal") == f"k8s:{SERVICE_ACCOUNT}" and r["outcome"] == "ok" for r in records
    )


def test_login_prints_the_principal_and_roles_a_token_maps_to(
    oidc_gateway: tuple[Gateway, Issuer], tmp_path: Path
) -> None:
    gw, issuer = oidc_gateway
    ci, pod, bad = tmp_path / "ci.jwt", tmp_path / "pod.jwt", tmp_path / "bad.jwt"
    ci.write_text(issuer.token(aud=[AUDIENCE, "another"]) + "\n")
    pod.write_text(issuer.token(iss=K8S_ISSUER, sub=SERVICE_ACCOUNT))
    bad.write_text(issuer.token(aud="someone-else"))
    env = gw.env(token="")
    done = run_cli(("login", "--oidc-token", str(ci)), env)
    assert done.rc == 0, str(done)
    lines = dict(line.split(":", 1) for line in done.out.splitlines())
    assert lines["principal"].strip() == f"ci:{SUBJECT}"
    assert (lines["kind"].strip(), lines["roles"].strip()) == ("oidc", "ml-sec")
    assert lines["iss"].strip() == ISSUER
    assert lines["aud"].strip() == f"{AUDIENCE},another"  # a list, one line
    as_json = run_cli(("login", "--oidc-token", str(pod), "--json"), env)
    assert as_json.rc == 0, str(as_json)
    identity = json.loads(as_json.out)
    assert (identity["id"], identity["roles"]) == (f"k8s:{SERVICE_ACCOUNT}", [])
    assert identity["claims"]["sub"] == SERVICE_ACCOUNT
    assert_one_line_error(run_cli(("login", "--oidc-token", str(bad)), env), "unauthenticated")
    root = run_cli(("login",), gw.env())
    assert root.rc == 0 and "admin" in root.out, str(root)
    api_token = tmp_path / "api.token"  # an API token is no OIDC token, though it works
    api_token.write_text(gw.root_token)
    assert_one_line_error(run_cli(("login", "--oidc-token", str(api_token)), env), "holds no JWT")


def test_every_bad_token_is_401(oidc_gateway: tuple[Gateway, Issuer]) -> None:
    gw, issuer = oidc_gateway
    now = int(time.time())
    public_pem = issuer.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = {
        "wrong audience": issuer.token(aud="someone-else"),
        "expired": issuer.token(exp=now - 60, iat=now - 400, nbf=now - 400),
        "not yet valid": issuer.token(nbf=now + 600),
        "issued in the future": issuer.token(iat=now + 600),
        "no expiry": issuer.token(exp=None),
        "another issuer": issuer.token(iss="https://elsewhere.example"),
        "unknown key": jwt.encode(
            issuer.claims(), stranger, algorithm="RS256", headers={"kid": "rsa-9"}
        ),
        "known kid, other key": jwt.encode(
            issuer.claims(), stranger, algorithm="RS256", headers={"kid": "rsa-1"}
        ),
        "alg none": _unsigned({"alg": "none", "typ": "JWT"}, issuer.claims(), None),
        "HS256 with the public key as secret": _unsigned(
            {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, issuer.claims(), public_pem
        ),
        "RS256 header on the EC key": jwt.encode(
            issuer.claims(), issuer.rsa, algorithm="RS256", headers={"kid": "ec-1"}
        ),
        "tampered claims": ".".join(
            [*issuer.token().split(".")[:1], _b64(json.dumps(issuer.claims(ref="x")).encode()),
             issuer.token().split(".")[2]]
        ),
        "not a JWT": "a.b.c",
        "a list for a kid": _unsigned({"alg": "RS256", "kid": ["rsa-1"]}, issuer.claims(), b"k"),
        "a list for the issuer": _unsigned(
            {"alg": "RS256", "kid": "rsa-1"}, issuer.claims(iss=[ISSUER]), b"k"
        ),
        # valid, but the policy input cannot hold it (it was a 403 evaluation error)
        "a claim beyond 64 bits": issuer.token(run_id=99999999999999999999),
        "exp as a string": issuer.token(exp=str(now + 300)),
        # a principal the store could not name (a grant's, a certificate owner's column)
        "a subject of 300 characters": issuer.token(sub="s" * 300),
    }  # fmt: skip
    statuses = {case: _sign(gw, token).status_code for case, token in bad.items()}
    assert statuses == dict.fromkeys(bad, 401)
    refusals = AuditFile(gw.data_dir / "audit.log").search(action="authn", limit=100).records
    oidc = [r for r in refusals if r["resource"] == {"kind": "oidc"}]
    assert len(oidc) >= len(bad) - 1
    # the record says which check failed (the caller is told only "invalid ... token")
    reasons = {r["detail"]["reason"] for r in oidc}
    assert {"InvalidAudienceError", "ExpiredSignatureError", "unknown issuer"} <= reasons
    assert any(reason.startswith("a principal id of 30") for reason in reasons), reasons


def test_each_refusal_logs_the_check_that_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/cli.md: the 401 is the same for every refused token, and the log says which
    check refused it, one line per token (never the token itself)."""
    issuer = Issuer(tmp_path)
    settings = OidcIssuer(name="ci", issuer=ISSUER, audiences=[AUDIENCE], jwks_file=issuer.jwks)
    authenticator = oidc.OidcAuthenticator([settings])
    cases = {
        "the issuer claim is not a string": _unsigned(
            {"alg": "RS256", "kid": "rsa-1"}, issuer.claims(iss=[ISSUER]), b"x"
        ),
        "the sub claim is not a non-empty string": issuer.token(sub=""),
        "unknown issuer": issuer.token(iss="https://other.example"),
        "ExpiredSignatureError": issuer.token(exp=int(time.time()) - 3600),
    }
    for why, token in cases.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="kmsgate"), pytest.raises(Unauthenticated):
            authenticator.authenticate(Credentials(bearer=token))
        lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert lines == [f"OIDC token refused: {why}"], (why, lines)
        assert token not in caplog.text


@pytest.mark.parametrize(
    ("issuer", "problem"),
    [
        ({"algorithms": ["HS256"]}, "refused"),
        ({"algorithms": ["none"]}, "refused"),
        ({"jwks_url": "https://x.example/jwks"}, "exactly one of jwks_file, jwks_url"),
        ({"jwks_file": None}, "exactly one of jwks_file, jwks_url"),
        ({"audiences": []}, "audiences"),
        ({"audiences": [""]}, "audiences"),
        ({"name": "Bad Name"}, "name"),
        ({"name": "token"}, "reserved"),
        ({"name": "cn"}, "reserved"),
        ({"name": "spiffe"}, "reserved"),
        ({"leeway": "3650d"}, "leeway"),
        ({"jwks_file": "/nonexistent/jwks.json"}, "is no file"),
        ({"jwks_file": None, "jwks_url": "http://keys.example/jwks"}, "https://"),
        ({"jwks_file": None, "jwks_url": "not a url"}, "https://"),
        ({"jwks_file": None, "jwks_url": "file:///etc/jwks.json"}, "https://"),
    ],
)
def test_oidc_settings_name_what_is_wrong(
    tmp_path: Path, issuer: dict[str, Any], problem: str
) -> None:
    jwks = tmp_path / "j.json"
    jwks.write_text('{"keys": []}')
    settings = {"name": "ci", "issuer": ISSUER, "audiences": [AUDIENCE], "jwks_file": str(jwks)}
    config = tmp_path / "kmsgate.yaml"
    config.write_text(json.dumps({"auth": {"oidc": [{**settings, **issuer}]}}))
    with pytest.raises(ConfigError, match=problem):
        load_settings(config)


class _JwksServer:
    """A JWKS URL on loopback that can be made to stall: it then sends a byte a second and
    never finishes (a JWKS server under attack, or an attacker's)."""

    def __init__(self, jwks: Path) -> None:
        self.stall = threading.Event()
        self.trickle_head = threading.Event()
        self.body: bytes | None = None
        """What to serve instead of the JWKS file."""
        self.status = 200
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if outer.trickle_head.is_set():  # a byte of the head every 0.2 s, for ever
                    for byte in b"HTTP/1.1 200 OK\r\n" + b"x-pad: " + b"a" * 10_000:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.2)
                body = outer.body if outer.body is not None else jwks.read_bytes()
                self.send_response(outer.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body) + 10_000))
                self.end_headers()
                while outer.stall.is_set():
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(1)
                self.wfile.write(body + b" " * 10_000)

            def log_message(self, *_: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_a_slow_jwks_server_never_holds_a_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token naming an unknown `kid` asks for a fetch but never waits for it: while the
    JWKS server stalls, such a token is refused at once and known keys keep working; once
    the server answers again, the key it publishes is accepted."""
    monkeypatch.setattr(oidc, "REFRESH_SECONDS", 0.2)
    issuer = Issuer(tmp_path)
    served = _JwksServer(issuer.jwks)
    settings = OidcIssuer(name="ci", issuer=ISSUER, audiences=[AUDIENCE], jwks_url=served.url)
    authenticator = oidc.OidcAuthenticator([settings])
    known = Credentials(bearer=issuer.token())
    newer = Credentials(bearer=issuer.token(kid="rsa-2"))
    served.stall.set()
    try:
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(Unauthenticated):
                authenticator.authenticate(newer)
            principal = authenticator.authenticate(known)
            assert principal is not None and principal.id == f"ci:{SUBJECT}"
            # a held request would wait for the fetch's timeout (5 s)
            assert time.monotonic() - started < oidc.FETCH_TIMEOUT_SECONDS / 5
            time.sleep(0.5)
        keys = json.loads(issuer.jwks.read_text())
        keys["keys"].append({**keys["keys"][0], "kid": "rsa-2"})
        issuer.jwks.write_text(json.dumps(keys))
    finally:
        served.stall.clear()
    deadline = time.monotonic() + 20  # the stalled fetch gives up after FETCH_TIMEOUT_SECONDS
    while True:
        try:
            assert authenticator.authenticate(newer) is not None
            break
        except Unauthenticated:
            assert time.monotonic() < deadline, "the published key was never fetched"
            time.sleep(0.2)
    served.server.shutdown()


def test_stalled_jwks_servers_delay_the_start_by_one_timeout_not_their_sum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three issuers whose JWKS servers stall: the JWKS were fetched one after another
    (17 s with the 5 s timeout); now at once, and the gateway starts after one timeout."""
    monkeypatch.setattr(oidc, "FETCH_TIMEOUT_SECONDS", 1.5)
    issuer = Issuer(tmp_path)
    served = _JwksServer(issuer.jwks)
    served.stall.set()
    issuers = [
        OidcIssuer(name=f"ci{n}", issuer=f"{ISSUER}/{n}", audiences=[AUDIENCE], jwks_url=served.url)
        for n in range(3)
    ]
    try:
        started = time.monotonic()
        authenticator = oidc.OidcAuthenticator(issuers)
        assert time.monotonic() - started < 2 * 1.5
        with pytest.raises(Unauthenticated):  # no key yet: refused, not held
            authenticator.authenticate(Credentials(bearer=issuer.token(iss=f"{ISSUER}/0")))
    finally:
        served.stall.clear()
        served.server.shutdown()


def _wait_accepted(authenticator: oidc.OidcAuthenticator, token: str, seconds: float) -> None:
    """Until `token` authenticates (its key fetched), at most `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            assert authenticator.authenticate(Credentials(bearer=token)) is not None
            return
        except Unauthenticated:
            assert time.monotonic() < deadline, "the published key was never fetched"
            time.sleep(0.2)


def test_a_malformed_jwks_keeps_the_keys_and_later_fetches_going(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A JWKS reply that is no JWK set (an array, a key whose kid is a list, JSON nested
    thousands deep, a set of private keys) at start and later: the keys already loaded
    keep working, the fetching thread goes on (it used to die, and keys the issuer then
    removed stayed trusted until a restart), and the start does not fail."""
    monkeypatch.setattr(oidc, "REFRESH_SECONDS", 0.2)
    issuer = Issuer(tmp_path)
    served = _JwksServer(issuer.jwks)
    jwk = json.loads(issuer.jwks.read_text())["keys"][0]
    private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(issuer.rsa))
    bad = [
        b"[]",
        b'"keys"',
        json.dumps({"keys": [{**jwk, "kid": ["rsa-1"]}]}).encode(),
        b"[" * 5000 + b"]" * 5000,
        json.dumps({"keys": [{**private, "kid": "rsa-1"}]}).encode(),
    ]
    settings = OidcIssuer(name="ci", issuer=ISSUER, audiences=[AUDIENCE], jwks_url=served.url)
    try:
        served.body = bad[0]
        oidc.OidcAuthenticator([settings])  # starts, with no key
        served.body = None
        authenticator = oidc.OidcAuthenticator([settings])
        known = Credentials(bearer=issuer.token())
        for body in bad:
            served.body = body
            refused = caplog.text.count("not loaded")
            with pytest.raises(Unauthenticated):  # an unknown kid asks for a fetch
                authenticator.authenticate(Credentials(bearer=issuer.token(kid="nope")))
            deadline = time.monotonic() + 10
            while caplog.text.count("not loaded") == refused:  # this body was fetched
                assert time.monotonic() < deadline, body[:40]
                time.sleep(0.05)
            assert authenticator.authenticate(known) is not None
        assert "holds private or secret key material" in caplog.text
        assert "not loaded: ValueError: not a JWK set" in caplog.text  # the reason, logged
        served.body = None
        keys = json.loads(issuer.jwks.read_text())
        issuer.jwks.write_text(json.dumps({"keys": [{**keys["keys"][0], "kid": "rsa-2"}]}))
        _wait_accepted(authenticator, issuer.token(kid="rsa-2"), 10)
        with pytest.raises(Unauthenticated):  # rsa-1, gone from the set, is trusted no more
            authenticator.authenticate(known)
    finally:
        served.server.shutdown()


def test_a_jwks_server_trickling_its_head_is_given_up_on_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JWKS server that sends its status line and headers a byte at a time (each read
    within the timeout): the fetch still gives up after FETCH_TIMEOUT_SECONDS in all, so
    the start is not held (it was, for hours)."""
    monkeypatch.setattr(oidc, "FETCH_TIMEOUT_SECONDS", 1.5)
    issuer = Issuer(tmp_path)
    served = _JwksServer(issuer.jwks)
    served.trickle_head.set()
    settings = OidcIssuer(name="ci", issuer=ISSUER, audiences=[AUDIENCE], jwks_url=served.url)
    try:
        started = time.monotonic()
        oidc.OidcAuthenticator([settings])
        assert time.monotonic() - started < 2 * 1.5
    finally:
        served.trickle_head.clear()
        served.server.shutdown()


def test_a_jwks_url_is_logged_without_its_credentials(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A JWKS URL with user info and a query (a token) that fails: the log names its host
    and path, and what failed (the HTTP status), never the credentials."""
    issuer = Issuer(tmp_path)
    served = _JwksServer(issuer.jwks)
    port = served.server.server_address[1]
    url = f"http://bot:s3cretpass@127.0.0.1:{port}/jwks.json?access_token=abc123"
    served.status = 404
    try:
        oidc.OidcAuthenticator(
            [OidcIssuer(name="ci", issuer=ISSUER, audiences=[AUDIENCE], jwks_url=url)]
        )
    finally:
        served.server.shutdown()
    assert f"JWKS http://127.0.0.1:{port}/jwks.json not loaded: HTTP 404" in caplog.text
    assert "s3cretpass" not in caplog.text and "abc123" not in caplog.text


def _jwks_authenticator(tmp_path: Path, keys: list[dict[str, Any]], **settings: Any) -> Any:
    jwks = tmp_path / "keys.json"
    jwks.write_text(json.dumps({"keys": keys}))
    issuer = OidcIssuer(name="ci", issuer=ISSUER, audiences=[AUDIENCE], jwks_file=jwks, **settings)
    return oidc.OidcAuthenticator([issuer])


def test_a_jwk_allows_only_its_own_algorithm_and_rsa_of_2048_bits(tmp_path: Path) -> None:
    """RFC 8725 3.1: a token may not pick another algorithm than its key's JWK names
    (PS256 with an RS256 key); RFC 7518 3.3: an RSA key under 2048 bits signs nothing."""
    issuer = Issuer(tmp_path)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(issuer.rsa.public_key()))
    authenticator = _jwks_authenticator(
        tmp_path, [{**jwk, "kid": "rsa-1", "alg": "RS256"}], algorithms=["RS256", "PS256"]
    )
    claims = issuer.claims()
    assert authenticator.authenticate(Credentials(bearer=issuer.token())) is not None
    pss = jwt.encode(claims, issuer.rsa, algorithm="PS256", headers={"kid": "rsa-1"})
    with pytest.raises(Unauthenticated):
        authenticator.authenticate(Credentials(bearer=pss))
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(small.public_key()))
    authenticator = _jwks_authenticator(tmp_path, [{**weak, "kid": "rsa-1"}])
    with warnings.catch_warnings():  # PyJWT warns of the short key, and would accept it
        warnings.simplefilter("ignore")
        token = jwt.encode(claims, small, algorithm="RS256", headers={"kid": "rsa-1"})
    with pytest.raises(Unauthenticated):
        authenticator.authenticate(Credentials(bearer=token))


def test_a_tenant_claim_must_be_a_non_empty_string(tmp_path: Path) -> None:
    """With `tenant_claim` set, a token without that claim, or with one that is no string,
    is refused: it would be of no tenant, out of tenant isolation's reach (or of a tenant
    named after a list's Python form)."""
    issuer = Issuer(tmp_path)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(issuer.rsa.public_key()))
    authenticator = _jwks_authenticator(tmp_path, [{**jwk, "kid": "rsa-1"}], tenant_claim="tenant")
    principal = authenticator.authenticate(Credentials(bearer=issuer.token(tenant="acme")))
    assert principal is not None and principal.tenant == "acme"
    for tenant in (None, "", ["acme", "globex"], True, 5, {"a": 1}):
        claims = {**issuer.claims(), "tenant": tenant}
        if tenant is None:
            del claims["tenant"]
        token = jwt.encode(claims, issuer.rsa, algorithm="RS256", headers={"kid": "rsa-1"})
        with pytest.raises(Unauthenticated):
            authenticator.authenticate(Credentials(bearer=token))
