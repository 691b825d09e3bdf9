"""Secret files (the softkms root key, a PKCS#11 PIN) are read only when no one but their
owner can reach them, or, for a file root owns, its group too: how a Kubernetes Secret with
`fsGroup` is mounted (0440 root:<fsGroup>)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from kmsgate.backends.secret_files import exposure
from kmsgate.backends.softkms import ROOT_KEY_BYTES, read_root_key_file
from kmsgate.errors import ConfigError

SERVICE_UID = 10001


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
    ],
)
def test_a_secret_file_is_private_to_its_owner_or_to_root_and_its_group(
    mode: int, uid: int, allowed: bool
) -> None:
    assert (exposure(_stat(mode, uid)) is None) is allowed


def test_the_root_key_file_is_read_only_when_private(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    path.write_bytes(b"k" * ROOT_KEY_BYTES)
    path.chmod(0o400)
    assert read_root_key_file(path) == b"k" * ROOT_KEY_BYTES
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=f"root key file {path} must not be accessible"):
        read_root_key_file(path)
