"""Files that hold a secret (the softkms root key, a PKCS#11 PIN, a Vault token, a TLS
private key, the offline root's passphrase): read only if no one but their owner can reach
them, and their owner is the gateway's user (the CLI's, for the passphrase) or root."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kmsgate.errors import ConfigError
from kmsgate.files import ROOT_UID, foreign_owner


def read_secret_file(path: Path, what: str) -> bytes:
    """The content of the secret file `path` (`what` it holds, for errors: "root key"), read
    through the descriptor whose owner and mode were checked (`exposure`). Raises
    ConfigError if it cannot be read or another user could read or replace it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            problem = exposure(os.fstat(file.fileno()))
            data = b"" if problem else file.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from None
    if problem is not None:
        raise ConfigError(f"{what} file {path} {problem} (chmod 600 {path})")
    return data


def exposure(st: os.stat_result) -> str | None:
    """What is wrong with a secret file's owner or mode, or None. Its owner must be the
    gateway's user or root (`foreign_owner`). It may be readable and writable by its owner
    only; or, owned by root, also readable by its group: a Kubernetes Secret volume with
    `fsGroup` makes its files 0440 root:<fsGroup>, and the gateway reads them through that
    group (the rule PostgreSQL applies to its server key)."""
    problem = foreign_owner(st)
    if problem is not None:
        return problem
    others = stat.S_IRWXO | (stat.S_IWGRP | stat.S_IXGRP if st.st_uid == ROOT_UID else stat.S_IRWXG)
    if st.st_mode & others:
        if st.st_uid == ROOT_UID:
            return "must not be accessible by others, nor writable by its group"
        return "must not be accessible by group or others"
    return None
