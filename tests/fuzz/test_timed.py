"""A timed run of every harness with fresh random inputs (`scripts/fuzz.py`), besides the
derandomized 300 inputs per harness of the other tests: each CI run explores inputs no run
before it tried. docs/fuzzing.md has the longer run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz.py"
SECONDS = 4
HARNESSES = ("envelope", "file_header", "pkcs11_uri", "csr", "ocsp", "jwt")


@pytest.mark.timeout(6 * SECONDS + 120)
def test_every_harness_runs_for_its_time_without_a_failure() -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", str(SECONDS)],
        capture_output=True,
        text=True,
        timeout=6 * SECONDS + 100,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    inputs = dict(re.findall(r"^(\w+) +(\d+) ", run.stdout, re.MULTILINE))
    assert all(int(inputs.get(name, 0)) > 0 for name in HARNESSES), run.stdout
    print(run.stdout)
