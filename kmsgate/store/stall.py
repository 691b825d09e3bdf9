"""Bounded waits on PostgreSQL. A server that is frozen, or cut off by a network that drops
nothing, leaves its connections open and silent: libpq would wait for an answer for ever,
and a request with it. `StallGuard` cuts the connection of a transaction that waits past
its deadline; the driver then fails, the request gets 503 (Unavailable) and the pool drops
the connection."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from kmsgate.errors import Unavailable

STALL_SECONDS = 10.0
"""How long a transaction on PostgreSQL may take before its connection is cut: far above
what any of kmsgate's transactions needs, well below a client's or a drain's patience."""

KEEPALIVE_ARGS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 15,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
"""libpq options that end a connection whose peer is gone (a host down, a partition that
drops packets) in about 30 seconds: for the connections held open between transactions
(the jobs' leader lock, the change listener), which no deadline covers."""


class StallGuard:
    """Deadlines for the transactions of this process's threads: `watching` opens one for
    the calling thread, `attach` names the connection it waits on (at checkout), and a
    watcher thread cuts that connection once the deadline passes."""

    def __init__(self, seconds: float | None = STALL_SECONDS) -> None:
        """None: no deadlines (SQLite: a local file has no peer to fall silent)."""
        self._seconds = seconds
        self._lock = threading.Lock()
        self._waits: dict[int, list[list[Any]]] = {}
        """thread ident -> its open deadlines, innermost last: [deadline, the driver
        connection or None, cut already] (a transaction may open inside another)"""
        self._watcher_pid = 0

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """A deadline for the calling thread's transaction, for the block."""
        if self._seconds is None:
            yield
            return
        self._start_watcher()
        me, wait = threading.get_ident(), [time.monotonic() + self._seconds, None, False]
        with self._lock:
            self._waits.setdefault(me, []).append(wait)
        try:
            yield
        finally:
            with self._lock:
                waits = self._waits[me]
                waits.remove(wait)
                if not waits:
                    del self._waits[me]

    def attach(self, driver_connection: Any) -> None:
        """Name the connection the calling thread's transaction uses (none is watched when
        the thread has no deadline open). Raises Unavailable if its deadline has passed:
        a thread whose connection was cut does not wait on a new one."""
        with self._lock:
            waits = self._waits.get(threading.get_ident())
            if not waits:
                return
            wait = waits[-1]
            if wait[2]:
                raise Unavailable("metadata store not answering")
            wait[1] = driver_connection

    def detach(self, driver_connection: Any) -> None:
        """The calling thread is done with `driver_connection` (it goes back to the pool,
        where another thread may take it): its deadline no longer cuts it."""
        with self._lock:
            for wait in self._waits.get(threading.get_ident(), ()):
                if wait[1] is driver_connection:
                    wait[1] = None

    def _start_watcher(self) -> None:
        if self._watcher_pid == os.getpid():
            return
        with self._lock:
            if self._watcher_pid == os.getpid():
                return
            self._watcher_pid = os.getpid()  # a forked worker starts its own
        threading.Thread(target=self._watch, name="kmsgate-store-stall", daemon=True).start()

    def _watch(self) -> None:
        assert self._seconds is not None
        while True:
            time.sleep(self._seconds / 20)
            moment = time.monotonic()
            with self._lock:  # cut under the lock: no connection is detached meanwhile
                for waits in self._waits.values():
                    for wait in waits:
                        if wait[0] < moment and not wait[2]:
                            wait[2] = True
                            if wait[1] is not None:
                                _cut(wait[1])


def _cut(driver_connection: Any) -> None:
    """Shut the socket of a psycopg connection down under it: the wait on it ends at once
    with a driver error (the connection is broken, and dropped by the pool)."""
    with contextlib.suppress(Exception):  # closed meanwhile: nothing left to cut
        fd = os.dup(driver_connection.pgconn.socket)
        with socket.socket(fileno=fd) as dup:
            dup.shutdown(socket.SHUT_RDWR)
