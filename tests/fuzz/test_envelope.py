"""Fuzz `Envelope.parse`, the reader of the server-side ciphertext that `decrypt`, `rewrap` and
a file header's data key hand it: DecryptionFailed or a ciphertext that writes back as given."""

from __future__ import annotations

import struct

from hypothesis import example, given
from hypothesis import strategies as st

from kmsgate.envelope import MAGIC, Envelope
from kmsgate.errors import DecryptionFailed
from tests.fuzz.harness import FUZZ, Input, Target, check_corpus, feed, pure


def parse_envelope(data: bytes) -> bool:
    """Refused with DecryptionFailed, or accepted and written back byte for byte."""
    try:
        envelope = Envelope.parse(data)
    except DecryptionFailed:
        return False
    assert envelope.to_bytes() == data
    return True


@st.composite
def raw_envelopes(draw: st.DrawFn) -> bytes:
    """The ciphertext layout with every field drawn, in range or not (docs/formats.md)."""
    name = draw(st.binary(max_size=300))
    wrapped = draw(st.binary(max_size=300))
    head = MAGIC + bytes([draw(st.sampled_from([1, 1, 0, 2])), draw(st.integers(0, 3))])
    head += bytes([draw(st.sampled_from([len(name) % 256, draw(st.integers(0, 255))]))]) + name
    head += struct.pack(">I", draw(st.sampled_from([1, 0, 2**32 - 1]) | st.integers(0, 2**32 - 1)))
    head += struct.pack(">H", draw(st.sampled_from([len(wrapped) % 65536, 0, 65535]))) + wrapped
    return head + draw(st.binary(max_size=12)) + draw(st.binary(max_size=64))


HARNESS = pure("envelope", parse_envelope, raw_envelopes())


def test_the_corpus_parses_as_labelled(target: Target) -> None:
    check_corpus(HARNESS, target)


@FUZZ
@given(value=HARNESS.inputs())
@example(value=b"")
@example(value=b"KGE\x01\x02\x00\x00\x00\x00\x01\x00\x01\x00")
@example(value=b"KGE\x01\x02\x81" + b"k" * 129 + b"\x00\x00\x00\x01\x00\x01w")  # name > 128
@example(value=b"KGE\x01\x02\x01k\x00\x00\x00\x01\x10\x01" + b"w" * 4097)  # wrapped > 4096
def test_envelope_parse_raises_only_decryption_failed(target: Target, value: Input) -> None:
    feed(target, value)
