#!/usr/bin/env python3
"""Envelope encryption benchmark, in one run on one machine:

1. raw AES-256-GCM (cryptography) on 1 MiB buffers and on 16 KiB chunks: the limit;
2. kmsgate.chunked (C2SP Cobblestone-256) streaming encrypt and decrypt, in memory (no disk),
   single thread, with the ratio to (1);
3. server-side `encrypt` req/s (single item, 64-byte plaintext, and batches of 100) against
   `kmsgate serve --dev`, driven by wrk (needs `wrk` on PATH; skipped otherwise).

    python scripts/bench_envelope.py [--seconds 5] [--mib 512] [--workers 1] [--no-server]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsgate import chunked

HOST = "127.0.0.1"


def rate(fn: Callable[[], int], seconds: float) -> float:
    """Bytes (or operations) per second of `fn` (which returns how many it did), repeated
    for about `seconds` after one warm-up call."""
    fn()
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        done += fn()
    return done / elapsed


class _Zeros(io.RawIOBase):
    """An endless (up to `size`) reader that costs nothing: isolates the cipher work."""

    def __init__(self, size: int) -> None:
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._left)
        self._left -= n
        return n  # the buffer's previous contents are as good as zeros here


class _Sink(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        return len(b)


def crypto_numbers(seconds: float, mib: int) -> dict[str, float]:
    key = os.urandom(32)
    aead = AESGCM(key)
    mb1 = bytes(1 << 20)
    chunk = bytes(chunked.CHUNK_BYTES)
    nonce = bytes(12)
    size = mib << 20
    ciphertext = io.BytesIO()
    chunked.encrypt_stream(key, b"ctx", _Zeros(64 << 20), ciphertext)
    ct = ciphertext.getvalue()

    def raw_1m() -> int:
        for _ in range(16):
            aead.encrypt(nonce, mb1, None)
        return 16 << 20

    def raw_16k() -> int:
        for _ in range(1024):
            aead.encrypt(nonce, chunk, None)
        return 1024 * len(chunk)

    def stream_encrypt() -> int:
        return chunked.encrypt_stream(key, b"ctx", _Zeros(size), _Sink())

    def stream_decrypt() -> int:
        return chunked.decrypt_stream(key, b"ctx", io.BytesIO(ct), _Sink())

    return {
        "raw_aes_gcm_1mib_GBps": rate(raw_1m, seconds) / 1e9,
        "raw_aes_gcm_16kib_GBps": rate(raw_16k, seconds) / 1e9,
        "chunked_encrypt_GBps": rate(stream_encrypt, seconds) / 1e9,
        "chunked_decrypt_GBps": rate(stream_decrypt, seconds) / 1e9,
    }


# -- server-side encrypt ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def gateway(workers: int) -> Iterator[tuple[str, str]]:
    """(url, root token) of a `kmsgate serve --dev` in a temporary data dir."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        data = Path(tmp) / "data"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KMSGATE_")}
        cmd = [sys.executable, "-c", "from kmsgate.cli import main; main()", "serve", "--dev"]
        cmd += ["--data-dir", str(data), "--port", str(port), "--workers", str(workers)]
        with (Path(tmp) / "server.log").open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        url = f"http://{HOST}:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        "gateway did not start:\n" + (Path(tmp) / "server.log").read_text()
                    )
                with contextlib.suppress(httpx.HTTPError):
                    ok = httpx.get(f"{url}/v1/sys/health", timeout=1).status_code == 200
                    if ok and (data / "root-token").exists():
                        break
                time.sleep(0.1)
            yield url, (data / "root-token").read_text().strip()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


WRK_LUA = """wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
"""


def wrk_rate(url: str, token: str, body: dict[str, object], seconds: float, tmp: Path) -> float:
    """Requests per second from wrk (2 threads, 32 connections); every reply must be 2xx."""
    script = tmp / "bench.lua"
    script.write_text(WRK_LUA.format(body=json.dumps(body), token=token))
    proc = subprocess.run(
        ["wrk", "-t2", "-c32", f"-d{max(1, round(seconds))}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    if "Non-2xx" in proc.stdout:
        raise SystemExit(f"wrk saw errors:\n{proc.stdout}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", proc.stdout)
    assert match, proc.stdout
    return float(match.group(1))


def server_numbers(seconds: float, workers: int) -> dict[str, float]:
    if shutil.which("wrk") is None:
        print("wrk not found: server-side numbers skipped", file=sys.stderr)
        return {}
    with gateway(workers) as (url, token), tempfile.TemporaryDirectory() as tmp:
        headers = {"authorization": f"Bearer {token}"}
        key = {"name": "bench", "type": "aes-256-gcm", "purpose": "envelope-data"}
        httpx.post(f"{url}/v1/keys", json=key, headers=headers, timeout=10).raise_for_status()
        item = {"plaintext": base64.b64encode(os.urandom(64)).decode(), "context": {"t": "a"}}
        ct = httpx.post(f"{url}/v1/keys/bench/encrypt", json=item, headers=headers, timeout=10)
        dec = {"ciphertext": ct.json()["ciphertext"], "context": {"t": "a"}}
        path = f"{url}/v1/keys/bench"
        wrk_rate(f"{path}/encrypt", token, item, 2, Path(tmp))  # warm-up
        return {
            "encrypt_req_per_s": wrk_rate(f"{path}/encrypt", token, item, seconds, Path(tmp)),
            "decrypt_req_per_s": wrk_rate(f"{path}/decrypt", token, dec, seconds, Path(tmp)),
            "encrypt_batch100_items_per_s": 100
            * wrk_rate(f"{path}/encrypt", token, {"batch": [item] * 100}, seconds, Path(tmp)),
            "datakey_req_per_s": wrk_rate(f"{path}/datakey", token, {}, seconds, Path(tmp)),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--mib", type=int, default=512, help="stream size per round")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-server", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = crypto_numbers(args.seconds, args.mib)
    results["encrypt_vs_raw_1mib"] = (
        results["chunked_encrypt_GBps"] / results["raw_aes_gcm_1mib_GBps"]
    )
    results["decrypt_vs_raw_1mib"] = (
        results["chunked_decrypt_GBps"] / results["raw_aes_gcm_1mib_GBps"]
    )
    if not args.no_server:
        results.update(server_numbers(args.seconds, args.workers))
    for name, value in results.items():
        print(f"{name:32} {value:12.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
