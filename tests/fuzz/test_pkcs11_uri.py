"""Fuzz the RFC 7512 reader `Pkcs11Uri.parse` (and `parse_key_reference`, the typed accessors):
InvalidRequest, or a URI that `format` writes and `parse` reads back as the same."""

from __future__ import annotations

import contextlib

from hypothesis import example, given
from hypothesis import strategies as st

from kmsgate.errors import InvalidRequest
from kmsgate.uri import PATH_ATTRIBUTES, QUERY_ATTRIBUTES, Pkcs11Uri
from tests.fuzz.harness import FUZZ, Input, Target, check_corpus, feed, pure

VENDOR = ("x-fuzz",)


def parse_uri(data: bytes) -> bool:
    """`data` as text (bytes that are not UTF-8 become lone surrogates, as JSON can carry)."""
    text = data.decode("utf-8", "surrogateescape")
    try:
        uri = Pkcs11Uri.parse(text, vendor_attributes=VENDOR)
    except InvalidRequest:
        return False
    _ = (uri.token, uri.serial, uri.object, uri.id, uri.type, uri.slot_id, repr(uri))
    assert Pkcs11Uri.parse(uri.format(), vendor_attributes=VENDOR) == uri
    with contextlib.suppress(InvalidRequest):
        Pkcs11Uri.parse_key_reference(text, vendor_attributes=VENDOR)
    return True


_NAMES = st.sampled_from([*PATH_ATTRIBUTES, *QUERY_ATTRIBUTES, *VENDOR, "Token", "ID", "x"])
_VALUES = st.text(max_size=12) | st.sampled_from(
    ["%", "%4", "%zz", "%C3%A9", "%FF", "1.2", "9" * 25]
)


@st.composite
def uris(draw: st.DrawFn) -> bytes:
    """`pkcs11:` and attributes drawn from the standard names, with any values."""
    path = ";".join(f"{n}={v}" for n, v in draw(st.lists(st.tuples(_NAMES, _VALUES), max_size=5)))
    query = "&".join(f"{n}={v}" for n, v in draw(st.lists(st.tuples(_NAMES, _VALUES), max_size=3)))
    text = f"{draw(st.sampled_from(['pkcs11', 'PKCS11', 'pkcs12']))}:{path}"
    return (text + (f"?{query}" if query or draw(st.booleans()) else "")).encode(
        "utf-8", "surrogateescape"
    )


HARNESS = pure("pkcs11_uri", parse_uri, uris())


def test_the_corpus_parses_as_labelled(target: Target) -> None:
    check_corpus(HARNESS, target)


@FUZZ
@given(value=HARNESS.inputs())
@example(value=b"pkcs11:slot-id=" + b"9" * 30)
def test_a_pkcs11_uri_is_read_or_refused_with_invalid_request(target: Target, value: Input) -> None:
    feed(target, value)
