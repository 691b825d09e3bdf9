"""A gateway whose PostgreSQL goes away for a while: what needs the store answers 503 with
Retry-After (never 500), readiness says so, signing goes on from the caches for
`max_staleness_seconds` (then 503 too), and once the database is back everything works
again without a restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.components import (
    PostgresServer,
    fresh_postgres_database,
    postgres_frozen,
    postgres_stopped,
)
from tests.test_cli import running_gateway, setup_key

MESSAGE = "aGVsbG8="
TIMEOUT = 15.0
STALE_S = 4


@pytest.mark.postgres
def test_a_database_outage_is_503_and_heals_by_itself(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    with fresh_postgres_database(postgres_server) as url:
        config = tmp_path / "kmsgate.yaml"
        # the test server trusts loopback: any password is accepted, and none is ever shown
        url = url.replace("@", ":pw-never-shown@", 1)
        config.write_text(json.dumps({"database_url": url, "max_staleness_seconds": STALE_S}))
        with running_gateway(tmp_path, "--config", str(config)) as gw:
            root = {"authorization": f"Bearer {gw.root_token}"}
            banner = gw.output.read_text()
            shown = url.replace("pw-never-shown", "***").replace("+psycopg", "")
            assert f"store {shown}" in banner, banner
            assert "pw-never-shown" not in banner

            def call(method: str, path: str, body: object = None) -> httpx.Response:
                return httpx.request(
                    method, f"{gw.addr}{path}", json=body, headers=root, timeout=TIMEOUT
                )

            made = call("POST", "/v1/keys", {"name": "k", "type": "ecdsa-p256", "purpose": "p"})
            assert made.status_code == 201, made.text
            assert call("POST", "/v1/keys/k/sign", {"input": MESSAGE}).status_code == 200
            assert call("GET", "/v1/sys/ready").status_code == 200

            with postgres_stopped(postgres_server):
                # still in rotation while the caches serve: every replica shares the store
                ready = call("GET", "/v1/sys/ready")
                assert ready.status_code == 200, ready.text
                assert ready.json()["status"] == "degraded"
                assert ready.json()["store"]["ok"] is False
                assert "from the caches" in ready.json()["store"]["detail"]
                signed = call("POST", "/v1/keys/k/sign", {"input": MESSAGE})
                assert signed.status_code == 200, signed.text  # from the caches
                shown = call("GET", "/v1/keys/k")
                assert shown.status_code == 200 and shown.json()["versions"][0]["uses"] is None
                for method, path, body in (
                    ("POST", "/v1/keys", {"name": "k2", "type": "ed25519", "purpose": "p"}),
                    ("POST", "/v1/keys/k/rotate", None),
                    ("POST", "/v1/sys/tokens", {"roles": ["reader"]}),
                ):
                    reply = call(method, path, body)
                    assert reply.status_code == 503, (path, reply.status_code, reply.text)
                    assert int(reply.headers["retry-after"]) > 0
                    assert reply.headers["content-type"] == "application/problem+json"
                assert call("GET", "/v1/sys/health").status_code == 200  # alive all along
                # the caches go on only so long: then a disable made elsewhere could be missed
                deadline = time.monotonic() + STALE_S + 5
                while (
                    signed := call("POST", "/v1/keys/k/sign", {"input": MESSAGE})
                ).status_code == 200:
                    assert time.monotonic() < deadline, "still signing from stale caches"
                    time.sleep(0.5)
                assert signed.status_code == 503 and int(signed.headers["retry-after"]) > 0
                for path in ("/v1/keys/k", "/v1/keys"):  # one key or the list: the same rule
                    listed = call("GET", path)
                    assert listed.status_code == 503, (path, listed.text)
                ready = call("GET", "/v1/sys/ready")
                assert ready.status_code == 503, ready.text
                assert ready.json()["status"] == "unavailable"
                assert ready.json()["store"]["ok"] is False

            deadline = time.monotonic() + 20
            while call("GET", "/v1/sys/ready").status_code != 200:
                assert time.monotonic() < deadline, "not ready again after the database came back"
                time.sleep(0.5)
            again = call("POST", "/v1/keys", {"name": "k3", "type": "ed25519", "purpose": "p"})
            assert again.status_code == 201, again.text
            assert call("POST", "/v1/keys/k3/sign", {"input": MESSAGE}).status_code == 200
            assert call("POST", "/v1/keys/k/rotate").status_code == 200


@pytest.mark.postgres
def test_a_frozen_database_is_503_in_bounded_time_not_a_hang(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """A server that stops answering without closing its connections (frozen, or behind a
    network that drops nothing): what needs the store answers 503 with Retry-After within
    the store's deadline (kmsgate.store.stall), reads answer from the caches, and once the
    server answers again everything works."""
    with fresh_postgres_database(postgres_server) as url:
        config = tmp_path / "kmsgate.yaml"
        config.write_text(json.dumps({"database_url": url}))
        with running_gateway(tmp_path, "--config", str(config)) as gw:
            root = {"authorization": f"Bearer {gw.root_token}"}

            def call(method: str, path: str, body: object = None) -> httpx.Response:
                return httpx.request(
                    method, f"{gw.addr}{path}", json=body, headers=root, timeout=40
                )

            made = call("POST", "/v1/keys", {"name": "k", "type": "ecdsa-p256", "purpose": "p"})
            assert made.status_code == 201, made.text
            with postgres_frozen(postgres_server):
                for method, path, body, status in (
                    ("POST", "/v1/keys", {"name": "k2", "type": "ed25519", "purpose": "p"}, 503),
                    ("POST", "/v1/keys/k/rotate", None, 503),
                    ("GET", "/v1/keys/k", None, 200),  # from the caches
                    ("POST", "/v1/keys/k/sign", {"input": MESSAGE}, 200),
                ):
                    started = time.monotonic()
                    reply = call(method, path, body)
                    took = time.monotonic() - started
                    assert reply.status_code == status, (path, reply.status_code, reply.text)
                    assert took < 20, (path, took)
                    if status == 503:
                        assert int(reply.headers["retry-after"]) > 0
                started = time.monotonic()
                ready = call("GET", "/v1/sys/ready")
                assert time.monotonic() - started < 20
                assert ready.json()["store"]["ok"] is False, ready.text
            deadline = time.monotonic() + 30
            while (again := call("POST", "/v1/keys/k/rotate")).status_code != 200:
                assert time.monotonic() < deadline, again.text
                time.sleep(0.5)
            assert again.json()["primary_version"] == 2


@pytest.mark.postgres
def test_readiness_answers_degraded_in_time_while_the_database_is_frozen(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """An orchestrator's readiness probe gives up after a few seconds: while PostgreSQL is
    frozen, /v1/sys/ready answers `degraded` (the caches still sign) within the store's
    ping deadline each time, not after a transaction's 10 s; signing goes on meanwhile."""
    with fresh_postgres_database(postgres_server) as url:
        config = tmp_path / "kmsgate.yaml"
        config.write_text(json.dumps({"database_url": url}))
        with running_gateway(tmp_path, "--config", str(config)) as gw:
            root = {"authorization": f"Bearer {gw.root_token}"}
            setup_key(gw, "k", "ecdsa-p256", "p")
            # its connection stays in the pool: the next check takes it (frozen, it waits)
            assert httpx.get(f"{gw.addr}/v1/sys/ready", timeout=TIMEOUT).status_code == 200
            with postgres_frozen(postgres_server):
                for _ in range(4):
                    started = time.monotonic()
                    ready = httpx.get(f"{gw.addr}/v1/sys/ready", timeout=TIMEOUT)
                    took = time.monotonic() - started
                    assert took < 4, took  # PING_SECONDS and the watcher's half-second tick
                    assert ready.status_code == 200, ready.text
                    assert ready.json()["status"] == "degraded", ready.text
                    signed = httpx.post(
                        f"{gw.addr}/v1/keys/k/sign",
                        json={"input": MESSAGE},
                        headers=root,
                        timeout=TIMEOUT,
                    )
                    assert signed.status_code == 200, signed.text
