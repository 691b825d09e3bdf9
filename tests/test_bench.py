"""scripts/bench.py end to end: a tiny run against a real `kmsgate serve --dev` subprocess,
with the Python load generator (so it passes without wrk)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


@pytest.mark.timeout(180)
def test_quick_bench_with_python_loadgen(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--loadgen", "python", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())

    assert report["ok"] is True
    assert report["failed_requests"] == 0
    assert report["loadgen"].startswith("python")
    assert report["raw_ecdsa_p256_sign_per_s_per_core"] > 0
    scenarios = report["scenarios"]
    assert set(scenarios) == {"noop", "sign", "batch_sign_10"}
    for name, result in scenarios.items():
        assert result["req_per_s"] > 0, name
        assert result["errors"] == 0, name
        assert result["non_2xx"] == 0, name
        assert result["p99_ms"] >= result["p50_ms"] > 0, name
    assert scenarios["noop"]["signatures_per_s"] == 0
    assert scenarios["batch_sign_10"]["signatures_per_s"] == pytest.approx(
        10 * scenarios["batch_sign_10"]["req_per_s"]
    )
    ratios = report["ratios"]
    assert set(ratios) == {"sign_vs_noop", "sign_vs_raw", "batch_vs_raw"}
    assert all(value > 0 for value in ratios.values())
    assert report["audit"]["ok"] is True
    assert "sign req/s vs no-op req/s" in proc.stdout
