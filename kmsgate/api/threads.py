"""Calls into blocking backends (Vault, AWS KMS, PKCS#11), each backend with threads of its
own: a backend that hangs holds at most `THREADS_PER_BACKEND` threads, so requests for keys
of other backends (and the routes that run in the shared thread pool) go on.

A request for a backend whose threads are all busy waits for one on the event loop, not in
a thread; when `QUEUE_PER_BACKEND` requests already wait, it is refused at once
(503 backend_unavailable, Retry-After 1) instead of waiting behind calls that may each take
up to the backend's timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio.to_thread
from anyio import CapacityLimiter

from kmsgate.errors import BackendUnavailable

__all__ = ["QUEUE_PER_BACKEND", "THREADS_PER_BACKEND", "BackendThreads"]

THREADS_PER_BACKEND = 16
"""Calls in progress at once per backend, per worker process."""
QUEUE_PER_BACKEND = 64
"""Requests that may wait for one of a backend's threads, per worker process."""

T = TypeVar("T")


class BackendThreads:
    """The thread budget of each backend of one application (one event loop)."""

    def __init__(self, threads: int = THREADS_PER_BACKEND, queue: int = QUEUE_PER_BACKEND) -> None:
        self._threads = threads
        self._queue = queue
        self._limiters: dict[str, CapacityLimiter] = {}

    async def run(self, backend: str, call: Callable[..., T], *args: object) -> T:
        """`call(*args)` in one of `backend`'s threads. Raises BackendUnavailable when
        `backend` has `queue` requests waiting already, and what `call` raises."""
        limiter = self._limiters.get(backend)
        if limiter is None:  # made on the event loop that uses it
            limiter = self._limiters[backend] = CapacityLimiter(self._threads)
        if limiter.available_tokens < 1 and limiter.statistics().tasks_waiting >= self._queue:
            raise BackendUnavailable(
                f"backend {backend!r} is not keeping up: {self._threads} calls in progress "
                f"and {self._queue} waiting",
                retry_after=1,
            )
        return await anyio.to_thread.run_sync(call, *args, limiter=limiter)
