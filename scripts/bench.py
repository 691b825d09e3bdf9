#!/usr/bin/env python3
"""kmsgate benchmark: the gateway against the raw `cryptography` limit, in one run.

Starts `kmsgate serve --dev` in a temporary data dir on a free loopback port, measures
ECDSA P-256 signing in-process (the raw limit), then drives three scenarios from a separate
load-generator process (wrk, or a Python fallback): a no-op endpoint, single sign and batch
sign. Prints a table with ratios and checks the audit chain afterwards.

With `--baseline DIR` (another kmsgate checkout, e.g. a `git worktree`), a second gateway runs
DIR's kmsgate (PYTHONPATH=DIR) with the same settings; each scenario is measured on the
baseline and then on this checkout, back to back, and the report adds this/baseline ratios.

    python scripts/bench.py                       # 10 s per scenario, 32 connections, 1 worker
    python scripts/bench.py --workers 2 --json out.json
    python scripts/bench.py --quick --loadgen python
    python scripts/bench.py --baseline /tmp/kmsgate-before

Exit status: 0 if every request succeeded and the audit chain(s) verify, 1 otherwise,
130 if interrupted. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

HOST = "127.0.0.1"
KEY_NAME = "bench"
INPUT_BYTES = 64
SIGN_TARGET = 0.60
"""Target for single-sign req/s as a fraction of no-op req/s."""
OTHER_CPU_WARN = 20.0
"""Warn when other processes used more than this % of a core during a scenario."""
KMSGATE_CLI = "from kmsgate.cli import main; main()"
T = TypeVar("T")


# -- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What to run; resolved from the command line (`--quick` changes the defaults)."""

    duration: float
    warmup: float
    connections: int
    workers: int
    batch: int
    raw_seconds: float
    loadgen: str
    threads: int
    json_path: Path | None
    keep_data: bool
    baseline: Path | None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; options left at None get their default in `resolve_settings`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, help="seconds measured per scenario (10)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per scenario (2)")
    parser.add_argument("--connections", type=int, help="concurrent connections (32)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers (1)")
    parser.add_argument("--batch", type=int, help="items per batch-sign request (100)")
    parser.add_argument("--raw-seconds", type=float, help="seconds for the raw sign loop (2)")
    parser.add_argument(
        "--loadgen", choices=["auto", "wrk", "python"], default="auto",
        help="load generator: wrk if installed (auto), or the Python one",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, help="wrk threads (1, or 2 with >1 worker)")
    parser.add_argument("--json", type=Path, dest="json_path", help="write results here")
    parser.add_argument("--keep-data", action="store_true", help="keep the temp data dir")
    parser.add_argument("--quick", action="store_true", help="tiny run (tests, smoke)")
    parser.add_argument(
        "--baseline", type=Path, metavar="DIR",
        help="another kmsgate checkout to measure against, scenario by scenario",
    )  # fmt: skip
    parser.add_argument("--loadgen-spec", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Fill defaults (normal or `--quick`) and check ranges. Raises SystemExit on bad input."""
    quick = args.quick
    settings = Settings(
        duration=_pick(args.duration, 0.5 if quick else 10.0),
        warmup=_pick(args.warmup, 0.25 if quick else 2.0),
        connections=_pick(args.connections, 4 if quick else 32),
        workers=args.workers,
        batch=_pick(args.batch, 10 if quick else 100),
        raw_seconds=_pick(args.raw_seconds, 0.3 if quick else 2.0),
        loadgen=_choose_loadgen(args.loadgen),
        threads=_pick(args.threads, 1 if args.workers == 1 else 2),
        json_path=args.json_path,
        keep_data=args.keep_data,
        baseline=args.baseline.resolve() if args.baseline else None,
    )
    problems = [
        "--duration must be > 0" if settings.duration <= 0 else "",
        "--warmup must be >= 0" if settings.warmup < 0 else "",
        "--workers must be >= 1" if settings.workers < 1 else "",
        "--batch must be 1..1000" if not 1 <= settings.batch <= 1000 else "",
        "--threads must be 1..--connections"
        if not 1 <= settings.threads <= settings.connections
        else "",
        f"--baseline {settings.baseline} has no kmsgate/ package"
        if settings.baseline and not (settings.baseline / "kmsgate" / "__init__.py").is_file()
        else "",
    ]
    if errors := [p for p in problems if p]:
        raise SystemExit("bench.py: " + "; ".join(errors))
    return settings


def _pick(value: T | None, default: T) -> T:
    return default if value is None else value


def _choose_loadgen(wanted: str) -> str:
    """`auto` means wrk when it is on PATH. Raises SystemExit if wrk is asked for but absent."""
    have_wrk = shutil.which("wrk") is not None
    if wanted == "wrk" and not have_wrk:
        raise SystemExit("bench.py: wrk not found (Debian: apt-get install -y wrk)")
    if wanted == "auto":
        return "wrk" if have_wrk else "python"
    return wanted


# -- the raw limit ---------------------------------------------------------------------------


def raw_sign_rate(seconds: float) -> float:
    """ECDSA P-256/SHA-256 signatures per second of 64-byte inputs, in this process (1 core)."""
    key = ec.generate_private_key(ec.SECP256R1())
    data, alg = os.urandom(INPUT_BYTES), ec.ECDSA(hashes.SHA256())
    count, start = 0, time.perf_counter()
    while True:
        for _ in range(50):
            key.sign(data, alg)
        count += 50
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count / elapsed


# -- the gateway under test ------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def kmsgate_command(*args: str) -> list[str]:
    """Run the `kmsgate` CLI with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-c", KMSGATE_CLI, *args]


def git_commit(directory: Path) -> str | None:
    """`git rev-parse --short HEAD` in `directory`; None if it is not a git checkout."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except OSError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


class Gateway:
    """`kmsgate serve --dev` as a subprocess in its own process group.

    `checkout` None runs the kmsgate this interpreter imports (this checkout, installed
    editable); a directory runs that checkout's kmsgate, put first on PYTHONPATH. Every
    kmsgate process runs in `work_dir`, so the current directory cannot shadow PYTHONPATH."""

    def __init__(self, work_dir: Path, workers: int, checkout: Path | None = None) -> None:
        self.work_dir = work_dir
        self.data_dir = work_dir / "data"
        self.log_path = work_dir / "server.log"
        self.workers = workers
        self.checkout = checkout
        self.label = "baseline" if checkout else "this checkout"
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        work_dir.mkdir(parents=True, exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        """The environment without KMSGATE_* variables; PYTHONPATH=checkout if any."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KMSGATE_")}
        if self.checkout:
            env["PYTHONPATH"] = str(self.checkout)
        return env

    def run_python(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """`python ARGS` as the gateway runs (environment, working directory), output captured."""
        return subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, timeout=timeout,
            env=self.env, cwd=self.work_dir, check=False,
        )  # fmt: skip

    def kmsgate_package(self) -> Path:
        """The kmsgate package directory the gateway imports. Raises RuntimeError if the
        import fails or, for a checkout, the package is not the checkout's."""
        proc = self.run_python("-c", "import kmsgate; print(kmsgate.__file__)", timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{self.label}: importing kmsgate failed:\n{proc.stderr[-2000:]}")
        package = Path(proc.stdout.strip()).resolve().parent
        if self.checkout and package != (self.checkout / "kmsgate").resolve():
            raise RuntimeError(f"{self.label}: imports kmsgate from {package}, not {self.checkout}")
        return package

    def verify_audit(self) -> dict[str, Any]:
        """`kmsgate audit verify` (this gateway's kmsgate) on the audit log; after `stop`."""
        log = str(self.data_dir / "audit.log")
        proc = self.run_python("-c", KMSGATE_CLI, "audit", "verify", log, timeout=300)
        return {"ok": proc.returncode == 0, "message": (proc.stdout + proc.stderr).strip()}

    def start(self, timeout: float = 60.0) -> str:
        """Start, wait for health and the root token file; return the token.

        Raises RuntimeError if the server exits or is not ready within `timeout`."""
        command = kmsgate_command(
            "serve", "--dev", "--data-dir", str(self.data_dir), "--port", str(self.port),
            "--workers", str(self.workers),
        )  # fmt: skip
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.work_dir,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        token_file = self.data_dir / "root-token"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                raise RuntimeError(f"{self.label}: gateway exited ({code}):\n{self.log_tail()}")
            if self._healthy() and token_file.exists():
                return token_file.read_text().strip()
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.label}: gateway not ready after {timeout:.0f} s:\n{self.log_tail()}"
        )

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v1/sys/health", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after `timeout`. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # uvicorn workers left behind by the master

    @property
    def pgid(self) -> int:
        """The server's process group (its master's pid). Raises RuntimeError if stopped."""
        if self._proc is None:
            raise RuntimeError("gateway not running")
        return self._proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


# -- CPU accounting (Linux /proc; None elsewhere) ---------------------------------------------


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds used so far by the server's process group and by the whole machine."""

    server: float | None
    machine: float | None

    @classmethod
    def take(cls, server_pgid: int) -> CpuSample:
        return cls(process_group_cpu(server_pgid), machine_busy_cpu())

    def until(self, later: CpuSample) -> CpuSample:
        """CPU used between this sample and `later`."""
        return CpuSample(_minus(later.server, self.server), _minus(later.machine, self.machine))


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def process_group_cpu(pgid: int) -> float | None:
    """Sum of utime+stime over the live processes whose process group is `pgid`."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    ticks = 0
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy_cpu() -> float | None:
    """Busy CPU seconds of all cores so far: everything in /proc/stat but idle and iowait."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# -- scenarios -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One kind of request, repeated by every connection."""

    name: str
    method: str
    path: str
    body: bytes
    token: str | None
    signatures_per_request: int

    def http_request(self, port: int) -> bytes:
        """The raw HTTP/1.1 keep-alive request."""
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {HOST}:{port}"]
        if self.token:
            lines.append(f"Authorization: Bearer {self.token}")
        if self.body:
            lines += ["Content-Type: application/json", f"Content-Length: {len(self.body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def _b64_input() -> str:
    return base64.b64encode(os.urandom(INPUT_BYTES)).decode()


def build_scenarios(token: str, batch: int) -> list[Scenario]:
    """No-op health, single sign, batch sign."""
    sign_path = f"/v1/keys/{KEY_NAME}/sign"
    single = json.dumps({"input": _b64_input()}).encode()
    many = json.dumps({"batch": [{"input": _b64_input()} for _ in range(batch)]}).encode()
    return [
        Scenario("noop", "GET", "/v1/sys/health", b"", None, 0),
        Scenario("sign", "POST", sign_path, single, token, 1),
        Scenario(f"batch_sign_{batch}", "POST", sign_path, many, token, batch),
    ]


def create_key(url: str, token: str) -> None:
    """Create the ecdsa-p256 bench key. Raises RuntimeError on any other answer than 201."""
    reply = httpx.post(
        f"{url}/v1/keys",
        json={"name": KEY_NAME, "type": "ecdsa-p256", "purpose": "bench"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30.0,
    )
    if reply.status_code != 201:
        raise RuntimeError(f"creating the key failed: {reply.status_code} {reply.text[:300]}")


def check_scenario(url: str, scenario: Scenario, workers: int, timeout: float = 15.0) -> None:
    """Send the scenario's request on fresh connections until every worker answers it well
    (other workers see a new key after their cache refresh). Raises RuntimeError."""
    headers = {"Content-Type": "application/json", "Connection": "close"}
    if scenario.token:
        headers["Authorization"] = f"Bearer {scenario.token}"
    deadline, problem = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        replies = [
            httpx.request(
                scenario.method, url + scenario.path, content=scenario.body, headers=headers
            )
            for _ in range(4 * workers)
        ]
        problem = next((p for r in replies if (p := _reply_problem(r, scenario))), "")
        if not problem:
            return
        time.sleep(0.25)
    raise RuntimeError(f"scenario {scenario.name}: {problem}")


def _reply_problem(reply: httpx.Response, scenario: Scenario) -> str:
    """Why a reply is not a successful answer to `scenario` ("" if it is)."""
    if reply.status_code != 200:
        return f"HTTP {reply.status_code}: {reply.text[:300]}"
    body = reply.json()
    if scenario.signatures_per_request == 0:
        return "" if body == {"status": "ok"} else f"unexpected body {body!r}"
    items = body["batch"] if scenario.signatures_per_request > 1 else [body]
    bad = [item for item in items if "signature" not in item]
    if len(items) != scenario.signatures_per_request or bad:
        return f"{len(items)} items, {len(bad)} without a signature: {bad[:1]!r}"
    return ""


# -- load results ----------------------------------------------------------------------------


@dataclass
class LoadResult:
    """What one load-generator run measured (after its warm-up)."""

    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    item_errors: int
    loadgen_cpu_s: float | None
    server_cpu_s: float | None = None
    machine_cpu_s: float | None = None

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors + self.item_errors


@dataclass
class ScenarioResult:
    """A scenario's figures as printed and written to JSON."""

    name: str
    req_per_s: float
    signatures_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    duration_s: float
    non_2xx: int
    socket_errors: int
    item_errors: int
    errors: int
    server_cpu_pct: float | None
    loadgen_cpu_pct: float | None
    other_cpu_pct: float | None

    @classmethod
    def of(cls, scenario: Scenario, load: LoadResult) -> ScenarioResult:
        rate = load.requests / load.duration_s
        others = _minus(_minus(load.machine_cpu_s, load.server_cpu_s), load.loadgen_cpu_s)
        return cls(
            name=scenario.name,
            req_per_s=round(rate, 1),
            signatures_per_s=round(rate * scenario.signatures_per_request, 1),
            p50_ms=round(load.p50_ms, 3),
            p99_ms=round(load.p99_ms, 3),
            requests=load.requests,
            duration_s=round(load.duration_s, 3),
            non_2xx=load.non_2xx,
            socket_errors=load.socket_errors,
            item_errors=load.item_errors,
            errors=load.errors,
            server_cpu_pct=_percent(load.server_cpu_s, load.duration_s),
            loadgen_cpu_pct=_percent(load.loadgen_cpu_s, load.duration_s),
            other_cpu_pct=_percent(others, load.duration_s),
        )


def _percent(cpu_s: float | None, wall_s: float) -> float | None:
    """CPU time as a percentage of one core over `wall_s`."""
    return None if cpu_s is None else round(100.0 * cpu_s / wall_s, 1)


def children_cpu() -> float:
    """User+system CPU of this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- wrk -------------------------------------------------------------------------------------

WRK_SCRIPT = """\
wrk.method = "{method}"
{body}
{auth}
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) non2xx = 0; item_errors = 0 end
function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  elseif body and string.find(body, '"error"', 1, true) then
    item_errors = item_errors + 1
  end
end
function done(summary, latency, requests)
  local bad, items = 0, 0
  for _, t in ipairs(threads) do
    bad = bad + t:get("non2xx"); items = items + t:get("item_errors")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {{"requests": %d, "duration_us": %d, "p50_us": %.1f, "p99_us": %.1f, '
    .. '"non_2xx": %d, "item_errors": %d, "socket_errors": %d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    bad, items, e.connect + e.read + e.write + e.timeout))
end
"""


def wrk_script(scenario: Scenario) -> str:
    """The Lua script: request, non-2xx and batch-item error counting, a JSON summary line."""
    body = (
        f"wrk.body = [==[{scenario.body.decode()}]==]\n"
        'wrk.headers["Content-Type"] = "application/json"'
        if scenario.body
        else ""
    )
    auth = f'wrk.headers["Authorization"] = "Bearer {scenario.token}"' if scenario.token else ""
    return WRK_SCRIPT.format(method=scenario.method, body=body, auth=auth)


def wrk_version() -> str:
    """First line of `wrk -v` (it exits 1 after printing usage)."""
    proc = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10, check=False)
    lines = (proc.stdout or proc.stderr).splitlines()
    words = lines[0].split() if lines else []
    return " ".join(words[:2]) if words else "wrk"


def run_wrk(
    gateway: Gateway, scenario: Scenario, seconds: float, settings: Settings, work: Path
) -> LoadResult:
    """One wrk run of whole seconds (wrk's unit). Raises RuntimeError if wrk fails."""
    script = work / f"{scenario.name}.lua"
    script.write_text(wrk_script(scenario))
    command = [
        "wrk", f"-t{settings.threads}", f"-c{settings.connections}",
        f"-d{max(1, round(seconds))}s", "--timeout", "10s", "--latency",
        "-s", str(script), gateway.url + scenario.path,
    ]  # fmt: skip
    before, sample = children_cpu(), CpuSample.take(gateway.pgid)
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    cpu, used = children_cpu() - before, sample.until(CpuSample.take(gateway.pgid))
    (work / f"{scenario.name}.wrk.txt").write_text(proc.stdout + proc.stderr)
    match = re.search(r"^BENCH_JSON (.*)$", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    data = json.loads(match.group(1))
    return LoadResult(
        requests=data["requests"],
        duration_s=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        non_2xx=data["non_2xx"],
        socket_errors=data["socket_errors"],
        item_errors=data["item_errors"],
        loadgen_cpu_s=cpu,
        server_cpu_s=used.server,
        machine_cpu_s=used.machine,
    )


# -- the Python load generator (runs in its own process) -----------------------------------


def run_python_loadgen(
    gateway: Gateway, scenario: Scenario, settings: Settings, work: Path
) -> LoadResult:
    """Start this script as a load-generator process (warm-up + measured window, one
    process, same connections). Raises RuntimeError if it fails."""
    spec = {
        "port": gateway.port,
        "server_pgid": gateway.pgid,
        "request": base64.b64encode(scenario.http_request(gateway.port)).decode(),
        "connections": settings.connections,
        "warmup": settings.warmup,
        "duration": settings.duration,
    }
    spec_path = work / f"{scenario.name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    timeout = settings.warmup + settings.duration + 60
    proc = subprocess.run(
        [sys.executable, __file__, "--loadgen-spec", str(spec_path)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"python load generator failed: {proc.stderr[-2000:]}")
    return LoadResult(**json.loads(proc.stdout))


@dataclass
class Window:
    """The measured window and what was seen in it."""

    start: float = float("inf")
    end: float = float("inf")
    stopping: bool = False
    latencies: list[float] = field(default_factory=list)
    non_2xx: int = 0
    item_errors: int = 0
    socket_errors: int = 0

    def record(self, started: float, finished: float, status: int, body: bytes) -> None:
        """Count a request that completed inside the window."""
        if not self.start <= finished <= self.end:
            return
        self.latencies.append(finished - started)
        if not 200 <= status <= 299:
            self.non_2xx += 1
        elif b'"error"' in body:
            self.item_errors += 1


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one HTTP/1.1 reply with a Content-Length body; return (status, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
    if match is None:
        raise ConnectionError("reply without Content-Length")
    return status, await reader.readexactly(int(match.group(1)))


async def _connection(port: int, request: bytes, window: Window) -> None:
    """Send `request` back to back on one keep-alive connection until the window closes;
    reconnect after a socket error."""
    while not window.stopping:
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            window.socket_errors += 1
            await asyncio.sleep(0.05)
            continue
        try:
            while not window.stopping:
                started = time.perf_counter()
                writer.write(request)
                status, body = await _read_reply(reader)
                window.record(started, time.perf_counter(), status, body)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            if not window.stopping:
                window.socket_errors += 1
        finally:
            writer.close()


async def _drive(spec: dict[str, Any]) -> dict[str, Any]:
    window = Window()
    request = base64.b64decode(spec["request"])
    tasks = [
        asyncio.create_task(_connection(spec["port"], request, window))
        for _ in range(spec["connections"])
    ]
    await asyncio.sleep(spec["warmup"])
    sample, cpu_start = CpuSample.take(spec["server_pgid"]), time.process_time()
    window.start = time.perf_counter()
    window.socket_errors = 0
    window.end = window.start + spec["duration"]
    await asyncio.sleep(spec["duration"])
    cpu, used = time.process_time() - cpu_start, sample.until(CpuSample.take(spec["server_pgid"]))
    window.stopping = True
    await asyncio.wait(tasks, timeout=15)
    latencies = sorted(window.latencies)
    return {
        "requests": len(latencies),
        "duration_s": window.end - window.start,
        "p50_ms": 1000 * _percentile(latencies, 50),
        "p99_ms": 1000 * _percentile(latencies, 99),
        "non_2xx": window.non_2xx,
        "socket_errors": window.socket_errors,
        "item_errors": window.item_errors,
        "loadgen_cpu_s": cpu,
        "server_cpu_s": used.server,
        "machine_cpu_s": used.machine,
    }


def _percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (0 when empty)."""
    if not ordered:
        return 0.0
    rank = max(1, round(pct / 100 * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


def python_loadgen_name() -> str:
    uvloop = importlib.util.find_spec("uvloop") is not None
    return "python asyncio" + (" + uvloop" if uvloop else "") + " (raw HTTP/1.1 keep-alive)"


def loadgen_main(spec_path: Path) -> int:
    """Entry point of the load-generator process: print its result as JSON."""
    spec = json.loads(spec_path.read_text())
    try:
        import uvloop  # optional: lower client overhead

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        print(json.dumps(runner.run(_drive(spec))))
    return 0


# -- the run ---------------------------------------------------------------------------------


@dataclass
class BuildResult:
    """What one gateway (this checkout's kmsgate or the baseline's) measured."""

    kmsgate: str
    """The kmsgate package directory the gateway imported."""
    checkout: str
    commit: str | None
    """`git rev-parse --short HEAD` of the checkout (None if not a git checkout)."""
    scenarios: dict[str, ScenarioResult] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    audit: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    """Scenarios skipped because their request failed before the load started."""

    @property
    def failed_requests(self) -> int:
        return sum(s.errors for s in self.scenarios.values())

    @property
    def ok(self) -> bool:
        return self.failed_requests == 0 and not self.failures and bool(self.audit.get("ok"))


@dataclass
class Report:
    """Everything one run measured: this checkout, and the baseline if there is one."""

    settings: dict[str, Any]
    machine: dict[str, Any]
    loadgen: str
    raw_ecdsa_p256_sign_per_s_per_core: float
    raw_limit_sign_per_s: float
    this: BuildResult
    baseline: BuildResult | None = None
    vs_baseline: dict[str, dict[str, float]] = field(default_factory=dict)
    """this/baseline per scenario: req_per_s and, for signing scenarios, signatures_per_s."""

    def builds(self) -> list[tuple[str, BuildResult]]:
        """(row suffix, result) in measuring order: the baseline first."""
        baseline = [(" (baseline)", self.baseline)] if self.baseline else []
        return [*baseline, ("", self.this)]

    @property
    def failed_requests(self) -> int:
        return sum(build.failed_requests for _, build in self.builds())

    @property
    def ok(self) -> bool:
        return all(build.ok for _, build in self.builds())


def machine_info() -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    return {
        "cpus": cpus,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "note": f"server and load generator share the same {cpus} cores",
    }


def measure_scenario(gateway: Gateway, scenario: Scenario, settings: Settings) -> ScenarioResult:
    """Warm up, then measure one scenario (wrk: two runs; Python: one process, two phases)."""
    work = gateway.work_dir
    if settings.loadgen == "wrk":
        if settings.warmup > 0:
            run_wrk(gateway, scenario, settings.warmup, settings, work)
        load = run_wrk(gateway, scenario, settings.duration, settings, work)
    else:
        load = run_python_loadgen(gateway, scenario, settings, work)
    return ScenarioResult.of(scenario, load)


def compute_ratios(
    results: dict[str, ScenarioResult], raw: float, batch_name: str
) -> dict[str, float]:
    """sign vs no-op req/s, sign/s and batch sign/s vs the raw limit (those measured)."""
    noop, sign, batch = (results.get(n) for n in ("noop", "sign", batch_name))
    ratios = {}
    if noop and sign and noop.req_per_s:
        ratios["sign_vs_noop"] = round(sign.req_per_s / noop.req_per_s, 3)
    if sign:
        ratios["sign_vs_raw"] = round(sign.signatures_per_s / raw, 3)
    if batch:
        ratios["batch_vs_raw"] = round(batch.signatures_per_s / raw, 3)
    return ratios


def compare(this: BuildResult, baseline: BuildResult) -> dict[str, dict[str, float]]:
    """this/baseline of req/s and sig/s, per scenario measured on both (sig/s: signing ones)."""
    ratios = {}
    for name, mine in this.scenarios.items():
        theirs = baseline.scenarios.get(name)
        if theirs is None or not theirs.req_per_s:
            continue
        ratios[name] = {"req_per_s": round(mine.req_per_s / theirs.req_per_s, 3)}
        if theirs.signatures_per_s:
            sig = mine.signatures_per_s / theirs.signatures_per_s
            ratios[name]["signatures_per_s"] = round(sig, 3)
    return ratios


class Build:
    """A started gateway, its scenarios (they carry its root token) and its results."""

    def __init__(self, gateway: Gateway, batch: int) -> None:
        """Check which kmsgate the gateway imports, start it and create the bench key.

        Raises RuntimeError if any of that fails (the caller stops the gateway)."""
        self.gateway = gateway
        package = gateway.kmsgate_package()
        checkout = package.parent
        self.result = BuildResult(str(package), str(checkout), git_commit(checkout))
        print(f"{gateway.label}: {_fmt_origin(self.result)}", flush=True)
        token = gateway.start()
        create_key(gateway.url, token)
        self.scenarios = build_scenarios(token, batch)

    def measure(self, index: int, settings: Settings) -> None:
        """Check, then measure scenario `index`; a failing check is recorded and skipped."""
        scenario, label = self.scenarios[index], self.gateway.label
        try:
            check_scenario(self.gateway.url, scenario, settings.workers)
        except RuntimeError as exc:  # report what was measured, then fail
            print(f"skipping ({label}) {exc}", file=sys.stderr, flush=True)
            self.result.failures.append(str(exc))
            return
        print(f"running {scenario.name} ({label}) ...", flush=True)
        measured = measure_scenario(self.gateway, scenario, settings)
        self.result.scenarios[scenario.name] = measured


def run(settings: Settings, work: Path) -> Report:
    """The whole benchmark; the gateways are stopped on every way out.

    With a baseline, both gateways stay up for the whole run but only one is under load at a
    time: each scenario runs on the baseline, then on this checkout, back to back."""
    cpus = os.cpu_count() or 1
    print(f"machine: {cpus} cores, shared by the gateway and the load generator", flush=True)
    raw = raw_sign_rate(settings.raw_seconds)
    limit = raw * min(settings.workers, cpus)
    print(f"raw cryptography ECDSA P-256 sign: {raw:,.0f}/s on one core", flush=True)
    loadgen = wrk_version() if settings.loadgen == "wrk" else python_loadgen_name()
    gateways = [Gateway(work, settings.workers)]
    if settings.baseline:
        gateways.insert(0, Gateway(work / "baseline", settings.workers, settings.baseline))
    builds: list[Build] = []
    try:
        for gateway in gateways:
            builds.append(Build(gateway, settings.batch))
        for index in range(len(builds[0].scenarios)):
            for build in builds:
                build.measure(index, settings)
    finally:
        for gateway in gateways:
            gateway.stop()
    for build in builds:
        build.result.ratios = compute_ratios(
            build.result.scenarios, limit, build.scenarios[-1].name
        )
        build.result.audit = build.gateway.verify_audit()
    this = builds[-1].result
    baseline = builds[0].result if settings.baseline else None
    return Report(
        settings={k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        machine=machine_info(),
        loadgen=loadgen,
        raw_ecdsa_p256_sign_per_s_per_core=round(raw, 1),
        raw_limit_sign_per_s=round(limit, 1),
        this=this,
        baseline=baseline,
        vs_baseline=compare(this, baseline) if baseline else {},
    )


# -- output ----------------------------------------------------------------------------------


def format_report(report: Report) -> str:
    """The human-readable table and ratios; baseline rows next to this checkout's."""
    s, builds = report.settings, report.builds()
    rows = [
        (name + suffix, build.scenarios[name])
        for name in dict.fromkeys(name for _, build in builds for name in build.scenarios)
        for suffix, build in builds
        if name in build.scenarios
    ]
    width = max([16, *(len(name) + 2 for name, _ in rows)])
    lines = [
        "",
        f"kmsgate bench: {s['workers']} worker(s), {s['connections']} connections, "
        f"{s['duration']} s per scenario after {s['warmup']} s warm-up",
        f"load generator: {report.loadgen} (separate process); {report.machine['note']}",
        f"this checkout: {_fmt_origin(report.this)}",
        *([f"baseline: {_fmt_origin(report.baseline)}"] if report.baseline else []),
        "",
        f"{'scenario':<{width}}{'req/s':>10}{'sig/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'non-2xx':>9}{'errors':>8}{'server%':>9}{'loadgen%':>10}{'other%':>8}",
    ]
    for name, r in rows:
        lines.append(
            f"{name:<{width}}{r.req_per_s:>10,.0f}{r.signatures_per_s:>10,.0f}{r.p50_ms:>9.2f}"
            f"{r.p99_ms:>9.2f}{r.non_2xx:>9}{r.errors:>8}{_fmt_pct(r.server_cpu_pct):>9}"
            f"{_fmt_pct(r.loadgen_cpu_pct):>10}{_fmt_pct(r.other_cpu_pct):>8}"
        )
    ratios, workers = report.this.ratios, s["workers"]
    target = "meets" if ratios.get("sign_vs_noop", 0) >= SIGN_TARGET else "BELOW"
    lines += [
        "",
        f"raw ECDSA P-256 sign: {report.raw_ecdsa_p256_sign_per_s_per_core:,.0f}/s per core; "
        f"limit for {workers} worker(s): {report.raw_limit_sign_per_s:,.0f}/s",
        f"sign req/s vs no-op req/s: {_fmt_ratio(ratios, 'sign_vs_noop')} "
        f"({target} the {SIGN_TARGET:.0%} target)",
        f"sign/s vs raw limit: {_fmt_ratio(ratios, 'sign_vs_raw')}",
        f"batch sign/s vs raw limit: {_fmt_ratio(ratios, 'batch_vs_raw')}",
    ]
    if report.baseline:
        base = report.baseline.ratios
        lines.append(
            f"baseline: sign vs no-op {_fmt_ratio(base, 'sign_vs_noop')}, sign/s vs raw "
            f"{_fmt_ratio(base, 'sign_vs_raw')}, batch vs raw {_fmt_ratio(base, 'batch_vs_raw')}"
        )
    for name, vs in report.vs_baseline.items():
        sig = f"{vs['signatures_per_s']:.2f}" if "signatures_per_s" in vs else "-"
        lines.append(f"this/baseline {name}: req/s {vs['req_per_s']:.2f}, sig/s {sig}")
    lines.append(
        "errors = non-2xx + socket errors + batch items with an error; CPU columns in % of "
        "one core: server, load generator, other processes on the machine"
    )
    for suffix, build in builds:
        lines.append(
            f"audit chain{suffix}: {'ok' if build.audit.get('ok') else 'BROKEN'} "
            f"({build.audit.get('message', '')})"
        )
    lines += [f"SKIPPED{suffix} {failure}" for suffix, b in builds for failure in b.failures]
    busy = [name for name, r in rows if (r.other_cpu_pct or 0) > OTHER_CPU_WARN]
    if busy:
        lines.append(
            f"WARNING: other processes used over {OTHER_CPU_WARN:.0f}% of a core during "
            f"{', '.join(busy)}: the machine was not quiet; figures may be low and noisy "
            f"(trust them more where server% is near {100 * int(s['workers'])})"
        )
    return "\n".join(lines)


def _fmt_origin(build: BuildResult) -> str:
    return f"kmsgate from {build.kmsgate}" + (f" at {build.commit}" if build.commit else "")


def _fmt_ratio(ratios: dict[str, float], name: str) -> str:
    return f"{ratios[name]:.0%}" if name in ratios else "not measured"


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def write_json(report: Report, path: Path) -> None:
    """The report as JSON; this checkout's figures at the top level, as without a baseline."""
    data = asdict(report)
    data.update(data.pop("this"))
    data["failed_requests"] = report.failed_requests
    data["ok"] = report.ok
    path.write_text(json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so the gateway is stopped on the way out."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.loadgen_spec is not None:
        return loadgen_main(args.loadgen_spec)
    settings = resolve_settings(args)
    work = Path(tempfile.mkdtemp(prefix="kmsgate-bench-"))
    try:
        with sigterm_as_interrupt():
            report = run(settings, work)
    except KeyboardInterrupt:
        print("bench.py: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, subprocess.TimeoutExpired, httpx.HTTPError) as exc:
        print(f"bench.py: {exc}", file=sys.stderr)
        return 1
    finally:
        if settings.keep_data:
            print(f"data and logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(format_report(report))
    if settings.json_path:
        write_json(report, settings.json_path)
    if not report.ok:
        builds = [build for _, build in report.builds()]
        print(
            f"bench.py: FAILED ({report.failed_requests} failed requests, "
            f"{sum(len(b.failures) for b in builds)} scenarios skipped, audit chain "
            f"{'ok' if all(b.audit.get('ok') for b in builds) else 'broken'})",
            file=sys.stderr,
        )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
