"""scripts/bench.py end to end: a tiny run against a real `kmsgate serve --dev` subprocess,
with the Python load generator (so it passes without wrk); the PKI scenarios also against a
real OpenBao dev server."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.openbao import require_openbao

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench.py"
PKI_OPTIONAL = ("ocsp_cached", "ocsp_nonce", "crl")
"""PKI scenarios of endpoints a build may not have yet: measured, or listed as not available."""


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


@pytest.mark.timeout(90)
def test_quick_pki_bench_against_openbao(tmp_path: Path) -> None:
    """Issue, OCSP and CRL on kmsgate, issue on OpenBao too (whose replies are chunked: the
    Python load generator reads them)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--loadgen", "python", "--json", str(out),
         "--scenarios", "pki", "--peer", "openbao", "--bao", require_openbao()],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())

    assert report["ok"] is True
    assert report["failed_requests"] == 0
    assert report["failures"] == []
    assert report["raw_ecdsa_p256_sign_per_s_per_core"] is None  # core scenarios not run
    assert report["raw_issue_per_s_per_core"] > 0
    assert report["raw_limit_issue_per_s"] == report["raw_issue_per_s_per_core"]  # 1 worker
    scenarios, unavailable = report["scenarios"], report["unavailable"]
    assert "issue" in scenarios
    assert set(scenarios) | set(unavailable) == {"issue", *PKI_OPTIONAL}
    assert not set(scenarios) & set(unavailable)
    for name, result in scenarios.items():
        assert result["req_per_s"] > 0, name
        assert result["errors"] == result["non_2xx"] == 0, name
        assert result["p99_ms"] >= result["p50_ms"] > 0, name
    assert scenarios["issue"]["signatures_per_s"] == scenarios["issue"]["req_per_s"]
    if "ocsp_nonce" in scenarios:
        assert scenarios["ocsp_nonce"]["signatures_per_s"] == scenarios["ocsp_nonce"]["req_per_s"]
    for name in ("ocsp_cached", "crl"):
        assert scenarios.get(name, {"signatures_per_s": 0})["signatures_per_s"] == 0
    assert set(report["ratios"]) == {"issue_vs_raw"}
    assert report["ratios"]["issue_vs_raw"] > 0
    assert report["audit"]["ok"] is True

    peer = report["peers"]["openbao"]
    assert peer["name"] == "OpenBao" and peer["version"].startswith("OpenBao v")
    assert peer["operations"] == {"issue": "PKI sign"}
    assert set(peer["scenarios"]) == {"issue"}
    assert peer["failures"] == [] and peer["unavailable"] == {}
    theirs = peer["scenarios"]["issue"]
    assert theirs["req_per_s"] > 0 and theirs["errors"] == 0
    ratio = report["vs_peers"]["openbao"]["issue"]["req_per_s"]
    assert ratio == pytest.approx(scenarios["issue"]["req_per_s"] / theirs["req_per_s"], rel=0.01)

    assert "\nissue " in proc.stdout and "\nissue (openbao) " in proc.stdout
    assert re.search(r"\nissue vs raw issuance limit: \d+%\n", proc.stdout)
    assert re.search(r"\nissue vs OpenBao PKI sign: \d+\.\d\dx ", proc.stdout)
    assert "\nOCSP responses/s: " in proc.stdout
    for name, reason in unavailable.items():
        assert f"\n{name}: not available ({reason})" in proc.stdout


def test_a_peer_without_its_scenarios_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--peer", "openbao"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "--peer openbao runs only issue: add --scenarios pki or all" in proc.stderr


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """scripts/bench.py as a module."""
    spec = importlib.util.spec_from_file_location("kmsgate_bench_script", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_wrk_bodies_keep_every_byte(bench: ModuleType) -> None:
    """The Lua literal wrk sends (an OCSP request is binary DER) decodes to the same bytes."""
    data = bytes(range(256)) + b'0\\1"2\x0012'
    literal = bench.lua_string(data)
    assert literal.isascii() and literal.isprintable()
    inner = literal[1:-1]
    assert '"' not in re.sub(r"\\\d{3}", "", inner)
    decoded = re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1))), inner)
    assert decoded.encode("latin-1") == data
