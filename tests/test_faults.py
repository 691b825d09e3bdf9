"""Fault injection against real components (issue 17 item 6): what the gateway does when
the audit disk fills up, when a key backend dies in the middle of a batch or answers
slowly. A stopped database is tests/test_store_outage.py (503 with Retry-After, never a
500, signing from the caches for `max_staleness_seconds`); `kill -9` under load is
tests/test_crash_loop.py."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import resource
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kmsgate.api.threads import BackendThreads
from kmsgate.audit import AuditEvent
from kmsgate.audit.filesink import RESERVE_BYTES, FileSink
from kmsgate.errors import BackendUnavailable
from tests.components import LOOPBACK
from tests.helpers import b64, create_key, unb64
from tests.openbao import OpenBaoServer, running_openbao
from tests.test_cli import running_gateway
from tests.test_hashivault_gateway import gateway, token_file, vault_config

MESSAGE = "aGVsbG8="
TIMEOUT = 15.0
FILLER_BYTES = 4 << 20
"""The audit log's size before the gateway starts: larger than its SQLite files will grow
in the test, so that the file size limit stops the audit log first."""
HEADROOM = RESERVE_BYTES + (16 << 10)
"""Bytes the audit log may still grow once the limit is set: the room it keeps for the
outcomes of changes under way, and a few dozen records."""


def _fill_audit_log(path: Path, size: int) -> None:
    """A valid chain of filler records, `size` bytes or a little more, at `path`."""
    path.parent.mkdir(parents=True)
    sink = FileSink(path)
    try:
        while path.stat().st_size < size:
            for n in range(1000):
                sink.append(AuditEvent("test.filler", "allow", "ok", f"fill-{n}", "test"))
    finally:
        sink.close()


def _store(data_dir: Path, query: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{data_dir / 'kmsgate.db'}?mode=ro", uri=True) as db:
        return db.execute(query).fetchall()


@pytest.mark.timeout(120)
def test_a_full_audit_disk_refuses_every_operation_and_changes_nothing(tmp_path: Path) -> None:
    """The gateway runs with a file size limit (RLIMIT_FSIZE, as `ulimit -f` or systemd's
    LimitFSIZE set it) that its audit log reaches first (Python ignores SIGXFSZ: a write
    past it would fail with EFBIG, the process lives on). Once less than the reserve is
    left, every operation is 503 audit_unavailable with Retry-After (never a 500), state
    changes before they start: nothing is changed without its records."""
    data_dir = tmp_path / "data"
    log = data_dir / "audit.log"
    _fill_audit_log(log, FILLER_BYTES)
    with running_gateway(tmp_path, data_dir=data_dir) as gw:
        assert gw.process is not None
        root = {"authorization": f"Bearer {gw.root_token}"}

        def call(
            method: str, path: str, body: object = None, headers: dict[str, str] = root
        ) -> httpx.Response:
            return httpx.request(
                method, f"{gw.addr}{path}", json=body, headers=headers, timeout=TIMEOUT
            )

        key = {"name": "k", "type": "ecdsa-p256", "purpose": "p"}
        assert call("POST", "/v1/keys", key).status_code == 201
        limit = log.stat().st_size + HEADROOM
        assert all(p.stat().st_size < limit for p in data_dir.glob("kmsgate.db*")), "test premise"
        resource.prlimit(gw.process.pid, resource.RLIMIT_FSIZE, (limit, limit))
        time.sleep(0.3)  # the sink looks at its room every fsync interval (0.05 s)

        signed = 0
        while (reply := call("POST", "/v1/keys/k/sign", {"input": MESSAGE})).status_code == 200:
            signed += 1
            assert signed < (HEADROOM - RESERVE_BYTES) // 100, "signing into the reserve"
        assert signed > 0 and reply.status_code == 503, reply.text
        # the shortest records (a refused token's) fill what room is left above the reserve
        stranger = {"authorization": "Bearer kmg.0000000000000000.nope"}
        for _ in range(20):
            if (reply := call("GET", "/v1/keys", headers=stranger)).status_code != 401:
                break
        assert reply.status_code == 503, reply.text
        # a token's `started` record is shorter still (by a few bytes, so there may be room
        # for one): what it leaves is too little for any change
        made = 0
        while (reply := call("POST", "/v1/sys/tokens", {"roles": ["reader"]})).status_code == 201:
            made += 1
            assert made < 3, "creating tokens into the reserve"
        assert reply.status_code == 503, reply.text
        for method, path, body in (
            ("POST", "/v1/keys/k/sign", {"input": MESSAGE}),
            ("POST", "/v1/keys", {"name": "after", "type": "ed25519", "purpose": "p"}),
            ("POST", "/v1/keys/k/rotate", None),
            ("POST", "/v1/sys/tokens", {"roles": ["reader"]}),
            ("POST", "/v1/keys/k/disable", None),
        ):
            reply = call(method, path, body)
            assert reply.status_code == 503, (path, reply.status_code, reply.text)
            assert reply.json()["code"] == "audit_unavailable", reply.text
            assert int(reply.headers["retry-after"]) > 0
        assert call("GET", "/v1/sys/health").status_code == 200  # the process lives on
        assert gw.process.poll() is None
        tokens = _store(data_dir, "SELECT count(*) FROM tokens")

    records = log.read_bytes().splitlines(keepends=True)
    assert log.stat().st_size <= limit and records[-1].endswith(b"\n")
    assert b'"after"' not in b"".join(records)  # refused before its started record
    assert _store(data_dir, "SELECT name FROM keys WHERE name = 'after'") == []
    assert _store(data_dir, "SELECT primary_version, state FROM keys WHERE name = 'k'") == [
        (1, "enabled")
    ]
    assert _store(data_dir, "SELECT count(*) FROM tokens") == tokens == [(1 + made,)]


@pytest.mark.timeout(120)
def test_a_backend_dying_mid_batch_reports_what_was_signed(tmp_path: Path) -> None:
    """OpenBao is killed (SIGKILL) once it has answered 3 of the batch's Transit requests
    (10 items each): the reply keeps the 30 signatures made, each of the 70 other items
    carries backend_unavailable, and the audit record says so. Nothing signed at all (the
    next batch, a single sign) is 503 with Retry-After; never a 500."""
    with running_openbao(tmp_path / "bao") as server:
        auth = {"token_file": str(token_file(tmp_path, server.root_token))}
        cfg = vault_config(server.addr, "kmsgate-", **auth, batch_size=10, max_inflight=1)
        with gateway(tmp_path, {**cfg, "timeout": 2, "retry_after": 7}) as (api, admin, vault):
            create_key(api, admin, "batch", "ecdsa-p256", backend="vault")
            pem = api.call("GET", "/v1/keys/batch/public-key", admin).content
            public_key = serialization.load_pem_public_key(pem)
            assert isinstance(public_key, ec.EllipticCurvePublicKey)
            answered = 0

            def kill_after_three(reply: requests.Response, *args: object, **kw: object) -> None:
                nonlocal answered
                answered += "/sign/" in reply.request.path_url
                if answered == 3 and server.process.poll() is None:
                    server.process.kill()
                    server.process.wait()

            vault.http_session.hooks["response"].append(kill_after_three)
            messages = [b"item %d" % n for n in range(100)]
            body = {"batch": [{"input": b64(m)} for m in messages]}
            reply = api.call("POST", "/v1/keys/batch/sign", admin, json=body)
            assert reply.status_code == 200, reply.text
            results = reply.json()["batch"]
            for message, result in zip(messages[:30], results[:30], strict=True):
                signature = unb64(result["signature"])
                public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
            assert {r["error"]["code"] for r in results[30:]} == {"backend_unavailable"}
            assert len(results) == 100 and server.addr not in reply.text
            [record] = api.service.audit.search(action="sign", key="batch").records
            assert record["outcome"] == "ok"
            assert record["detail"] == {"items": 100, "failed": 70}

            for again in (body, {"input": b64(b"one")}):
                down = api.call("POST", "/v1/keys/batch/sign", admin, json=again)
                assert down.status_code == 503, down.text
                assert down.json()["code"] == "backend_unavailable"
                assert down.headers["retry-after"] == "7"


class DelayingProxy:
    """A TCP proxy on loopback in front of `upstream` (host, port) that holds each chunk
    of the upstream's replies for `delay` seconds (0 at first): a slow backend."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.delay = 0.0
        self._listener = socket.create_server((LOOPBACK, 0))
        self.addr = f"http://{LOOPBACK}:{self._listener.getsockname()[1]}"
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._relay, args=(client, server, 0.0), daemon=True).start()
            threading.Thread(target=self._relay, args=(server, client, None), daemon=True).start()

    def _relay(self, source: socket.socket, sink: socket.socket, delay: float | None) -> None:
        """Copy `source` to `sink` (after `delay` s a chunk; None: the proxy's delay)."""
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                time.sleep(self.delay if delay is None else delay)
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()


def _timed_sign(
    addr: str,
    headers: dict[str, str],
    key: str,
    *,
    timeout: float,
    post: Callable[..., httpx.Response] = httpx.post,
) -> tuple[httpx.Response, float]:
    """One sign with `key` through the gateway at `addr` (by `post`: a kept client's, or a
    new connection's), and how long it took."""
    started = time.monotonic()
    url = f"{addr}/v1/keys/{key}/sign"
    reply = post(url, json={"input": MESSAGE}, headers=headers, timeout=timeout)
    return reply, time.monotonic() - started


def _key_that_signs(addr: str, headers: dict[str, str], name: str, backend: str) -> None:
    """Create the ecdsa-p256 key `name` on `backend` and check that it signs."""
    body = {"name": name, "type": "ecdsa-p256", "purpose": "p", "backend": backend}
    made = httpx.post(f"{addr}/v1/keys", json=body, headers=headers, timeout=TIMEOUT)
    assert made.status_code == 201, made.text
    assert _timed_sign(addr, headers, name, timeout=TIMEOUT)[0].status_code == 200


@pytest.mark.timeout(120)
def test_a_slow_backend_times_out_without_stalling_other_keys(
    tmp_path: Path, openbao_server: OpenBaoServer
) -> None:
    """OpenBao answers only after 5 s (a proxy holds its replies): signs with its key are
    503 backend_unavailable with Retry-After after the backend's `timeout` (1 s; 2 s for a
    sign queued behind the `max_inflight` requests already waiting), while signs with a
    local key through the same gateway go on at full speed (the slow calls wait in
    threads, not on the event loop)."""
    proxy = DelayingProxy((LOOPBACK, openbao_server.port))
    auth = {"token_file": str(token_file(tmp_path, openbao_server.root_token))}
    vault = vault_config(proxy.addr, f"t{secrets.token_hex(4)}-", **auth, timeout=1)
    config = tmp_path / "kmsgate.yaml"
    config.write_text(json.dumps({"backends": {"local": {"type": "softkms"}, "vault": vault}}))
    try:
        with running_gateway(tmp_path, "--config", str(config)) as gw:
            root = {"authorization": f"Bearer {gw.root_token}"}

            sign = functools.partial(_timed_sign, gw.addr, root, timeout=TIMEOUT)
            for name, backend in (("slow", "vault"), ("fast", "local")):
                _key_that_signs(gw.addr, root, name, backend)

            proxy.delay = 5.0
            # the local signs on one kept connection: their count measures the gateway, not
            # the set-up of a connection each (~50 ms on a loaded machine)
            with ThreadPoolExecutor(8) as pool, httpx.Client() as kept:
                slow = [pool.submit(sign, "slow") for _ in range(8)]
                fast: list[tuple[httpx.Response, float]] = []
                while not all(f.done() for f in slow):
                    fast.append(sign("fast", post=kept.post))
                for future in slow:
                    reply, took = future.result()
                    assert reply.status_code == 503, reply.text
                    assert reply.json()["code"] == "backend_unavailable"
                    assert int(reply.headers["retry-after"]) > 0
                    assert took < 3, f"a 1 s backend timeout took {took:.2f} s"
            assert {reply.status_code for reply, _ in fast} == {200}
            # a stalled loop would hold each for the backend's 1 s: three in all, at most
            assert len(fast) >= 10, "the local key hardly signed meanwhile"
            # A stalled loop holds a local sign for the backend's whole 1 s timeout; a loaded
            # 2-core CI machine can delay one sign by half of that, never by all of it.
            took_fast = sorted(took for _, took in fast)
            assert took_fast[len(took_fast) // 2] < 0.25, "local signs slowed down meanwhile"
            assert took_fast[-1] < 1.0, "the event loop stalled for a backend timeout"
    finally:
        proxy.close()


HUNG_S = 6
"""The hung backend's timeout (its proxy holds every request for 10 s)."""


def test_a_hung_backend_never_holds_the_threads_of_another(
    tmp_path: Path, openbao_server: OpenBaoServer
) -> None:
    """One backend stops answering while many requests use it: they hold only that
    backend's threads (`kmsgate.api.threads`), so a sign with a key of another remote
    backend still answers at once. Before, they held the whole shared thread pool (40
    threads) for their backend's timeout, and every blocking backend waited behind them."""
    proxy = DelayingProxy((LOOPBACK, openbao_server.port))
    auth = {"token_file": str(token_file(tmp_path, openbao_server.root_token))}
    backends = {
        "hung": vault_config(proxy.addr, f"t{secrets.token_hex(4)}-", **auth, timeout=HUNG_S),
        "other": vault_config(openbao_server.addr, f"t{secrets.token_hex(4)}-", **auth),
    }
    config = tmp_path / "kmsgate.yaml"
    config.write_text(json.dumps({"backends": {"local": {"type": "softkms"}, **backends}}))
    try:
        with running_gateway(tmp_path, "--config", str(config)) as gw:
            root = {"authorization": f"Bearer {gw.root_token}"}

            sign = functools.partial(_timed_sign, gw.addr, root, timeout=60)
            for backend in backends:
                _key_that_signs(gw.addr, root, backend, backend)

            proxy.delay = 10.0
            with ThreadPoolExecutor(48) as pool:
                hung = [pool.submit(sign, "hung") for _ in range(48)]
                time.sleep(1.0)  # every one of them is waiting on the hung backend by now
                others = [sign("other") for _ in range(5)]
                for future in hung:
                    reply, _ = future.result()
                    assert reply.status_code == 503, reply.text
                    assert reply.json()["code"] == "backend_unavailable"
            assert {reply.status_code for reply, _ in others} == {200}
            slowest = max(took for _, took in others)
            # waiting behind the hung requests would take their whole timeout, or more; half
            # of it leaves room for a slow, loaded machine
            assert slowest < HUNG_S / 2, f"a sign on another backend took {slowest:.2f} s"
    finally:
        proxy.delay = 0.0
        proxy.close()


def test_requests_beyond_a_backends_queue_are_refused_at_once() -> None:
    """With a backend's threads busy and its queue full, the next request is refused
    (503, Retry-After 1) without waiting; those already queued still run in turn."""
    release = threading.Event()

    async def scenario() -> list[object]:
        threads = BackendThreads(threads=1, queue=1)
        running = asyncio.ensure_future(threads.run("hsm", release.wait, 10))
        queued = asyncio.ensure_future(threads.run("hsm", lambda: "queued"))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="not keeping up") as refused:
            await threads.run("hsm", lambda: "refused")
        assert time.monotonic() - started < 0.1
        assert refused.value.retry_after == 1
        assert await threads.run("vault", lambda: "another backend") == "another backend"
        release.set()
        return [await running, await queued]

    assert asyncio.run(scenario()) == [True, "queued"]
