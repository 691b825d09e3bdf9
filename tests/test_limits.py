"""Request rates per principal and per key (429 with Retry-After), and the time a client has
to send its request body (408, connection closed): issue 17, item 7 and finding 7."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kmsgate.config import Limits
from kmsgate.ratelimit import FailureLimit
from tests.gateway import Api, open_gateway
from tests.helpers import b64, create_key
from tests.test_cli import Gateway, running_gateway

BURST_SECONDS = 5.0
"""With a rate of 1/s: five requests saved up, and a refill slow next to in-process requests."""


@contextlib.contextmanager
def _limited(base: Path, **rates: float) -> Iterator[tuple[Api, str]]:
    limits = Limits(**rates, burst_seconds=BURST_SECONDS)
    with open_gateway(base, limits=limits) as opened:
        yield opened


def _statuses(
    api: Api, token: str, path: str, count: int, **kwargs: object
) -> tuple[list[int], float]:
    """The statuses of `count` requests, and the seconds they took."""
    method = "POST" if "json" in kwargs else "GET"
    started = time.monotonic()
    statuses = [api.call(method, path, token, **kwargs).status_code for _ in range(count)]
    return statuses, time.monotonic() - started


def _most_served(seconds: float) -> int:
    """What a bucket of 1/s with BURST_SECONDS saved up can let through in `seconds`."""
    return int(BURST_SECONDS + seconds) + 1


def test_a_principal_over_its_rate_gets_429_and_may_retry_after(tmp_path: Path) -> None:
    with _limited(tmp_path, principal_rate=1, key_rate=0) as (api, admin):
        other = api.service.tokens.create(["admin"], ttl=None)[1]
        statuses, took = _statuses(api, admin, "/v1/sys/whoami", 20)
        assert statuses[:5] == [200] * 5, statuses
        assert statuses.count(200) <= _most_served(took) and statuses.count(429) >= 10, statuses
        reply = api.call("GET", "/v1/sys/whoami", admin)
        assert reply.status_code == 429 and reply.json()["code"] == "rate_limited"
        assert reply.headers["content-type"] == "application/problem+json"
        wait = int(reply.headers["retry-after"])
        assert wait >= 1
        document = api.call("GET", "/openapi.json", other).json()  # which declares it so
        declared = document["paths"]["/v1/sys/whoami"]["get"]["responses"]["429"]["headers"]
        assert declared["retry-after"]["required"] is True, declared
        assert api.call("GET", "/v1/sys/whoami", other).status_code == 200  # its own bucket
        time.sleep(wait)
        assert api.call("GET", "/v1/sys/whoami", admin).status_code == 200
        whoami = api.service.audit.search(action="principal.read", limit=10_000).records
        served = statuses.count(200) + 2
        assert len(whoami) == served  # the 429s took no decision: no record


def test_a_key_over_its_rate_gets_429_while_other_keys_sign(tmp_path: Path) -> None:
    with _limited(tmp_path, principal_rate=0, key_rate=1) as (api, admin):
        for name in ("hot", "cold"):
            create_key(api, admin, name)
        body = {"json": {"input": b64(b"m")}}
        hot, took = _statuses(api, admin, "/v1/keys/hot/sign", 16, **body)
        assert hot[:5] == [200] * 5, hot
        assert hot.count(200) <= _most_served(took) and hot.count(429) >= 8, hot
        cold, _ = _statuses(api, admin, "/v1/keys/cold/sign", 1, **body)
        assert cold == [200]  # its own bucket
        # the policy decides first: a caller it denies never uses the key's rate up, and a
        # call past the rate is on the trail as such
        outsider = api.service.tokens.create(["nobody"], ttl=None)[1]
        denied, _ = _statuses(api, outsider, "/v1/keys/cold/sign", 16, **body)
        assert denied == [403] * 16, denied
        assert _statuses(api, admin, "/v1/keys/cold/sign", 1, **body)[0] == [200]
        limited = [r for r in api.service.audit.search(action="sign", key="hot").records]
        assert "rate_limited" in {r["outcome"] for r in limited}


def test_failed_authentications_past_an_addresss_rate_get_429_and_one_record(
    tmp_path: Path,
) -> None:
    """A client trying token after token: its failures within the rate are each 401 and
    audited; past it, 429 and only the first of the run is audited (the audit log does not
    grow at the client's pace); a valid token from the same address still works, and once
    the bucket refills failures are 401 and audited again."""
    with _limited(tmp_path, principal_rate=0, key_rate=0, failed_auth_rate=1) as (api, admin):
        bad = "kmg.0123456789abcdef.not-the-secret"
        statuses, took = _statuses(api, bad, "/v1/sys/whoami", 20)
        assert statuses[:5] == [401] * 5, statuses
        assert statuses.count(401) <= _most_served(took) and statuses.count(429) >= 10, statuses
        records = api.service.audit.search(action="authn", limit=10_000).records
        assert len(records) == statuses.count(401) + 1
        assert [bool((r.get("detail") or {}).get("throttled")) for r in records].count(True) == 1
        assert api.call("GET", "/v1/sys/whoami", admin).status_code == 200
        unrecorded = statuses.count(429) - 1
        assert api.service.gate.failures.unrecorded == unrecorded  # kmsgate_authn_failures_...
        time.sleep(1.1)
        assert api.call("GET", "/v1/sys/whoami", bad).status_code == 401
        after = api.service.audit.search(action="authn", limit=10_000).records
        assert len(after) == len(records) + 1
        assert after[-1]["detail"]["unrecorded_before"] == unrecorded  # what went unrecorded


def test_failures_count_by_address_ipv6_by_its_64_and_trusted_proxies_are_exempt() -> None:
    limit = FailureLimit(1, 1, exempt=["10.9.0.0/16"])
    for address in ("192.0.2.7", "2001:db8:1:2::1"):
        assert limit.failed(address)[0] and not limit.failed(address)[0]
    assert not limit.failed("2001:db8:1:2::ffff")[0]  # the same /64: held back too
    assert limit.failed("2001:db8:1:3::1")[0]  # another /64
    assert all(limit.failed("10.9.3.4")[0] for _ in range(10))  # a trusted proxy
    assert all(limit.failed(None)[0] for _ in range(10))  # no address known


def test_dev_mode_has_no_rate_limits_and_production_has(tmp_path: Path) -> None:
    assert Limits().rates(dev=True) == (0.0, 0.0)
    principal, key = Limits().rates(dev=False)
    assert principal > 0 and key > 0
    assert Limits(principal_rate=0).rates(dev=False)[0] == 0.0  # explicitly off


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    base = tmp_path_factory.mktemp("deadlines")
    config = base / "kmsgate.json"
    config.write_text(json.dumps({"limits": {"body_read_seconds": 1}}))
    with running_gateway(base, "--config", str(config)) as gw:
        yield gw


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", ["/v1/keys/k/sign", "/v1/keys"])  # fast path, FastAPI route
def test_a_client_that_stops_sending_its_body_gets_408_and_is_disconnected(
    impatient: Gateway, path: str
) -> None:
    with impatient.connect() as conn:
        conn.sendall(impatient.post_head(path, "content-length: 100") + b'{"inp')  # no more
        started = time.monotonic()
        reply = b""
        while chunk := conn.recv(65536):  # until the gateway closes the connection
            reply += chunk
        waited = time.monotonic() - started
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), reply
    assert b"request_timeout" in rest and b"connection: close" in rest.lower()
    assert 0.9 < waited < 5, waited
    # a client that sends its body in time is served as usual
    made = httpx.get(f"{impatient.addr}/v1/sys/health", timeout=5)
    assert made.status_code == 200


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("path", "framing", "status"),
    [
        ("/v1/keys/k/sign", "content-length: 1000000000", b"413"),  # fast path
        ("/v1/keys", "content-length: 1000000000", b"413"),  # FastAPI route
        ("/v1/keys/k/sign", "transfer-encoding: chunked", None),  # over the limit as it comes
        ("/v1/keys", "content-encoding: gzip\r\ncontent-length: 1000000", b"415"),
    ],
)
def test_a_reply_before_the_body_ends_the_connection(
    impatient: Gateway, path: str, framing: str, status: bytes | None
) -> None:
    """Refused before its body was read, a request's connection ends after the reply,
    whatever the client goes on sending: the rest of the body was read and dropped at the
    client's pace, with no deadline (a byte a second kept it open for good)."""
    with impatient.connect() as conn:
        conn.sendall(impatient.post_head(path, framing))
        if status is None:  # chunks past the limit (4 MiB), sent at once
            conn.sendall((b"100000\r\n" + b"A" * 0x100000 + b"\r\n") * 5)
        conn.settimeout(0.5)
        reply, started = b"", time.monotonic()
        while time.monotonic() - started < 8:
            try:
                conn.sendall(b"A")  # a byte a second, for as long as the gateway listens
                chunk = conn.recv(65536)
            except TimeoutError:
                time.sleep(0.5)
                continue
            except OSError:  # reset: the gateway closed while we were still sending
                break
            if not chunk:
                break
            reply += chunk
        waited = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 " + (status or b"413")), reply
    assert waited < 5, waited  # ended within the linger, not at the 8 s the client gave up


def _reply_to(gateway: Gateway, *sends: bytes, pause: float = 0.0) -> tuple[bytes, float]:
    """What the gateway answers on a new connection to `sends` (sent `pause` seconds apart),
    read until it closes, and the seconds from the last send to the close."""
    host, port = gateway.addr.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        for data in sends:
            time.sleep(pause)
            conn.sendall(data)
        started = time.monotonic()
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    return reply, time.monotonic() - started


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "sends",
    [
        (),  # a connection that never says anything
        (b"GET /v1/sys/health HTTP/1.1\r\n", b"host: x\r\n"),  # a header now and then
        # a second request on a kept-alive connection, whose head never ends
        (b"GET /v1/sys/health HTTP/1.1\r\nhost: x\r\n\r\nGET /v1/sys/health HTTP/1.1\r\n",),
    ],
)
def test_a_request_head_that_does_not_arrive_in_time_gets_408_and_is_disconnected(
    impatient: Gateway, sends: tuple[bytes, ...]
) -> None:
    reply, waited = _reply_to(impatient, *sends, pause=0.4)
    last = reply.rpartition(b"HTTP/1.1 ")[2]
    assert last.startswith(b"408"), reply
    assert b"request_timeout" in last and b"connection: close" in last.lower()
    assert b"x-content-type-options: nosniff" in last and b"cache-control: no-store" in last
    if len(sends) == 1:  # the first request was answered
        assert reply.startswith(b"HTTP/1.1 200"), reply
    assert waited < 3.5, waited  # 1 s, and a sweep a second
