"""The gateway's own log lines: one JSON object per line on stderr, at the level `serve
--log-level` gives (warning by default). At info, every request gets a line (logger
`kmsgate.requests`): request id, method, route template, operation, key, principal,
status and duration; never a body, a token or a header value."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

import orjson

from kmsgate.errors import ConfigError
from kmsgate.text import utc_timestamp

__all__ = [
    "LEVEL_ENV",
    "UVICORN_LOG_CONFIG",
    "Decided",
    "configure",
    "current_decisions",
    "current_request",
    "request_logger",
]

LEVEL_ENV: Final = "KMSGATE_LOG_LEVEL"
"""How `serve` passes its log level to its worker processes."""
LEVELS: Final = ("debug", "info", "warning", "error")
request_logger = logging.getLogger("kmsgate.requests")
current_request: ContextVar[str | None] = ContextVar("kmsgate_request", default=None)
"""The id of the request being served (set by the API for each request; None elsewhere):
every line logged while it is served names it, as its audit record does."""


class Decided(NamedTuple):
    """One policy decision a request asked for: its action and what it was on."""

    action: str
    kind: object
    name: object


current_decisions: ContextVar[list[Decided] | None] = ContextVar("kmsgate_decisions", default=None)
"""The decisions the request being served asked for, in order (a new list per request, set
by the API; the gate appends to it, also from a worker thread, whose context is a copy
holding the same list): its request log line names the action and what it was on."""


class JsonFormatter(logging.Formatter):
    """`{time, level, logger, message, ...}`; a request line carries its fields instead of
    a message."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": utc_timestamp(datetime.fromtimestamp(record.created, UTC)),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        else:
            line["message"] = record.getMessage()
            request_id = current_request.get()
            if request_id is not None:
                line["request_id"] = request_id
        if record.exc_info and record.exc_info[0] is not None:
            line["error"] = record.exc_info[0].__name__  # the type only: never its text
        return orjson.dumps(line).decode()


class MalformedRequestsAtDebug(logging.Filter):
    """uvicorn logs each request it cannot parse at warning level; any client can send such
    requests by the thousand (the gateway answers each with a 400 of its own), so that
    line is written at debug level, and only when uvicorn logs at debug."""

    MESSAGE: Final = "Invalid HTTP request received."

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self.MESSAGE or record.levelno <= logging.DEBUG:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


UVICORN_LOG_CONFIG: Final[dict[str, Any]] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": JsonFormatter}},
    "filters": {"malformed": {"()": MalformedRequestsAtDebug}},
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "stream": "ext://sys.stderr",
            "filters": ["malformed"],
        }
    },
    "loggers": {"uvicorn": {"handlers": ["stderr"], "propagate": False}},
}
"""uvicorn's own lines (start, stop, its errors) as JSON lines like the gateway's (its
access log is off: `kmsgate.requests` has a line per request)."""


def configure(level: str) -> None:
    """Send the `kmsgate` loggers to stderr as JSON lines at `level` (debug, info, warning,
    error), and the other libraries' warnings and errors, and Python warnings, too.
    Idempotent. Raises
    ConfigError for another level."""
    if level.lower() not in LEVELS:
        raise ConfigError(f"log level {level!r}: use one of {', '.join(LEVELS)}")
    logger = logging.getLogger("kmsgate")
    logger.setLevel(level.upper())
    _to_stderr_as_json(logger)
    logger.propagate = False
    # the libraries' warnings and errors (SQLAlchemy's pool losing a connection, say), which
    # Python would otherwise print as plain text with a traceback, and Python warnings
    # (`warnings.warn`: logger py.warnings) as JSON lines too
    _to_stderr_as_json(logging.getLogger())
    logging.captureWarnings(True)


def _to_stderr_as_json(logger: logging.Logger) -> None:
    if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
