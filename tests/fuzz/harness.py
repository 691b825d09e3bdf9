"""What every fuzz harness shares: seeds, byte mutations of a seed, the Hypothesis settings
of the bounded run (`FUZZ`) and of the long one (`fuzz_for`).

A harness feeds its target three kinds of input: arbitrary bytes, a `Mutant` (a seed with a
few edits: bit flips, interesting bytes and lengths, insertions, deletions, truncation,
repetition, splicing with another seed) and whatever structure-aware generators it adds
(tokens signed with the right key, requests re-signed after a mutation, ...). The target's
`check` returns True if the input was accepted and False if it was refused with the
documented client error; any other exception escapes: that is a bug.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

T = TypeVar("T")
CORPUS = Path(__file__).resolve().parent / "corpus"
MAX_EDITS = 4
MAX_RANDOM_BYTES = 512
_SLOW_IS_FINE = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.filter_too_much,
    HealthCheck.large_base_example,
]

settings.register_profile(
    "kmsgate-fuzz",
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=_SLOW_IS_FINE,
)
settings.register_profile(
    "kmsgate-fuzz-long",
    max_examples=200,  # one batch; `fuzz_for` runs batches until the time is up
    deadline=None,
    derandomize=False,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=_SLOW_IS_FINE,
)
FUZZ = settings.get_profile("kmsgate-fuzz")
"""The bounded run of the normal suite: the same 300 inputs per harness every run."""


def corpus(name: str) -> list[tuple[str, bytes]]:
    """The seed files of harness `name` as (file name, bytes), sorted by name. A file named
    `valid-*` must be accepted, one named `bad-*` refused (see `check_corpus`)."""
    directory = CORPUS / name
    return [(p.name, p.read_bytes()) for p in sorted(directory.iterdir()) if p.is_file()]


# -- mutation of a seed ------------------------------------------------------------------------


class Op(enum.Enum):
    FLIP = "flip"  # flip bit `arg` of the byte at `at`
    SET = "set"  # the byte at `at` becomes `arg`
    SET_U16 = "set-u16"  # the two bytes at `at` become `arg`, big-endian (a length field)
    INSERT = "insert"  # insert `data` at `at`
    DELETE = "delete"  # delete `arg` bytes from `at`
    TRUNCATE = "truncate"  # keep the first `at` bytes
    REPEAT = "repeat"  # repeat the `arg` bytes from `at` once
    SPLICE = "splice"  # keep the first `at` bytes, then seed `arg` from the same offset


@dataclass(frozen=True, slots=True)
class Edit:
    """One change to a byte string; positions are taken modulo its length (plus one)."""

    op: Op
    at: int
    arg: int = 0
    data: bytes = b""

    def apply(self, buf: bytes, seeds: Sequence[bytes]) -> bytes:
        at = self.at % (len(buf) + 1)
        match self.op:
            case Op.FLIP | Op.SET if at == len(buf):
                return buf
            case Op.FLIP:
                return buf[:at] + bytes([buf[at] ^ (1 << self.arg)]) + buf[at + 1 :]
            case Op.SET:
                return buf[:at] + bytes([self.arg]) + buf[at + 1 :]
            case Op.SET_U16:
                return buf[:at] + self.arg.to_bytes(2, "big") + buf[at + 2 :]
            case Op.INSERT:
                return buf[:at] + self.data + buf[at:]
            case Op.DELETE:
                return buf[:at] + buf[at + self.arg :]
            case Op.TRUNCATE:
                return buf[:at]
            case Op.REPEAT:
                return buf[: at + self.arg] + buf[at:]
            case Op.SPLICE:
                return buf[:at] + seeds[self.arg % len(seeds)][at:]


@dataclass(frozen=True, slots=True)
class Mutant:
    """Seed number `seed` (modulo the number of seeds) with `edits` applied in turn."""

    seed: int
    edits: tuple[Edit, ...]

    def apply(self, seeds: Sequence[bytes]) -> bytes:
        data = seeds[self.seed % len(seeds)]
        for edit in self.edits:
            data = edit.apply(data, seeds)
        return data


_INTERESTING_BYTES = st.sampled_from([0x00, 0x01, 0x02, 0x7F, 0x80, 0xFF]) | st.integers(0, 255)
_INTERESTING_U16 = st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF])
_POSITIONS = st.integers(0, 1 << 16)
_LENGTHS = st.integers(1, 64)


def edits() -> st.SearchStrategy[Edit]:
    """One `Edit` of any kind."""
    return st.one_of(
        st.builds(Edit, st.just(Op.FLIP), _POSITIONS, st.integers(0, 7)),
        st.builds(Edit, st.just(Op.SET), _POSITIONS, _INTERESTING_BYTES),
        st.builds(Edit, st.just(Op.SET_U16), _POSITIONS, _INTERESTING_U16),
        st.builds(Edit, st.just(Op.INSERT), _POSITIONS, data=st.binary(min_size=1, max_size=64)),
        st.builds(Edit, st.just(Op.DELETE), _POSITIONS, _LENGTHS),
        st.builds(Edit, st.just(Op.TRUNCATE), _POSITIONS),
        st.builds(Edit, st.just(Op.REPEAT), _POSITIONS, _LENGTHS),
        st.builds(Edit, st.just(Op.SPLICE), _POSITIONS, st.integers(0, 255)),
    )


def rarely(values: st.SearchStrategy[T]) -> st.SearchStrategy[list[T]]:
    """No value three times in four, else one of `values` (an optional field that is usually
    left out)."""
    return st.one_of(
        st.just([]), st.just([]), st.just([]), st.lists(values, min_size=1, max_size=1)
    )


def mutants() -> st.SearchStrategy[Mutant]:
    """A seed (by number) with 1 to `MAX_EDITS` edits."""
    return st.builds(
        Mutant, st.integers(0, 255), st.lists(edits(), min_size=1, max_size=MAX_EDITS).map(tuple)
    )


# -- harnesses -----------------------------------------------------------------------------


class Target(Protocol):
    """A parser under test, ready to be fed (with whatever context it needs)."""

    @property
    def seeds(self) -> Sequence[bytes]:
        """What mutants start from: the corpus and any seeds made for this target."""
        ...

    def check(self, data: bytes) -> bool:
        """True if `data` was accepted, False if refused with the documented error; raises
        (or fails an assertion) for anything else."""
        ...


@dataclass(frozen=True)
class PureTarget:
    """A target that needs no context: the corpus seeds and a check function."""

    seeds: Sequence[bytes]
    checker: Callable[[bytes], bool]

    def check(self, data: bytes) -> bool:
        return self.checker(data)


Input = bytes | Mutant


@dataclass(frozen=True)
class Harness:
    """One fuzz target: `open()` makes it ready (and cleans up on exit); `generators` are its
    structure-aware inputs, besides arbitrary bytes and mutants of its seeds."""

    name: str
    open: Callable[[], AbstractContextManager[Target]]
    generators: tuple[st.SearchStrategy[bytes], ...] = ()

    def inputs(self) -> st.SearchStrategy[Input]:
        """Arbitrary bytes, mutants of the seeds, and generated inputs with up to two edits."""
        generated = [
            st.builds(_edited, generator, st.lists(edits(), max_size=2).map(tuple))
            for generator in self.generators
        ]
        return st.one_of(st.binary(max_size=MAX_RANDOM_BYTES), mutants(), *generated)


def _edited(data: bytes, changes: tuple[Edit, ...]) -> bytes:
    return Mutant(0, changes).apply([data])


def pure(
    name: str, checker: Callable[[bytes], bool], *generators: st.SearchStrategy[bytes]
) -> Harness:
    """A harness for a context-free parser whose seeds are its corpus."""

    def open_pure() -> AbstractContextManager[Target]:
        return contextlib.nullcontext(PureTarget([seed for _, seed in corpus(name)], checker))

    return Harness(name, open_pure, generators)


def feed(target: Target, value: Input) -> bool:
    """Feed `value` (bytes, or a mutant of the target's seeds) to the target."""
    return target.check(value if isinstance(value, bytes) else value.apply(target.seeds))


def check_corpus(harness: Harness, target: Target) -> None:
    """Every `valid-*` seed of the harness is accepted and every `bad-*` one refused."""
    seeds = corpus(harness.name)
    assert seeds, f"no seeds in {CORPUS / harness.name}"
    for name, seed in seeds:
        if name.startswith(("valid-", "bad-")):
            assert target.check(seed) is name.startswith("valid-"), name


def fuzz_for(harness: Harness, seconds: float) -> int:
    """Feed `harness` random inputs (profile `kmsgate-fuzz-long`, in batches) for about
    `seconds`; the number of inputs fed. A failing input raises, shrunk and printed by
    Hypothesis."""
    executions = 0
    with harness.open() as target:

        def one(value: Input) -> None:
            nonlocal executions
            executions += 1
            feed(target, value)

        batch = settings.get_profile("kmsgate-fuzz-long")(given(harness.inputs())(one))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            batch()
    return executions
