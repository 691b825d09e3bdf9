"""sign / verify / mac through the real REST app: algorithms, digests, batches, limits,
authentication, policy and audit."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from kmsgate.audit import AuditFile
from kmsgate.policy import ACTIONS
from kmsgate.service import STATE_CHANGING
from tests.helpers import JSON_TYPE, b64, create_key, unb64


def public_key(api, token, name, version=None):
    query = f"?version={version}" if version else ""
    return load_pem_public_key(api.call("GET", f"/v1/keys/{name}/public-key{query}", token).content)


@pytest.mark.parametrize(
    ("key_type", "algorithm"),
    [
        ("ed25519", "ed25519"),
        ("ecdsa-p256", "ecdsa-sha256"),
        ("ecdsa-p384", "ecdsa-sha384"),
        ("ecdsa-p256", "ecdsa-sha512"),
    ],
)
def test_sign_verifies_independently(api, admin, key_type, algorithm):
    create_key(api, admin, "k", key_type)
    r = api.call(
        "POST", "/v1/keys/k/sign", admin, json={"input": b64(b"msg"), "algorithm": algorithm}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["algorithm"], body["key_version"]) == (algorithm, 1)
    pub = public_key(api, admin, "k")
    sig = unb64(body["signature"])
    if isinstance(pub, ed25519.Ed25519PublicKey):
        pub.verify(sig, b"msg")
    else:
        h = {
            "ecdsa-sha256": hashes.SHA256,
            "ecdsa-sha384": hashes.SHA384,
            "ecdsa-sha512": hashes.SHA512,
        }[algorithm]()
        pub.verify(sig, b"msg", ec.ECDSA(h))


def test_rsa_pss_and_pkcs1_with_digest(api, admin):
    create_key(api, admin, "r", "rsa-3072")
    digest = hashlib.sha256(b"payload").digest()
    pub = public_key(api, admin, "r")
    assert isinstance(pub, rsa.RSAPublicKey)
    pss = api.call("POST", "/v1/keys/r/sign", admin, json={"digest": b64(digest)}).json()
    assert pss["algorithm"] == "rsa-pss-sha256"
    pub.verify(
        unb64(pss["signature"]),
        b"payload",
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        hashes.SHA256(),
    )
    pk = api.call(
        "POST",
        "/v1/keys/r/sign",
        admin,
        json={"digest": b64(digest), "algorithm": "rsa-pkcs1-sha256"},
    ).json()
    pub.verify(unb64(pk["signature"]), digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    r = api.call(
        "POST",
        "/v1/keys/r/verify",
        admin,
        json={
            "input": b64(b"payload"),
            "signature": pk["signature"],
            "algorithm": "rsa-pkcs1-sha256",
        },
    )
    assert r.json()["valid"] is True
    r = api.call(
        "POST",
        "/v1/keys/r/verify",
        admin,
        json={"input": b64(b"payload"), "signature": pk["signature"]},
    )
    assert r.json()["valid"] is False  # PKCS#1 signature is not a PSS signature


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"input": "not base64!"}, 422, "validation_failed"),
        ({"input": "YWJj"[:3]}, 422, "validation_failed"),
        ({"input": "aGl="}, 422, "validation_failed"),  # "hi" is aGk=: one encoding per input
        ({"input": "aR=="}, 422, "validation_failed"),  # "i" is aQ==
        ({"input": "YWJj", "algorithm": "rsa-pss-sha256"}, 400, "invalid_request"),
        ({"input": "YWJj", "algorithm": "md5"}, 400, "invalid_request"),
        ({"digest": b64(b"short")}, 400, "invalid_request"),
        ({"input": "YWJj", "digest": "YWJj"}, 422, "validation_failed"),
        ({}, 422, "validation_failed"),
        ({"input": "YWJj", "version": 9}, 409, "key_version_unusable"),
    ],
)
def test_bad_sign_requests(api, admin, body, status, code):
    create_key(api, admin, "k", "ecdsa-p256")
    r = api.call("POST", "/v1/keys/k/sign", admin, json=body)
    assert (r.status_code, r.json()["code"]) == (status, code), r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["request_id"] == r.headers["x-request-id"]


def test_malformed_json_is_400(api, admin):
    create_key(api, admin, "k", "ecdsa-p256")
    for raw in (b"{", b"[]", b"\xff"):
        r = api.call(
            "POST",
            "/v1/keys/k/sign",
            admin,
            content=raw,
            headers={"content-type": "application/json"},
        )
        assert (r.status_code, r.json()["code"]) == (400, "invalid_request")


def test_ed25519_refuses_digest(api, admin):
    create_key(api, admin, "e", "ed25519")
    r = api.call("POST", "/v1/keys/e/sign", admin, json={"digest": b64(bytes(32))})
    assert r.status_code == 400


def test_usage_is_bound_to_type(api, admin):
    create_key(api, admin, "h", "hmac-sha256")
    create_key(api, admin, "s", "ecdsa-p256")
    assert api.call("POST", "/v1/keys/h/sign", admin, json={"input": "YWJj"}).status_code == 400
    assert api.call("POST", "/v1/keys/s/mac", admin, json={"input": "YWJj"}).status_code == 400


def test_the_audit_log_digests_what_is_signed_but_not_what_is_maced(api, admin):
    """A MAC's input is often a short secret (an account number): its plain SHA-256 in the
    log would give it away to a reader who guesses; a signed message is public anyway."""
    create_key(api, admin, "h", "hmac-sha256")
    create_key(api, admin, "s", "ecdsa-p256")
    secret = b64(b"078-05-1120")
    mac = api.call("POST", "/v1/keys/h/mac", admin, json={"input": secret}).json()["mac"]
    check = {"input": secret, "mac": mac}
    assert api.call("POST", "/v1/keys/h/mac/verify", admin, json=check).json()["valid"]
    api.call("POST", "/v1/keys/s/sign", admin, json={"input": secret})
    for action in ("mac", "mac.verify"):
        [record] = api.service.audit.search(action=action).records
        assert record["inputs"] == {"count": 1, "length": 11}, record
    [signed] = api.service.audit.search(action="sign").records
    assert signed["inputs"]["sha256"] == hashlib.sha256(b"078-05-1120").hexdigest()


@pytest.mark.parametrize("key_type", ["hmac-sha256", "hmac-sha384", "hmac-sha512"])
def test_mac_and_verify(api, admin, key_type):
    create_key(api, admin, "h", key_type)
    r = api.call("POST", "/v1/keys/h/mac", admin, json={"input": b64(b"data")})
    tag = unb64(r.json()["mac"])
    assert len(tag) == hashlib.new(key_type.split("-")[1]).digest_size
    ok = api.call(
        "POST", "/v1/keys/h/mac/verify", admin, json={"input": b64(b"data"), "mac": b64(tag)}
    )
    assert ok.json() == {"valid": True, "key_version": 1}
    for bad in (tag[:-1], tag[:16], bytes(len(tag)), tag + b"\x00"):
        r = api.call(
            "POST", "/v1/keys/h/mac/verify", admin, json={"input": b64(b"data"), "mac": b64(bad)}
        )
        assert r.json()["valid"] is False
    api.call("POST", "/v1/keys/h/rotate", admin)
    r = api.call(
        "POST", "/v1/keys/h/mac/verify", admin, json={"input": b64(b"data"), "mac": b64(tag)}
    )
    assert r.json() == {"valid": True, "key_version": 1}
    r = api.call("POST", "/v1/keys/h/mac", admin, json={"input": b64(b"data")})
    assert r.json()["key_version"] == 2 and unb64(r.json()["mac"]) != tag


def test_a_compromised_version_verifies_no_mac(api, admin):
    """A MAC has no time to place it before the leak: anyone holding the key makes one."""
    create_key(api, admin, "h", "hmac-sha256")
    tag = api.call("POST", "/v1/keys/h/mac", admin, json={"input": b64(b"data")}).json()["mac"]
    check = {"input": b64(b"data"), "mac": tag}
    assert api.call("POST", "/v1/keys/h/mac/verify", admin, json=check).json()["valid"] is True
    since = {"since": "2020-01-01T00:00:00Z"}
    marked = api.call("POST", "/v1/keys/h/versions/1/compromised", admin, json=since)
    assert marked.status_code == 200, marked.text
    for body in (check, {**check, "version": 1}):
        reply = api.call("POST", "/v1/keys/h/mac/verify", admin, json=body)
        assert reply.json() == {"valid": False, "key_version": None}, reply.text
    batch = api.call("POST", "/v1/keys/h/mac/verify", admin, json={"batch": [check]}).json()
    assert batch["batch"][0]["valid"] is False, batch


def test_batch_keeps_order_and_reports_item_errors(api, admin):
    create_key(api, admin, "k", "ecdsa-p256")
    items = [
        {"input": b64(b"a")},
        {"digest": b64(b"bad")},
        {"input": b64(b"c"), "algorithm": "ecdsa-sha384"},
    ]
    r = api.call("POST", "/v1/keys/k/sign", admin, json={"batch": items})
    assert r.status_code == 200, r.text
    out = r.json()["batch"]
    assert out[1]["error"]["code"] == "invalid_request"
    assert out[2]["algorithm"] == "ecdsa-sha384"
    verify_items = [
        {"input": b64(b"a"), "signature": out[0]["signature"]},
        {"input": b64(b"c"), "signature": out[2]["signature"], "algorithm": "ecdsa-sha384"},
        {"input": b64(b"x"), "signature": out[0]["signature"]},
    ]
    r = api.call("POST", "/v1/keys/k/verify", admin, json={"batch": verify_items})
    assert [x["valid"] for x in r.json()["batch"]] == [True, True, False]


def test_batch_limits(api, admin):
    create_key(api, admin, "k", "ed25519")
    ok = api.call("POST", "/v1/keys/k/sign", admin, json={"batch": [{"input": "YQ=="}] * 1000})
    assert ok.status_code == 200 and len(ok.json()["batch"]) == 1000
    r = api.call("POST", "/v1/keys/k/sign", admin, json={"batch": [{"input": "YQ=="}] * 1001})
    assert (r.status_code, r.json()["code"]) == (413, "too_large")
    mixed = api.call(
        "POST", "/v1/keys/k/sign", admin, json={"batch": [{"input": "YQ=="}], "input": "YQ=="}
    )
    assert mixed.status_code == 422


def test_size_limits(api, admin):
    create_key(api, admin, "k", "ed25519")
    limit = api.service.settings.limits
    big = b64(b"x" * (limit.max_input_bytes + 1))
    r = api.call("POST", "/v1/keys/k/sign", admin, json={"input": big})
    assert (r.status_code, r.json()["code"]) == (413, "too_large")
    huge = b"{" + b" " * limit.max_body_bytes + b"}"
    r = api.call("POST", "/v1/keys/k/sign", admin, content=huge)
    assert (r.status_code, r.json()["code"]) == (413, "too_large")

    def chunks():
        yield b'{"input": "'
        for _ in range(limit.max_body_bytes // 65536 + 2):
            yield b"A" * 65536
        yield b'"}'

    r = api.call("POST", "/v1/keys/k/sign", admin, content=chunks())
    assert (r.status_code, r.json()["code"]) == (413, "too_large")


@pytest.mark.parametrize(
    ("key_type", "path", "advice"),
    [
        ("ecdsa-p256", "sign", "; send a digest instead"),
        ("ed25519", "sign", "; Ed25519 signs the whole message, not a digest, so the input"),
        ("ed25519", "verify", "; Ed25519 signs the whole message, not a digest, so the input"),
        ("hmac-sha256", "mac", "; an HMAC covers the whole input, not a digest, so the input"),
    ],
)
def test_an_input_over_the_limit_gets_advice_it_can_follow(api, admin, key_type, path, advice):
    """Past `max_input_bytes` only a hashing algorithm can take a digest: an Ed25519 key
    (which refuses digests) and an HMAC key (which takes none) were told to send one."""
    name = f"limit-{key_type}-{path}"
    create_key(api, admin, name, key_type)
    limit = api.service.settings.limits.max_input_bytes
    body = {"input": b64(b"x" * (limit + 1))}
    if path == "verify":
        body["signature"] = b64(b"s" * 64)
    r = api.call("POST", f"/v1/keys/{name}/{path}", admin, json=body)
    assert (r.status_code, r.json()["code"]) == (413, "too_large")
    detail = r.json()["detail"]
    assert detail.startswith(f"input of {limit + 1} bytes exceeds the limit of {limit}{advice}")
    assert ("digest instead" in detail) == (key_type == "ecdsa-p256"), detail


def test_authentication(api, admin, make_token):
    create_key(api, admin, "k", "ecdsa-p256")
    for header in (
        {},
        {"authorization": "Bearer nope"},
        {"authorization": "Basic abc"},
        {"authorization": f"Bearer {admin[:-2]}xx"},
    ):
        r = api.client.post("/v1/keys/k/sign", json={"input": "YQ=="}, headers=header)
        assert (r.status_code, r.json()["code"]) == (401, "unauthenticated")
    token_id = admin.split(".")[1]
    assert api.call("DELETE", f"/v1/sys/tokens/{token_id}", make_token("admin")).status_code == 200
    assert api.call("POST", "/v1/keys/k/sign", admin, json={"input": "YQ=="}).status_code == 401
    assert api.call("GET", "/v1/sys/health", None).json() == {"status": "ok"}


def test_policy_denies_whether_or_not_key_exists(api, admin, make_token):
    create_key(api, admin, "k", "ecdsa-p256", purpose="model-sign")
    nobody = make_token("reader")
    for name in ("k", "does-not-exist"):
        r = api.call("POST", f"/v1/keys/{name}/sign", nobody, json={"input": "YQ=="})
        assert (r.status_code, r.json()["code"]) == (403, "policy_denied")
        assert api.call("GET", f"/v1/keys/{name}", nobody).status_code == 403
    assert api.call("GET", "/v1/keys", nobody).status_code == 403
    assert (
        api.call("POST", "/v1/keys/does-not-exist/sign", admin, json={"input": "YQ=="}).status_code
        == 404
    )


def test_ml_sec_may_sign_model_keys_only_in_prod(api, admin, make_token):
    create_key(api, admin, "model", "ecdsa-p256", purpose="model-sign")
    create_key(api, admin, "other", "ecdsa-p256", purpose="general")
    ml = make_token("ml-sec")
    assert api.service.settings.env == "test"
    assert api.call("POST", "/v1/keys/model/sign", ml, json={"input": "YQ=="}).status_code == 403
    api.service.settings.env = "prod"
    assert api.call("POST", "/v1/keys/model/sign", ml, json={"input": "YQ=="}).status_code == 200
    assert api.call("POST", "/v1/keys/other/sign", ml, json={"input": "YQ=="}).status_code == 403
    assert api.call("POST", "/v1/keys/model/rotate", ml).status_code == 403


def test_the_audited_first_actions_are_real_actions():
    """A misspelt name in STATE_CHANGING would silently skip the record-first rule."""
    # and those of the scheduler (destroy, expire), of an operator's `token bootstrap`, and
    # the gateway's revocation publishing (CRLs, OCSP responders)
    system = {
        "key.destroy",
        "exception.expire",
        "token.bootstrap",
        "token.purge",
        "crl.build",
        "ocsp.responder",
    }
    assert ACTIONS | system >= STATE_CHANGING


def test_every_call_is_audited_and_tamper_evident(api, admin, make_token):
    create_key(api, admin, "k", "ecdsa-p256")
    api.call("POST", "/v1/keys/k/sign", admin, json={"input": b64(b"secret-data")})
    api.call("POST", "/v1/keys/k/sign", make_token("nobody"), json={"input": "YQ=="})
    api.call("POST", "/v1/keys/k/sign", None, json={"input": "YQ=="})
    path = api.service.settings.resolved_audit_path()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    summary = [(r["action"], r["decision"], r["outcome"]) for r in records]
    assert summary == [
        ("key.create", "allow", "started"),  # a state change is recorded before it runs
        ("key.create", "allow", "ok"),
        ("sign", "allow", "ok"),
        ("sign", "deny", "policy_denied"),
        ("authn", "deny", "unauthenticated"),
    ]
    assert records[0]["request_id"] == records[1]["request_id"]
    assert records[4]["detail"] == {  # where failures come from, and why
        "remote_addr": "testclient",
        "reason": "missing, invalid, expired or revoked token",
    }
    assert records[2]["inputs"]["sha256"] == hashlib.sha256(b"secret-data").hexdigest()
    assert all(r["policy_digest"] == api.service.policy.digest for r in records)
    text = path.read_text()
    assert "secret-data" not in text and b64(b"secret-data") not in text
    assert admin.split(".")[2] not in text
    assert AuditFile(path).verify().ok
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"sign"', b'"sigm"')
    path.write_bytes(b"".join(lines))
    report = AuditFile(path).verify()
    assert not report.ok and report.first_bad_line == 3


def test_openapi_and_unknown_routes(api, admin):
    spec = api.client.get("/openapi.json").json()
    sign = spec["paths"]["/v1/keys/{name}/sign"]["post"]
    assert "oneOf" in sign["requestBody"]["content"]["application/json"]["schema"]
    r = api.call("GET", "/v1/nothing", admin)
    assert (r.status_code, r.json()["code"]) == (404, "not_found")
    assert r.headers["content-type"] == "application/problem+json"


def test_text_replies_end_with_a_newline(api, admin):
    """JSON (hot and ordinary routes), problem+json and PEM replies end with a newline."""
    create_key(api, admin, "newline", "ecdsa-p256")
    replies = [
        api.call("POST", "/v1/keys/newline/sign", admin, json={"input": b64(b"x")}),
        api.call("GET", "/v1/keys/newline", admin),
        api.call("GET", "/v1/keys", admin),
        api.call("GET", "/v1/sys/health", None),
        api.call("GET", "/v1/keys/newline/public-key", admin),
        api.call("GET", "/v1/keys", None),
        api.call("POST", "/v1/keys/newline/sign", admin, content=b"{", headers=JSON_TYPE),
    ]
    assert [r.status_code for r in replies] == [200, 200, 200, 200, 200, 401, 400]
    for r in replies:
        assert r.content.endswith(b"\n") and not r.content.endswith(b"\n\n"), r.content
    assert replies[0].json()["key_version"] == 1


def test_docs_pages_load_every_asset_from_the_gateway(api):
    """/docs and /redoc work offline: every script, style and icon they reference is served
    by the gateway itself (no CDN), and the spec they load is the gateway's own."""
    for page in ("/docs", "/redoc"):
        r = api.client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        refs = re.findall(r'(?:src|href|spec-url)="([^"]+)"', r.text)
        refs += re.findall(r"url: '([^']+)'", r.text)
        assert any(ref.endswith(".js") for ref in refs), r.text
        assert "/openapi.json" in refs, r.text
        for ref in refs:
            assert ref.startswith("/") and not ref.startswith("//"), f"{page} loads {ref}"
            asset = api.client.get(ref)
            assert asset.status_code == 200 and len(asset.content) > 100, ref


def test_metrics_need_permission(api, admin, make_token):
    assert api.call("GET", "/metrics", None).status_code == 401
    assert api.call("GET", "/metrics", make_token("scraper")).status_code == 403
    r = api.call("GET", "/metrics", admin)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    assert 'kmsgate_http_requests_total{method="GET",route="/metrics",status="401"} 1.0' in r.text
    assert 'kmsgate_http_requests_total{method="GET",route="/metrics",status="403"} 1.0' in r.text


def _metric(text: str, sample: str) -> float:
    """The value of the exposition line that starts with `sample` (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_routes_by_template_and_time_each_operation(api, admin):
    create_key(api, admin, "metered", "ecdsa-p256")
    for _ in range(3):
        r = api.call("POST", "/v1/keys/metered/sign", admin, json={"input": b64(b"m")})
        assert r.status_code == 200
    assert api.call("POST", "/v1/keys/no-such-key/sign", admin, json={"input": "AA=="}).status_code
    assert api.call("GET", "/v1/secret-looking/path/xyz", admin).status_code == 404
    assert api.call("BREW", "/v1/sys/health", admin).status_code == 405
    text = api.call("GET", "/metrics", admin).text
    sign = 'kmsgate_http_requests_total{method="POST",route="/v1/keys/{name}/sign",status="200"}'
    assert _metric(text, sign) == 3
    assert _metric(text, 'kmsgate_operation_duration_seconds_count{operation="sign"}') == 4
    assert _metric(text, 'kmsgate_operation_duration_seconds_count{operation="create_key"}') == 1
    # the three signs ran on the `local` backend's key; decisions counted by result
    assert _metric(text, 'kmsgate_backend_operation_seconds_count{backend="local"}') == 3
    assert _metric(text, 'kmsgate_backend_operation_seconds_sum{backend="local"}') > 0
    assert _metric(text, 'kmsgate_backend_failures_total{backend="local"}') == 0
    assert _metric(text, 'kmsgate_policy_decisions_total{result="allow"}') >= 5
    # every latency sample fell under the last finite bucket
    assert (
        _metric(text, 'kmsgate_operation_duration_seconds_bucket{le="10.0",operation="sign"}') == 4
    )
    # raw paths and arbitrary methods never become label values (bounded cardinality)
    assert "secret-looking" not in text and "no-such-key" not in text and "BREW" not in text
    assert (
        _metric(text, 'kmsgate_http_requests_total{method="GET",route="unmatched",status="404"}')
        == 1
    )
    assert (
        _metric(
            text, 'kmsgate_http_requests_total{method="other",route="/v1/sys/health",status="405"}'
        )
        == 1
    )
    assert "# TYPE kmsgate_backend_errors_total counter" in text


def test_fast_routes_answer_a_wrong_method_and_a_crash_with_problems(api, admin, monkeypatch):
    """The fast path (served ahead of FastAPI's middleware) keeps the contract: a method
    the route lacks gets FastAPI's 405 problem; an unexpected exception a 500 problem with
    the request id and no internal text."""
    create_key(api, admin, "fast", "ecdsa-p256")
    wrong = api.call("GET", "/v1/keys/fast/sign", admin)
    assert (wrong.status_code, wrong.json()["code"]) == (405, "method_not_allowed")

    def crash(*_args, **_kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(api.service.gate, "target", crash)
    r = api.call("POST", "/v1/keys/fast/sign", admin, json={"input": b64(b"x")})
    assert (r.status_code, r.json()["code"]) == (500, "internal_error")
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["request_id"] == r.headers["x-request-id"]
    assert "secret" not in r.text
    text = api.call("GET", "/metrics", admin).text
    assert (
        _metric(text, 'kmsgate_http_requests_total{method="POST",route="/v1/keys/{name}/sign",'
                'status="500"}')
        == 1
    )  # fmt: skip


def test_a_client_gone_before_its_body_arrived_is_a_400_not_a_500(api, admin, caplog):
    create_key(api, admin, "gone", "ecdsa-p256")
    app = api.client.app
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/keys/gone/sign",
        "raw_path": b"/v1/keys/gone/sign",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"authorization", f"Bearer {admin}".encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
    assert "unexpected" not in caplog.text
