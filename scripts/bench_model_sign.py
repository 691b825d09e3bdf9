"""Time `kmsgate model sign` on a generated model: local hashing vs the gateway calls.

Starts `kmsgate serve --dev` on a free port (or uses --addr/--token), writes a model of
--size MiB split into --files files (default 1 GiB in 4 files, under --dir; left there for
the next run: delete it yourself), signs it with an ecdsa-p256 key and prints where the time
goes: hashing
(GB/s, page cache warm after the first pass) and the two gateway sign calls (model statement
and provenance) plus the public-key/policy look-ups. Also verifies it once (hashing again).

    python scripts/bench_model_sign.py [--size 1024] [--files 4] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kmsgate.client import Client
from kmsgate.model_signing import GatewaySigner, PublicKeyTrust, sign_model, verify_model


def make_model(root: Path, size_mib: int, files: int) -> Path:
    model = root / "bench-model"
    model.mkdir(parents=True, exist_ok=True)
    per_file = size_mib * (1 << 20) // files
    block = os.urandom(1 << 20)
    for i in range(files):
        path = model / f"shard-{i:03d}.safetensors"
        if path.exists() and path.stat().st_size == per_file:
            continue
        with path.open("wb") as f:
            left = per_file
            while left:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
    (model / "config.json").write_text('{"bench": true}')
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024, help="MiB")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--addr")
    ap.add_argument("--token")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kmsgate-bench-model")
    args = ap.parse_args()

    model = make_model(args.dir, args.size, args.files)
    if args.addr:
        run(args, model, args.addr, args.token)
        return
    from tests.test_cli import running_gateway  # the test suite's dev-gateway launcher

    with tempfile.TemporaryDirectory() as tmp, running_gateway(Path(tmp)) as gw:
        run(args, model, gw.addr, gw.root_token)


def run(args: argparse.Namespace, model: Path, addr: str, token: str | None) -> None:
    with Client(addr, token) as client:
        key = f"bench-model-{int(time.time())}"
        client.create_key(key, "ecdsa-p256", "model-sign")
        rows = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            result = sign_model(model, GatewaySigner(client, key), workers=args.workers)
            total = time.perf_counter() - t0
            rows.append((total, result.hash_seconds, result.sign_seconds, result.bytes_hashed))
        t0 = time.perf_counter()
        report = verify_model(
            model, result.bundle_path, PublicKeyTrust.from_pem(result.public_key_pem)
        )
        verify_s = time.perf_counter() - t0
    size = rows[0][3]
    med = lambda i: statistics.median(r[i] for r in rows)  # noqa: E731
    print(
        json.dumps(
            {
                "bytes": size,
                "files": len(result.manifest.files),
                "cpus": os.cpu_count(),
                "sign_total_s": round(med(0), 3),
                "hash_s": round(med(1), 3),
                "hash_GBps": round(size / med(1) / 1e9, 2),
                "gateway_sign_s": round(med(2), 4),
                "other_s": round(med(0) - med(1) - med(2), 4),
                "verify_s": round(verify_s, 3),
                "verified": report.ok,
                "runs": [[round(x, 4) for x in r[:3]] for r in rows],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
