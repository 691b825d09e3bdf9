"""The audit sink protocol: where the service records, searches and verifies audit records."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NamedTuple, Protocol

from kmsgate.audit.checkpoint import ChainCheckpoints
from kmsgate.audit.events import AuditEvent
from kmsgate.errors import InvalidRequest

__all__ = ["AuditCursor", "AuditPage", "AuditSink", "VerifyReport"]


@dataclass(frozen=True)
class VerifyReport:
    """Result of `AuditSink.verify`: ok, records checked, and the first broken line, why,
    and in which chain file."""

    ok: bool
    records: int
    first_bad_line: int | None
    reason: str | None
    chain: Path | None = None
    """The chain file with the broken line (a log has one per writer process)."""
    chains: int = 1
    """Chain files checked."""
    checkpoints: tuple[ChainCheckpoints, ...] = field(default=(), compare=False)
    """What each chain's signed checkpoints prove (when the log is intact); a summary, not
    part of the verdict (left out of comparisons)."""


class AuditCursor(NamedTuple):
    """Where a record stands in a log's search order: its time, then its chain file's
    number and its line. A page's `next` is the cursor of its oldest record."""

    time: str
    chain: int
    line: int

    def text(self) -> str:
        """The cursor as `GET /v1/audit?before=` takes it (`AuditCursor.parse`)."""
        return f"{self.time}~{self.chain}~{self.line}"

    @classmethod
    def parse(cls, text: str) -> AuditCursor:
        """The cursor `text` wrote. Raises InvalidRequest if it is not one."""
        match = _CURSOR.fullmatch(text)
        if match is None or not _real_time(match.group(1)):
            raise InvalidRequest("before: not a cursor (the `next` of a previous page)")
        return cls(match.group(1), int(match.group(2)), int(match.group(3)))


def _real_time(text: str) -> bool:
    """Whether `text`, of the shape of a record's time, names a time that exists."""
    try:
        datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return False
    return True


_CURSOR = re.compile(
    r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z)~(\d{1,9})~([1-9]\d{0,17})", re.ASCII
)


@dataclass(frozen=True, slots=True)
class AuditPage:
    """One page of a search: its records, oldest first, and the cursor of the older
    matches it left out (None: there are none)."""

    records: list[dict[str, object]]
    next: str | None


class AuditSink(Protocol):
    """A tamper-evident, append-only store of audit records. Implementations are
    thread-safe. Writes are fail-closed: when `append` raises, the caller must not return
    the operation's result."""

    def append(self, event: AuditEvent, *, reserved: bool = False) -> None:
        """Seal `event` into the chain as the next record before returning. `reserved`:
        the outcome of a change whose `started` record was appended; it may use room kept
        back from every other record, so that a change that started can be recorded.

        Raises AuditUnavailable if the record cannot be made durable (the chain is then
        unchanged) or the sink is closed or failed; TypeError/ValueError if the event holds
        values JSON cannot encode.
        """
        ...

    def search(
        self,
        *,
        since: datetime | None = None,
        principal: str | None = None,
        key: str | None = None,
        action: str | None = None,
        limit: int = 1000,
        before: AuditCursor | None = None,
    ) -> AuditPage:
        """The most recent `limit` matching records, oldest first, and the cursor of the
        older matches left out, if any. `key` matches resource.name; `before`: only records
        older than that cursor's; a naive `since` is taken as UTC.

        Raises ValueError if `limit` < 1 or a stored record cannot be parsed; OSError if
        the records cannot be read.
        """
        ...

    def problem(self) -> str | None:
        """Why appends are refused now (for the readiness check), or None."""
        ...

    def verify(self) -> VerifyReport:
        """Recompute every hash and check the links; the report names the first broken
        record. Raises OSError if the records cannot be read.
        """
        ...

    def close(self) -> None:
        """Make every record durable and release the sink; later appends fail. Idempotent.

        Raises AuditUnavailable if the final flush fails.
        """
        ...
