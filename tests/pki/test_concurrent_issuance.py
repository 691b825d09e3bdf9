"""Ten issuers at once against `serve --workers 2`: no duplicate serial, every certificate in
the inventory, the audit chain intact."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509

from kmsgate.audit import AuditFile
from tests.pki.ceremony import OfflineRoot, leaf_csr, make_intermediate
from tests.test_cli import running_gateway

ISSUERS = 10
EACH = 15


class HttpApi:
    """The `Api.call` shape over a real server (a new connection per request, so requests
    land on either worker)."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def call(self, method: str, path: str, token: str | None, **kwargs: Any) -> httpx.Response:
        headers = {"connection": "close"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        return self.client.request(method, path, headers=headers, **kwargs)


def test_concurrent_issuers_on_two_workers(tmp_path: Path) -> None:
    with (
        running_gateway(tmp_path, "--workers", "2") as gw,
        httpx.Client(base_url=gw.addr, timeout=60) as client,
    ):
        api = HttpApi(client)
        make_intermediate(api, gw.root_token, OfflineRoot(), name="burst")  # type: ignore[arg-type]
        serials: list[str] = []
        failures: list[str] = []
        lock = threading.Lock()

        def issuer(n: int) -> None:
            for i in range(EACH):
                _, csr = leaf_csr(x509.DNSName(f"w{n}-{i}.lab"))
                reply = api.call(
                    "POST",
                    "/v1/pki/cas/burst/issue",
                    gw.root_token,
                    json={"csr": csr, "profile": "server"},
                )
                with lock:
                    if reply.status_code == 200:
                        serials.append(reply.json()["serial"])
                    else:
                        failures.append(f"{reply.status_code} {reply.text[:200]}")

        threads = [threading.Thread(target=issuer, args=(n,)) for n in range(ISSUERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert failures == []
        assert len(serials) == len(set(serials)) == ISSUERS * EACH
        listed = api.call("GET", "/v1/pki/certs?ca=burst&limit=1000", gw.root_token).json()
        assert sorted(c["serial"] for c in listed["certs"]) == sorted(serials)
        audit_path = gw.data_dir / "audit.log"
    report = AuditFile(audit_path).verify()
    assert report.ok, report
