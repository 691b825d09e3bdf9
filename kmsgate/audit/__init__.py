"""Tamper-evident audit records and the sinks that keep them.

The service records `AuditEvent`s through an `AuditSink` (append, search, verify); the
hash-chained JSON-lines file (`FileSink`) is the sink in use, and `AuditFile` reads such a
file in place (``kmsgate audit verify``). Sinks write only what they are given: callers
pass digests and lengths of inputs (see `input_summary`), never plaintext, keys or tokens.
Writes are fail-closed: `AuditSink.append` raises `AuditUnavailable` and the caller must not
return the operation's result.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from kmsgate.audit.chain import GENESIS_HASH
from kmsgate.audit.events import AuditEvent, input_summary
from kmsgate.audit.filereader import AuditFile, iter_records
from kmsgate.audit.filesink import FileSink
from kmsgate.audit.sink import AuditSink, VerifyReport

__all__ = [
    "GENESIS_HASH",
    "AuditEvent",
    "AuditFile",
    "AuditLog",
    "AuditSink",
    "FileSink",
    "VerifyReport",
    "input_summary",
    "iter_records",
    "search",
    "verify_file",
]

# Former names, kept until the service and CLI use the sink API; then remove them.

AuditLog = FileSink
"""Former name of `FileSink`."""


def search(
    path: Path,
    *,
    since: datetime | None = None,
    principal: str | None = None,
    key: str | None = None,
    action: str | None = None,
    limit: int = 1000,
) -> list[dict[str, object]]:
    """Former form of `AuditFile(path).search(...)`; raises as that does."""
    return AuditFile(path).search(
        since=since, principal=principal, key=key, action=action, limit=limit
    )


def verify_file(path: Path) -> VerifyReport:
    """Former form of `AuditFile(path).verify()`; raises as that does."""
    return AuditFile(path).verify()
