"""Tamper-evident audit records and the sinks that keep them.

The service records `AuditEvent`s through an `AuditSink` (append, search, verify); the
hash-chained JSON-lines files (`FileSink`, one chain per writer process) are the sink in
use, and `AuditFile` reads such a log in place (``kmsgate audit verify``). Given a
`CheckpointPolicy`, a sink signs its chain now and then (`kmsgate.audit.checkpoint`).
Sinks write only what they are given: callers pass digests and lengths of inputs (see
`input_summary`), never plaintext, keys or tokens.
Writes are fail-closed: `AuditSink.append` raises `AuditUnavailable` and the caller must not
return the operation's result.
"""

from __future__ import annotations

from kmsgate.audit.chain import GENESIS_HASH
from kmsgate.audit.checkpoint import (
    CHECKPOINT_ACTION,
    ChainCheckpoints,
    CheckpointPolicy,
    PublicKeys,
)
from kmsgate.audit.events import AuditEvent, input_summary
from kmsgate.audit.filereader import AuditFile, chain_paths, iter_records, log_of_chain
from kmsgate.audit.filesink import FileSink
from kmsgate.audit.sink import AuditCursor, AuditPage, AuditSink, VerifyReport

__all__ = [
    "CHECKPOINT_ACTION",
    "GENESIS_HASH",
    "AuditCursor",
    "AuditEvent",
    "AuditFile",
    "AuditPage",
    "AuditSink",
    "ChainCheckpoints",
    "CheckpointPolicy",
    "FileSink",
    "PublicKeys",
    "VerifyReport",
    "chain_paths",
    "input_summary",
    "iter_records",
    "log_of_chain",
]
