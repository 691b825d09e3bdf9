"""The `target` fixture: the module's `HARNESS`, opened once for the module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fuzz.harness import Harness, Target


@pytest.fixture(scope="module")
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    harness: Harness = request.module.HARNESS
    with harness.open() as opened:
        yield opened
