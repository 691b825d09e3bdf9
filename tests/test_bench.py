"""scripts/bench.py end to end: tiny runs against a real `kmsgate serve --dev` subprocess,
with the Python load generator (so they pass without wrk), the core and the PKI scenarios also
against a real OpenBao dev server; and the checks that count a wrong reply as an error."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.helpers import load_script
from tests.openbao import require_openbao

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench.py"
PKI_OPTIONAL = ("ocsp_cached", "ocsp_nonce", "crl")
"""PKI scenarios of endpoints a build may not have yet: measured, or listed as not available."""
KEY_OPERATIONS = ("sign", "batch_sign_10", "verify", "hmac", "encrypt", "decrypt")
"""The core scenarios OpenBao runs too (Transit), with `--quick`'s batch of 10."""
CORE = ("noop", *KEY_OPERATIONS)
SHORT = ("--duration", "0.1", "--warmup", "0.05")
"""Shorter windows than `--quick`'s for the runs of many scenarios."""


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
    """The core scenarios on kmsgate, and those but the no-op on OpenBao (Transit), in two
    rounds."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", *SHORT, "--loadgen", "python", "--json", str(out),
         "--peer", "openbao", "--bao", require_openbao(), "--rounds", "2"],
        capture_output=True, text=True, timeout=150, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())

    assert report["ok"] is True
    assert report["failed_requests"] == 0
    assert report["failures"] == []
    assert report["loadgen"].startswith("python")
    assert report["raw_ecdsa_p256_sign_per_s_per_core"] > 0
    assert report["raw_issue_per_s_per_core"] is None  # PKI scenarios not run
    assert report["crl_at_scale"] is None
    scenarios = report["scenarios"]
    assert list(scenarios) == list(CORE)
    for name, result in scenarios.items():
        assert result["req_per_s"] > 0, name
        assert result["errors"] == 0, name
        assert result["non_2xx"] == 0, name
        assert result["p99_ms"] >= result["p50_ms"] > 0, name
    for name in ("noop", "verify", "hmac", "encrypt", "decrypt"):
        assert scenarios[name]["signatures_per_s"] == 0, name
    assert scenarios["sign"]["signatures_per_s"] == scenarios["sign"]["req_per_s"]
    assert scenarios["batch_sign_10"]["signatures_per_s"] == pytest.approx(
        10 * scenarios["batch_sign_10"]["req_per_s"]
    )
    ratios = report["ratios"]
    assert set(ratios) == {"sign_vs_noop", "sign_vs_raw", "batch_vs_raw"}
    assert all(value > 0 for value in ratios.values())
    assert report["audit"]["ok"] is True
    assert "sign req/s vs no-op req/s" in proc.stdout

    peer = report["peers"]["openbao"]
    assert list(peer["scenarios"]) == list(peer["operations"]) == list(KEY_OPERATIONS)
    assert peer["operations"]["batch_sign_10"] == "Transit sign (batch_input)"
    assert "Transit engine at transit/" in peer["setup"] and "PKI" not in peer["setup"]
    assert peer["failures"] == [] and peer["unavailable"] == {}
    vs = report["vs_peers"]["openbao"]
    assert list(vs) == list(KEY_OPERATIONS)
    for name, theirs in peer["scenarios"].items():
        signatures = {"sign": 1, "batch_sign_10": 10}.get(name, 0)
        assert theirs["req_per_s"] > 0 and theirs["errors"] == theirs["non_2xx"] == 0, name
        assert theirs["signatures_per_s"] == pytest.approx(signatures * theirs["req_per_s"])
        mine = scenarios[name]["req_per_s"]
        assert vs[name]["req_per_s"] == pytest.approx(mine / theirs["req_per_s"], rel=0.01)
        assert set(vs[name]) == {"req_per_s"} | ({"signatures_per_s"} if signatures else set())

    table = proc.stdout.split("\nscenario ", 1)[1]
    rows = re.findall(r"^(\S+(?: \(openbao\))?) +[\d,]+ ", table, re.MULTILINE)
    assert rows == [
        "noop",
        *(row for name in KEY_OPERATIONS for row in (name, f"{name} (openbao)")),
    ]
    for name in KEY_OPERATIONS:
        assert re.search(rf"\n{name} vs OpenBao: \d+\.\d\dx \(kmsgate/OpenBao\)", proc.stdout)
    assert re.search(
        r"\nbatch_sign_10 vs OpenBao: [\d.]+x \(kmsgate/OpenBao\), items/s ", proc.stdout
    )
    # two rounds, the servers taking turns: each row is the slower round (the lower median)
    assert "2 rounds, the servers taking turns" in proc.stdout
    for result in (report, peer):
        assert list(result["rounds"]) == list(result["scenarios"])
        for name, rates in result["rounds"].items():
            assert len(rates) == 2 and all(rate > 0 for rate in rates), name
            assert result["scenarios"][name]["req_per_s"] == min(rates), name
    assert re.search(r"\n  sign \(openbao\): [\d,]+, [\d,]+\n", proc.stdout)


@pytest.mark.timeout(60)
def test_quick_bench_against_a_baseline_checkout(tmp_path: Path, head_checkout: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", *SHORT, "--loadgen", "python", "--json", str(out),
         "--baseline", str(head_checkout)],
        capture_output=True, text=True, timeout=150, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())

    baseline = report["baseline"]
    assert baseline["kmsgate"] == str(head_checkout.resolve() / "kmsgate")
    assert report["kmsgate"] != baseline["kmsgate"]
    assert baseline["checkout"] == str(head_checkout.resolve())
    assert baseline["commit"] == git("rev-parse", "--short", "HEAD")
    assert set(baseline["scenarios"]) == set(report["scenarios"]) == set(CORE)
    assert all(result["errors"] == 0 for result in baseline["scenarios"].values())
    assert baseline["audit"]["ok"] is True
    assert report["audit"]["ok"] is True
    vs = report["vs_baseline"]
    assert set(vs) == set(CORE)
    for name in ("noop", "verify", "hmac", "encrypt", "decrypt"):
        assert set(vs[name]) == {"req_per_s"}, name
    assert set(vs["sign"]) == set(vs["batch_sign_10"]) == {"req_per_s", "signatures_per_s"}
    assert all(value > 0 for ratios in vs.values() for value in ratios.values())

    assert f"baseline: kmsgate from {head_checkout.resolve() / 'kmsgate'}" in proc.stdout
    for name in CORE:
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
        capture_output=True, text=True, timeout=240, check=False,
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
    scale = report["crl_at_scale"]
    # --quick's 2,000 revoked, then one more through the API, twice
    assert scale["entries"] == [2_001, 2_002]
    assert len(scale["build_s"]) == 2 and all(s > 0 for s in scale["build_s"])
    assert scale["ocsp_answers"] > 0 and scale["ocsp_failures"] == 0
    assert scale["ocsp_max_ms"] >= scale["ocsp_p99_ms"] >= scale["ocsp_p50_ms"] > 0
    assert re.search(
        r"\nCRL builds with 2,001 entries, then one more \(.+\): \d+\.\d\d s, then "
        r"\d+\.\d\d s; meanwhile \d+ OCSP answers",
        proc.stdout,
    )

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
    assert re.search(r"\nissue vs raw issuance limit: \d+% \(\d+% of one core.s\)\n", proc.stdout)
    assert re.search(r"\nissue vs OpenBao PKI sign: \d+\.\d\dx ", proc.stdout)
    assert "\nOCSP responses/s: " in proc.stdout
    for name, reason in unavailable.items():
        assert f"\n{name}: not available ({reason})" in proc.stdout


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """scripts/bench.py as a module."""
    return load_script("bench")


def test_wrk_bodies_keep_every_byte(bench: ModuleType) -> None:
    """The Lua literal wrk sends (an OCSP request is binary DER) decodes to the same bytes."""
    data = bytes(range(256)) + b'0\\1"2\x0012'
    literal = bench.lua_string(data)
    assert literal.isascii() and literal.isprintable()
    inner = literal[1:-1]
    assert '"' not in re.sub(r"\\\d{3}", "", inner)
    decoded = re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1))), inner)
    assert decoded.encode("latin-1") == data


def test_a_peer_without_its_scenarios_is_refused(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenBao runs scenarios of both groups; a peer that runs only PKI ones needs them."""
    pki_only = type("PkiOnlyPeer", (bench.Peer,), {"KINDS": frozenset({"issue"})})
    monkeypatch.setitem(bench.PEERS, "pki-only", pki_only)
    args = bench.parse_args(["--quick", "--peer", "pki-only"])
    with pytest.raises(
        SystemExit, match="--peer pki-only runs only issue: add --scenarios pki or all"
    ):
        bench.resolve_settings(args)


@pytest.mark.parametrize("rounds", ["0", "21"])
def test_rounds_out_of_range_are_refused(bench: ModuleType, rounds: str) -> None:
    with pytest.raises(SystemExit, match=r"--rounds must be 1\.\.20"):
        bench.resolve_settings(bench.parse_args(["--quick", "--rounds", rounds]))


def test_the_median_round_counts_and_every_round_s_errors_show(bench: ModuleType) -> None:
    fields = dict.fromkeys(
        ["signatures_per_s", "p50_ms", "p99_ms", "duration_s", "socket_errors", "item_errors"], 0
    )
    rounds = [
        bench.ScenarioResult(name="sign", req_per_s=rate, requests=i, non_2xx=errors,
                             errors=errors, server_cpu_pct=None, loadgen_cpu_pct=None,
                             other_cpu_pct=None, **fields)
        for i, (rate, errors) in enumerate([(900.0, 0), (700.0, 3), (800.0, 0), (1000.0, 0)])
    ]  # fmt: skip
    median = bench.median_round(rounds)
    assert (median.req_per_s, median.requests) == (800.0, 2)  # the lower middle of four
    assert median.errors == median.non_2xx == 3
    assert bench.median_round(rounds[:3]).req_per_s == 800.0


def _reply(body: object) -> httpx.Response:
    """A 200 with `body` as compact JSON, as kmsgate and OpenBao write it."""
    return httpx.Response(200, content=json.dumps(body, separators=(",", ":")).encode())


def _problem(scenario: Any, reply: httpx.Response, bench: ModuleType) -> str:
    """The problem the pre-check sees, asserting the Python load generator sees one too."""
    problem: str = bench._reply_problem(reply, scenario)
    window = bench.Window(expect=scenario.expect, start=0.0, end=2.0)
    window.record(0.5, 1.0, 200, reply.content)
    assert window.item_errors == int(bool(problem)), problem
    return problem


def test_wrong_answers_count_as_errors(bench: ModuleType) -> None:
    """A 200 that is not the answer (not valid, another plaintext, a failed or missing batch
    item) is an error for the pre-check and the Python load generator, in both dialects."""
    data, plaintext = b"x" * 64, b"p" * 1024
    kmsgate, transit = bench.kmsgate_api("token"), bench.transit_api("token")
    verify = bench.Workload("verify", "verify", (data,))
    decrypt = bench.Workload("decrypt", "decrypt", (plaintext,))
    batch = bench.Workload("batch_sign_2", "batch_sign", (data, data))
    b64 = base64.b64encode(plaintext).decode()

    def check(api: Any, workload: Any, answer: dict[str, Any]) -> str:
        reply = {"data": answer} if api is transit else answer
        return _problem(bench.key_scenario(api, workload, "given"), _reply(reply), bench)

    for api in (kmsgate, transit):
        assert check(api, verify, {"valid": True}) == ""
        assert check(api, verify, {"valid": False})
        assert check(api, verify, {"valid": "true"})
        assert check(api, decrypt, {"plaintext": b64}) == ""
        assert check(api, decrypt, {"plaintext": base64.b64encode(b"q" * 1024).decode()})
    sig = "vault:v1:MEUC"
    assert check(transit, batch, {"batch_results": [{"signature": sig}] * 2}) == ""
    assert check(transit, batch, {"batch_results": [{"signature": sig}]})
    assert check(transit, batch, {"batch_results": [{"signature": sig}, {"error": "bad"}]})
    assert check(transit, batch, {"batch_results": [{"signature": sig}, {"signature": "MEUC"}]})
    assert check(kmsgate, batch, {"batch": [{"signature": "MEUC"}] * 2}) == ""
    assert check(kmsgate, batch, {"batch": [{"signature": "MEUC"}, {"error": {"code": "x"}}]})
    one = bench.Workload("batch_sign_1", "batch_sign", (data,))  # --batch 1: still a batch
    assert check(kmsgate, one, {"batch": [{"signature": "MEUC"}]}) == ""
