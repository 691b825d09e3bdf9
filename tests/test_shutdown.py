"""SIGTERM under load: the gateway stops accepting, finishes what is in flight, closes its
audit chains and exits 0; no request gets a 5xx, and every signature it answered is in an
intact audit log."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from kmsgate.audit import AuditFile
from tests.test_cli import running_gateway

MESSAGE = "aGVsbG8="


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_drains_in_flight_requests_and_keeps_every_record(
    tmp_path: Path, workers: str
) -> None:
    """One worker (in the serving process) or several (under a supervisor): the same."""
    answered: list[int] = []
    lock = threading.Lock()
    with running_gateway(tmp_path, "--workers", workers) as gw:
        assert gw.process is not None
        root = {"authorization": f"Bearer {gw.root_token}"}
        body = {"name": "drained", "type": "ecdsa-p256", "purpose": "p"}
        assert httpx.post(f"{gw.addr}/v1/keys", json=body, headers=root).status_code == 201
        stop = threading.Event()

        def hammer() -> None:
            with httpx.Client(base_url=gw.addr, headers=root, timeout=10) as client:
                while not stop.is_set():
                    try:
                        reply = client.post("/v1/keys/drained/sign", json={"input": MESSAGE})
                    except httpx.TransportError:
                        return  # the server closed its door: no reply, nothing done
                    with lock:
                        answered.append(reply.status_code)

        threads = [threading.Thread(target=hammer) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        os.kill(gw.process.pid, signal.SIGTERM)
        code = gw.process.wait(timeout=25)
        stop.set()
        for t in threads:
            t.join(timeout=15)
    assert code == 0
    assert answered and set(answered) == {200}, sorted(set(answered))
    audit = AuditFile(gw.data_dir / "audit.log")
    assert audit.verify().ok
    signed = [
        r
        for r in audit.search(action="sign", key="drained", limit=1_000_000).records
        if r["outcome"] == "ok"
    ]
    assert len(signed) >= len(answered)


def test_a_stopping_gateway_with_workers_refuses_new_connections(tmp_path: Path) -> None:
    """SIGTERM to the supervisor of two workers, one of them finishing a request: a new
    connection is refused (safe to retry) rather than accepted and reset once the request
    was sent (the supervisor kept listening while no worker accepted any more)."""
    with running_gateway(tmp_path, "--workers", "2") as gw:
        assert gw.process is not None
        with gw.connect() as in_flight:
            head = gw.post_head("/v1/keys", "content-length: 54")
            in_flight.sendall(head + b'{"name": "late"')  # the rest comes later
            time.sleep(0.5)
            os.kill(gw.process.pid, signal.SIGTERM)
            time.sleep(2)  # the supervisor and the workers have stopped accepting
            assert gw.process.poll() is None  # still finishing the request in flight
            with pytest.raises(ConnectionRefusedError):
                gw.connect().close()
            in_flight.sendall(b', "type": "ecdsa-p256", "purpose": "p"}')
            reply = in_flight.recv(65536)
        assert reply.startswith(b"HTTP/1.1 201 "), reply
        assert gw.process.wait(timeout=25) == 0
