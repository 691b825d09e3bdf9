"""Natural batching: `_Coalescer` merges concurrent sign and MAC calls on one key version into
shared Vault batch requests, with a bounded number of requests in flight per key."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from kmsgate.errors import BackendError, KmsgateError

_log = logging.getLogger(__name__)

_Result = bytes | KmsgateError
_Send = Callable[[Sequence[bytes]], list[_Result]]


@dataclass(eq=False)
class _Job:
    inputs: Sequence[bytes]
    event: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    batch: list[_Job] | None = None
    """Set (with `event`) when this job's thread is handed the next request to send."""
    results: list[_Result] | None = None
    error: KmsgateError | None = None


class _Coalescer:
    """Natural batching: concurrent calls with the same key share Vault requests.

    A caller queues its inputs. If fewer than `max_inflight` requests for that key are in
    flight, it sends the queue's oldest jobs (up to `max_items` inputs) as one request at
    once; otherwise it waits. When a request answers, its jobs' callers are woken, and if
    jobs are queued, the caller of the oldest one is handed the slot and sends the next
    batch. A lone call therefore goes out immediately (no timer, no added latency); under
    load, calls arriving while requests are in flight ride together on the next one. Each
    wake-up concerns one thread (no thundering herd). The Python HTTP client tops out near
    1,000 requests/s per process, so this is what lets single-item signing scale.
    """

    def __init__(self, max_items: int, max_inflight: int) -> None:
        self._max_items = max_items
        self._max_inflight = max_inflight
        self._lock = threading.Lock()
        self._queues: dict[Hashable, collections.deque[_Job]] = {}
        self._inflight: dict[Hashable, int] = {}

    def run(self, key: Hashable, inputs: Sequence[bytes], send: _Send) -> list[_Result]:
        """`send(inputs)` for this caller, possibly merged with others' inputs.

        Raises the KmsgateError that failed the whole request carrying these inputs.
        """
        job = _Job(inputs)
        with self._lock:
            self._queues.setdefault(key, collections.deque()).append(job)
            batch: list[_Job] | None = None
            if self._inflight.get(key, 0) < self._max_inflight:
                self._inflight[key] = self._inflight.get(key, 0) + 1
                batch = self._take(key)
        while True:
            if batch is not None:
                batch = self._send_and_hand_over(key, batch, send, job)
                if batch is not None:
                    continue  # the next batch starts with our own job: send it too
            if job.finished:
                break
            job.event.wait()
            if job.finished:
                break
            batch, job.batch = job.batch, None
        if job.error is not None:
            raise job.error
        assert job.results is not None
        return job.results

    def _take(self, key: Hashable) -> list[_Job]:
        """Jobs from the front of `key`'s queue, up to `max_items` inputs (at least one).
        Called with the lock held."""
        queue = self._queues[key]
        batch = [queue.popleft()]
        size = len(batch[0].inputs)
        while queue and size + len(queue[0].inputs) <= self._max_items:
            size += len(queue[0].inputs)
            batch.append(queue.popleft())
        if not queue:
            del self._queues[key]
        return batch

    def _send_and_hand_over(
        self, key: Hashable, batch: list[_Job], send: _Send, me: _Job
    ) -> list[_Job] | None:
        """Send `batch`, finish its jobs, pass the slot on. Returns the next batch if it is
        `me` who must send it."""
        self._send(batch, send)
        with self._lock:
            for job in batch:
                job.finished = True
            following: list[_Job] | None = None
            if self._queues.get(key):
                following = self._take(key)  # the slot passes to following[0]'s thread
            elif self._inflight[key] > 1:
                self._inflight[key] -= 1
            else:
                del self._inflight[key]
        for job in batch:
            if job is not me:
                job.event.set()
        if following is None:
            return None
        if following[0] is me:
            return following
        following[0].batch = following
        following[0].event.set()
        return None

    @staticmethod
    def _send(batch: list[_Job], send: _Send) -> None:
        inputs = [item for job in batch for item in job.inputs]
        try:
            results = send(inputs)
            if len(results) != len(inputs):
                raise BackendError("the backend answered a batch with the wrong item count")
        except KmsgateError as exc:
            for job in batch:
                job.error = exc
        except Exception:
            _log.exception("hashivault: a batched request failed unexpectedly")
            for job in batch:
                job.error = BackendError("the key backend request failed")
        else:
            start = 0
            for job in batch:
                job.results = results[start : start + len(job.inputs)]
                start += len(job.inputs)
