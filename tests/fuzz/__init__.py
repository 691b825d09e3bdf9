"""Fuzz harnesses for kmsgate's parsers of untrusted input (docs/fuzzing.md).

Each `test_<harness>.py` module defines a `Harness` (tests/fuzz/harness.py) and runs it for a
bounded number of Hypothesis examples in the normal suite; `scripts/fuzz.py` runs the same
harnesses for as long as asked. Seeds are in `corpus/<harness>/`.
"""
