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
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

from kmsgate.errors import Unavailable

STALL_SECONDS = 10.0
"""How long a transaction on PostgreSQL may take before its connection is cut: far above
what any of kmsgate's transactions needs, well below a client's or a drain's patience."""

CONNECT_TIMEOUT_SECONDS = 3
"""How long a new PostgreSQL connection may take before the request gets 503."""

SERVER_KEEPALIVE = {
    "tcp_keepalives_idle": 10,
    "tcp_keepalives_interval": 5,
    "tcp_keepalives_count": 3,
    "tcp_user_timeout": 25_000,
}
"""The server's side of each session (PostgreSQL settings, sent as `options`): a session
whose client is gone without a word (its host down, a partition that drops packets) ends
in about 25 seconds, and with it the advisory lock of the jobs' leader, which another
replica then takes; PostgreSQL's own defaults (the kernel's, two hours) held the jobs
still that long. Longer than the leader's own detection (a `STALL_SECONDS` deadline on
its next check), so that a partitioned leader has let go before another takes over."""

_CONNECTION_DEFAULTS: dict[str, int | str] = {
    "connect_timeout": CONNECT_TIMEOUT_SECONDS,
    "keepalives": 1,
    "keepalives_idle": 15,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
    "options": " ".join(f"-c {name}={value}" for name, value in SERVER_KEEPALIVE.items()),
}
"""libpq options: a connection that cannot be made fails in seconds, and one whose peer is
gone (a host down, a partition that drops packets) ends in about 30 seconds, for the
connections held open between transactions (the jobs' leader lock, the change listener),
which no deadline covers; and the server's `SERVER_KEEPALIVE`."""


def connection_defaults(given: Collection[str]) -> dict[str, int | str]:
    """kmsgate's libpq options but those the database URL sets itself (`given`): an
    operator's `?connect_timeout=20` stands."""
    return {name: value for name, value in _CONNECTION_DEFAULTS.items() if name not in given}


@dataclass(slots=True)
class _Wait:
    """One open deadline: when it passes, and the connection it would cut (a duplicate of
    its socket, made while the connection is surely open and closed with the wait, so
    that a cut can never reach a descriptor number reused meanwhile)."""

    deadline: float
    silences: bool = True
    """Whether its cut counts the server as silent (not a readiness check's short one)."""
    driver: Any = None
    socket: socket.socket | None = None
    cut: bool = False

    def watch(self, driver: Any) -> None:
        self.forget()
        self.driver = driver
        try:
            fd = os.dup(driver.pgconn.socket)
        except Exception:  # the driver's own when closed: no socket, nothing to cut
            return
        try:
            self.socket = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)

    def forget(self) -> None:
        if self.socket is not None:
            self.socket.close()
        self.driver, self.socket = None, None

    def cut_now(self) -> None:
        """Shut the connection's socket down under it: the wait on it ends at once with a
        driver error (the connection is broken, and dropped by the pool)."""
        self.cut = True
        if self.socket is not None:
            with contextlib.suppress(OSError):  # closed by its peer meanwhile
                self.socket.shutdown(socket.SHUT_RDWR)


PROBE_SECONDS = 1.0
"""While the server counts as silent, how often a transaction may try it again."""


class StallGuard:
    """Deadlines for the transactions of this process's threads: `watching` opens one for
    the calling thread, `attach` names the connection it waits on (at checkout), and a
    watcher thread cuts that connection once the deadline passes."""

    def __init__(self, seconds: float | None = STALL_SECONDS) -> None:
        """None: no deadlines (SQLite: a local file has no peer to fall silent)."""
        self._seconds = seconds
        self._lock = threading.Lock()
        self._waits: dict[int, list[_Wait]] = {}
        """thread ident -> its open deadlines, innermost last (a transaction may open
        inside another)"""
        self._watcher_pid = 0
        self._silent = False
        """Whether the server counts as silent (a connection was cut, or could not be made,
        and no transaction has answered since): then one transaction at a time, and one a
        `PROBE_SECONDS`, tries it again; the others get Unavailable at once instead of a
        deadline (or a connect timeout) each: a request that needs several would wait for
        each in turn."""
        self._next_probe = 0.0

    @contextlib.contextmanager
    def watching(self, check_seconds: float | None = None) -> Iterator[None]:
        """A deadline for the calling thread's transaction, for the block. `check_seconds`:
        a check that must answer quickly (readiness): its own shorter deadline, whose cut
        does not count the server as silent, and while the server counts as silent it is
        refused at once, never the transaction that tries the server again. Raises
        Unavailable."""
        if self._seconds is None:
            yield
            return
        self._start_watcher()
        seconds = self._seconds if check_seconds is None else check_seconds
        me = threading.get_ident()
        wait = _Wait(time.monotonic() + seconds, silences=check_seconds is None)
        with self._lock:
            if self._silent:
                if self._waits or time.monotonic() < self._next_probe or not wait.silences:
                    raise Unavailable("metadata store not answering")
                self._next_probe = time.monotonic() + PROBE_SECONDS
            self._waits.setdefault(me, []).append(wait)
        answered = False
        try:
            yield
            answered = not wait.cut
        finally:
            with self._lock:
                waits = self._waits[me]
                waits.remove(wait)
                if not waits:
                    del self._waits[me]
                wait.forget()
                if answered:
                    self._silent = False

    def silence(self) -> None:
        """A connection to the server could not be made (it refused, or did not answer in
        time): the server counts as silent until a transaction answers."""
        if self._seconds is not None:
            with self._lock:
                self._silent = True
                self._next_probe = time.monotonic() + PROBE_SECONDS

    def attach(self, driver_connection: Any) -> None:
        """Name the connection the calling thread's transaction uses (none is watched when
        the thread has no deadline open). Raises Unavailable if its deadline has passed:
        a thread whose connection was cut does not wait on a new one."""
        with self._lock:
            waits = self._waits.get(threading.get_ident())
            if not waits:
                return
            if waits[-1].cut:
                raise Unavailable("metadata store not answering")
            waits[-1].watch(driver_connection)

    def detach(self, driver_connection: Any) -> None:
        """`driver_connection` goes back to the pool, where another thread may take it:
        no deadline cuts it any more (whichever thread returns it)."""
        with self._lock:
            for waits in self._waits.values():
                for wait in waits:
                    if wait.driver is driver_connection:
                        wait.forget()

    def _start_watcher(self) -> None:
        if self._watcher_pid == os.getpid():
            return
        with self._lock:
            if self._watcher_pid == os.getpid():
                return
            watcher = threading.Thread(target=self._watch, name="kmsgate-store-stall", daemon=True)
            watcher.start()  # if it cannot, the next transaction tries again
            self._watcher_pid = os.getpid()  # a forked worker starts its own

    def _watch(self) -> None:
        assert self._seconds is not None
        while True:
            time.sleep(self._seconds / 20)
            moment = time.monotonic()
            with self._lock:  # under the lock: no connection is detached meanwhile
                for waits in self._waits.values():
                    for wait in waits:
                        if wait.deadline < moment and not wait.cut:
                            wait.cut_now()
                            self._silent = self._silent or wait.silences
                            self._next_probe = moment + PROBE_SECONDS
