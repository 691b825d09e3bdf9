"""scripts/bench.py end to end: a tiny run against a real `kmsgate serve --dev` subprocess,
with the Python load generator (so it passes without wrk)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench.py"


def git(*args: str) -> str:
    proc = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60, check=True
    )
    return proc.stdout.strip()


@pytest.fixture
def head_checkout(tmp_path: Path) -> Iterator[Path]:
    """A second checkout of HEAD (`git worktree add`), removed afterwards."""
    checkout = tmp_path / "before"
    try:
        git("worktree", "add", "--detach", str(checkout), "HEAD")
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no git worktree of this checkout: {exc}")
    try:
        yield checkout
    finally:
        git("worktree", "remove", "--force", str(checkout))


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


@pytest.mark.timeout(60)
def test_quick_bench_against_a_baseline_checkout(tmp_path: Path, head_checkout: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--loadgen", "python", "--json", str(out),
         "--baseline", str(head_checkout)],
        capture_output=True, text=True, timeout=50, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())

    baseline = report["baseline"]
    assert baseline["kmsgate"] == str(head_checkout.resolve() / "kmsgate")
    assert report["kmsgate"] != baseline["kmsgate"]
    assert baseline["checkout"] == str(head_checkout.resolve())
    assert baseline["commit"] == git("rev-parse", "--short", "HEAD")
    assert set(baseline["scenarios"]) == set(report["scenarios"]) == {
        "noop", "sign", "batch_sign_10",
    }  # fmt: skip
    assert all(result["errors"] == 0 for result in baseline["scenarios"].values())
    assert baseline["audit"]["ok"] is True
    assert report["audit"]["ok"] is True
    vs = report["vs_baseline"]
    assert set(vs) == {"noop", "sign", "batch_sign_10"}
    assert set(vs["noop"]) == {"req_per_s"}
    assert set(vs["sign"]) == set(vs["batch_sign_10"]) == {"req_per_s", "signatures_per_s"}
    assert all(value > 0 for ratios in vs.values() for value in ratios.values())

    assert f"baseline: kmsgate from {head_checkout.resolve() / 'kmsgate'}" in proc.stdout
    for name in ("noop", "sign", "batch_sign_10"):
        assert f"\n{name} (baseline) " in proc.stdout
        assert f"\n{name} " in proc.stdout
        assert f"this/baseline {name}: req/s " in proc.stdout
    assert "audit chain (baseline): ok" in proc.stdout


def test_baseline_without_a_kmsgate_package_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--baseline", str(tmp_path)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"--baseline {tmp_path.resolve()} has no kmsgate/ package" in proc.stderr
