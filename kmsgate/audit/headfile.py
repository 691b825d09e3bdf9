"""The ``<log>.head`` file: the (seq, hash) of the last fsynced record of an audit file."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from kmsgate.audit.chain import decode

__all__ = ["head_path", "read_head", "write_head"]


def head_path(path: Path) -> Path:
    """The head file of the log at `path`."""
    return path.with_name(path.name + ".head")


def read_head(path: Path) -> tuple[int, str] | None:
    """The (seq, hash) stored in the head file, None if there is none.

    Raises ValueError if the head file is malformed, OSError if it cannot be read.
    """
    try:
        raw = head_path(path).read_bytes()
    except FileNotFoundError:
        return None
    obj = decode(raw.strip())
    seq, digest = obj.get("seq"), obj.get("hash")
    if type(seq) is not int or not isinstance(digest, str):
        raise ValueError("head file lacks seq/hash")
    return seq, digest


def write_head(path: Path, seq: int, digest: str) -> None:
    """Atomically replace the head file (write, fsync, rename). Raises OSError, leaving no
    temporary file behind (a full disk is retried later)."""
    target = head_path(path)
    # unique per call: several writers (processes, or logs in one process) sync concurrently
    tmp = target.with_name(f"{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, json.dumps({"seq": seq, "hash": digest}).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
