"""scripts/crash_loop.py in its short form (a dev gateway with 2 workers killed with SIGKILL
under concurrent changes, 4 times, restarted on its data dir): no change without its audit
record. The documented long run is `--loops 20` (docs/audit.md). Also: its checker finds
what it is there to find."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "crash_loop.py"
LOOPS = 4


@pytest.fixture(scope="module")
def crash_loop() -> ModuleType:
    """scripts/crash_loop.py as a module."""
    return load_script("crash_loop")


@pytest.mark.timeout(150)
def test_kill_9_under_load_leaves_no_change_without_its_record() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--loops", str(LOOPS), "--max-seconds", "1.5"],
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    rows = [line.split("|") for line in done.stdout.splitlines() if line[:5].strip().isdigit()]
    assert [int(row[0]) for row in rows] == list(range(1, LOOPS + 1)), report
    assert all(int(row[-1]) == 0 for row in rows), report  # violations
    assert sum(int(row[3]) for row in rows) > 0, report  # changes were acknowledged
    assert sum(int(row[4]) for row in rows) > 0, report  # and some cut off by the kill
    assert f"0 violations in {LOOPS} loops" in done.stdout, report
    assert "the gateway starts again and stops cleanly" in done.stdout, report


def _record(action: str, request_id: str, outcome: str, **fields: object) -> dict[str, object]:
    return {"action": action, "request_id": request_id, "outcome": outcome, **fields}


def test_the_checker_finds_a_change_without_its_record(crash_loop: ModuleType) -> None:
    key = {"kind": "key", "name": "crash-k"}
    store = crash_loop.Store({"crash-k": 2}, ["0a"], {"t1"})
    audit = crash_loop.Audit.of(
        [
            _record("key.create", "r1", "started", resource=key),
            _record("key.create", "r1", "ok", resource=key),
            _record("cert.issue", "r2", "started"),  # cut off: explains the certificate
        ]
    )
    found = crash_loop.violations(store, audit, [])
    assert found == [
        "key crash-k: 1 rotations in the store, 0 recorded",
        "token.create: 1 in the store unnamed, 0 cut off",
    ]
    assert crash_loop.violations(crash_loop.Store({"crash-x": 1}, [], set()), audit, []) == [
        "key crash-x in the store: no key.create record"
    ]


def test_the_checker_finds_an_acknowledged_change_lost(crash_loop: ModuleType) -> None:
    acknowledged = crash_loop.Sent("cert.issue", None, 200, "r9", {"serial": "0b"})
    twice = crash_loop.Sent("cert.issue", None, 200, "r8", {"serial": "0b"})
    audit = crash_loop.Audit.of([_record("cert.issue", "r8", "ok", detail={"serial": "0b"})])
    found = crash_loop.violations(crash_loop.Store({}, [], set()), audit, [acknowledged, twice])
    assert Counter(found) == Counter(
        [
            "acknowledged cert.issue (r9): no ok record",
            "acknowledged certificate 0b: not in the inventory",
            "acknowledged certificate 0b: not in the inventory",
            "serials repeated in the replies: ['0b']",
        ]
    )
