"""moto_server fixtures for the awskms backend: a real HTTP KMS endpoint on loopback.

- :func:`running_moto`: `moto_server -H 127.0.0.1 -p PORT` on a free port, stopped by PID
  (SIGTERM, then SIGKILL). State is in memory; :meth:`MotoServer.reset` wipes it
  (`POST /moto-api/reset`).
- :class:`KmsProxy`: a small HTTP proxy in front of moto that records every KMS request
  (the `X-Amz-Target` and the JSON body, to check request shapes moto itself ignores) and
  can answer the next N requests with `ThrottlingException` as AWS does (HTTP 400,
  `__type: ThrottlingException`), to test retries and 503 Retry-After honestly over HTTP.

moto is *not* a faithful KMS (docs/backends/awskms.md, "moto gaps"): it ignores
`MessageType=DIGEST`, signs RSA-PSS with the maximum salt, lets disabled and pending-deletion
keys work and enforces no key policy. Tests use it for the wire protocol and the RAW-mode
cryptography, which they verify independently (cryptography, openssl), never with moto's
own Verify. Missing moto skips the tests, or fails them under ``KMSGATE_REQUIRE_ALL=1``.

The credentials are dummies (moto accepts any); they are passed in the backend settings so
that no real AWS credential from the environment is ever used against moto.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]
import pytest
from botocore.config import Config  # type: ignore[import-untyped]

from tests.components import (
    LOOPBACK,
    free_port,
    log_tail,
    require_component,
    stop_process,
    wait_for_port,
)

__all__ = [
    "DUMMY_CREDENTIALS",
    "KmsProxy",
    "MotoServer",
    "kms_proxy",
    "moto_server",
    "moto_server_binary",
    "running_moto",
]

DUMMY_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}
REGION = "us-east-1"
_START_TIMEOUT = 20.0
_START_ATTEMPTS = 3


def moto_server_binary() -> list[str] | None:
    """The command that starts moto's server, or None if moto[server] is missing."""
    beside = Path(sys.executable).parent / "moto_server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("moto_server")
    if found:
        return [found]
    return None


def require_moto() -> list[str]:
    command = moto_server_binary()
    if command is None:
        require_component("moto", "no 'moto_server'; pip install 'moto[server]'")
    assert command is not None
    return command


@dataclasses.dataclass
class MotoServer:
    endpoint: str
    port: int
    process: subprocess.Popen[bytes]
    log_file: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, endpoint: str | None = None) -> Any:
        """A boto3 KMS client on this server (dummy credentials, no retries)."""
        return boto3.client(
            "kms",
            endpoint_url=endpoint or self.endpoint,
            region_name=REGION,
            aws_access_key_id=DUMMY_CREDENTIALS["access_key_id"],
            aws_secret_access_key=DUMMY_CREDENTIALS["secret_access_key"],
            config=Config(retries={"total_max_attempts": 1, "mode": "standard"}),
        )

    def reset(self) -> None:
        """Wipe moto's state (every key, alias, ...)."""
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
        try:
            connection.request("POST", "/moto-api/reset")
            reply = connection.getresponse()
            reply.read()
            assert reply.status == 200, reply.status
        finally:
            connection.close()

    def backend_settings(self, endpoint: str | None = None, **extra: Any) -> dict[str, Any]:
        """A `backends.<name>` entry for the awskms backend on this server."""
        return {
            "type": "awskms",
            "region": REGION,
            "endpoint_url": endpoint or self.endpoint,
            **DUMMY_CREDENTIALS,
            **extra,
        }


@contextlib.contextmanager
def running_moto(work_dir: Path) -> Iterator[MotoServer]:
    """`moto_server -H 127.0.0.1 -p PORT` on a free port; stopped by PID on exit."""
    command = require_moto()
    work_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(work_dir),
        "LANG": "C.UTF-8",
        # moto never checks credentials; make sure none leak into its environment
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    if "PYENV_VERSION" in os.environ:
        env["PYENV_VERSION"] = os.environ["PYENV_VERSION"]
    process: subprocess.Popen[bytes] | None = None
    try:
        for attempt in range(1, _START_ATTEMPTS + 1):
            port = free_port()
            log_file = work_dir / f"moto-{port}.log"
            with log_file.open("ab") as log:
                process = subprocess.Popen(
                    [*command, "-H", LOOPBACK, "-p", str(port)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=work_dir,
                    start_new_session=True,
                )
            try:
                deadline = time.monotonic() + _START_TIMEOUT
                while True:
                    if process.poll() is not None:
                        raise RuntimeError(
                            f"moto_server exited with {process.returncode}:\n{log_tail(log_file)}"
                        )
                    try:
                        wait_for_port(LOOPBACK, port, timeout=0.5)
                        break
                    except TimeoutError:
                        if time.monotonic() > deadline:
                            raise
                break
            except (RuntimeError, TimeoutError):
                stop_process(process)
                if attempt < _START_ATTEMPTS and "in use" in log_tail(log_file):
                    continue
                raise
        assert process is not None
        yield MotoServer(f"http://{LOOPBACK}:{port}", port, process, log_file)
    finally:
        if process is not None:
            stop_process(process)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto_server for the session (tests that need a clean state call `reset`)."""
    with running_moto(tmp_path_factory.mktemp("moto")) as server:
        yield server


# -- recording / throttling proxy ------------------------------------------------------------


@dataclasses.dataclass
class KmsRequest:
    target: str  # "TrentService.Sign"
    body: dict[str, Any]

    @property
    def operation(self) -> str:
        return self.target.rpartition(".")[2]

    def blob(self, field: str) -> bytes:
        return base64.b64decode(self.body[field])


class KmsProxy:
    """An HTTP proxy on loopback in front of moto: records requests, injects throttling."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.requests: list[KmsRequest] = []
        self.throttled = 0
        self._throttle_next = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = self.rfile.read(length)
                target = self.headers.get("x-amz-target", "")
                try:
                    parsed = json.loads(body) if body else {}
                except ValueError:
                    parsed = {}
                with proxy._lock:
                    proxy.requests.append(KmsRequest(target, parsed))
                    throttle = proxy._throttle_next > 0
                    if throttle:
                        proxy._throttle_next -= 1
                        proxy.throttled += 1
                if throttle:
                    self._reply(
                        400,
                        json.dumps(
                            {"__type": "ThrottlingException", "message": "Rate exceeded"}
                        ).encode(),
                        {"content-type": "application/x-amz-json-1.1"},
                    )
                    return
                upstream = http.client.HTTPConnection(LOOPBACK, proxy.upstream_port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    headers["host"] = f"{LOOPBACK}:{proxy.upstream_port}"
                    upstream.request("POST", self.path, body=body, headers=headers)
                    reply = upstream.getresponse()
                    data = reply.read()
                    self._reply(
                        reply.status,
                        data,
                        {"content-type": reply.getheader("content-type", "application/json")},
                    )
                finally:
                    upstream.close()

            def _reply(self, status: int, data: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def throttle_next(self, count: int) -> None:
        """Answer the next `count` requests with ThrottlingException."""
        with self._lock:
            self._throttle_next = count

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.throttled = 0
            self._throttle_next = 0

    def of(self, operation: str) -> list[KmsRequest]:
        with self._lock:
            return [r for r in self.requests if r.operation == operation]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def kms_proxy(moto_server: MotoServer) -> Iterator[KmsProxy]:
    """A fresh recording / throttling proxy in front of the session's moto_server."""
    proxy = KmsProxy(moto_server.port)
    try:
        yield proxy
    finally:
        proxy.close()
