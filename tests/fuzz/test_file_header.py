"""Fuzz the encrypted-file reader: `FileHeader.read` (kmsgate/envelope.py) and the C2SP chunked
body after it (kmsgate/chunked.py), through `Client.decrypt_stream` as `kmsgate decrypt-file`
runs it. Only the gateway round trip is replaced: the data keys of the files made here are
known, any other is refused as the gateway would.

A header is refused with DecryptionFailed or written back byte for byte; a body is refused
with DecryptionFailed and nothing else.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from kmsgate import chunked
from kmsgate.client import Client
from kmsgate.envelope import Envelope, FileHeader, Kind
from kmsgate.errors import DecryptionFailed
from tests.fuzz.harness import FUZZ, Harness, Input, Target, check_corpus, corpus, feed

PLAINTEXT_SIZES = (0, 1, 100, chunked.CHUNK_BYTES, chunked.CHUNK_BYTES + 1)
CONTEXTS: tuple[dict[str, str], ...] = ({}, {"team": "ml"}, {"a": "", "é": "ü" * 40})


class OfflineClient(Client):
    """A client whose `decrypt` knows the data keys of the files made here (no gateway)."""

    def __init__(self, deks: Mapping[bytes, bytes]) -> None:
        super().__init__("http://127.0.0.1:9", "fuzz")
        self._deks = deks

    def decrypt(
        self, name: str, ciphertext: bytes, context: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        dek = self._deks.get(ciphertext)
        if dek is None:
            raise DecryptionFailed("not a data key of this harness")
        return {"plaintext": dek, "key_version": 1}


def encrypted_file(context: dict[str, str], size: int) -> tuple[bytes, bytes, bytes]:
    """(file, data-key ciphertext, data key) of `size` random bytes, as the client writes
    it; the data-key ciphertext is well formed but wrapped by no backend."""
    dek = os.urandom(32)
    data_key = Envelope(Kind.DATA_KEY, "fuzz-files", 1, os.urandom(60)).to_bytes()
    header = FileHeader(context, data_key)
    body = io.BytesIO()
    chunked.encrypt_stream(dek, header.bound, io.BytesIO(os.urandom(size)), body)
    return header.to_bytes() + body.getvalue(), data_key, dek


@dataclass(frozen=True)
class FileTarget:
    seeds: Sequence[bytes]
    client: OfflineClient

    def check(self, data: bytes) -> bool:
        """Whether the header was accepted (its body is then checked too)."""
        src = io.BytesIO(data)
        try:
            header = FileHeader.read(src)
        except DecryptionFailed:
            return False
        assert header.to_bytes() == data[: src.tell()]
        with contextlib.suppress(DecryptionFailed):
            self.client.decrypt_stream(io.BytesIO(data), io.BytesIO())
        return True


@contextlib.contextmanager
def open_files() -> Iterator[Target]:
    made = [encrypted_file(ctx, size) for ctx in CONTEXTS for size in PLAINTEXT_SIZES]
    seeds = [seed for _, seed in corpus(HARNESS.name)] + [file for file, _, _ in made]
    with contextlib.closing(OfflineClient({key: dek for _, key, dek in made})) as client:
        yield FileTarget(seeds, client)


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """A header with a drawn context (any text) and data-key field, then a short body."""
    context = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4))
    data_key = draw(st.sampled_from([b"", b"KGE\x01\x02"]) | st.binary(max_size=80))
    return FileHeader(context, data_key).to_bytes() + draw(st.binary(max_size=80))


HARNESS = Harness("file_header", open_files, (headers(),))


def test_the_corpus_parses_as_labelled(target: Target) -> None:
    check_corpus(HARNESS, target)


def test_a_file_made_here_decrypts() -> None:
    file, data_key, dek = encrypted_file({"k": "v"}, 70_000)
    with contextlib.closing(OfflineClient({data_key: dek})) as client:
        assert client.decrypt_stream(io.BytesIO(file), io.BytesIO())["bytes"] == 70_000


@FUZZ
@given(value=HARNESS.inputs())
@example(value=b"KMSGATE\n\x01\x00\x02\x00\x00\x00\x00")
def test_a_file_is_read_or_refused_with_decryption_failed(target: Target, value: Input) -> None:
    feed(target, value)
