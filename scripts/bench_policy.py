#!/usr/bin/env python3
"""Policy decision cost: `PolicyEngine.decide` on a bundle (the shipped one by default), per
case, with a new input for every call (the decision cache never answers) and then the same
inputs again (the cache answers), on the compiled VM that decides in the gateway and on the
interpreter, in one run. Prints microseconds per decision, best of `--rounds`.

    python scripts/bench_policy.py [--policies DIR] [--calls 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from kmsgate.policy import PolicyEngine, policy_input

REPO = Path(__file__).resolve().parent.parent


def grant(resource: str, number: int = 1) -> dict[str, object]:
    """An active grant of `decrypt` on `resource`, as the gateway passes it."""
    return {
        "id": f"e{number:015x}",
        "actions": ["decrypt"],
        "resource": resource,
        "ticket": "SEC-1",
        "approved_by": ["token:approver"],
        "expires_at": "2026-12-05T12:00:00Z",
    }


CASES: dict[str, tuple[tuple[str, ...], list[dict[str, object]]]] = {
    "denied (no rule, no grant)": (("dev",), []),
    "allowed by role admin": (("admin",), []),
    "allowed by one grant: key name": (("dev",), [grant("payroll-export")]),
    "allowed by one grant: purpose": (("dev",), [grant("purpose:envelope-data")]),
    "allowed by one grant: payroll-*": (("dev",), [grant("payroll-*")]),
    "allowed by one grant: pay?oll-* (glob.match)": (("dev",), [grant("pay?oll-*")]),
    "allowed by three grants: payroll-*": (("dev",), [grant("payroll-*", n) for n in range(3)]),
}
"""Case -> (the principal's roles, its active grants); the request is `decrypt` on key
`payroll-export` (purpose envelope-data)."""


def inputs(
    roles: Sequence[str], grants: list[dict[str, object]], serials: range
) -> list[dict[str, object]]:
    """One decision input per serial, each distinct (a label carries the serial)."""
    return [
        policy_input(
            principal={
                "id": "token:bench",
                "kind": "token",
                "tenant": None,
                "roles": list(roles),
                "claims": {"session_start": "2026-12-05T08:00:00Z"},
            },
            action="decrypt",
            resource={
                "kind": "key",
                "name": "payroll-export",
                "purpose": "envelope-data",
                "type": "aes-256-gcm",
                "backend": "local",
                "labels": {"n": str(n)},
            },
            request=None,
            env="prod",
            now=datetime.now(UTC),
            exceptions=grants,
            trusted=True,
        )
        for n in serials
    ]


def per_call(engine: PolicyEngine, docs: list[dict[str, object]]) -> float:
    """Microseconds per `decide` over `docs`."""
    start = time.perf_counter()
    for doc in docs:
        engine.decide(doc)
    return (time.perf_counter() - start) / len(docs) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", type=Path, default=REPO / "policies")
    parser.add_argument("--calls", type=int, default=2000, help="decisions per round (2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best counts (5)")
    args = parser.parse_args()
    compiled = PolicyEngine.load(args.policies)
    engines = {"VM": compiled, "interpreter": PolicyEngine.load(args.policies, compiled=False)}
    print(f"policy bundle {args.policies} ({compiled.digest[:19]}), {args.calls} decisions x "
          f"{args.rounds} rounds, best round; µs per decision")  # fmt: skip
    print(f"{'case':46s} {'VM':>8s} {'interp.':>8s} {'cached':>8s}  allow  reasons")
    serials = itertools.count()
    for case, (roles, grants) in CASES.items():
        best = {name: float("inf") for name in engines}
        for _ in range(args.rounds):
            for name, engine in engines.items():
                batch = next(serials) * args.calls
                docs = inputs(roles, grants, range(batch, batch + args.calls))
                best[name] = min(best[name], per_call(engine, docs))
        repeat = PolicyEngine.load(args.policies)  # an empty cache (it holds 4,096)
        per_call(repeat, docs[:2000])
        cached = per_call(repeat, docs[:2000])
        decision = compiled.decide(docs[0])
        print(f"{case:46s} {best['VM']:8.1f} {best['interpreter']:8.1f} {cached:8.1f}  "
              f"{decision.allow!s:5s}  {', '.join(decision.reasons)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
