"""Key version usage: every process counts the uses of each key version in memory (a dict
update under a lock on the request path, never the database) and a background flush adds
them to the store, so `GET /v1/keys/{name}` can show each version's use count and last use
across all workers and replicas (an operator then knows when raising `min_decrypt_version`
is safe)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime

from kmsgate.errors import KmsgateError
from kmsgate.store import Store

__all__ = ["BackendTimes", "KeyUsage"]


@dataclass(slots=True)
class _Tally:
    count: int
    last: datetime


class KeyUsage:
    """This process's uses of key versions since its last flush."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int], _Tally] = {}

    def record(self, name: str, version: int, count: int = 1) -> None:
        """Count `count` uses of version `version` of key `name`, now."""
        at = datetime.now(UTC)
        with self._lock:
            tally = self._pending.get((name, version))
            if tally is None:
                self._pending[(name, version)] = _Tally(count, at)
            else:
                tally.count += count
                tally.last = at

    def flush(self) -> None:
        """Add the counted uses to the store; they are kept for the next flush if it is
        down. Raises Unavailable (after keeping them)."""
        with self._lock:
            taken, self._pending = self._pending, {}
        try:
            self._store.key_usage.add({k: (t.count, t.last) for k, t in taken.items()})
        except KmsgateError:
            with self._lock:
                for key, tally in taken.items():
                    kept = self._pending.setdefault(key, _Tally(0, tally.last))
                    kept.count += tally.count
                    kept.last = max(kept.last, tally.last)
            raise

    def of_key(self, name: str) -> dict[int, tuple[int, datetime]]:
        """Version -> (uses, last use) of key `name`: the store's, plus what this process
        has not flushed yet. Raises Unavailable."""
        stored = self._store.key_usage.of_key(name)
        with self._lock:
            pending = {v: (t.count, t.last) for (n, v), t in self._pending.items() if n == name}
        for version, (count, at) in pending.items():
            before = stored.get(version)
            stored[version] = (
                (count, at) if before is None else (before[0] + count, max(before[1], at))
            )
        return stored


class BackendTimes:
    """Per backend: the key operations run on its keys, those that met a backend failure
    (unreachable, or failing), and the seconds they took; this process's, for /metrics."""

    def __init__(self) -> None:
        self.by_backend: dict[str, tuple[int, int, float]] = {}

    def record(self, backend: str, seconds: float, *, failed: bool) -> None:
        # one tuple swap per operation: a reader never sees half an update
        count, failures, total = self.by_backend.get(backend, (0, 0, 0.0))
        self.by_backend[backend] = (count + 1, failures + failed, total + seconds)
