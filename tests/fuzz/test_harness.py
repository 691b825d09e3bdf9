"""The shared fuzz machinery itself: what each edit does to a seed, and that a timed run
(`scripts/fuzz.py`) feeds inputs."""

from __future__ import annotations

import pytest

from tests.fuzz import test_envelope
from tests.fuzz.harness import Edit, Mutant, Op, fuzz_for

SEEDS = [b"abcdef", b"012345"]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (Edit(Op.FLIP, 0, 0), b"`bcdef"),
        (Edit(Op.SET, 1, 0xFF), b"a\xffcdef"),
        (Edit(Op.SET, 6, 0xFF), b"abcdef"),  # at the end: nothing to set
        (Edit(Op.SET_U16, 4, 0x0102), b"abcd\x01\x02"),
        (Edit(Op.INSERT, 3, data=b"XY"), b"abcXYdef"),
        (Edit(Op.DELETE, 1, 2), b"adef"),
        (Edit(Op.TRUNCATE, 2), b"ab"),
        (Edit(Op.REPEAT, 1, 2), b"abcbcdef"),
        (Edit(Op.SPLICE, 2, 1), b"ab2345"),
        (Edit(Op.TRUNCATE, 7 + 3), b"abc"),  # positions are taken modulo len + 1
    ],
)
def test_an_edit_changes_a_seed_as_named(edit: Edit, expected: bytes) -> None:
    assert edit.apply(SEEDS[0], SEEDS) == expected


def test_a_mutant_applies_its_edits_in_turn_to_its_seed() -> None:
    mutant = Mutant(3, (Edit(Op.TRUNCATE, 3), Edit(Op.INSERT, 0, data=b"<")))
    assert mutant.apply(SEEDS) == b"<012"


def test_a_timed_run_feeds_inputs() -> None:
    assert fuzz_for(test_envelope.HARNESS, 0.5) > 50
