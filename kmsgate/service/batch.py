"""Running an operation's items (one, or a batch) on one key."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from kmsgate.catalogue import Key
from kmsgate.errors import BackendError, BackendUnavailable, KmsgateError, TooLarge
from kmsgate.policy import Decision
from kmsgate.service.gate import Call, Gate, KeyTarget, Outcome
from kmsgate.service.results import ItemResults
from kmsgate.usage import BackendTimes, KeyUsage


class _Versioned(Protocol):
    @property
    def key_version(self) -> int: ...


ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT", bound=_Versioned)
RunAll = Callable[[Key, Sequence[ItemT]], ItemResults[ResultT]]
"""Runs every item on the key, each error in its item's place."""


def each(
    one: Callable[[Key, ItemT], ResultT], key: Key, items: Sequence[ItemT]
) -> ItemResults[ResultT]:
    """`one` item by item, keeping each item's error in its place."""
    results: ItemResults[ResultT] = []
    for item in items:
        try:
            results.append(one(key, item))
        except KmsgateError as exc:
            results.append(exc)
    return results


def run_items(
    key: Key,
    outcome: Outcome,
    items: Sequence[ItemT],
    batch: bool,
    run: RunAll[ItemT, ResultT],
    usage: KeyUsage,
    backends: BackendTimes,
) -> ItemResults[ResultT]:
    """Run the items on an enabled key, counting each success in `usage` by version and
    the run in `backends`. A single item's error is raised; a batch reports its item and
    failure counts to the audit record.

    Raises KeyDisabled & co. for a key that is not enabled, and a single item's error.
    """
    key.require_enabled()
    started = time.perf_counter()
    try:
        results = run(key, items)
    except KmsgateError as exc:
        backends.record(key.backend, time.perf_counter() - started, failed=_backend_failure(exc))
        raise
    failed = any(_backend_failure(r) for r in results)
    backends.record(key.backend, time.perf_counter() - started, failed=failed)
    if not batch:
        result = results[0]
        if isinstance(result, KmsgateError):
            raise result
        outcome.key_version = result.key_version
        usage.record(key.name, result.key_version)
        return results
    outcome.detail["items"] = len(items)
    outcome.detail["failed"] = sum(1 for r in results if isinstance(r, KmsgateError))
    versions = Counter(r.key_version for r in results if not isinstance(r, KmsgateError))
    for version, count in versions.items():
        usage.record(key.name, version, count)
    return results


def run_on_target(
    gate: Gate,
    call: Call,
    target: KeyTarget,
    items: Sequence[ItemT],
    batch: bool,
    run: RunAll[ItemT, ResultT],
    *,
    detail: Mapping[str, object] | None = None,
    decision: Decision | None = None,
) -> ItemResults[ResultT]:
    """Decide on `call` (unless `decision` was taken), run the items on the target key
    (`run_items`), audit the outcome with `detail` added. Raises what `Gate.run_on_key`
    and `run_items` raise."""

    def operate(key: Key, outcome: Outcome) -> ItemResults[ResultT]:
        if detail:
            outcome.detail.update(detail)
        return run_items(key, outcome, items, batch, run, gate.usage, gate.backend_times)

    return gate.run_on_key(call, target, operate, decision=decision)


def _backend_failure(result: object) -> bool:
    return isinstance(result, BackendError | BackendUnavailable)


def check_size(data: bytes, limit: int, advice: str) -> bytes:
    """`data` if it is at most `limit` bytes. Raises TooLarge, whose detail ends with
    `advice`: what the caller can do instead."""
    if len(data) > limit:
        raise TooLarge(f"input of {len(data)} bytes exceeds the limit of {limit}; {advice}")
    return data
