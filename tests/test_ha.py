"""scripts/ha_test.py in its short form: three replicas on a real PostgreSQL under
concurrent load, one killed with SIGKILL; every invariant of its table must hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.components import require_postgres

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ha_test.py"
INVARIANTS = (
    "failures on the survivors after the kill",
    "certificates issued, in the inventory",
    "rotations: versions 2..N once each",
    "disable, token revocation enforced everywhere: max s",
    "CRL builds for one revocation burst",
    "scheduled jobs went on after the kill",
    "audit chains verify",
)


@pytest.mark.postgres
def test_three_replicas_keep_every_invariant_when_one_is_killed() -> None:
    require_postgres()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--duration", "8", "--signers", "2"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    report = done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for invariant in INVARIANTS:
        assert any(line.startswith("ok") and invariant in line for line in lines), report
    assert done.returncode == 0, report


@pytest.mark.postgres
def test_the_scaling_measurement_runs_one_to_three_replicas() -> None:
    require_postgres()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--scaling", "--duration", "2", "--connections", "4"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "2", "3"], done.stdout
    assert all(float(row[1].replace(",", "")) > 0 for row in rows), done.stdout
    assert "failed requests: 0" in done.stdout
