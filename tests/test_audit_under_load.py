"""Under concurrent load on a two-worker gateway, policy and audit run on every request:
each signature answered has its audit record, and each refusal its deny record."""

from __future__ import annotations

import base64
import threading
from collections import Counter
from pathlib import Path

import httpx

from kmsgate.audit import AuditFile, chain_paths, iter_records
from tests.test_cli import running_gateway

CLIENTS = 8
REQUESTS_PER_CLIENT = 150
DENIED_EVERY = 10
"""Every tenth request of each client comes from a token whose role may not sign."""


def test_every_signature_and_every_refusal_under_load_has_its_audit_record(
    tmp_path: Path,
) -> None:
    with running_gateway(tmp_path, "--workers", "2") as gw:
        root = {"Authorization": f"Bearer {gw.root_token}"}
        with httpx.Client(base_url=gw.addr, timeout=30.0) as client:
            made = client.post(
                "/v1/keys",
                json={"name": "loaded", "type": "ecdsa-p256", "purpose": "load"},
                headers=root,
            )
            assert made.status_code == 201, made.text
            minted = client.post("/v1/sys/tokens", json={"roles": ["reader"]}, headers=root)
            assert minted.status_code == 201, minted.text
        outsider = {"Authorization": f"Bearer {minted.json()['token']}"}
        statuses: Counter[tuple[str, int]] = Counter()
        lock = threading.Lock()

        def client_run(n: int) -> None:
            body = {"input": base64.b64encode(f"client {n}".encode()).decode()}
            with httpx.Client(base_url=gw.addr, timeout=30.0) as http:
                for i in range(REQUESTS_PER_CLIENT):
                    who = "outsider" if i % DENIED_EVERY == 0 else "root"
                    reply = http.post(
                        "/v1/keys/loaded/sign",
                        json=body,
                        headers=outsider if who == "outsider" else root,
                    )
                    with lock:
                        statuses[who, reply.status_code] += 1

        threads = [threading.Thread(target=client_run, args=(n,)) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    # the gateway has stopped: its audit log is complete and fsynced
    signed = statuses["root", 200]
    denied = statuses["outsider", 403]
    total = CLIENTS * REQUESTS_PER_CLIENT
    assert signed + denied == total, statuses
    assert denied == CLIENTS * (REQUESTS_PER_CLIENT // DENIED_EVERY)
    log = gw.data_dir / "audit.log"
    report = AuditFile(log).verify()
    assert report.ok, report.reason
    # one chain per worker
    assert report.chains == 2
    records = [record for chain in chain_paths(log) for record in iter_records(chain)]
    outcomes = Counter((r["decision"], r["outcome"]) for r in records if r["action"] == "sign")
    assert outcomes == {("allow", "ok"): signed, ("deny", "policy_denied"): denied}, outcomes
