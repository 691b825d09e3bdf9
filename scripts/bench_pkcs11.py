#!/usr/bin/env python3
"""kmsgate pkcs11 benchmark: REST signing through a SoftHSM2 token vs python-pkcs11 directly.

In one run, on a private SoftHSM2 token (temporary SOFTHSM2_CONF):

1. the direct limit: python-pkcs11 signing loops (sha256 in software + CKM_ECDSA + DER, one
   login per process, no lock) in 1 process and in `--workers` processes at once;
2. `kmsgate serve --dev --config <pkcs11 backend>` with `--workers` uvicorn workers, one
   gateway per `--sessions` value (1 = one worker session per process, serialised; more = a
   pool): single sign requests and batch sign requests (`--batch` items) on keep-alive
   connections from a separate load-generator process.

The two are interleaved, `--repeat` rounds then a last direct loop, and the best sample of
each is compared (other jobs on a shared machine only ever slow a sample down). Prints
signatures/s and the ratio of REST signing to the direct loop with as many processes as
the gateway has workers (goal for batches: >= 70%).

    python scripts/bench_pkcs11.py                      # 8 s per sample, 2 workers
    python scripts/bench_pkcs11.py --quick --json out.json
    python scripts/bench_pkcs11.py --sessions 1 4 --workers 1

Exit status: 0 if every request (and every batch item) succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

HOST = "127.0.0.1"
TOKEN_LABEL = "kmsgate-bench"
KEY_LABEL = "bench-direct"
KEY_NAME = "bench-hsm"
BATCH_GOAL = 0.70
KMSGATE_CLI = "from kmsgate.cli import main; main()"
MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
)


# -- the SoftHSM token ------------------------------------------------------------------------


@dataclass(frozen=True)
class Hsm:
    conf: Path
    module: str
    pin_file: Path

    @property
    def pin(self) -> str:
        return self.pin_file.read_text().strip()

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KMSGATE_")}
        return {**env, "SOFTHSM2_CONF": str(self.conf)}


def make_hsm(work: Path) -> Hsm:
    """A private SoftHSM config with one fresh token. Raises RuntimeError."""
    module = next((m for m in MODULES if Path(m).is_file()), None)
    util = shutil.which("softhsm2-util")
    if module is None or util is None:
        raise RuntimeError("SoftHSM2 is not installed (apt-get install softhsm2)")
    tokens = work / "tokens"
    tokens.mkdir(mode=0o700)
    conf = work / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n"
    )
    pin_file = work / "pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(8) + "\n")
    hsm = Hsm(conf, module, pin_file)
    subprocess.run(
        [util, "--init-token", "--free", "--label", TOKEN_LABEL, "--so-pin",
         secrets.token_hex(8), "--pin", hsm.pin],
        env=hsm.env(), check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return hsm


# -- 1. the direct python-pkcs11 loop (child processes) ---------------------------------------


def direct_child(seconds: float, start_at: float) -> int:
    """Child process: log in, sign with the bench key until `start_at + seconds`; print the
    number of signatures made after `start_at`."""
    import pkcs11
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11.util.ec import encode_named_curve_parameters

    conf = os.environ["KMSGATE_BENCH_HSM"]
    spec = json.loads(conf)
    lib = pkcs11.lib(spec["module"])
    for attempt in range(10):
        # SoftHSM's file store is racy when processes open a token at the same moment:
        # the token may be missing for a moment or answer GeneralError
        try:
            token = lib.get_token(token_label=TOKEN_LABEL)
            login = token.open(rw=True, user_pin=spec["pin"])
            session = token.open(rw=True)
            key: Any = (
                None
                if spec.get("create")
                else session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=KEY_LABEL)
            )
            break
        except (pkcs11.exceptions.GeneralError, pkcs11.exceptions.NoSuchToken):
            time.sleep(0.05 * (attempt + 1))
            lib.reinitialize()
    else:
        raise RuntimeError("cannot open the token")
    if key is None:
        session.generate_keypair(
            KeyType.EC,
            store=True,
            label=KEY_LABEL,
            public_template={Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
        )
        print(0)
        return 0
    message = os.urandom(64)
    count = 0
    while time.time() < start_at:
        time.sleep(0.001)
    late = time.time() - start_at
    started = time.perf_counter()
    end = started + seconds
    while (now := time.perf_counter()) < end:
        raw = key.sign(hashlib.sha256(message).digest(), mechanism=Mechanism.ECDSA)
        encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        count += 1
    session.close()
    login.close()
    print(json.dumps({"count": count, "seconds": now - started, "late": late}))
    return 0


def direct_rate(hsm: Hsm, processes: int, seconds: float) -> float:
    """Signatures/s of `processes` direct loops running together."""
    spec = {"module": hsm.module, "pin": hsm.pin}
    env = {**hsm.env(), "KMSGATE_BENCH_HSM": json.dumps(spec)}
    start_at = time.time() + 1.5 + 0.2 * processes  # after every child has logged in
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--direct-child", str(seconds), str(start_at)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    total = 0.0
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"direct loop failed: {err[-1500:]}")
        result = json.loads(out)
        if result["late"] > 0.1 * seconds:
            print(f"warning: a direct loop started {result['late']:.2f} s late", file=sys.stderr)
        total += result["count"] / result["seconds"]
    return total


def create_direct_key(hsm: Hsm) -> None:
    env = {**hsm.env(), "KMSGATE_BENCH_HSM": json.dumps({**asdict_hsm(hsm), "create": True})}
    subprocess.run(
        [sys.executable, __file__, "--direct-child", "0", "0"],
        env=env, check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def asdict_hsm(hsm: Hsm) -> dict[str, Any]:
    return {"module": hsm.module, "pin": hsm.pin}


# -- 2. the gateway ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Gateway:
    """`kmsgate serve --dev --config` with a pkcs11 backend, in its own process group."""

    def __init__(self, work: Path, hsm: Hsm, workers: int, sessions: int) -> None:
        self.dir = work / f"gateway-w{workers}-s{sessions}"
        self.dir.mkdir()
        self.hsm = hsm
        self.workers = workers
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.config = self.dir / "kmsgate.yaml"
        backend = {
            "type": "pkcs11",
            "module": hsm.module,
            "token": TOKEN_LABEL,
            "pin_file": str(hsm.pin_file),
            "sessions": sessions,
        }
        self.config.write_text(yaml.safe_dump({"backends": {"hsm": backend}}))
        self.log = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> str:
        """Start; return the root token. Raises RuntimeError."""
        command = [
            sys.executable, "-c", KMSGATE_CLI, "serve", "--dev", "--config", str(self.config),
            "--data-dir", str(self.dir / "data"), "--port", str(self.port),
            "--workers", str(self.workers),
        ]  # fmt: skip
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.hsm.env(),
                start_new_session=True,
            )  # fmt: skip
        token_file = self.dir / "data" / "root-token"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (
                    httpx.get(f"{self.url}/v1/sys/health", timeout=1).status_code == 200
                    and token_file.exists()
                ):
                    return token_file.read_text().strip()
            time.sleep(0.1)
        raise RuntimeError(f"gateway not ready:\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        return "(no log)"


def prepare_key(url: str, token: str, workers: int) -> None:
    """Create the hsm key; wait until every worker signs with it. Raises RuntimeError."""
    headers = {"Authorization": f"Bearer {token}"}
    reply = httpx.post(
        f"{url}/v1/keys",
        json={"name": KEY_NAME, "type": "ecdsa-p256", "purpose": "bench", "backend": "hsm"},
        headers=headers,
        timeout=30,
    )
    if reply.status_code != 201:
        raise RuntimeError(f"creating the key failed: {reply.status_code} {reply.text[:300]}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        replies = [
            httpx.post(
                f"{url}/v1/keys/{KEY_NAME}/sign",
                json={"input": "YQ=="},
                headers={**headers, "Connection": "close"},
                timeout=30,
            )
            for _ in range(4 * workers)
        ]
        if all(r.status_code == 200 for r in replies):
            return
        time.sleep(0.3)
    raise RuntimeError("the key is not usable on every worker")


# -- the load generator (its own process) -----------------------------------------------------


async def _connection(port: int, request: bytes, stats: dict[str, Any]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while not stats["stopping"]:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
            body = await reader.readexactly(int(length.group(1)) if length else 0)
            if stats["measuring"]:
                stats["requests"] += 1
                if head[9:12] != b"200":
                    stats["non_2xx"] += 1
                    stats["last_error"] = (head[:12] + body[:300]).decode(errors="replace")
                errors = body.count(b'"error"')
                if errors:
                    stats["item_errors"] += errors
                    stats["last_error"] = body[:600].decode(errors="replace")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        if not stats["stopping"]:
            stats["socket_errors"] += 1
            stats["last_error"] = repr(exc)
    finally:
        writer.close()


async def _drive(spec: dict[str, Any]) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "stopping": False, "measuring": False, "requests": 0, "non_2xx": 0,
        "item_errors": 0, "socket_errors": 0,
    }  # fmt: skip
    request = base64.b64decode(spec["request"])
    tasks = [
        asyncio.create_task(_connection(spec["port"], request, stats))
        for _ in range(spec["connections"])
    ]
    await asyncio.sleep(spec["warmup"])
    stats["measuring"] = True
    started = time.perf_counter()
    await asyncio.sleep(spec["duration"])
    stats["measuring"] = False
    elapsed = time.perf_counter() - started
    stats["stopping"] = True
    await asyncio.wait(tasks, timeout=30)
    stats["duration_s"] = elapsed
    del stats["stopping"], stats["measuring"]
    return stats


def loadgen_child(spec_path: Path) -> int:
    print(json.dumps(asyncio.run(_drive(json.loads(spec_path.read_text())))))
    return 0


def http_request(port: int, token: str, body: bytes) -> bytes:
    head = (
        f"POST /v1/keys/{KEY_NAME}/sign HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def load(
    work: Path, port: int, request: bytes, connections: int, warmup: float, duration: float
) -> dict[str, Any]:
    spec_path = work / f"load-{secrets.token_hex(4)}.json"
    spec = {
        "port": port,
        "request": base64.b64encode(request).decode(),
        "connections": connections,
        "warmup": warmup,
        "duration": duration,
    }
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, __file__, "--loadgen", str(spec_path)],
        capture_output=True, text=True, timeout=warmup + duration + 90, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {proc.stderr[-1500:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


# -- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Interleave the measurements (direct loop, then every gateway, `--repeat` times, then
    the direct loop once more) and keep every sample; ratios compare the best of each, as
    other jobs on the machine only ever slow a sample down."""
    hsm = make_hsm(work)
    create_direct_key(hsm)
    settings = {k: v for k, v in vars(args).items() if k not in ("direct_child", "loadgen")}
    report: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
        "cpus": os.cpu_count(),
        "direct_runs": {f"{p}_proc": [] for p in sorted({1, args.workers})},
        "gateway_runs": {},
        "errors": 0,
    }
    single = json.dumps({"input": base64.b64encode(os.urandom(64)).decode()}).encode()
    items = [{"input": base64.b64encode(os.urandom(64)).decode()} for _ in range(args.batch)]
    batch = json.dumps({"batch": items}).encode()
    scenarios = (
        ("single", single, args.connections, 1),
        ("batch", batch, args.batch_connections, args.batch),
    )

    def measure_direct() -> None:
        for processes in sorted({1, args.workers}):
            print(f"  direct loop, {processes} process(es)", file=sys.stderr)
            rate = direct_rate(hsm, processes, args.duration)
            report["direct_runs"][f"{processes}_proc"].append(rate)

    gateways: dict[str, tuple[Gateway, str]] = {}
    try:
        for sessions in args.sessions:
            gateway = Gateway(work, hsm, args.workers, sessions)
            token = gateway.start()
            prepare_key(gateway.url, token, args.workers)
            gateways[f"sessions_{sessions}"] = (gateway, token)
            report["gateway_runs"][f"sessions_{sessions}"] = {"single": [], "batch": []}
        for round_ in range(args.repeat):
            print(f"round {round_ + 1}/{args.repeat}", file=sys.stderr)
            measure_direct()
            for key, (gateway, token) in gateways.items():
                for name, body, connections, per_request in scenarios:
                    print(f"  gateway {key}: {name}", file=sys.stderr)
                    request = http_request(gateway.port, token, body)
                    out = load(work, gateway.port, request, connections, args.warmup, args.duration)
                    out["signatures_per_s"] = out["requests"] * per_request / out["duration_s"]
                    report["errors"] += out["non_2xx"] + out["item_errors"] + out["socket_errors"]
                    report["gateway_runs"][key][name].append(out)
        print("final round", file=sys.stderr)
        measure_direct()
    finally:
        for gateway, _ in gateways.values():
            gateway.stop()
    report["direct"] = {k: max(v) for k, v in report["direct_runs"].items()}
    report["gateway"] = {
        key: {name: max(r["signatures_per_s"] for r in runs) for name, runs in res.items()}
        for key, res in report["gateway_runs"].items()
    }
    direct = report["direct"][f"{args.workers}_proc"]
    report["ratios"] = {
        key: {f"{name}_vs_direct": rate / direct for name, rate in res.items()}
        for key, res in report["gateway"].items()
    }
    best = max(r["batch_vs_direct"] for r in report["ratios"].values())
    report["batch_goal"] = BATCH_GOAL
    report["batch_goal_met"] = best >= BATCH_GOAL
    return report


def format_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"pkcs11 bench: {report['cpus']} CPUs, {s['workers']} gateway worker(s), batch "
        f"{s['batch']}, {s['duration']:.0f} s per sample, best of {s['repeat']} "
        "(direct: best of all rounds)",
        "",
        "direct python-pkcs11 (sha256 + CKM_ECDSA + DER, P-256):",
    ]
    for key, rate in report["direct"].items():
        runs = ", ".join(f"{r:,.0f}" for r in report["direct_runs"][key])
        lines.append(f"  {key.replace('_', ' '):<12} {rate:>10,.0f} sign/s  (samples {runs})")
    lines.append("")
    lines.append("REST through the HSM:")
    for key, res in report["gateway"].items():
        for name, rate in res.items():
            samples = report["gateway_runs"][key][name]
            runs = ", ".join(f"{r['signatures_per_s']:,.0f}" for r in samples)
            errors = sum(r["non_2xx"] + r["item_errors"] + r["socket_errors"] for r in samples)
            ratio = report["ratios"][key][f"{name}_vs_direct"]
            lines.append(
                f"  {key:<12} {name:<7} {rate:>10,.0f} sign/s  {ratio:>4.0%} of direct  "
                f"errors {errors}  (samples {runs})"
            )
    lines.append(f"(ratios against the direct loop with {s['workers']} process(es))")
    lines.append("")
    met = "met" if report["batch_goal_met"] else "NOT met"
    lines.append(f"batch goal >= {report['batch_goal']:.0%} of the direct loop: {met}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per scenario")
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--workers", type=int, default=2, help="gateway worker processes")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument(
        "--connections", type=int, help="connections for single signs (8 per worker)"
    )
    parser.add_argument(
        "--batch-connections",
        type=int,
        help="connections for batch signs (4 per worker: fewer can all land on one worker)",
    )
    parser.add_argument("--repeat", type=int, default=2, help="samples per scenario")
    parser.add_argument("--quick", action="store_true", help="2 s per sample, 1 round")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--direct-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--loadgen", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.repeat = 2.0, 0.5, 1
    args.connections = args.connections or 8 * args.workers
    args.batch_connections = args.batch_connections or 4 * args.workers
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.direct_child:
        return direct_child(float(args.direct_child[0]), float(args.direct_child[1]))
    if args.loadgen:
        return loadgen_child(args.loadgen)
    with tempfile.TemporaryDirectory(prefix="kmsgate-bench-pkcs11-") as tmp:
        report = run(args, Path(tmp))
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
