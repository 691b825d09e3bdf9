"""kmsgate.store.stall on its own: a connection silent past its transaction's deadline is
cut, a connection given back in time never is, and while the server counts as silent the
other transactions are refused at once (tests/test_store_outage.py freezes a real
PostgreSQL under a gateway)."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest

from kmsgate.errors import Unavailable
from kmsgate.store import stall
from kmsgate.store.stall import StallGuard, connection_defaults

DEADLINE = 0.2


def _connection() -> tuple[SimpleNamespace, socket.socket]:
    """A stand-in for a psycopg connection (its socket, as `pgconn.socket`), and the
    server's end of that socket."""
    ours, theirs = socket.socketpair()
    return SimpleNamespace(pgconn=SimpleNamespace(socket=ours.fileno()), sock=ours), theirs


def test_a_silent_transaction_is_cut_and_the_others_are_refused_until_one_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stall, "PROBE_SECONDS", DEADLINE)
    guard = StallGuard(DEADLINE)
    driver, _server = _connection()
    started = time.monotonic()
    with guard.watching():
        guard.attach(driver)
        assert driver.sock.recv(1) == b""  # the wait ends: its socket was shut down
        waited = time.monotonic() - started
        with pytest.raises(Unavailable):
            guard.attach(driver)  # a new connection would only be waited on again
    assert DEADLINE <= waited < DEADLINE + 1

    refused: list[BaseException] = []

    def another_transaction() -> None:
        try:
            with guard.watching():
                pass
        except Unavailable as exc:
            refused.append(exc)

    another_transaction()  # at once: no new try before PROBE_SECONDS
    assert len(refused) == 1
    time.sleep(DEADLINE)
    refused.clear()
    with guard.watching():  # the probe: the one transaction let through while silent
        thread = threading.Thread(target=another_transaction)
        thread.start()
        thread.join()
    assert len(refused) == 1
    another_transaction()  # the probe answered: the server is no longer silent
    assert len(refused) == 1


def test_a_connection_given_back_in_time_is_never_cut() -> None:
    guard = StallGuard(DEADLINE)
    driver, server = _connection()
    with guard.watching():
        guard.attach(driver)
        guard.detach(driver)  # back in the pool: another thread may take it now
        time.sleep(DEADLINE * 3)
    server.sendall(b"x")
    assert driver.sock.recv(1) == b"x"  # still whole


def test_the_operators_connection_options_stand() -> None:
    defaults = connection_defaults({"connect_timeout": "20", "sslmode": "require"})
    assert "connect_timeout" not in defaults and defaults["keepalives"] == 1
