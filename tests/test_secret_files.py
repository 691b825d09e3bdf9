"""Secret files (the softkms root key, a PKCS#11 PIN, a Vault token, a TLS key) are read
only when they belong to the gateway's user or root, and no one but their owner can reach
them, or, for a file root owns, its group too: how a Kubernetes Secret with `fsGroup` is
mounted (0440 root:<fsGroup>). The data dir and the SQLite database must belong to the
gateway's user (or root) too: made beforehand by another user, they are refused."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from kmsgate.backends.softkms import ROOT_KEY_BYTES, read_root_key_file
from kmsgate.bootstrap import build_service, check_data_dir, prepare_dev_data_dir
from kmsgate.config import load_settings
from kmsgate.errors import ConfigError
from kmsgate.secret_files import exposure
from kmsgate.store import Store

SERVICE_UID = 10001
OTHER_UID = 20002


def _stat(mode: int, uid: int) -> os.stat_result:
    return os.stat_result((stat.S_IFREG | mode, 1, 1, 1, uid, 10001, 32, 0, 0, 0))


@pytest.mark.parametrize(
    ("mode", "uid", "allowed"),
    [
        (0o600, SERVICE_UID, True),
        (0o400, SERVICE_UID, True),
        (0o640, SERVICE_UID, False),  # its group is not root's choice: refused
        (0o604, SERVICE_UID, False),
        (0o440, 0, True),  # a Kubernetes Secret volume with fsGroup
        (0o640, 0, True),
        (0o660, 0, False),  # its group could rewrite it
        (0o644, 0, False),
        (0o604, 0, False),
        (0o600, OTHER_UID, False),  # private, but another user's: it can read or replace it
        (0o400, OTHER_UID, False),
    ],
)
def test_a_secret_file_is_private_to_its_owner_or_to_root_and_its_group(
    mode: int, uid: int, allowed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: SERVICE_UID)  # the gateway's user
    problem = exposure(_stat(mode, uid))
    assert (problem is None) is allowed
    if uid == OTHER_UID:
        assert problem == (
            f"is owned by uid {OTHER_UID}, not by the user the gateway runs as "
            f"(uid {SERVICE_UID}) or root"
        )


def test_the_root_key_file_is_read_only_when_private(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    path.write_bytes(b"k" * ROOT_KEY_BYTES)
    path.chmod(0o400)
    assert read_root_key_file(path) == b"k" * ROOT_KEY_BYTES
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=f"root key file {path} must not be accessible"):
        read_root_key_file(path)


@pytest.fixture
def give_away(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """Make a path belong to another user than the gateway's: chown it to OTHER_UID when
    the tests run as root, else make the gateway's user another one than the path's."""

    def give(path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, OTHER_UID, OTHER_UID)
        else:
            monkeypatch.setattr(os, "geteuid", lambda: OTHER_UID)

    return give


def test_a_dev_data_dir_another_user_made_is_refused_and_left_as_it_is(
    tmp_path: Path, give_away: Callable[[Path], None]
) -> None:
    """Another local user makes the dev data dir first (under /tmp, say) with a root key
    it knows: the gateway refuses it before it reads, writes or chmods anything there."""
    data = tmp_path / "kg"
    data.mkdir(mode=0o755)
    (data / "root.key").write_bytes(b"k" * ROOT_KEY_BYTES)
    give_away(data)
    settings = load_settings(data_dir=data, dev=True, env="dev")
    with pytest.raises(ConfigError, match=rf"the data dir {data} is owned by uid \d+, not by"):
        prepare_dev_data_dir(settings)
    assert stat.S_IMODE(data.stat().st_mode) == 0o755  # not made private for the attacker
    with pytest.raises(ConfigError, match="is owned by uid"):
        build_service(settings)


def test_a_data_dir_every_user_may_write_in_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "open"
    data.mkdir()
    data.chmod(0o777)
    with pytest.raises(ConfigError, match=f"the data dir {data} is writable by every user"):
        check_data_dir(data)
    data.chmod(0o1777)  # sticky, as /tmp: still anyone may add files
    with pytest.raises(ConfigError, match="is writable by every user"):
        check_data_dir(data)
    data.chmod(0o700)
    check_data_dir(data)


def test_a_database_file_another_user_made_is_refused(
    tmp_path: Path, give_away: Callable[[Path], None]
) -> None:
    """SQLite gives its -wal and -shm files the database file's owner and mode: a file made
    beforehand by another user would let it read the store."""
    database = tmp_path / "kmsgate.db"
    database.touch(mode=0o666)
    url = f"sqlite:///{database}"
    settings = load_settings(data_dir=tmp_path / "data", dev=True, env="dev", database_url=url)
    prepare_dev_data_dir(settings)
    # as root, only the database is another user's; else the gateway's uid changes, and the
    # data dir (checked first) is refused too
    mine = os.geteuid() == 0
    give_away(database)
    with pytest.raises(ConfigError, match=f"the database {database}" if mine else "owned by uid"):
        build_service(settings)
    Store(url).close()  # a read-only look (`audit verify --config`) by another user is fine


def test_a_root_key_file_of_another_user_is_refused_even_when_private(
    tmp_path: Path, give_away: Callable[[Path], None]
) -> None:
    path = tmp_path / "root.key"
    path.write_bytes(b"k" * ROOT_KEY_BYTES)
    path.chmod(0o600)
    give_away(path)
    with pytest.raises(ConfigError, match=f"root key file {path} is owned by uid"):
        read_root_key_file(path)


def test_a_dev_data_dir_that_cannot_be_made_private_is_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-root user with a root-owned, group-writable dev data dir: chmod is refused; the
    gateway says so in one line (it said `unexpected PermissionError`)."""

    def refused(path: object, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "chmod", refused)
    settings = load_settings(data_dir=tmp_path / "shared", dev=True, env="dev")
    with pytest.raises(ConfigError, match=r"cannot make the dev data dir .* private .*permitted"):
        prepare_dev_data_dir(settings)
