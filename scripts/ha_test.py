"""Three kmsgate replicas on one PostgreSQL, under concurrent load, one of them killed.

Starts a throwaway PostgreSQL and three gateways (`serve --dev`, one worker each, one data
dir and root key, the store on PostgreSQL) on loopback ports, then for `--duration`
seconds drives, through all three at once: signs, certificate issuance, rotations of one
shared key, key disables and token revocations (timing how long the other replicas take to
enforce them), and a burst of certificate revocations (counting the CRL builds). Halfway
through it kills one replica with SIGKILL. Then it checks the invariants and prints a table:

- no lost update: every certificate a replica issued is in the inventory, serials unique;
  the rotated key's versions are 1..N without a gap or a duplicate;
- every disable and token revocation enforced by every replica within 1 s (the maximum);
- one CRL build per revocation burst (the burst starts right after a build: the jobs
  leader builds at most once a tick, so a burst spanning two ticks would make two);
- the replicas left kept serving after the kill, and the scheduled jobs (a key rotating
  every 2 s) went on within 10 s;
- every audit chain verifies (the killed replica's included).

Exit status 0 when every invariant holds, 1 otherwise. The test suite runs a short form
(tests/test_ha.py). Usage: python scripts/ha_test.py [--duration 20] [--signers 3]

With `--scaling` it measures instead single-sign throughput through 1, 2 and 3 replicas
(one worker each, one wrk per replica at once) and the replicas' CPU per signature.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "scripts"))

import bench  # noqa: E402  (its CPU accounting)
from gateways import Gateway as Replica  # noqa: E402
from gateways import kill_group, start_gateway, verify_audit  # noqa: E402

from kmsgate.pki.csr import new_key_and_csr  # noqa: E402
from tests.components import fresh_postgres_database, running_postgres, stop_process  # noqa: E402

REPLICAS = 3
ENFORCE_LIMIT_S = 1.0
JOBS_MOVE_LIMIT_S = 10.0
MESSAGE = base64.b64encode(b"replicated").decode()
TIMEOUT = 10.0


@dataclass
class Tally:
    """What the load saw, by replica."""

    ok: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    failed_after_kill: Counter[str] = field(default_factory=Counter)
    issued: list[str] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    enforce_s: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextmanager
def replicas(base: Path, database_url: str, count: int = REPLICAS) -> Iterator[list[Replica]]:
    """`count` dev gateways (one worker each) on one data dir and one PostgreSQL database,
    started one after the other (the first makes the dev CA and the root token); stopped
    on exit."""
    config = base / "kmsgate.yaml"
    # a scheduled rotation every 2 s (`ha-sched`) shows the jobs moving after the kill
    limits = {"min_rotation_seconds": 2}
    config.write_text(json.dumps({"database_url": database_url, "limits": limits}))
    data = base / "data"
    started: list[Replica] = []
    try:
        for n in range(count):
            log = base / f"replica-{n}.log"
            started.append(start_gateway(f"r{n}", data, log, "--config", str(config)))
        yield started
    finally:
        for replica in started:
            if replica.alive:
                stop_process(replica.proc)


class Load:
    """The concurrent work, spread over the replicas still alive."""

    def __init__(self, nodes: list[Replica], token: str, tally: Tally) -> None:
        self.nodes = nodes
        self.headers = {"authorization": f"Bearer {token}"}
        # one client for every thread: keep-alive connections, and no new client per call
        # (building one costs ~50 ms, which the enforcement timings would count)
        self.client = httpx.Client(timeout=TIMEOUT)
        self.tally = tally
        self.stop = threading.Event()
        self.killed_at: float | None = None
        _, csr = new_key_and_csr(["ha.lab"])
        self.csr = csr.public_bytes(serialization.Encoding.PEM).decode()

    def alive(self) -> list[Replica]:
        return [r for r in self.nodes if r.alive]

    def call(self, replica: Replica, method: str, path: str, body: object = None,
             headers: dict[str, str] | None = None) -> httpx.Response | None:  # fmt: skip
        """One request; None when the replica cannot be reached (it was killed)."""
        try:
            return self.client.request(
                method, f"{replica.addr}{path}", json=body, headers=headers or self.headers
            )
        except httpx.HTTPError:
            return None

    def _count(self, replica: Replica, ok: bool) -> None:
        with self.tally.lock:
            (self.tally.ok if ok else self.tally.failed)[replica.name] += 1
            if not ok and self.killed_at is not None and replica.alive:
                self.tally.failed_after_kill[replica.name] += 1

    def signer(self) -> None:
        for replica in itertools.cycle(self.nodes):
            if self.stop.is_set():
                return
            if not replica.alive:
                continue
            reply = self.call(replica, "POST", "/v1/keys/ha-sign/sign", {"input": MESSAGE})
            self._count(replica, reply is not None and reply.status_code == 200)

    def issuer(self) -> None:
        for replica in itertools.cycle(self.nodes):
            if self.stop.is_set():
                return
            if not replica.alive:
                continue
            body = {"csr": self.csr, "profile": "server", "ttl": "1h"}
            reply = self.call(replica, "POST", "/v1/pki/cas/dev/issue", body)
            ok = reply is not None and reply.status_code == 200
            self._count(replica, ok)
            if ok and reply is not None:
                with self.tally.lock:
                    self.tally.issued.append(reply.json()["serial"])

    def rotator(self) -> None:
        for replica in itertools.cycle(self.nodes):
            if self.stop.wait(0.1):
                return
            if not replica.alive:
                continue
            reply = self.call(replica, "POST", "/v1/keys/ha-rot/rotate")
            if reply is not None and reply.status_code == 200:
                with self.tally.lock:
                    self.tally.versions.append(reply.json()["primary_version"])

    def enforcer(self) -> None:
        """Disable a fresh key, and revoke a fresh token, through one replica; time until
        each other replica refuses them."""
        for n in itertools.count():
            if self.stop.wait(0.3):
                return
            nodes = self.alive()
            if len(nodes) < 2:
                continue
            origin = nodes[n % len(nodes)]
            others = [r for r in nodes if r is not origin]
            name = f"ha-enforce-{n}"
            body = {"name": name, "type": "ed25519", "purpose": "ha"}
            made = self.call(origin, "POST", "/v1/keys", body)
            if made is None or made.status_code != 201:
                continue
            token = self.call(origin, "POST", "/v1/sys/tokens", {"roles": ["admin"]})
            if token is None or token.status_code != 201:
                continue
            bearer = {"authorization": f"Bearer {token.json()['token']}"}
            for other in others:  # both usable everywhere first
                self.call(other, "POST", f"/v1/keys/{name}/sign", {"input": MESSAGE})
                self.call(other, "GET", "/v1/keys", headers=bearer)
            disabled = self.call(origin, "POST", f"/v1/keys/{name}/disable")
            revoked = self.call(origin, "DELETE", f"/v1/sys/tokens/{token.json()['id']}")
            if disabled is None or revoked is None:
                continue
            started = time.monotonic()
            for other in others:
                self._time_refusal(other, "POST", f"/v1/keys/{name}/sign", 409, started, None)
                self._time_refusal(other, "GET", "/v1/keys", 401, started, bearer)

    def _time_refusal(self, replica: Replica, method: str, path: str, status: int,
                      started: float, headers: dict[str, str] | None) -> None:  # fmt: skip
        body = {"input": MESSAGE} if method == "POST" else None
        while time.monotonic() - started < 5:
            reply = self.call(replica, method, path, body, headers)
            if reply is None:
                return  # killed meanwhile
            if reply.status_code == status:
                with self.tally.lock:
                    self.tally.enforce_s.append(time.monotonic() - started)
                return
            time.sleep(0.01)
        with self.tally.lock:
            self.tally.enforce_s.append(float("inf"))


def _crl(load: Load, replica: Replica) -> x509.CertificateRevocationList | None:
    reply = load.call(replica, "GET", "/v1/pki/cas/dev/crl")
    if reply is None or reply.status_code != 200:
        return None
    return x509.load_der_x509_crl(reply.content)


def revocation_burst(load: Load) -> tuple[int, float]:
    """Revoke five issued certificates at once through different replicas, right after a
    CRL build (so that the burst falls within one tick of the jobs leader, which builds at
    most once a tick); wait until every replica's CRL lists them. Returns (CRL builds
    meanwhile: `crl.build` audit records, seconds until listed)."""
    nodes = load.alive()
    with load.tally.lock:
        pacer, serials = load.tally.issued[-6], load.tally.issued[-5:]
    revoke = {"reason": "keyCompromise"}
    load.call(nodes[0], "POST", f"/v1/pki/certs/{pacer}/revoke", revoke)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the pacer's build marks the start of a tick
        crl = _crl(load, nodes[0])
        if crl is not None and int(pacer, 16) in {e.serial_number for e in crl}:
            break
        time.sleep(0.02)
    since = datetime.now(UTC).isoformat()
    threads = [
        threading.Thread(
            target=load.call,
            args=(nodes[i % len(nodes)], "POST", f"/v1/pki/certs/{serial}/revoke", revoke),
        )
        for i, serial in enumerate(serials)
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wanted = {int(s, 16) for s in serials}
    while time.monotonic() - started < 10:
        crls = [_crl(load, r) for r in nodes]
        if all(c is not None and wanted <= {e.serial_number for e in c} for c in crls):
            listed = time.monotonic() - started
            time.sleep(1.5)  # a second build, if any, would come at the next tick
            query = f"/v1/audit?action=crl.build&since={since.replace('+', '%2B')}"
            reply = load.call(nodes[0], "GET", query)
            assert reply is not None and reply.status_code == 200, reply and reply.text
            builds = [r for r in reply.json()["events"] if r["outcome"] == "ok"]
            return len(builds), listed
        time.sleep(0.1)
    return -1, float("inf")


def run(duration: float, signers: int) -> int:
    tally = Tally()
    results: list[tuple[str, str, bool]] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="kmsgate-ha-") as tmp:
        server = stack.enter_context(running_postgres())
        database_url = stack.enter_context(fresh_postgres_database(server))
        nodes = stack.enter_context(replicas(Path(tmp), database_url))
        token = (Path(tmp) / "data" / "root-token").read_text().strip()
        load = Load(nodes, token, tally)
        stack.callback(load.client.close)
        keys: dict[str, dict[str, str]] = {
            "ha-sign": {},
            "ha-rot": {},
            "ha-sched": {"rotation_period": "2s"},
        }
        for name, extra in keys.items():
            body = {"name": name, "type": "ecdsa-p256", "purpose": "ha", **extra}
            made = load.call(nodes[0], "POST", "/v1/keys", body)
            assert made is not None and made.status_code == 201, made and made.text
        workers = [threading.Thread(target=load.signer) for _ in range(signers)]
        workers += [threading.Thread(target=f) for f in (load.issuer, load.rotator, load.enforcer)]
        for w in workers:
            w.start()
        time.sleep(duration / 2)
        builds, listed = revocation_burst(load)
        victim = nodes[0]  # the first replica started: the likeliest jobs leader
        kill_group(victim)
        load.killed_at = time.monotonic()
        sched_before = _primary(load, nodes[1], "ha-sched")
        time.sleep(duration / 2)
        load.stop.set()
        for w in workers:
            w.join()
        moved = _rotated_within(load, nodes[1], "ha-sched", sched_before, JOBS_MOVE_LIMIT_S)

        stored = [s for s in tally.issued if _stored(load, nodes[1], s)]
        versions = sorted(tally.versions)
        final = _primary(load, nodes[1], "ha-rot")
        audit = Path(tmp) / "data" / "audit.log"
        verify = verify_audit(audit)
        worst = max(tally.enforce_s, default=float("inf"))
        after_kill = sum(tally.failed_after_kill.values())
        ok, failed = sum(tally.ok.values()), sum(tally.failed.values())
        rotated = versions == list(range(2, 2 + len(versions))) and final == 1 + len(versions)
        all_stored = len(stored) == len(set(tally.issued)) == len(tally.issued) > 0
        verified = (verify.stdout or verify.stderr).strip()
        results = [
            ("operations ok / failed", f"{ok} / {failed}", True),
            ("failures on the survivors after the kill", str(after_kill), after_kill == 0),
            ("certificates issued, in the inventory", f"{len(tally.issued)}, {len(stored)}",
             all_stored),
            ("rotations: versions 2..N once each", f"{len(versions)} -> v{final}", rotated),
            ("disable, token revocation enforced everywhere: max s",
             f"{worst:.3f} of {len(tally.enforce_s)}", worst <= ENFORCE_LIMIT_S),
            ("CRL builds for one revocation burst", f"{builds} (listed in {listed:.2f} s)",
             builds == 1),
            ("scheduled jobs went on after the kill", "yes" if moved else "no", moved),
            ("audit chains verify", verified, verify.returncode == 0),
        ]  # fmt: skip
    width = max(len(r[0]) for r in results)
    for what, value, ok in results:
        print(f"{'ok  ' if ok else 'FAIL'} {what:<{width}}  {value}")
    return 0 if all(ok for _, _, ok in results) else 1


def _stored(load: Load, replica: Replica, serial: str) -> bool:
    reply = load.call(replica, "GET", f"/v1/pki/certs/{serial}")
    return reply is not None and reply.status_code == 200


def _primary(load: Load, replica: Replica, name: str) -> int:
    reply = load.call(replica, "GET", f"/v1/keys/{name}")
    assert reply is not None and reply.status_code == 200, reply and reply.text
    return int(reply.json()["primary_version"])


def _rotated_within(load: Load, replica: Replica, name: str, since: int, limit: float) -> bool:
    """Whether the scheduler rotated `name` again (past `since`) within `limit` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if _primary(load, replica, name) > since:
            return True
        time.sleep(0.2)
    return False


SIGN_LUA = """wrk.method = "POST"
wrk.body = '{"input": "%s"}'
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer %s"
"""


def scaling(duration: float, connections: int) -> int:
    """Single-sign throughput through 1, 2 and 3 replicas (one worker each) on one
    PostgreSQL: one wrk per replica, all at once; the replicas' CPU per signature. Prints a
    table; exit 1 if a request failed."""
    if shutil.which("wrk") is None:
        print("ha_test.py --scaling needs wrk (Debian: apt-get install -y wrk)")
        return 1
    rows: list[tuple[int, float, float]] = []
    failed = 0
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="kmsgate-scale-") as tmp:
        server = stack.enter_context(running_postgres())
        for count in range(1, REPLICAS + 1):
            base = Path(tmp) / f"n{count}"
            base.mkdir()
            with fresh_postgres_database(server) as url, replicas(base, url, count) as nodes:
                token = (base / "data" / "root-token").read_text().strip()
                load = Load(nodes, token, Tally())
                body = {"name": "scale", "type": "ecdsa-p256", "purpose": "ha"}
                made = load.call(nodes[0], "POST", "/v1/keys", body)
                assert made is not None and made.status_code == 201, made and made.text
                script = base / "sign.lua"
                script.write_text(SIGN_LUA % (MESSAGE, token))
                before = sum(bench.process_group_cpu(r.proc.pid) or 0.0 for r in nodes)
                wrk = ["wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", "-s"]
                runs = [
                    subprocess.Popen(
                        [*wrk, str(script), f"{r.addr}/v1/keys/scale/sign"],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    for r in nodes
                ]
                outputs = [run.communicate()[0] for run in runs]
                cpu = sum(bench.process_group_cpu(r.proc.pid) or 0.0 for r in nodes) - before
            rate = sum(_wrk_number(o, "Requests/sec:") for o in outputs)
            failed += sum(int(_wrk_number(o, "Non-2xx or 3xx responses:")) for o in outputs)
            rows.append((count, rate, cpu / max(rate * duration, 1) * 1000))
    print(f"{'replicas':>8} {'sign req/s':>11} {'vs 1':>6} {'server CPU ms/sign':>19}")
    for count, rate, cpu_ms in rows:
        print(f"{count:>8} {rate:>11,.0f} {rate / max(rows[0][1], 1):>5.2f}x {cpu_ms:>19.3f}")
    print(f"failed requests: {failed}; {os.cpu_count()} cores shared by the replicas, "
          "PostgreSQL and wrk")  # fmt: skip
    return 0 if failed == 0 else 1


def _wrk_number(output: str, label: str) -> float:
    """The number after `label` in wrk's report (0 when the line is absent)."""
    for line in output.splitlines():
        if line.strip().startswith(label):
            return float(line.split(":", 1)[1].split()[0].replace(",", ""))
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--signers", type=int, default=3, help="signing threads")
    parser.add_argument(
        "--scaling", action="store_true", help="measure sign req/s over 1, 2 and 3 replicas"
    )
    parser.add_argument("--connections", type=int, default=16, help="per wrk (--scaling)")
    args = parser.parse_args()
    os.environ.setdefault("KMSGATE_LOG_LEVEL", "warning")
    if args.scaling:
        return scaling(args.duration, args.connections)
    return run(args.duration, args.signers)


if __name__ == "__main__":
    sys.exit(main())
