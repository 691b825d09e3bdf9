"""OCSP from `kmsgate.pki.ocsp`, against the real `openssl ocsp` CLI.

`openssl ocsp` writes the requests (with and without a nonce); kmsgate answers them, signed by
the issuing CA itself or by a delegated responder, and `openssl ocsp -respin` must verify the
answer against the root and report the status. Garbage requests get malformedRequest.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from kmsgate.errors import InvalidRequest
from kmsgate.pki.extensions import extension_value
from kmsgate.pki.ocsp import (
    CertStatus,
    MalformedOcspRequest,
    Responder,
    build_response,
    delegated_responder_extensions,
    issuer_matches,
    malformed_response,
    parse_request,
    request_nonce,
    unauthorized_response,
)
from tests.pki.test_crl import NOW, Pki, RemoteKey, issue, make_pki, run

pytestmark = pytest.mark.interop

HOUR = datetime.timedelta(hours=1)
GOOD_LEAF = 0x1004
REVOKED_LEAF = 0x1001
REVOKED_AT = NOW - 2 * HOUR


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def responder(pki: Pki) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A delegated responder certificate the intermediate issued, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue(
        "Test OCSP Responder",
        key.public_key(),
        issuer=pki.ca,
        issuer_key=pki.ca_key,
        ca=False,
        extensions=delegated_responder_extensions(),
    )
    return cert, key


def openssl_request(
    openssl_bin: str, pki: Pki, serial: int, out: Path, *options: str
) -> ocsp.OCSPRequest:
    done = run(
        openssl_bin,
        "ocsp",
        "-issuer",
        pki.ca_pem,
        "-cert",
        pki.leaves[serial],
        *options,
        "-reqout",
        out,
    )
    assert done.returncode == 0, done.stderr
    return parse_request(out.read_bytes())


def openssl_check(
    openssl_bin: str, pki: Pki, response: bytes, tmp_path: Path, *options: str | Path
) -> str:
    """`openssl ocsp -respin` output (stdout + stderr) for `response`; asserts it verifies.

    With `-cert`, openssl builds a request of its own and compares its nonce with the
    response's, so a fresh nonce is turned off unless the original request comes in `-reqin`.
    """
    if "-reqin" not in options:
        options = ("-no_nonce", *options)
    path = tmp_path / "resp.der"
    path.write_bytes(response)
    done = run(
        openssl_bin,
        "ocsp",
        "-respin",
        path,
        "-issuer",
        pki.ca_pem,
        "-CAfile",
        pki.root_pem,
        "-resp_text",
        *options,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Response verify OK" in output, output
    return output


def answer(
    pki: Pki,
    request: ocsp.OCSPRequest,
    status: CertStatus,
    *,
    responder_cert: x509.Certificate | None = None,
    responder_key: Any = None,
    **overrides: Any,
) -> bytes:
    """The response signed by the CA, or by the responder certificate and key given (checked
    as the gateway checks its responder: `Responder.checked`)."""
    responder = Responder.checked(
        pki.ca, responder_cert or pki.ca, pki.ca_key if responder_key is None else responder_key
    )
    args: dict[str, Any] = {
        "request": request,
        "responder": responder,
        "status": status,
        "this_update": NOW,
        "next_update": NOW + HOUR,
        "include_nonce": True,
    }
    args.update(overrides)
    return build_response(**args)


# --- good and revoked, signed by the CA and by a delegated responder --------------------------


@pytest.mark.parametrize("signer", ["ca", "delegated"])
def test_openssl_verifies_good_and_revoked(
    pki: Pki, responder: Any, openssl_bin: str, tmp_path: Path, signer: str
):
    signing = (
        {} if signer == "ca" else {"responder_cert": responder[0], "responder_key": responder[1]}
    )

    request = openssl_request(openssl_bin, pki, GOOD_LEAF, tmp_path / "good.der")
    assert issuer_matches(request, pki.ca)
    der = answer(pki, request, CertStatus.good(), **signing)
    output = openssl_check(openssl_bin, pki, der, tmp_path, "-cert", pki.leaves[GOOD_LEAF])
    assert "Cert Status: good" in output
    assert f"{pki.leaves[GOOD_LEAF]}: good" in output

    request = openssl_request(openssl_bin, pki, REVOKED_LEAF, tmp_path / "revoked.der")
    status = CertStatus.revoked(REVOKED_AT, x509.ReasonFlags.key_compromise)
    der = answer(pki, request, status, **signing)
    output = openssl_check(openssl_bin, pki, der, tmp_path, "-cert", pki.leaves[REVOKED_LEAF])
    assert "Cert Status: revoked" in output
    assert "Revocation Reason: keyCompromise (0x1)" in output
    assert f"{pki.leaves[REVOKED_LEAF]}: revoked" in output

    response = ocsp.load_der_ocsp_response(der)
    assert response.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.certificate_status is ocsp.OCSPCertStatus.REVOKED
    assert response.revocation_time_utc == REVOKED_AT
    assert response.serial_number == REVOKED_LEAF
    assert response.this_update_utc == NOW and response.next_update_utc == NOW + HOUR
    if signer == "ca":
        assert response.certificates == []
        assert response.responder_key_hash == _key_hash(pki.ca)
    else:
        assert response.certificates == [responder[0]]
        assert response.responder_key_hash == _key_hash(responder[0])


def _key_hash(cert: x509.Certificate) -> bytes:
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest


def test_unknown_status(pki: Pki, openssl_bin: str, tmp_path: Path):
    request = openssl_request(openssl_bin, pki, GOOD_LEAF, tmp_path / "req.der")
    output = openssl_check(openssl_bin, pki, answer(pki, request, CertStatus.unknown()), tmp_path)
    assert "Cert Status: unknown" in output


def test_sha256_cert_id(pki: Pki, openssl_bin: str, tmp_path: Path):
    done = run(
        openssl_bin,
        "ocsp",
        "-sha256",
        "-issuer",
        pki.ca_pem,
        "-cert",
        pki.leaves[GOOD_LEAF],
        "-reqout",
        tmp_path / "req.der",
    )
    assert done.returncode == 0, done.stderr
    request = parse_request((tmp_path / "req.der").read_bytes())
    assert isinstance(request.hash_algorithm, hashes.SHA256)
    assert issuer_matches(request, pki.ca)
    der = answer(pki, request, CertStatus.good())
    output = openssl_check(
        openssl_bin, pki, der, tmp_path, "-sha256", "-cert", pki.leaves[GOOD_LEAF]
    )
    assert f"{pki.leaves[GOOD_LEAF]}: good" in output


def test_a_remote_responder_key_signs_once(pki: Pki, openssl_bin: str, tmp_path: Path):
    request = openssl_request(openssl_bin, pki, GOOD_LEAF, tmp_path / "req.der")
    remote = RemoteKey(pki.ca_key)
    der = answer(pki, request, CertStatus.good(), responder_key=remote)
    assert remote.sign_calls == 1
    openssl_check(openssl_bin, pki, der, tmp_path)


# --- nonces ------------------------------------------------------------------------------------


def test_nonce_is_echoed(pki: Pki, openssl_bin: str, tmp_path: Path):
    request = openssl_request(openssl_bin, pki, GOOD_LEAF, tmp_path / "req.der", "-nonce")
    nonce = request_nonce(request)
    assert nonce is not None and len(nonce) >= 16
    der = answer(pki, request, CertStatus.good())
    response = ocsp.load_der_ocsp_response(der)
    echoed = response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    assert echoed == nonce
    # with -reqin, openssl compares the nonces itself
    output = openssl_check(openssl_bin, pki, der, tmp_path, "-reqin", tmp_path / "req.der")
    assert "OCSP Nonce" in output
    assert "nonce" not in output.lower().replace("ocsp nonce", "")  # no nonce warning

    without = answer(pki, request, CertStatus.good(), include_nonce=False)
    assert len(ocsp.load_der_ocsp_response(without).extensions) == 0


def test_no_nonce_without_one_in_the_request(pki: Pki, openssl_bin: str, tmp_path: Path):
    request = openssl_request(openssl_bin, pki, GOOD_LEAF, tmp_path / "req.der", "-no_nonce")
    assert request_nonce(request) is None
    der = answer(pki, request, CertStatus.good())
    assert len(ocsp.load_der_ocsp_response(der).extensions) == 0
    output = openssl_check(openssl_bin, pki, der, tmp_path, "-reqin", tmp_path / "req.der")
    assert "OCSP Nonce" not in output


@pytest.mark.parametrize(
    ("octets", "echoed"), [(0, None), (1, True), (32, True), (33, False), (128, False), (129, None)]
)
def test_nonce_lengths_follow_rfc_9654(pki: Pki, octets: int, echoed: bool | None):
    """1-32 octets are echoed, 33-128 answered without a nonce, none or over 128 refused
    as malformed (RFC 9654 §2.1)."""
    leaf = x509.load_pem_x509_certificate(Path(pki.leaves[GOOD_LEAF]).read_bytes())
    nonce = bytes(range(256))[:octets]
    builder = ocsp.OCSPRequestBuilder().add_certificate(leaf, pki.ca, hashes.SHA256())
    der = (
        builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        .build()
        .public_bytes(Encoding.DER)
    )
    if echoed is None:
        with pytest.raises(MalformedOcspRequest, match=f"{octets} octets"):
            parse_request(der)
        return
    response = ocsp.load_der_ocsp_response(answer(pki, parse_request(der), CertStatus.good()))
    got = extension_value(response.extensions, x509.OCSPNonce)
    assert (got.nonce if got else None) == (nonce if echoed else None)


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"not an OCSP request", b"\x30\x03\x02\x01\x01"])
def test_garbage_is_a_malformed_request(garbage: bytes):
    with pytest.raises(MalformedOcspRequest):
        parse_request(garbage)


def test_a_request_for_two_certificates_is_refused(pki: Pki, openssl_bin: str, tmp_path: Path):
    done = run(
        openssl_bin,
        "ocsp",
        "-issuer",
        pki.ca_pem,
        "-cert",
        pki.leaves[GOOD_LEAF],
        "-cert",
        pki.leaves[REVOKED_LEAF],
        "-reqout",
        tmp_path / "req.der",
    )
    assert done.returncode == 0, done.stderr
    with pytest.raises(MalformedOcspRequest, match="more than one"):
        parse_request((tmp_path / "req.der").read_bytes())


def test_malformed_response_for_openssl(openssl_bin: str, tmp_path: Path):
    assert (
        ocsp.load_der_ocsp_response(malformed_response()).response_status
        is ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    )
    (tmp_path / "resp.der").write_bytes(malformed_response())
    done = run(openssl_bin, "ocsp", "-respin", tmp_path / "resp.der", "-resp_text")
    output = done.stdout + done.stderr
    assert "malformedrequest" in output.lower(), output


def test_a_request_for_another_issuer_is_unauthorized(pki: Pki, openssl_bin: str, tmp_path: Path):
    # a request about the intermediate, whose issuer is the root, not the intermediate
    done = run(
        openssl_bin,
        "ocsp",
        "-issuer",
        pki.root_pem,
        "-cert",
        pki.ca_pem,
        "-reqout",
        tmp_path / "req.der",
    )
    assert done.returncode == 0, done.stderr
    request = parse_request((tmp_path / "req.der").read_bytes())
    assert issuer_matches(request, pki.root)
    assert not issuer_matches(request, pki.ca)
    with pytest.raises(InvalidRequest, match="another issuer"):
        answer(pki, request, CertStatus.good())

    (tmp_path / "resp.der").write_bytes(unauthorized_response())
    done = run(openssl_bin, "ocsp", "-respin", tmp_path / "resp.der", "-resp_text")
    assert "unauthorized" in (done.stdout + done.stderr).lower()


def test_responder_checks(pki: Pki, responder: Any, openssl_bin: str, tmp_path: Path):
    request = openssl_request(openssl_bin, pki, GOOD_LEAF, tmp_path / "req.der")
    good = CertStatus.good()
    with pytest.raises(InvalidRequest, match="does not match"):
        answer(pki, request, good, responder_key=responder[1])
    # a certificate without id-kp-OCSPSigning may not answer for the CA
    key = ec.generate_private_key(ec.SECP256R1())
    plain = issue("plain", key.public_key(), issuer=pki.ca, issuer_key=pki.ca_key, ca=False)
    with pytest.raises(InvalidRequest, match="OCSPSigning"):
        answer(pki, request, good, responder_cert=plain, responder_key=key)
    # a responder the root issued may not answer for the intermediate
    foreign = issue(
        "foreign responder",
        key.public_key(),
        issuer=pki.root,
        issuer_key=pki.root_key,
        ca=False,
        extensions=delegated_responder_extensions(),
    )
    with pytest.raises(InvalidRequest, match="not issued by"):
        answer(pki, request, good, responder_cert=foreign, responder_key=key)
    with pytest.raises(InvalidRequest, match="after"):
        answer(pki, request, good, next_update=NOW)
    with pytest.raises(InvalidRequest, match="timezone"):
        answer(pki, request, good, this_update=NOW.replace(tzinfo=None))


def test_cert_status_rules():
    assert CertStatus.revoked(REVOKED_AT).reason is None
    with pytest.raises(InvalidRequest):
        CertStatus("revoked")
    with pytest.raises(InvalidRequest):
        CertStatus.revoked(REVOKED_AT.replace(tzinfo=None))
    with pytest.raises(InvalidRequest):
        CertStatus("good", REVOKED_AT)
    with pytest.raises(InvalidRequest):
        CertStatus.revoked(REVOKED_AT, x509.ReasonFlags.remove_from_crl)
    with pytest.raises(InvalidRequest):
        CertStatus("maybe")  # type: ignore[arg-type]  # the check behind the type


def test_delegated_responder_extensions():
    extensions = {
        type(value): (value, critical) for value, critical in delegated_responder_extensions()
    }
    eku = extensions[x509.ExtendedKeyUsage][0]
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert list(eku) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    assert x509.OCSPNoCheck in extensions
    usage, critical = extensions[x509.KeyUsage]
    assert isinstance(usage, x509.KeyUsage)
    assert critical and usage.digital_signature and not usage.key_cert_sign
