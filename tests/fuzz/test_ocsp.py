"""Fuzz OCSP request handling: `parse_request` refuses with MalformedOcspRequest only, and the
responder (`Revocation.ocsp_from_memory`, then `Revocation.ocsp`, as the OCSP routes call
them) answers every input with a DER OCSPResponse: malformedRequest exactly when
`parse_request` refused it, never an exception.

The responder is a real in-process gateway's, for its dev CA. Besides mutants of the corpus
and of requests about a certificate that CA issued, requests are assembled here field by field
(any number of CertIDs, hash algorithms, serials, nonces and other extensions), about the dev
CA or not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cryptography.x509 import ocsp
from hypothesis import example, given
from hypothesis import strategies as st

from kmsgate.pki.ocsp import MalformedOcspRequest, parse_request
from kmsgate.service import Ctx, Service
from tests.fuzz import der
from tests.fuzz.harness import (
    FUZZ,
    Harness,
    Input,
    Target,
    check_corpus,
    corpus,
    feed,
    rarely,
)
from tests.fuzz.seeds import dev_gateway, issued_certificate, ocsp_requests

CA = "dev"
HASH_OIDS = {
    "sha1": "1.3.14.3.2.26",
    "sha256": "2.16.840.1.101.3.4.2.1",
    "sha512": "2.16.840.1.101.3.4.2.3",
    "md5": "1.2.840.113549.2.5",
    "unknown": "1.2.3.4",
}
NONCE = "1.3.6.1.5.5.7.48.1.2"
LIVE_CERT_IDS: dict[str, tuple[bytes, bytes]] = {}
"""(issuer name hash, issuer key hash) of the open gateway's dev CA, by hash OID; drawn
requests name it when set."""


@dataclass(frozen=True)
class OcspTarget:
    seeds: Sequence[bytes]
    service: Service

    def check(self, data: bytes) -> bool:
        """Whether `parse_request` accepted `data`; the answer is checked either way."""
        try:
            parse_request(data)
            parsed = True
        except MalformedOcspRequest:
            parsed = False
        revocation = self.service.revocation
        answer = revocation.ocsp_from_memory(CA, data) or revocation.ocsp(Ctx("fuzz"), CA, data)
        status = ocsp.load_der_ocsp_response(answer).response_status
        assert (status is ocsp.OCSPResponseStatus.MALFORMED_REQUEST) is not parsed, status
        return parsed


@contextlib.contextmanager
def open_responder() -> Iterator[Target]:
    with dev_gateway() as (service, post):
        made = ocsp_requests(*issued_certificate(post))
        for name, request_der in made.items():
            if name.startswith("valid-") and "other" not in name:
                request = ocsp.load_der_ocsp_request(request_der)
                oid = request.hash_algorithm.name
                LIVE_CERT_IDS[HASH_OIDS[oid]] = (request.issuer_name_hash, request.issuer_key_hash)
        seeds = [seed for _, seed in corpus(HARNESS.name)] + list(made.values())
        try:
            yield OcspTarget(seeds, service)
        finally:
            LIVE_CERT_IDS.clear()


@st.composite
def request_extensions(draw: st.DrawFn) -> bytes:
    """A nonce (of any length, wrapped or not), or another extension, critical or not."""
    critical = draw(st.booleans())
    nonce = draw(st.binary(max_size=40))
    if draw(st.booleans()):
        return der.extension(NONCE, critical, der.tlv(der.OCTET_STRING, nonce))
    return der.extension(draw(st.sampled_from([NONCE, "1.2.3.4"])), critical, nonce)


def cert_id(algorithm: str, name_hash: bytes, key_hash: bytes, serial: int) -> bytes:
    """A CertID: hash algorithm OID, issuer name and key hashes, serial number."""
    return der.tlv(
        der.SEQUENCE,
        der.algorithm(algorithm),
        der.tlv(der.OCTET_STRING, name_hash),
        der.tlv(der.OCTET_STRING, key_hash),
        der.integer(serial),
    )


def single_request(cert_id: bytes) -> bytes:
    """An OCSPRequest about one CertID, without extensions."""
    requests = der.tlv(der.SEQUENCE, der.tlv(der.SEQUENCE, cert_id))
    return der.tlv(der.SEQUENCE, der.tlv(der.SEQUENCE, requests))


@st.composite
def cert_ids(draw: st.DrawFn) -> bytes:
    """A CertID about the live dev CA (when open) or about anyone."""
    algorithm = draw(st.sampled_from(sorted(HASH_OIDS.values())))
    hashes = LIVE_CERT_IDS.get(algorithm)
    if hashes is None or draw(st.booleans()):
        hashes = (draw(st.binary(max_size=40)), draw(st.binary(max_size=40)))
    serial = draw(st.sampled_from([0, 1, -1, 2**159]) | st.integers(-(2**80), 2**170))
    return cert_id(algorithm, *hashes, serial)


def _with_extensions(head: bytes, tag: int, extensions: list[bytes]) -> list[bytes]:
    """`head`, then the extensions in an explicit [tag] when there are any."""
    return [head, der.context(tag, der.tlv(der.SEQUENCE, *extensions))] if extensions else [head]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """An OCSPRequest of 0-2 CertIDs (each perhaps with an extension), perhaps a version and a
    requestor name, 0-3 request extensions (repeated ones too), perhaps a signature (junk)."""
    single = [
        der.tlv(der.SEQUENCE, *_with_extensions(draw(cert_ids()), 0, draw(extension_lists(1))))
        for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2])))
    ]
    version = [der.context(0, der.integer(v)) for v in draw(rarely(st.sampled_from([0, 1, -1])))]
    requestor = [der.context(1, der.tlv(0x82, name)) for name in draw(rarely(st.binary()))]
    request_list = der.tlv(der.SEQUENCE, *single)
    tbs = der.tlv(
        der.SEQUENCE,
        *version,
        *requestor,
        *_with_extensions(request_list, 2, draw(extension_lists(3))),
    )
    signature = [der.context(0, junk) for junk in draw(rarely(st.binary(max_size=40)))]
    return der.tlv(der.SEQUENCE, tbs, *signature)


def extension_lists(most: int) -> st.SearchStrategy[list[bytes]]:
    return st.lists(request_extensions(), max_size=most)


HARNESS = Harness("ocsp", open_responder, (requests(),))


def test_the_corpus_parses_as_labelled(target: Target) -> None:
    check_corpus(HARNESS, target)


def test_a_negative_serial_is_a_malformed_request(target: Target) -> None:
    """Found by this harness: a request about the CA naming serial -1 made the responder
    raise ValueError (it cannot sign an answer about a negative serial): a 500."""
    sha1 = HASH_OIDS["sha1"]
    assert target.check(single_request(cert_id(sha1, *LIVE_CERT_IDS[sha1], -1))) is False


@FUZZ
@given(value=HARNESS.inputs())
@example(value=b"\x30\x03\x30\x01\x30")
def test_every_ocsp_input_gets_an_ocsp_response(target: Target, value: Input) -> None:
    feed(target, value)
