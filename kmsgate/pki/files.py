"""Key and certificate files that are replaced while others read them (the gateway's own
TLS certificate, the agent's workload certificate)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["replace_private_file"]


def replace_private_file(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (mode 0600; the directory is made 0700 if missing): a
    reader sees the old file or the new one, never a part (temporary file, fsync, rename).
    Raises OSError, leaving no temporary file behind."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
