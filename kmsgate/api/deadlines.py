"""The time a client has to send its request body (`limits.body_read_seconds`): a client that
stops sending mid-body gets 408 and its connection is closed, instead of holding a worker's
connection slot for ever.

One sweep a second cancels the reads that are past their deadline: a timer per request
(`asyncio.timeout`) would cost ~10 us on every request, where waiting on a body is rare."""

from __future__ import annotations

import asyncio
import contextlib
import time

from starlette.types import Message, Receive

from kmsgate.errors import RequestTimeout

SWEEP_SECONDS = 1.0


class BodyDeadlines:
    """Deadlines of the body reads in progress in this process (one event loop)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._waiting: dict[asyncio.Task[object], float] = {}
        self._expired: set[asyncio.Task[object]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def guard(self, receive: Receive) -> Receive:
        """`receive`, for one request: raises RequestTimeout when the body has not arrived
        `seconds` after the request began (only while the sweeper runs)."""
        deadline = time.monotonic() + self.seconds
        body_done = False

        async def guarded() -> Message:
            nonlocal body_done
            if body_done:  # what follows (a disconnect) may be waited on as long as it takes
                return await receive()
            task = asyncio.current_task()
            assert task is not None
            self._waiting[task] = deadline
            try:
                message = await receive()
            except asyncio.CancelledError:
                if task not in self._expired:
                    raise
                self._expired.discard(task)
                task.uncancel()
                raise RequestTimeout(
                    f"the request body did not arrive within {self.seconds:g} s"
                ) from None
            finally:
                self._waiting.pop(task, None)
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return guarded

    def start(self) -> None:
        """Start sweeping (on the running event loop)."""
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        """Stop sweeping."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_SECONDS, self.seconds / 2))
            now = time.monotonic()
            for task, deadline in list(self._waiting.items()):
                if deadline < now and task not in self._expired:
                    self._expired.add(task)
                    task.cancel()
