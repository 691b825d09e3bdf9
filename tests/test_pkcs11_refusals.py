"""`PinRefusals`, the record of a PIN file the token refused, shared by the gateway's
processes through the data dir: what it names, links planted in the data dir, a file system
without locks, a login turn held for too long."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

import pytest

from kmsgate.backends.pkcs11 import refusals
from kmsgate.backends.pkcs11.refusals import LoginTurnTimeout, PinRefusals, pin_file_identity

SERIAL = b"0123456789abcdef"


def _identity(path: Path) -> bytes:
    return pin_file_identity(path.stat())


def test_a_refusal_names_the_file_as_it_was_read_not_as_it_is_later(tmp_path: Path) -> None:
    """The PIN file replaced after the wrong PIN was read (the operator fixing it): the
    refusal recorded then must not stand for the new file, nor name the PIN."""
    pin = tmp_path / "hsm.pin"
    pin.write_text("wrong-pin-xyz\n")  # not hex: the mark holds a digest, which may hold 0000
    shared = PinRefusals("hsm")
    shared.keep_in(tmp_path)
    as_read = _identity(pin)
    fixed = tmp_path / "new.pin"
    fixed.write_text("12345678\n")
    os.replace(fixed, pin)
    shared.record(SERIAL, as_read)  # the token refused what was read before the change
    assert shared.refused(SERIAL, as_read)
    assert not shared.refused(SERIAL, _identity(pin))
    assert not shared.refused(b"another token serial", as_read)
    assert shared.mark is not None and b"wrong-pin" not in shared.mark.read_bytes()
    shared.forget()
    assert not shared.refused(SERIAL, as_read)


def test_links_planted_in_the_data_dir_are_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    shared = PinRefusals("hsm")
    shared.keep_in(tmp_path)
    assert shared.mark is not None
    shared.mark.symlink_to(victim)
    identity = _identity(victim)
    assert not shared.refused(SERIAL, identity)  # a link is no record
    shared.record(SERIAL, identity)
    assert victim.read_text() == "keep me"
    assert not shared.mark.is_symlink() and shared.refused(SERIAL, identity)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    odd = PinRefusals("../hsm")  # a backend name never leads out of the directory
    odd.keep_in(tmp_path)
    assert odd.mark is not None and odd.mark.parent == tmp_path


def test_a_file_system_without_locks_logs_in_without_a_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    shared = PinRefusals("hsm")
    shared.keep_in(tmp_path)
    with shared.turn():
        pass  # no error: the login goes ahead, unserialised


def test_a_login_turn_held_too_long_is_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process stuck in C_Login (a hung HSM) held every other worker's logins, and
    the module lock with them, without limit."""
    monkeypatch.setattr(refusals, "TURN_SECONDS", 0.3)
    shared = PinRefusals("hsm")
    shared.keep_in(tmp_path)
    other = PinRefusals("hsm")
    other.keep_in(tmp_path)
    with shared.turn():
        started = time.monotonic()
        with pytest.raises(LoginTurnTimeout), other.turn():
            pass
        assert time.monotonic() - started < 2
    with other.turn():  # free again once the holder is done
        pass
