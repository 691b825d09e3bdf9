"""kmsgate.encoding: the strict base64 decoder accepts exactly what B64_PATTERN (the JSON
Schema pattern the API documents) matches, and gives the bytes back."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from kmsgate.encoding import B64_PATTERN, b64decode_strict, b64encode

# base64's alphabet, its padding and a few characters it must refuse
_TEXT = st.text(
    alphabet=st.sampled_from(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ \n\x00\u00e9\u0661"
    ),
    max_size=24,
)


def _encoded_then_changed() -> st.SearchStrategy[str]:
    """Canonical encodings, some with one character replaced or one added."""
    encoded = st.binary(max_size=12).map(b64encode)

    @st.composite
    def changed(draw: st.DrawFn) -> str:
        value = draw(encoded)
        where = draw(st.integers(0, len(value)))
        char = draw(st.sampled_from("AQgwBz+/=\n"))
        return value[:where] + char + value[where + draw(st.integers(0, 1)) :]

    return st.one_of(encoded, changed())


@given(st.one_of(_TEXT, _encoded_then_changed()))
@example("AAAA=")  # binascii's strict mode alone takes it
@example("aGl=")  # the bits under the padding are not zero
@example("AAAA\n")  # `$` in the pattern matches before a final newline
@example("")
def test_the_decoder_accepts_exactly_what_the_pattern_matches(value: str) -> None:
    if re.fullmatch(B64_PATTERN, value):
        assert b64decode_strict(value) == base64.b64decode(value)
        assert b64encode(b64decode_strict(value)) == value  # one encoding per byte string
    else:
        with pytest.raises(ValueError, match="not standard base64 with padding"):
            b64decode_strict(value)


@given(st.binary(max_size=2048))
def test_any_bytes_round_trip(data: bytes) -> None:
    assert b64decode_strict(b64encode(data)) == data
