"""The Wycheproof vectors kept in `tests/vectors/wycheproof/` (see its README).

One loader for every test module: a missing file, or one whose SHA-256 differs from
`SHA256SUMS`, fails the test run the same way everywhere (vectors are part of the repository,
not an optional component).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

WYCHEPROOF_DIR = Path(__file__).resolve().parent / "vectors" / "wycheproof"


@functools.cache
def _expected_digests() -> dict[str, str]:
    sums = WYCHEPROOF_DIR / "SHA256SUMS"
    if not sums.is_file():
        pytest.fail(f"missing {sums}", pytrace=False)
    digests: dict[str, str] = {}
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        digests[name] = digest
    return digests


@functools.cache
def load_vectors(name: str) -> dict[str, Any]:
    """The parsed vector file `name`.

    Fails the calling test (or the collection of its module) when the file is missing, not
    listed in SHA256SUMS, or altered.
    """
    path = WYCHEPROOF_DIR / name
    expected = _expected_digests().get(name)
    if expected is None:
        pytest.fail(f"{name} is not listed in {WYCHEPROOF_DIR / 'SHA256SUMS'}", pytrace=False)
    if not path.is_file():
        pytest.fail(f"missing Wycheproof vectors {path}", pytrace=False)
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != expected:
        pytest.fail(f"{path} does not match its SHA256SUMS digest (edited?)", pytrace=False)
    data: dict[str, Any] = json.loads(raw)
    return data
