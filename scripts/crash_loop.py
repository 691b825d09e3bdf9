"""kill -9 a gateway under load, again and again: no change without its audit record.

Starts `kmsgate serve --dev --workers 2` on a data dir (loopback, a free port) and drives
concurrent state changes through it (key creates, rotations, certificate issues from a CSR
by the dev CA `dev`, API token creates) besides signs; at a random moment it SIGKILLs the
gateway's whole process group, then checks the data dir it left, and starts the gateway
again on it for the next loop. The invariants, checked after every kill:

- every acknowledged change (a 2xx reply) has its outcome record (`ok`, the reply's
  `x-request-id`) and is in the store (the key, its version, the certificate, the token);
- every change in the store has a record: a key its `key.create`, each version after the
  first a `key.rotate`, each certificate and token its `cert.issue` / `token.create`. A
  change whose reply never came may be in the store, but then its `started` record is there
  with no outcome after it (the allow record is written before the change runs);
- `kmsgate audit verify` (checkpoint signatures against `audit.dev`, and the store's
  checkpoints) passes on the data dir;
- certificate serials are unique; the gateway starts again on the data dir.

Prints a row per loop and exits 1 on any violation (listed after the table). The test
suite runs a short form (tests/test_crash_loop.py); the documented long run is
`python scripts/crash_loop.py --loops 20`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateways import Gateway, kill_group, start_gateway, verify_audit

from kmsgate.pki.csr import new_key_and_csr
from tests.components import stop_process

PREFIX = "crash-"
SIGN_KEY = "crash-sign"
ROTATED = ("crash-rot-0", "crash-rot-1")
CHANGES = ("key.create", "key.rotate", "cert.issue", "token.create")
MESSAGE = base64.b64encode(b"crash loop").decode()
TIMEOUT = 15.0
SERVE_ARGS = ("--workers", "2")
SAN_NAME = "crash"


@dataclass
class Sent:
    """One state-changing request and what became of it."""

    action: str
    name: str | None
    status: int | None = None
    """The reply's status; None while in flight, and for a request the kill cut off."""
    request_id: str | None = None
    body: dict[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.action} {self.name}" if self.name else self.action

    @property
    def acknowledged(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass
class Row:
    loop: int
    run_s: float
    signs: int
    acknowledged: int
    in_flight: int
    in_store_unacknowledged: int
    records: int
    interrupted: int
    violations: list[str]


class Load:
    """Client threads sending changes and signs to one gateway until `stop` is set."""

    def __init__(self, gateway: Gateway, token: str, loop: int, profile: str, csr: str) -> None:
        self.gateway = gateway
        self.headers = {"authorization": f"Bearer {token}"}
        self.loop = loop
        self.profile = profile
        self.csr = csr
        self.stop = threading.Event()
        self.sent: list[Sent] = []
        self.signs = Counter[str]()
        self.lock = threading.Lock()

    def client(self, number: int, seed: int) -> None:
        """One client thread: a random mix of signs (40%) and changes until `stop`."""
        chooser = random.Random(seed)
        with httpx.Client(base_url=self.gateway.addr, headers=self.headers) as http:
            for n in range(1_000_000):
                if self.stop.is_set():
                    return
                change = self._pick(chooser, f"{PREFIX}r{self.loop}-t{number}-{n}")
                if change is None:
                    self._sign(http)
                else:
                    self._change(http, *change)

    def _pick(self, chooser: random.Random, fresh: str) -> tuple[Sent, str, object] | None:
        """The next change (what is sent, its path and body), None for a sign; `fresh` names
        a key to create."""
        pick = chooser.random()
        if pick < 0.4:
            return None
        if pick < 0.6:
            body = {"name": fresh, "type": "ed25519", "purpose": "crash"}
            return Sent("key.create", fresh), "/v1/keys", body
        if pick < 0.8:
            name = chooser.choice(ROTATED)
            return Sent("key.rotate", name), f"/v1/keys/{name}/rotate", None
        if pick < 0.9:
            issue = {"csr": self.csr, "profile": self.profile, "ttl": "1h"}
            return Sent("cert.issue", None), "/v1/pki/cas/dev/issue", issue
        token = {"roles": ["reader"], "description": "crash loop"}
        return Sent("token.create", None), "/v1/sys/tokens", token

    def _sign(self, http: httpx.Client) -> None:
        try:
            reply = http.post(f"/v1/keys/{SIGN_KEY}/sign", json={"input": MESSAGE}, timeout=TIMEOUT)
            outcome = str(reply.status_code)
        except httpx.HTTPError:
            outcome = "no reply"
        with self.lock:
            self.signs[outcome] += 1

    def _change(self, http: httpx.Client, sent: Sent, path: str, body: object = None) -> None:
        """Send one change; a request refused at connect (the gateway already dead) was
        never sent and is forgotten, one cut off later stays in flight (status None)."""
        with self.lock:
            self.sent.append(sent)
        try:
            reply = http.post(path, json=body, timeout=TIMEOUT)
        except httpx.ConnectError:
            with self.lock:
                self.sent.remove(sent)
            return
        except httpx.HTTPError:
            return
        sent.status, sent.request_id = reply.status_code, reply.headers.get("x-request-id")
        if sent.acknowledged:
            sent.body = reply.json()

    def run(self, clients: int, seconds: float, seed: int) -> None:
        """Drive the load for `seconds`, then SIGKILL the gateway and wait for the threads."""
        threads = [
            threading.Thread(target=self.client, args=(n, seed * 1000 + n)) for n in range(clients)
        ]
        for t in threads:
            t.start()
        time.sleep(seconds)
        self.stop.set()  # no new requests; those under way are cut off by the kill
        kill_group(self.gateway)
        for t in threads:
            t.join()


# --- what the data dir holds -----------------------------------------------------------


@dataclass
class Store:
    """The changes in the store (read after the kill, the gateway down)."""

    keys: dict[str, int]
    """Key name (ours only) -> number of versions."""
    serials: list[str]
    tokens: set[str]

    @classmethod
    def read(cls, data_dir: Path, root_token_id: str) -> Store:
        url = f"file:{data_dir / 'kmsgate.db'}?mode=ro"
        with contextlib.closing(sqlite3.connect(url, uri=True)) as db:
            keys = dict(
                db.execute(
                    "SELECT key_name, count(*) FROM key_versions WHERE key_name LIKE ?"
                    " GROUP BY key_name",
                    (PREFIX + "%",),
                ).fetchall()
            )
            names = {
                n for (n,) in db.execute("SELECT name FROM keys WHERE name LIKE ?", (PREFIX + "%",))
            }
            keys.update({n: 0 for n in names - keys.keys()})
            serials = [s for (s,) in db.execute("SELECT serial FROM certificates WHERE ca = 'dev'")]
            tokens = {t for (t,) in db.execute("SELECT id FROM tokens")} - {root_token_id}
        return cls(keys, serials, tokens)

    def counts(self) -> Counter[str]:
        return Counter(
            {
                "key.create": len(self.keys),
                "key.rotate": sum(max(v - 1, 0) for v in self.keys.values()),
                "cert.issue": len(self.serials),
                "token.create": len(self.tokens),
            }
        )


def audit_records(data_dir: Path) -> list[dict[str, object]]:
    """Every record of every chain file of the data dir's audit log."""
    records: list[dict[str, object]] = []
    for chain in sorted(data_dir.glob("audit*.log")):
        records += [json.loads(line) for line in chain.read_text().splitlines() if line]
    return records


@dataclass
class Audit:
    """The change records of the audit log, by request id."""

    by_request: dict[str, list[dict[str, object]]]

    @classmethod
    def of(cls, records: list[dict[str, object]]) -> Audit:
        by_request: dict[str, list[dict[str, object]]] = {}
        for record in records:
            if record["action"] in CHANGES:
                by_request.setdefault(str(record["request_id"]), []).append(record)
        return cls(by_request)

    def records(self) -> Iterator[dict[str, object]]:
        for chain in self.by_request.values():
            yield from chain

    def interrupted(self) -> list[dict[str, object]]:
        """The `started` records no outcome record follows (the change was cut off)."""
        return [
            r[0] for r in self.by_request.values() if len(r) == 1 and r[0]["outcome"] == "started"
        ]

    def has_ok(self, request_id: str | None, action: str) -> bool:
        found = self.by_request.get(request_id or "", [])
        return any(r["action"] == action and _ok(r) for r in found)


def _name(record: dict[str, object]) -> object:
    resource = record.get("resource")
    return resource.get("name") if isinstance(resource, dict) else None


def _ok(record: dict[str, object]) -> bool:
    return record["outcome"] == "ok"


def _detail(record: dict[str, object], member: str) -> object:
    detail = record.get("detail")
    return detail.get(member) if isinstance(detail, dict) else None


def violations(store: Store, audit: Audit, sent: list[Sent]) -> list[str]:
    """Every invariant the data dir breaks (after a kill): see the module docstring."""
    acknowledged = [s for s in sent if s.acknowledged]
    records = list(audit.records())
    return (
        _lost_acknowledged(store, audit, acknowledged)
        + _unrecorded(store, audit, records)
        + _repeated_serials(store, records, acknowledged)
    )


def _lost_acknowledged(store: Store, audit: Audit, acknowledged: list[Sent]) -> list[str]:
    """Acknowledged changes without their ok record, or missing from the store."""
    found = [
        f"acknowledged {s.label} ({s.request_id}): no ok record"
        for s in acknowledged
        if not audit.has_ok(s.request_id, s.action)
    ]
    for s in acknowledged:
        if s.action == "key.create" and s.name not in store.keys:
            found.append(f"acknowledged key.create {s.name}: not in the store")
        version = s.body.get("primary_version")
        if s.action == "key.rotate" and store.keys.get(str(s.name), 0) < int(str(version)):
            found.append(f"acknowledged rotation of {s.name} to v{version}: not in the store")
        if s.action == "cert.issue" and s.body["serial"] not in store.serials:
            found.append(f"acknowledged certificate {s.body['serial']}: not in the inventory")
        if s.action == "token.create" and s.body["id"] not in store.tokens:
            found.append(f"acknowledged token {s.body['id']}: not in the store")
    return found


def _unrecorded(store: Store, audit: Audit, records: list[dict[str, object]]) -> list[str]:
    """Changes in the store that no record explains: one naming them, or for each, one
    `started` record cut off before its outcome."""
    created = {_name(r) for r in records if r["action"] == "key.create"}
    found = [
        f"key {name} in the store: no key.create record" for name in store.keys.keys() - created
    ]
    cut_off = Counter((r["action"], _name(r)) for r in audit.interrupted())
    rotated = Counter(_name(r) for r in records if r["action"] == "key.rotate" and _ok(r))
    for name, versions in store.keys.items():
        explained = rotated[name] + cut_off["key.rotate", name]
        if versions - 1 > explained:
            found.append(f"key {name}: {versions - 1} rotations in the store, {explained} recorded")
    for action, member, present in (
        ("cert.issue", "serial", store.serials),
        ("token.create", "token_id", store.tokens),
    ):
        named = {_detail(r, member) for r in records if r["action"] == action}
        unexplained = [x for x in present if x not in named]
        left = sum(n for (a, _), n in cut_off.items() if a == action)
        if len(unexplained) > left:
            found.append(f"{action}: {len(unexplained)} in the store unnamed, {left} cut off")
    return found


def _repeated_serials(
    store: Store, records: list[dict[str, object]], acknowledged: list[Sent]
) -> list[str]:
    """Certificate serials given twice (in the inventory, the audit log or the replies)."""
    issued = [_detail(r, "serial") for r in records if r["action"] == "cert.issue" and _ok(r)]
    answered = [s.body["serial"] for s in acknowledged if s.action == "cert.issue"]
    found = []
    for what, serials in (("store", store.serials), ("audit", issued), ("replies", answered)):
        repeated = [s for s, n in Counter(serials).items() if n > 1]
        if repeated:
            found.append(f"serials repeated in the {what}: {repeated[:3]}")
    return found


# --- the loop ----------------------------------------------------------------------------


def _issue_request(gateway: Gateway, token: str) -> tuple[str, str]:
    """A profile of the dev CA that takes a DNS name, and a CSR it accepts."""
    reply = httpx.get(
        f"{gateway.addr}/v1/pki/profiles",
        headers={"authorization": f"Bearer {token}"},
        timeout=TIMEOUT,
    )
    reply.raise_for_status()
    for profile in reply.json()["profiles"]:
        for rule in profile["san_rules"]["dns"]:
            if rule.startswith("*."):
                _, csr = new_key_and_csr([SAN_NAME + rule[1:]])
                return profile["name"], csr.public_bytes(serialization.Encoding.PEM).decode()
    raise RuntimeError("no profile of the dev CA takes a DNS name")


def _prepare(gateway: Gateway, token: str, data_dir: Path) -> Path:
    """The keys the load signs with and rotates; the audit key's public key (returned:
    its PEM file, for `audit verify --key`)."""
    headers = {"authorization": f"Bearer {token}"}
    for name in (SIGN_KEY, *ROTATED):
        body = {"name": name, "type": "ed25519", "purpose": "crash"}
        made = httpx.post(f"{gateway.addr}/v1/keys", json=body, headers=headers, timeout=TIMEOUT)
        if made.status_code != 201:
            raise RuntimeError(f"creating {name}: {made.status_code} {made.text}")
    reply = httpx.get(
        f"{gateway.addr}/v1/keys/audit.dev/public-key", headers=headers, timeout=TIMEOUT
    )
    reply.raise_for_status()
    pem = data_dir.parent / "audit-dev.pem"
    pem.write_bytes(reply.content)
    return pem


@dataclass
class Tally:
    """What the loops so far left in the data dir (to tell each loop's share)."""

    changes: Counter[str] = field(default_factory=Counter)
    records: int = 0
    interrupted: int = 0
    violations: set[str] = field(default_factory=set)

    def row(self, loop: int, seconds: float, load: Load, store: Store, audit: Audit,
            found: list[str]) -> Row:  # fmt: skip
        """This loop's row; the tally moves on to the data dir as the loop left it."""
        acknowledged = sum(s.acknowledged for s in load.sent)
        changes, records = store.counts(), len(list(audit.records()))
        interrupted = len(audit.interrupted())
        row = Row(
            loop=loop,
            run_s=seconds,
            signs=load.signs["200"],
            acknowledged=acknowledged,
            in_flight=sum(s.status is None for s in load.sent),
            in_store_unacknowledged=sum((changes - self.changes).values()) - acknowledged,
            records=records - self.records,
            interrupted=interrupted - self.interrupted,
            violations=[v for v in found if v not in self.violations],
        )
        self.changes, self.records, self.interrupted = changes, records, interrupted
        self.violations.update(found)
        return row


def run(loops: int, clients: int, min_s: float, max_s: float, seed: int, base: Path) -> int:
    """`loops` rounds of load, kill -9, checks and restart on one data dir under `base`;
    prints the table. Returns the exit status (1 on any violation). Raises RuntimeError
    if the gateway does not start (again)."""
    data_dir, log = base / "data", base / "serve.log"
    chooser = random.Random(seed)
    tally, rows, sent = Tally(), list[Row](), list[Sent]()
    audit_key: Path | None = None
    for loop in range(1, loops + 1):
        gateway = start_gateway(f"loop {loop}", data_dir, log, *SERVE_ARGS)
        token = (data_dir / "root-token").read_text().strip()
        audit_key = audit_key or _prepare(gateway, token, data_dir)
        load = Load(gateway, token, loop, *_issue_request(gateway, token))
        seconds = chooser.uniform(min_s, max_s)
        load.run(clients, seconds, chooser.randrange(1 << 30))
        sent += load.sent
        store = Store.read(data_dir, token.split(".")[1])
        audit = Audit.of(audit_records(data_dir))
        found = violations(store, audit, sent) + _verify(data_dir, audit_key)
        rows.append(tally.row(loop, seconds, load, store, audit, found))
        print(_format(rows[-1]), flush=True)
    last = start_gateway("after the last loop", data_dir, log, *SERVE_ARGS)
    stop_process(last.proc)
    print(f"after loop {loops}: the gateway starts again and stops cleanly")
    bad = [v for r in rows for v in r.violations] + _verify(data_dir, audit_key)
    for violation in bad:
        print(f"VIOLATION {violation}")
    print(f"{len(bad)} violations in {loops} loops")
    return 1 if bad else 0


def _verify(data_dir: Path, audit_key: Path | None) -> list[str]:
    """`kmsgate audit verify` on the data dir's log: checkpoint signatures against the audit
    key (when known), the store's checkpoints; its report as a violation if it fails."""
    key = ("--key", audit_key) if audit_key else ()
    verified = verify_audit(data_dir / "audit.log", *key, "--data-dir", data_dir)
    report = (verified.stdout + verified.stderr).strip()
    return [f"audit verify: {report}"] if verified.returncode != 0 else []


HEADER = (
    "loop",
    "kill at s",
    "signs",
    "acknowledged",
    "in flight",
    "in store unacked",
    "records",
    "cut off",
    "violations",
)


def _format(row: Row) -> str:
    cells = (
        row.loop,
        f"{row.run_s:.2f}",
        row.signs,
        row.acknowledged,
        row.in_flight,
        row.in_store_unacknowledged,
        row.records,
        row.interrupted,
        len(row.violations),
    )
    return " | ".join(f"{c:>{len(h)}}" for c, h in zip(cells, HEADER, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loops", type=int, default=20, help="kill -9 and restart this often")
    parser.add_argument("--clients", type=int, default=6, help="client threads")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="least load before a kill")
    parser.add_argument("--max-seconds", type=float, default=3.0, help="most load before a kill")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: printed)")
    parser.add_argument("--keep", type=Path, default=None, help="work here (kept), not in /tmp")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    os.environ.setdefault("KMSGATE_LOG_LEVEL", "warning")
    print(f"crash loop: {args.loops} loops, {args.clients} clients, seed {seed}")
    print(" | ".join(HEADER))
    with contextlib.ExitStack() as stack:
        base = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        base.mkdir(parents=True, exist_ok=True)
        return run(args.loops, args.clients, args.min_seconds, args.max_seconds, seed, base)


if __name__ == "__main__":
    sys.exit(main())
