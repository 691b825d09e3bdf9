"""Dev gateways as subprocesses, for the scripts that start, kill and check them
(ha_test.py, crash_loop.py): start on a free loopback port and wait until healthy, kill the
whole process group, verify the audit log it left."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.components import LOOPBACK, free_port  # noqa: E402

START_TIMEOUT_S = 60.0


def kmsgate_command() -> str:
    """The `kmsgate` entry point beside this Python (a virtual environment's), else PATH's."""
    found = Path(sys.executable).parent / "kmsgate"
    return str(found) if found.exists() else "kmsgate"


@dataclass
class Gateway:
    name: str
    addr: str
    proc: subprocess.Popen[bytes]
    log: Path
    alive: bool = True


def start_gateway(name: str, data_dir: Path, log: Path, *serve_args: str) -> Gateway:
    """`kmsgate serve --dev --data-dir DATA_DIR [serve_args]` on a free loopback port, in a
    process group of its own, its output appended to `log`; returns once it answers its
    health check. Raises RuntimeError if it exits or does not answer within a minute
    (its log's tail in the message)."""
    port = free_port()
    argv = [kmsgate_command(), "serve", "--dev", "--data-dir", str(data_dir)]
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [*argv, "--port", str(port), *serve_args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    gateway = Gateway(name, f"http://{LOOPBACK}:{port}", proc, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{gateway.addr}/v1/sys/health", timeout=1).status_code == 200:
                return gateway
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    kill_group(gateway)
    raise RuntimeError(f"{name} did not start:\n{log.read_text()[-2000:]}")


def kill_group(gateway: Gateway, grace: float = 5.0) -> None:
    """SIGKILL the gateway's whole process group (its workers too) and wait, up to `grace`
    seconds, until no process of the group is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(gateway.proc.pid, signal.SIGKILL)
    gateway.proc.wait()
    gateway.alive = False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(gateway.proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def verify_audit(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`kmsgate audit verify ARGS`, its output captured."""
    argv = [kmsgate_command(), "audit", "verify", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, check=False)
