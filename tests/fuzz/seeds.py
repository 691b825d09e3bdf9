"""The seeds of the fuzz corpus, made by kmsgate itself (`scripts/fuzz.py --write-corpus`
writes tests/fuzz/corpus/): ciphertexts and files from a real gateway's `encrypt` and
`datakey`, CSRs from `kmsgate.pki.csr`, OCSP requests about a certificate its dev CA issued,
OIDC tokens of a test issuer whose public keys are kept beside them (`jwt.jwks.json`).

Files named `valid-*` must be accepted by their harness and `bad-*` refused (edge cases on
the wrong side of a limit); the harnesses check that the corpus still says so.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from kmsgate import chunked
from kmsgate.bootstrap import ensure_dev_ca
from kmsgate.envelope import FileHeader
from kmsgate.pki.csr import new_key_and_csr
from kmsgate.service import Service
from tests.gateway import open_gateway
from tests.test_oidc import Issuer

ENVELOPE_KEY = "fuzz-envelope"
FAR_FUTURE = 4_102_444_800  # 2100-01-01: the valid corpus tokens do not expire
JWKS_FILE = "jwt.jwks.json"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


Post = Callable[[str, dict[str, Any]], dict[str, str]]
"""POST a JSON body to a gateway path as admin; the JSON reply (asserting success)."""


def poster(client: httpx.Client) -> Post:
    """`Post` through `client` (an httpx or Starlette test client carrying an admin token)."""

    def post(path: str, body: dict[str, Any]) -> dict[str, str]:
        reply = client.post(path, json=body)
        assert reply.status_code in (200, 201), reply.text
        result: dict[str, str] = reply.json()
        return result

    return post


def envelopes(post: Post) -> dict[str, bytes]:
    """Server-side ciphertexts of the gateway's key `ENVELOPE_KEY`, and broken ones."""
    path = f"/v1/keys/{ENVELOPE_KEY}"

    def encrypt(plaintext: bytes, **context: str) -> bytes:
        body = {"plaintext": _b64(plaintext), "context": context}
        return base64.b64decode(post(f"{path}/encrypt", body)["ciphertext"])

    message = encrypt(b"hello")
    data_key = base64.b64decode(post(f"{path}/datakey", {})["ciphertext"])
    return {
        "valid-message.bin": message,
        "valid-message-context.bin": encrypt(b"x" * 300, tenant="acme", purpose="fuzz"),
        "valid-empty-plaintext.bin": encrypt(b""),
        "valid-data-key.bin": data_key,
        "bad-empty.bin": b"",
        "bad-short-tag.bin": message[:-6],
        "bad-data-key-trailing-byte.bin": data_key + b"\x00",
        "bad-kind-3.bin": message[:4] + b"\x03" + message[5:],
        "bad-format-2.bin": message[:3] + b"\x02" + message[4:],
        "bad-name-empty.bin": message[:5] + b"\x00" + message[6 + message[5] :],
    }


def files(post: Post, message: bytes) -> dict[str, bytes]:
    """Encrypted files as `kmsgate encrypt-file` writes them, and broken headers (one holds
    the ciphertext of a `message` where the data key goes)."""

    def encrypt_file(plaintext: bytes, context: dict[str, str]) -> bytes:
        made = post(f"/v1/keys/{ENVELOPE_KEY}/datakey", {"context": context})
        header = FileHeader(context, base64.b64decode(made["ciphertext"]))
        body = io.BytesIO()
        dek = base64.b64decode(made["plaintext"])
        chunked.encrypt_stream(dek, header.bound, io.BytesIO(plaintext), body)
        return header.to_bytes() + body.getvalue()

    plain = encrypt_file(b"model weights", {})
    with_context = encrypt_file(b"z" * 1000, {"team": "ml", "env": "prod"})
    unsorted = b"\x00\x02" + b"\x00\x01b\x00\x00" + b"\x00\x01a\x00\x00"
    data_key = FileHeader.read(io.BytesIO(plain)).data_key
    return {
        "valid-no-context.kmsgate": plain,
        "valid-context.kmsgate": with_context,
        "bad-magic.kmsgate": b"KMSGATF\n" + plain[8:],
        "bad-truncated-header.kmsgate": plain[:12],
        "bad-unsorted-context.kmsgate": (
            b"KMSGATE\n\x01"
            + struct.pack(">H", len(unsorted))
            + unsorted
            + struct.pack(">H", len(data_key))
            + data_key
        ),
        "bad-message-as-data-key.kmsgate": FileHeader({}, message).to_bytes(),
    }


def pkcs11_uris() -> dict[str, bytes]:
    """RFC 7512's examples and the references kmsgate writes, and refused ones."""
    uris = {
        "valid-rfc7512-token.txt": "pkcs11:",
        "valid-rfc7512-object.txt": "pkcs11:object=my-pubkey;type=public",
        "valid-rfc7512-full.txt": (
            "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;"
            "manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=cert;"
            "id=%69%95%3E%5C%F4%BD%EC%91;serial=?pin-source=file:/etc/token_pin"
        ),
        "valid-rfc7512-library.txt": (
            "pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;library-description=Soft%20Token;"
            "library-version=1.23"
        ),
        "valid-key-reference.txt": "pkcs11:token=kmsgate;id=%01%02;type=private",
        "valid-slot.txt": "pkcs11:slot-id=18446744073709551615;object=a",
        "valid-vendor.txt": "pkcs11:x-fuzz=value;object=a",
        "bad-percent.txt": "pkcs11:object=%G1",
        "bad-twice.txt": "pkcs11:object=a;OBJECT=b",
        "bad-slot-too-big.txt": "pkcs11:slot-id=18446744073709551616",
        "bad-fragment.txt": "pkcs11:object=a#b",
        "bad-pin-in-path.txt": "pkcs11:pin-value=1234",
        "bad-empty-query.txt": "pkcs11:object=a?",
    }
    return {name: text.encode() for name, text in uris.items()}


def csr_der(*sans: str, common_name: str | None = None) -> bytes:
    """A CSR made by `kmsgate cert issue --key-out`'s code, as DER."""
    _, csr = new_key_and_csr(list(sans), common_name)
    return csr.public_bytes(serialization.Encoding.DER)


def csrs() -> dict[str, bytes]:
    """CSRs the dev profiles approve, and ones they refuse."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    asks_ca = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("a.lab")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return {
        "valid-workload.der": csr_der("spiffe://dev.lab/ns/ml/sa/model-server"),
        "valid-server.der": csr_der("api.lab", "ip:127.0.0.1", common_name="api.lab"),
        "valid-client.der": csr_der("ci.lab"),
        "bad-wildcard.der": csr_der("*.lab"),
        "bad-outside-profiles.der": csr_der("example.com"),
        "bad-cn-not-a-san.der": csr_der("api.lab", common_name="other.lab"),
        "bad-asks-ca.der": asks_ca.public_bytes(serialization.Encoding.DER),
    }


def issued_certificate(post: Post) -> tuple[x509.Certificate, x509.Certificate]:
    """(a certificate the dev CA issued, the dev CA's certificate)."""
    pem = x509.load_der_x509_csr(csr_der("spiffe://dev.lab/fuzz")).public_bytes(
        serialization.Encoding.PEM
    )
    issued = post("/v1/pki/cas/dev/issue", {"csr": pem.decode(), "profile": "workload"})
    chain = x509.load_pem_x509_certificates(issued["chain"].encode())
    return x509.load_pem_x509_certificate(issued["certificate"].encode()), chain[0]


def ocsp_requests(cert: x509.Certificate, issuer: x509.Certificate) -> dict[str, bytes]:
    """Requests about `cert` (SHA-1 and SHA-256 CertIDs, with nonces of several lengths), about
    a serial `issuer` never issued, and refused ones."""

    def request(algorithm: hashes.HashAlgorithm, nonce: bytes | None = None) -> bytes:
        builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm)
        if nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        return builder.build().public_bytes(serialization.Encoding.DER)

    sha1 = request(hashes.SHA1())
    other = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        *_hashes(sha1), serial_number=cert.serial_number + 1, algorithm=hashes.SHA1()
    )
    return {
        "valid-sha1.der": sha1,
        "valid-sha256-nonce.der": request(hashes.SHA256(), b"n" * 16),
        "valid-sha512-long-nonce.der": request(hashes.SHA512(), b"n" * 64),
        "valid-other-serial.der": other.build().public_bytes(serialization.Encoding.DER),
        "bad-empty.der": b"",
        "bad-truncated.der": sha1[:-3],
        "bad-sequence-of-nothing.der": b"\x30\x00",
    }


def _hashes(request_der: bytes) -> tuple[bytes, bytes]:
    request = ocsp.load_der_ocsp_request(request_der)
    return request.issuer_name_hash, request.issuer_key_hash


def jwts(issuer: Issuer) -> dict[str, bytes]:
    """Tokens of `issuer`, accepted and refused; its keys are `corpus_jwks(issuer)`."""
    tokens = {
        "valid-rs256.jwt": issuer.token("RS256", "corpus-rsa", exp=FAR_FUTURE),
        "valid-es256.jwt": issuer.token("ES256", "corpus-ec", exp=FAR_FUTURE),
        "bad-expired.jwt": issuer.token(
            "RS256", "corpus-rsa", exp=1_000_000_000, iat=999_999_000, nbf=None
        ),
        "bad-audience.jwt": issuer.token("RS256", "corpus-rsa", exp=FAR_FUTURE, aud="other"),
        "bad-issuer.jwt": issuer.token("RS256", "corpus-rsa", exp=FAR_FUTURE, iss="https://x"),
        "bad-kid.jwt": issuer.token("ES256", "corpus-rsa", exp=FAR_FUTURE),
        "bad-no-subject.jwt": issuer.token("RS256", "corpus-rsa", exp=FAR_FUTURE, sub=None),
        "bad-alg-none.jwt": jwt.encode(issuer.claims(exp=FAR_FUTURE), "", algorithm="none"),
    }
    return {name: token.encode() for name, token in tokens.items()}


def corpus_jwks(issuer: Issuer) -> bytes:
    """`issuer`'s JWKS with the key ids the corpus tokens name (`corpus-rsa`, `corpus-ec`)."""
    keys = json.loads(issuer.jwks.read_text())["keys"]
    for key in keys:
        key["kid"] = {"rsa-1": "corpus-rsa", "ec-1": "corpus-ec"}[key["kid"]]
    return json.dumps({"keys": keys}, indent=1).encode()


def create_envelope_key(post: Post) -> None:
    """Create the AES-256-GCM envelope key `ENVELOPE_KEY`."""
    post("/v1/keys", {"name": ENVELOPE_KEY, "type": "aes-256-gcm", "purpose": "envelope-data"})


@contextlib.contextmanager
def dev_gateway() -> Iterator[tuple[Service, Post]]:
    """An in-process gateway on a temporary directory with its dev CA: its service, and
    `Post` as admin."""
    with tempfile.TemporaryDirectory() as tmp, open_gateway(Path(tmp)) as (api, token):
        ensure_dev_ca(api.service, Path(tmp) / "data")
        api.client.headers["authorization"] = f"Bearer {token}"
        yield api.service, poster(api.client)


def write_corpus(root: Path) -> None:
    """Write every harness's seeds under `root`, replacing those there, using a fresh
    in-process gateway (and a fresh OIDC test issuer, whose JWKS goes to `JWKS_FILE`)."""
    with dev_gateway() as (_, post), tempfile.TemporaryDirectory() as tmp:
        create_envelope_key(post)
        issuer = Issuer(Path(tmp))
        message = envelopes(post)["valid-message.bin"]
        made = {
            "envelope": envelopes(post),
            "file_header": files(post, message),
            "pkcs11_uri": pkcs11_uris(),
            "csr": csrs(),
            "ocsp": ocsp_requests(*issued_certificate(post)),
            "jwt": jwts(issuer),
        }
        for harness, seeds in made.items():
            directory = root / harness
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            for name, data in seeds.items():
                (directory / name).write_bytes(data)
        (root / JWKS_FILE).write_bytes(corpus_jwks(issuer))
