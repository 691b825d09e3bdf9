"""Several gateways on one store (worker processes, replicas): what is written through one is
usable through every other at once, caches reload only the aggregate and the items that moved,
a change reaches every cache within a second, and scheduled work is done once."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from kmsgate.auth import Principal
from kmsgate.backends.base import BackendKey
from kmsgate.backends.softkms import SoftKmsBackend
from kmsgate.bootstrap import build_service, prepare_dev_data_dir
from kmsgate.catalogue import KeyState
from kmsgate.config import load_settings
from kmsgate.jobs import Jobs, PostgresLeaderLock, leader_lock
from kmsgate.service import Ctx
from kmsgate.service.requests import NewKey
from kmsgate.store.stall import SERVER_KEEPALIVE
from tests.components import PostgresServer, fresh_postgres_database
from tests.gateway import Api, open_gateway
from tests.test_cli import running_gateway

MESSAGE = base64.b64encode(b"replicated").decode()


def _reloads(api: Api, token: str) -> dict[tuple[str, str], float]:
    """kmsgate_cache_reloads_total by (cache, scope), as /metrics shows it."""
    text = api.call("GET", "/metrics", token).text
    counts = {}
    for line in text.splitlines():
        if line.startswith("kmsgate_cache_reloads_total{"):
            labels, value = line.rsplit(" ", 1)
            cache = labels.split('cache="')[1].split('"')[0]
            scope = labels.split('scope="')[1].split('"')[0]
            counts[cache, scope] = float(value)
    return counts


def test_two_gateways_on_one_store(tmp_path: Path, database_url: str) -> None:
    with (
        open_gateway(tmp_path, database_url=database_url) as (a, admin_a),
        open_gateway(tmp_path, database_url=database_url) as (b, admin_b),
    ):
        created = a.call(
            "POST",
            "/v1/keys",
            admin_a,
            json={"name": "shared", "type": "ecdsa-p256", "purpose": "p"},
        )
        assert created.status_code == 201, created.text
        # made through a, signed through b at once: b reads the unknown name through
        signed = b.call("POST", "/v1/keys/shared/sign", admin_b, json={"input": MESSAGE})
        assert signed.status_code == 200, signed.text
        # a's token works on b at once too
        assert b.call("GET", "/v1/keys/shared", admin_a).status_code == 200

        b.service.catalogue.refresh()
        before = _reloads(b, admin_b)
        assert before["keys", "full"] == 1
        for _ in range(100):
            reply = a.call("POST", "/v1/sys/tokens", admin_a, json={"roles": ["reader"]})
            assert reply.status_code == 201
        b.service.catalogue.refresh()
        b.service.tokens.refresh()
        after = _reloads(b, admin_b)
        assert after["keys", "full"] == before["keys", "full"]
        assert after["keys", "item"] == before["keys", "item"]
        assert after["tokens", "full"] == before["tokens", "full"]
        assert after["tokens", "item"] >= before["tokens", "item"] + 100

        # a change through b to a key a just rotated is decided on the key as stored
        for version in range(2, 6):
            assert a.call("POST", "/v1/keys/shared/rotate", admin_a).status_code == 200
            shown = b.call("GET", "/v1/keys/shared", admin_b).json()
            assert shown["primary_version"] == version
            raised = b.call(
                "PATCH", "/v1/keys/shared", admin_b, json={"min_decrypt_version": version}
            )
            assert raised.status_code == 200, raised.text

        # a disabled key is refused through the other gateway within a second
        assert a.call("POST", "/v1/keys/shared/disable", admin_a).status_code == 200
        started = time.monotonic()
        while True:
            reply = b.call("POST", "/v1/keys/shared/sign", admin_b, json={"input": MESSAGE})
            if reply.status_code == 409:
                break
            assert reply.status_code == 200 and time.monotonic() - started < 3.0
            time.sleep(0.02)
        assert reply.json()["code"] == "key_disabled"
        assert time.monotonic() - started < 1.5


def test_two_workers_create_then_sign_at_once_never_404(tmp_path: Path) -> None:
    """`serve --workers 2`, a new connection per request (so requests land on either worker):
    200 times, create a key and sign with it straight away."""
    with running_gateway(tmp_path, "--workers", "2") as gw:
        headers = {"authorization": f"Bearer {gw.root_token}", "connection": "close"}
        statuses = []
        with httpx.Client(base_url=gw.addr, headers=headers, timeout=30) as client:
            for i in range(200):
                body = {"name": f"burst-{i}", "type": "ed25519", "purpose": "p"}
                assert client.post("/v1/keys", json=body).status_code == 201
                reply = client.post(f"/v1/keys/burst-{i}/sign", json={"input": MESSAGE})
                statuses.append(reply.status_code)
        assert statuses == [200] * 200, sorted(set(statuses))


def test_two_workers_see_each_others_changes_at_once_without_polling(tmp_path: Path) -> None:
    """`serve --workers 2` on SQLite, with the caches' poll set to 60 s: a change through one
    worker reaches the other in well under a second (each reads the database's data
    version), and a change to a key is decided on the key as stored, not on a worker's copy:
    rotate, then raise min_decrypt_version to the new version, never 400."""
    config = tmp_path / "kmsgate.yaml"
    config.write_text(json.dumps({"cache_refresh_seconds": 60}))
    with running_gateway(tmp_path, "--workers", "2", "--config", str(config)) as gw:
        root = {"authorization": f"Bearer {gw.root_token}", "connection": "close"}
        with httpx.Client(base_url=gw.addr, headers=root, timeout=30) as client:
            body = {"name": "moving", "type": "aes-256-gcm", "purpose": "p"}
            assert client.post("/v1/keys", json=body).status_code == 201
            for version in range(2, 12):
                assert client.post("/v1/keys/moving/rotate").status_code == 200
                shown = client.get("/v1/keys/moving").json()
                assert shown["primary_version"] == version, shown
                raised = client.patch("/v1/keys/moving", json={"min_decrypt_version": version})
                assert raised.status_code == 200, raised.text

            made = client.post("/v1/sys/tokens", json={"roles": ["admin"]}).json()
            token = {"authorization": f"Bearer {made['token']}", "connection": "close"}
            assert client.get("/v1/keys", headers=token).status_code == 200
            assert client.delete(f"/v1/sys/tokens/{made['id']}").status_code in (200, 204)
            started = time.monotonic()
            while client.get("/v1/keys", headers=token).status_code != 401:
                assert time.monotonic() - started < 2, "a worker still takes the revoked token"
            time.sleep(0.5)  # every worker has followed by now: none takes it any more
            assert {client.get("/v1/keys", headers=token).status_code for _ in range(40)} == {401}


def test_a_due_key_is_destroyed_by_exactly_one_of_four_processes(
    tmp_path: Path,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two replicas x two workers (four services, each with its own leader lock) tick at the
    same moment: one leads, and the key's material is destroyed once."""
    destroyed: list[str] = []
    real_destroy = SoftKmsBackend.destroy

    def counting_destroy(self: SoftKmsBackend, ref: BackendKey) -> None:
        destroyed.append(ref.ref)
        real_destroy(self, ref)

    monkeypatch.setattr(SoftKmsBackend, "destroy", counting_destroy)
    caplog.set_level(logging.INFO, logger="kmsgate.jobs")
    settings = load_settings(
        dev=True, data_dir=tmp_path / "data", database_url=database_url, env="test"
    )
    prepare_dev_data_dir(settings)
    services = [build_service(settings) for _ in range(4)]
    locks = [leader_lock(database_url) for _ in services]
    try:
        admin = Principal(id="test", kind="token", roles=("admin",))
        first = services[0]
        first.keys.create(admin, Ctx("t"), NewKey(name="doomed", type="ed25519", purpose="p"))
        first.keys.rotate(admin, Ctx("t"), "doomed")
        first.keys.schedule_deletion(admin, Ctx("t"), "doomed", pending_days=7)
        later = datetime.now(UTC) + timedelta(days=8)
        start = threading.Barrier(len(services))
        led: list[bool] = []

        def tick(jobs: Jobs) -> None:
            start.wait(timeout=10)
            led.append(jobs.run_due(later))

        schedulers = [Jobs(service, lock) for service, lock in zip(services, locks, strict=True)]
        threads = [threading.Thread(target=tick, args=(jobs,)) for jobs in schedulers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(led) == [False, False, False, True]
        leads = [r.getMessage() for r in caplog.records if "the scheduled jobs" in r.getMessage()]
        assert len(leads) == 1 and "now leads the scheduled jobs" in leads[0], leads
        assert sorted(destroyed) == ["softkms:doomed/1", "softkms:doomed/2"]
        for service in services:
            service.catalogue.refresh()
            assert service.catalogue.get("doomed").state is KeyState.DESTROYED
        # the leader keeps leading; a second round destroys nothing more
        again = [Jobs(s, lock).run_due(later) for s, lock in zip(services, locks, strict=True)]
        assert sorted(again) == [False, False, False, True]
        assert len(destroyed) == 2
        # the leader stops (its shutdown): it says so, and another process takes over
        caplog.clear()
        leader = schedulers[again.index(True)]
        leader.close()
        rest = [jobs for jobs in schedulers if jobs is not leader]
        assert sorted(jobs.run_due(later) for jobs in rest) == [False, False, True]
        changes = [r.getMessage() for r in caplog.records if "the scheduled jobs" in r.getMessage()]
        assert [m.split(") ")[1] for m in changes] == [
            "no longer leads the scheduled jobs",
            "now leads the scheduled jobs",
        ]
    finally:
        for lock in locks:
            lock.close()
        for service in services:
            service.close()


@pytest.mark.postgres
def test_the_server_ends_a_silent_leaders_session_in_seconds(
    postgres_server: PostgresServer,
) -> None:
    """The jobs' leader holds a session advisory lock. A leader whose host vanishes sends
    no FIN: PostgreSQL frees the lock only when it finds the session dead, after the
    kernel's two hours of keepalive by default. Every kmsgate session asks the server for
    keepalives of its own (`SERVER_KEEPALIVE`), the leader's too; an operator's `options`
    in the URL stand instead."""
    with fresh_postgres_database(postgres_server) as url:
        lock = leader_lock(url)
        try:
            assert isinstance(lock, PostgresLeaderLock) and lock.acquire()
            session = lock._conn
            assert session is not None
            for name, value in SERVER_KEEPALIVE.items():
                shown = session.execute(sa.text(f"SHOW {name}")).scalar()
                assert shown == str(value), (name, shown)
        finally:
            lock.close()
        own = leader_lock(url + "?options=-c%20tcp_keepalives_idle%3D42")
        try:
            assert isinstance(own, PostgresLeaderLock) and own.acquire()
            assert own._conn is not None
            assert own._conn.execute(sa.text("SHOW tcp_keepalives_idle")).scalar() == "42"
        finally:
            own.close()


def _set_read_only(server: PostgresServer, url: str, on: bool) -> None:
    """Make the database of `url` take no writes from new sessions (`on`), as a failover
    that left the gateway's address on a standby does, or take them again; sessions open
    now are ended, so that every next one sees it."""
    import psycopg
    from psycopg import sql

    name = sa.engine.make_url(url).database
    assert name
    setting = sql.SQL(
        "SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only"
    )
    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} ").format(sql.Identifier(name)) + setting)
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )


@pytest.mark.postgres
def test_a_read_only_store_is_a_503_and_the_jobs_thread_goes_on(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """After a failover the store's address leads to a standby: writes fail with
    PostgreSQL's read-only error (psycopg's InternalError). A change is 503, not 500,
    readiness says the store is read-only, and the background thread that flushes key usage
    and runs the leader's jobs goes on (it died on that error, keeping the leader lock: no
    scheduled job ran on any replica until the process restarted)."""
    with (
        fresh_postgres_database(postgres_server) as url,
        open_gateway(tmp_path, database_url=url) as (api, admin),
    ):

        def create(name: str) -> httpx.Response:
            body = {"name": name, "type": "ecdsa-p256", "purpose": "p"}
            reply: httpx.Response = api.call("POST", "/v1/keys", admin, json=body)
            return reply

        created = create("k")
        assert created.status_code == 201, created.text
        _set_read_only(postgres_server, url, True)
        try:
            signed = api.call("POST", "/v1/keys/k/sign", admin, json={"input": "bQ=="})
            assert signed.status_code == 200, signed.text  # from the caches; its use is to flush
            for _ in range(2):  # the first may meet a session that was ended
                refused = create("k2")
                assert refused.status_code == 503, refused.text
            ready = api.call("GET", "/v1/sys/ready", admin).json()
            assert "read-only" in ready["store"]["detail"], ready
            time.sleep(3)  # the jobs thread flushes the key's use each second: refused
            assert "kmsgate-jobs" in {t.name for t in threading.enumerate()}
        finally:
            _set_read_only(postgres_server, url, False)
        for _ in range(2):
            again = create("k2")
            if again.status_code == 201:
                break
        assert again.status_code == 201, again.text
