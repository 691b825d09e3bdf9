#!/usr/bin/env python3
"""Run kmsgate's fuzz harnesses (tests/fuzz, docs/fuzzing.md) for a while.

    python scripts/fuzz.py --seconds 600                 # every harness, 10 minutes each
    python scripts/fuzz.py --seconds 60 --harness ocsp   # one harness
    python scripts/fuzz.py --write-corpus                # remake tests/fuzz/corpus

Prints, per harness, the inputs fed and the inputs per second. A failing input stops the run:
Hypothesis prints it shrunk, and the exit status is 1. Add it as an `@example` to the
harness's test once the parser is fixed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fuzz import (  # noqa: E402
    test_csr,
    test_envelope,
    test_file_header,
    test_jwt,
    test_ocsp,
    test_pkcs11_uri,
)
from tests.fuzz.harness import CORPUS, Harness, fuzz_for  # noqa: E402
from tests.fuzz.seeds import write_corpus  # noqa: E402

HARNESSES: dict[str, Harness] = {
    module.HARNESS.name: module.HARNESS
    for module in (test_envelope, test_file_header, test_pkcs11_uri, test_csr, test_ocsp, test_jwt)
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="per harness (default 60)")
    parser.add_argument("--harness", choices=sorted(HARNESSES), help="only this one")
    parser.add_argument("--write-corpus", action="store_true", help=f"remake {CORPUS}")
    args = parser.parse_args()
    if args.write_corpus:
        write_corpus(CORPUS)
        print(f"wrote {CORPUS}")
        return 0
    chosen = [HARNESSES[args.harness]] if args.harness else list(HARNESSES.values())
    print(f"{'harness':<12} {'inputs':>10} {'seconds':>8} {'inputs/s':>9}", flush=True)
    total = 0
    for harness in chosen:
        started = time.monotonic()
        executions = fuzz_for(harness, args.seconds)
        elapsed = time.monotonic() - started
        total += executions
        print(f"{harness.name:<12} {executions:>10} {elapsed:>8.1f} {executions / elapsed:>9.0f}")
    print(f"{'total':<12} {total:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
