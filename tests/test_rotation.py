"""Scheduled rotation (`rotation_period`, Keys.rotate_due run by the jobs leader every
second): a real gateway with two workers rotates a key once per period, audited as
`system`, and leaves keys without a period, or disabled, alone."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from kmsgate.audit import AuditFile
from tests.test_cli import run_cli, running_gateway

TIMEOUT = 10.0
PERIOD_S = 2


def _poll(get: Callable[[], Any], done: Callable[[Any], bool], seconds: float) -> Any:
    """`get()` until `done` holds for its value or `seconds` pass; the last value (requests
    land on either worker: a value is judged as it was read, not read again)."""
    deadline = time.monotonic() + seconds
    while not done(value := get()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def test_a_key_rotates_once_per_period_with_two_workers(tmp_path: Path) -> None:
    with running_gateway(
        tmp_path, "--workers", "2", KMSGATE_LIMITS__MIN_ROTATION_SECONDS=str(PERIOD_S)
    ) as gw:
        root = {"authorization": f"Bearer {gw.root_token}"}

        def create(name: str, **extra: object) -> None:
            body = {"name": name, "type": "ecdsa-p256", "purpose": "general", **extra}
            made = httpx.post(f"{gw.addr}/v1/keys", json=body, headers=root, timeout=TIMEOUT)
            assert made.status_code == 201, made.text

        def key(name: str) -> dict[str, Any]:
            reply = httpx.get(f"{gw.addr}/v1/keys/{name}", headers=root, timeout=TIMEOUT)
            assert reply.status_code == 200, reply.text
            body: dict[str, Any] = reply.json()
            return body

        made = run_cli(
            ("keys", "create", "rotating", "--type", "ecdsa-p256",
             "--rotation-period", f"{PERIOD_S}s"),
            gw.env(),
        )  # fmt: skip
        assert made.rc == 0 and '"rotation_period": "2s"' in made.out, str(made)
        create("still")
        create("paused", rotation_period=f"{PERIOD_S}s")
        disabled = httpx.post(f"{gw.addr}/v1/keys/paused/disable", headers=root, timeout=TIMEOUT)
        assert disabled.status_code == 200
        assert "next_rotation" in key("rotating")
        # either worker answers: the one that did not disable it follows within a refresh
        paused = _poll(lambda: key("paused"), lambda k: k["state"] == "disabled", 3)
        assert "next_rotation" not in paused

        for _ in range(10):  # either worker answers; the other follows within a refresh
            due = run_cli(("keys", "list", "--due"), gw.env())
            if "rotating" in due.out:
                break
            time.sleep(0.3)
        assert due.rc == 0 and "rotating" in due.out and "still" not in due.out, str(due)

        rotated = _poll(
            lambda: key("rotating"), lambda k: k["primary_version"] >= 3, 4 * PERIOD_S + 3
        )
        assert rotated["primary_version"] >= 3
        assert key("still")["primary_version"] == 1 and key("paused")["primary_version"] == 1

        # every worker counts its uses in memory; GET adds what all have flushed (each second)
        for _ in range(10):
            signed = httpx.post(
                f"{gw.addr}/v1/keys/still/sign",
                json={"input": "aGk="},
                headers=root,
                timeout=TIMEOUT,
            )  # new connections: both workers sign
            assert signed.status_code == 200
        still = _poll(lambda: key("still"), lambda k: k["versions"][0]["uses"] == 10, 5)
        (used,) = still["versions"]
        assert used["uses"] == 10 and used["last_used"] is not None
        assert [v["uses"] for v in key("paused")["versions"]] == [0]

    records = (
        AuditFile(gw.data_dir / "audit.log").search(key="rotating", action="key.rotate").records
    )
    done = [r for r in records if r["outcome"] == "ok"]
    assert all(r["principal"] == "system" and r["detail"]["scheduled"] is True for r in done)
    versions = [r["key_version"] for r in done]
    assert versions == list(range(2, 2 + len(versions)))  # each version made once, in order
    times = [datetime.fromisoformat(r["time"]) for r in done]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert all(gap >= PERIOD_S - 0.1 for gap in gaps), gaps  # never twice in one period
