"""Durations as settings and requests write them (`90d`, `12h`, `30m`, `45s`, seconds): read,
written back, and `Duration`, the type of a duration setting."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer

from kmsgate.text import quoted

_DURATION_RE = re.compile(r"([0-9]+)([smhd]?)")
_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


MAX_DURATION_SECONDS = 100 * 365 * 86400
"""The longest duration any setting or request may name (a century: timedelta's own limit is
far beyond, but a number that large is a mistake)."""


_DURATION_FORMAT = "a whole number and one unit (d, h, m or s), such as 12h or 45s"


def parse_duration_setting(value: object) -> timedelta:
    """A positive duration from `90d`, `12h`, `30m`, `45s`, plain seconds or a timedelta.

    Raises ValueError (a validation error inside a settings model).
    """
    if isinstance(value, timedelta):
        duration = value
    elif isinstance(value, int | str) and not isinstance(value, bool):
        written = quoted(str(value))  # an integer may have thousands of digits too
        match = _DURATION_RE.fullmatch(str(value))  # ASCII digits, no spaces
        if not match:
            raise ValueError(f"invalid duration {written}: {_DURATION_FORMAT}")
        digits, unit = match.groups()
        seconds = int(digits[-12:]) * _DURATION_UNITS.get(unit, 1)
        if len(digits.lstrip("0")) > 12 or seconds > MAX_DURATION_SECONDS:
            raise ValueError(f"invalid duration {written}: at most {MAX_DURATION_SECONDS} seconds")
        duration = timedelta(seconds=seconds)
    else:
        raise ValueError(f"invalid duration of type {type(value).__name__}: {_DURATION_FORMAT}")
    if duration <= timedelta(0) or duration.microseconds:
        raise ValueError("a duration must be a positive whole number of seconds")
    return duration


def format_duration(duration: timedelta) -> str:
    """`duration` in the largest unit that divides it exactly: `7d`, `36h`, `90m`, `45s`."""
    seconds = int(duration.total_seconds())
    unit = next(u for u, size in _DURATION_UNITS.items() if seconds % size == 0)
    return f"{seconds // _DURATION_UNITS[unit]}{unit}"


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration_setting),
    PlainSerializer(format_duration, return_type=str),
]
"""A duration setting: `90d`, `12h`, `30m`, `45s` or seconds in the file, a timedelta once read."""
