"""Interoperability with the real `openssl` CLI (docs/api.md: signatures are "verifiable by openssl
with the public key").

Forward: kmsgate signs a file's content (whole message, and the prehashed `digest` form) through
REST; `openssl` verifies the signature with the key's public half from `GET .../public-key`, and
fails on a tampered file. Reverse: `openssl` signs with a key of its own whose public half was
imported into kmsgate; REST `verify` accepts it and rejects it for a tampered message.

RSA-PSS is MGF1 with the message hash and salt length = hash length, strictly (DESIGN.md §6b):
openssl is told so explicitly, and a mismatched salt length must fail in both directions.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.gateway import AdminApi, open_gateway
from tests.helpers import b64

pytestmark = pytest.mark.interop

OPENSSL_TIMEOUT = 120.0  # seconds; RSA-4096 keygen is the slowest call (~2-4 s)


@dataclass(frozen=True)
class Case:
    key_type: str
    algorithm: str
    hash: str | None  # openssl digest name; None for Ed25519 (signs the whole message)
    padding: str | None  # "pss" or "pkcs1" for RSA

    @property
    def id(self) -> str:
        return f"{self.key_type}-{self.algorithm}"

    @property
    def digest_size(self) -> int:
        assert self.hash is not None
        return hashlib.new(self.hash).digest_size


CASES = [
    Case("ed25519", "ed25519", None, None),
    Case("ecdsa-p256", "ecdsa-sha256", "sha256", None),
    Case("ecdsa-p384", "ecdsa-sha384", "sha384", None),
    Case("rsa-3072", "rsa-pss-sha256", "sha256", "pss"),
    Case("rsa-3072", "rsa-pkcs1-sha256", "sha256", "pkcs1"),
    Case("rsa-4096", "rsa-pss-sha512", "sha512", "pss"),
]
KEY_TYPES = sorted({c.key_type for c in CASES})
PREHASHABLE = [c for c in CASES if c.hash is not None]

# openssl genpkey arguments producing a key of each kmsgate type
GENPKEY: dict[str, list[str]] = {
    "ed25519": ["-algorithm", "ed25519"],
    "ecdsa-p256": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    "ecdsa-p384": ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
    "rsa-3072": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072"],
    "rsa-4096": ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:4096"],
}


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=OPENSSL_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def checked(*argv: str | Path) -> None:
    proc = run(*argv)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))}\n{proc.stdout}{proc.stderr}"


def rsa_options(case: Case, flag: str, salt: str | None = None) -> list[str]:
    """`-sigopt`/`-pkeyopt` options fixing the RSA padding of `case` (salt: PSS salt length,
    default `digest` = the hash length)."""
    if case.padding == "pkcs1":
        return [flag, "rsa_padding_mode:pkcs1"]
    if case.padding == "pss":
        assert case.hash is not None
        return [
            flag,
            "rsa_padding_mode:pss",
            flag,
            f"rsa_pss_saltlen:{salt or 'digest'}",
            flag,
            f"rsa_mgf1_md:{case.hash}",
        ]
    return []


def openssl_verify(
    openssl: str, case: Case, pub: Path, data: Path, sig: Path, *, salt: str | None = None
) -> subprocess.CompletedProcess[str]:
    """openssl verifying `sig` over the content of `data` (the message)."""
    if case.hash is None:
        return run(
            openssl, "pkeyutl", "-verify", "-pubin", "-inkey", pub, "-rawin",
            "-in", data, "-sigfile", sig,
        )  # fmt: skip
    return run(
        openssl, "dgst", f"-{case.hash}", "-verify", pub,
        *rsa_options(case, "-sigopt", salt), "-signature", sig, data,
    )  # fmt: skip


def openssl_verify_digest(
    openssl: str, case: Case, pub: Path, digest: Path, sig: Path
) -> subprocess.CompletedProcess[str]:
    """openssl verifying `sig` over a precomputed digest (the file holds the raw hash)."""
    assert case.hash is not None
    return run(
        openssl, "pkeyutl", "-verify", "-pubin", "-inkey", pub,
        "-pkeyopt", f"digest:{case.hash}", *rsa_options(case, "-pkeyopt"),
        "-in", digest, "-sigfile", sig,
    )  # fmt: skip


def assert_verified(proc: subprocess.CompletedProcess[str]) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Verified OK" in out or "Signature Verified Successfully" in out, out


def assert_rejected(proc: subprocess.CompletedProcess[str]) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Verified OK" not in out and "Verified Successfully" not in out, out
    assert "failure" in out.lower() or "failed" in out.lower(), out


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminApi]:
    """One SQLite gateway for the module: what is checked here is the crypto path, which
    does not depend on the store (the API suites run on PostgreSQL too), and each key is
    generated once."""
    with open_gateway(tmp_path_factory.mktemp("interop-gateway")) as (api, admin):
        yield AdminApi(api, admin)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("interop")


@pytest.fixture(scope="module")
def kms_public_keys(gateway: AdminApi, workdir: Path) -> dict[str, Path]:
    """kmsgate-generated keys, one per type: the PEM file of each public key."""
    paths = {}
    for key_type in KEY_TYPES:
        name = f"interop-{key_type}"
        r = gateway.call(
            "POST", "/v1/keys", json={"name": name, "type": key_type, "purpose": "interop"}
        )
        assert r.status_code == 201, r.text
        pem = gateway.call("GET", f"/v1/keys/{name}/public-key")
        assert pem.status_code == 200, pem.text
        assert pem.headers["content-type"].startswith("application/x-pem-file")
        path = workdir / f"{name}.pub.pem"
        path.write_bytes(pem.content)
        paths[key_type] = path
    return paths


@dataclass(frozen=True)
class OpensslKey:
    private: Path
    name: str  # the verify-only key in kmsgate holding its public half


@pytest.fixture(scope="module")
def openssl_keys(openssl_bin: str, gateway: AdminApi, workdir: Path) -> dict[str, OpensslKey]:
    """openssl-generated keys, one per type, whose public halves are imported into kmsgate."""
    keys = {}
    for key_type in KEY_TYPES:
        private = workdir / f"ossl-{key_type}.pem"
        public = workdir / f"ossl-{key_type}.pub.pem"
        checked(openssl_bin, "genpkey", *GENPKEY[key_type], "-out", private)
        checked(openssl_bin, "pkey", "-in", private, "-pubout", "-out", public)
        name = f"ossl-{key_type}"
        r = gateway.call(
            "POST",
            "/v1/keys",
            json={"name": name, "purpose": "interop", "public_key": public.read_text()},
        )
        assert r.status_code == 201, r.text
        assert (r.json()["type"], r.json()["verify_only"]) == (key_type, True), r.json()
        keys[key_type] = OpensslKey(private, name)
    return keys


@pytest.fixture
def files(tmp_path: Path) -> tuple[bytes, Path, Path]:
    """A file to sign (binary, 10 KiB + text) and a copy with one byte flipped."""
    content = secrets.token_bytes(10 * 1024) + b"\nkmsgate interop\n"
    original = tmp_path / "payload.bin"
    original.write_bytes(content)
    tampered = tmp_path / "tampered.bin"
    tampered.write_bytes(content[:100] + bytes([content[100] ^ 0x01]) + content[101:])
    return content, original, tampered


def kms_sign(gateway: AdminApi, case: Case, body: dict[str, str]) -> bytes:
    r = gateway.call(
        "POST",
        f"/v1/keys/interop-{case.key_type}/sign",
        json={**body, "algorithm": case.algorithm},
    )
    assert r.status_code == 200, r.text
    reply = r.json()
    assert (reply["algorithm"], reply["key_version"]) == (case.algorithm, 1)
    return base64.b64decode(reply["signature"], validate=True)


def kms_verify(gateway: AdminApi, name: str, case: Case, body: dict[str, str]) -> dict[str, Any]:
    r = gateway.call("POST", f"/v1/keys/{name}/verify", json={**body, "algorithm": case.algorithm})
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


# --------------------------------------------------------------------------------------------
# kmsgate signs, openssl verifies
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_openssl_verifies_kmsgate_signature(
    openssl_bin: str,
    gateway: AdminApi,
    kms_public_keys: dict[str, Path],
    files: tuple[bytes, Path, Path],
    case: Case,
) -> None:
    content, original, tampered = files
    signature = kms_sign(gateway, case, {"input": b64(content)})
    sig = original.with_suffix(".sig")
    sig.write_bytes(signature)
    pub = kms_public_keys[case.key_type]
    assert_verified(openssl_verify(openssl_bin, case, pub, original, sig))
    assert_rejected(openssl_verify(openssl_bin, case, pub, tampered, sig))


@pytest.mark.parametrize("case", PREHASHABLE, ids=lambda c: c.id)
def test_openssl_verifies_kmsgate_signature_over_digest(
    openssl_bin: str,
    gateway: AdminApi,
    kms_public_keys: dict[str, Path],
    files: tuple[bytes, Path, Path],
    case: Case,
) -> None:
    """A signature over a prehashed `digest` is a signature over the message: openssl checks
    it against the file (dgst) and against the raw digest (pkeyutl)."""
    content, original, tampered = files
    assert case.hash is not None
    digest = hashlib.new(case.hash, content).digest()
    signature = kms_sign(gateway, case, {"digest": b64(digest)})
    sig = original.with_suffix(".sig")
    sig.write_bytes(signature)
    digest_file = original.with_suffix(".digest")
    digest_file.write_bytes(digest)
    pub = kms_public_keys[case.key_type]
    assert_verified(openssl_verify(openssl_bin, case, pub, original, sig))
    assert_verified(openssl_verify_digest(openssl_bin, case, pub, digest_file, sig))
    assert_rejected(openssl_verify(openssl_bin, case, pub, tampered, sig))
    other = original.with_suffix(".other-digest")
    other.write_bytes(hashlib.new(case.hash, tampered.read_bytes()).digest())
    assert_rejected(openssl_verify_digest(openssl_bin, case, pub, other, sig))


@pytest.mark.parametrize("case", [c for c in CASES if c.padding == "pss"], ids=lambda c: c.id)
def test_kmsgate_pss_salt_is_exactly_the_hash_length(
    openssl_bin: str,
    gateway: AdminApi,
    kms_public_keys: dict[str, Path],
    files: tuple[bytes, Path, Path],
    case: Case,
) -> None:
    content, original, _ = files
    sig = original.with_suffix(".sig")
    sig.write_bytes(kms_sign(gateway, case, {"input": b64(content)}))
    pub = kms_public_keys[case.key_type]
    exact = str(case.digest_size)
    assert_verified(openssl_verify(openssl_bin, case, pub, original, sig, salt=exact))
    for wrong in ("20", str(case.digest_size + 1), "max"):
        assert_rejected(openssl_verify(openssl_bin, case, pub, original, sig, salt=wrong))


# --------------------------------------------------------------------------------------------
# openssl signs, kmsgate verifies (imported public key)
# --------------------------------------------------------------------------------------------


def openssl_sign(
    openssl: str, case: Case, private: Path, data: Path, out: Path, *, salt: str | None = None
) -> bytes:
    if case.hash is None:
        checked(openssl, "pkeyutl", "-sign", "-inkey", private, "-rawin", "-in", data, "-out", out)
    else:
        checked(
            openssl, "dgst", f"-{case.hash}", "-sign", private,
            *rsa_options(case, "-sigopt", salt), "-out", out, data,
        )  # fmt: skip
    return out.read_bytes()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kmsgate_verifies_openssl_signature(
    openssl_bin: str,
    gateway: AdminApi,
    openssl_keys: dict[str, OpensslKey],
    files: tuple[bytes, Path, Path],
    case: Case,
) -> None:
    content, original, tampered = files
    key = openssl_keys[case.key_type]
    signature = openssl_sign(openssl_bin, case, key.private, original, original.with_suffix(".sig"))
    sig = b64(signature)
    ok = kms_verify(gateway, key.name, case, {"input": b64(content), "signature": sig})
    assert ok == {"valid": True, "key_version": 1}
    bad = kms_verify(
        gateway, key.name, case, {"input": b64(tampered.read_bytes()), "signature": sig}
    )
    assert bad == {"valid": False, "key_version": None}
    if case.hash is not None:
        digest = hashlib.new(case.hash, content).digest()
        by_digest = kms_verify(gateway, key.name, case, {"digest": b64(digest), "signature": sig})
        assert by_digest == {"valid": True, "key_version": 1}
        wrong = hashlib.new(case.hash, tampered.read_bytes()).digest()
        bad_digest = kms_verify(gateway, key.name, case, {"digest": b64(wrong), "signature": sig})
        assert bad_digest == {"valid": False, "key_version": None}


@pytest.mark.parametrize("case", [c for c in CASES if c.padding == "pss"], ids=lambda c: c.id)
def test_kmsgate_rejects_openssl_pss_with_another_salt_length(
    openssl_bin: str,
    gateway: AdminApi,
    openssl_keys: dict[str, OpensslKey],
    files: tuple[bytes, Path, Path],
    case: Case,
) -> None:
    """Strict PSS: a signature valid under another salt length is not a kmsgate signature."""
    content, original, _ = files
    key = openssl_keys[case.key_type]
    for salt in ("max", "20"):
        signature = openssl_sign(
            openssl_bin, case, key.private, original, original.with_suffix(f".{salt}.sig"),
            salt=salt,
        )  # fmt: skip
        reply = kms_verify(
            gateway, key.name, case, {"input": b64(content), "signature": b64(signature)}
        )
        assert reply == {"valid": False, "key_version": None}, salt
