"""The harnesses' inputs over REST, against one live dev gateway (`kmsgate serve --dev` in a
subprocess, configured with the OIDC test issuer): `decrypt`, CSR `issue`, OCSP by POST and
by GET, and bearer tokens. No input gets a 5xx; every OCSP input gets a DER OCSPResponse
(malformedRequest exactly when `parse_request` refuses it), never problem+json.

Seeds include what this gateway made: its ciphertexts, OCSP requests about a certificate its
dev CA issued, and its root API token (mutated bearers reach the API-token check too).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import pytest
from cryptography.x509 import ocsp
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsgate.pki.ocsp import MalformedOcspRequest, parse_request
from tests.fuzz import test_csr, test_envelope, test_jwt, test_ocsp
from tests.fuzz.harness import FUZZ, Input, corpus, feed
from tests.fuzz.seeds import (
    ENVELOPE_KEY,
    create_envelope_key,
    envelopes,
    issued_certificate,
    ocsp_requests,
    poster,
)
from tests.test_cli import REPO, running_gateway

HTTP = settings(FUZZ, max_examples=60)
"""Per route: a few hundred requests in all."""
OCSP_PATH = "/v1/pki/cas/dev/ocsp"
NOT_THE_JSON_ASKED_FOR = [
    b"[]",
    b"null",
    b"{",
    b'{"csr": 1, "profile": "workload"}',
    b'{"csr": "\\ud800", "profile": "workload"}',
    b'{"ciphertext": "\\ud800"}',
    b'{"ciphertext": "S0dF", "context": {"\\udfff": "x"}}',
]


@dataclass(frozen=True)
class Route:
    """A route fed a harness's inputs: `send` makes the request that carries an input."""

    seeds: Sequence[bytes]
    send: Callable[[bytes], httpx.Response]

    def check(self, data: bytes) -> bool:
        reply = self.send(data)
        assert reply.status_code < 500, (reply.status_code, reply.text)
        return reply.is_success


@dataclass(frozen=True)
class OcspRoute(Route):
    def check(self, data: bytes) -> bool:
        reply = self.send(data)
        assert reply.status_code == 200, (reply.status_code, reply.text)
        assert reply.headers["content-type"] == "application/ocsp-response", reply.text
        status = ocsp.load_der_ocsp_response(reply.content).response_status
        try:
            parse_request(data)
        except MalformedOcspRequest:
            assert status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
            return False
        assert status is not ocsp.OCSPResponseStatus.MALFORMED_REQUEST
        return True


@dataclass(frozen=True)
class Live:
    admin: httpx.Client
    decrypt: Route
    issue: Route
    ocsp_post: OcspRoute
    ocsp_get: OcspRoute
    bearer: Route


def _bearer(data: bytes) -> bytes:
    """`data` as a header value can carry it (no control characters, no outer spaces)."""
    return bytes(b for b in data if 0x20 <= b != 0x7F).strip()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    base = tmp_path_factory.mktemp("fuzz-http")
    issuer = test_jwt.issuer_settings(base / "jwks.json")
    oidc = {
        "name": issuer.name,
        "issuer": issuer.issuer,
        "audiences": issuer.audiences,
        "jwks_file": str(issuer.jwks_file),
        "algorithms": issuer.algorithms,
    }
    config = base / "kmsgate.yaml"
    config.write_text(json.dumps({"auth": {"oidc": [oidc]}}))
    # PYTHONPATH: the checkout's code, also when the `kmsgate` script was installed from another
    with (
        running_gateway(base, "--config", str(config), PYTHONPATH=str(REPO)) as gw,
        httpx.Client(
            base_url=gw.addr, headers={"authorization": f"Bearer {gw.root_token}"}, timeout=30
        ) as admin,
        httpx.Client(base_url=gw.addr, timeout=30) as anonymous,
    ):
        post = poster(admin)
        create_envelope_key(post)
        ciphertexts = list(envelopes(post).values())
        requests = list(ocsp_requests(*issued_certificate(post)).values())

        def seeds(name: str, made: Sequence[bytes] = ()) -> list[bytes]:
            return [seed for _, seed in corpus(name)] + list(made)

        def decrypt(data: bytes) -> httpx.Response:
            body = {"ciphertext": base64.b64encode(data).decode()}
            return admin.post(f"/v1/keys/{ENVELOPE_KEY}/decrypt", json=body)

        def issue(data: bytes) -> httpx.Response:
            body = {"csr": test_csr.pem_of(data), "profile": "workload"}
            return admin.post("/v1/pki/cas/dev/issue", json=body)

        def ocsp_post(data: bytes) -> httpx.Response:
            content_type = {"content-type": "application/ocsp-request"}
            return anonymous.post(OCSP_PATH, content=data, headers=content_type)

        def ocsp_get(data: bytes) -> httpx.Response:
            # RFC 6960 appendix A: base64, then URL-encoded
            return anonymous.get(f"{OCSP_PATH}/{quote(base64.b64encode(data), safe='')}")

        def bearer(data: bytes) -> httpx.Response:
            authorization = [(b"authorization", _bearer(b"Bearer " + data))]
            return anonymous.get("/v1/sys/whoami", headers=authorization)

        yield Live(
            admin=admin,
            decrypt=Route(seeds("envelope", ciphertexts), decrypt),
            issue=Route(seeds("csr"), issue),
            ocsp_post=OcspRoute(seeds("ocsp", requests), ocsp_post),
            ocsp_get=OcspRoute(seeds("ocsp", requests), ocsp_get),
            bearer=Route(seeds("jwt", [gw.root_token.encode()]), bearer),  # and API tokens
        )


@HTTP
@given(value=test_envelope.HARNESS.inputs())
def test_decrypt_answers_no_5xx(live: Live, value: Input) -> None:
    feed(live.decrypt, value)


@HTTP
@given(value=test_csr.HARNESS.inputs())
def test_issue_answers_no_5xx(live: Live, value: Input) -> None:
    feed(live.issue, value)


@HTTP
@given(value=test_ocsp.HARNESS.inputs())
def test_ocsp_post_answers_an_ocsp_response(live: Live, value: Input) -> None:
    feed(live.ocsp_post, value)


@HTTP
@given(value=test_ocsp.HARNESS.inputs())
def test_ocsp_get_answers_an_ocsp_response(live: Live, value: Input) -> None:
    feed(live.ocsp_get, value)


@HTTP
@given(value=test_jwt.HARNESS.inputs())
def test_a_bearer_gets_no_5xx(live: Live, value: Input) -> None:
    feed(live.bearer, value)


@HTTP
@given(body=st.binary(max_size=200) | st.sampled_from(NOT_THE_JSON_ASKED_FOR))
def test_a_body_that_is_not_the_json_asked_for_gets_no_5xx(live: Live, body: bytes) -> None:
    for path in (f"/v1/keys/{ENVELOPE_KEY}/decrypt", "/v1/pki/cas/dev/issue"):
        reply = live.admin.post(path, content=body, headers={"content-type": "application/json"})
        assert reply.status_code < 500, (path, reply.status_code, reply.text)
