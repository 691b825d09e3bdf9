"""Project Wycheproof vectors (DESIGN.md §6b, tests/vectors/wycheproof/README.md).

Signatures go end to end through REST: every test group's public key is imported as a
verify-only key (`POST /v1/keys` with `public_key`) and all of its cases are checked with one
batched `verify` call. `valid` cases must verify, `invalid` ones must not, `acceptable` ones are
recorded (and must not cause a 5xx). HMAC-SHA256 and AES-256-GCM go through the softkms backend
directly (`verify_mac`, `unwrap`), with each vector key sealed into a BackendKey.

Out of scope, by design, and therefore not parametrised (counts asserted in
`test_aes_gcm_scope`): AES-GCM groups with 128/192-bit keys (kmsgate's only AEAD key type is
aes-256-gcm) and with IVs other than 96 bits (softkms' wrap format is a fixed 12-byte nonce ||
ciphertext || 16-byte tag). aes_wrap/aes_kwp and the C2SP chunked-encryption vectors belong to
later issues.
"""

from __future__ import annotations

import collections
import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsgate.algorithms import HashName, KeyType
from kmsgate.backends.base import BackendKey
from kmsgate.backends.softkms import SoftKmsBackend
from kmsgate.errors import DecryptionFailed
from tests.gateway import AdminApi, open_gateway
from tests.helpers import b64
from tests.wycheproof import load_vectors

BATCH_LIMIT = 1000  # docs/api.md: a batch holds at most 1,000 items


# --------------------------------------------------------------------------------------------
# Signatures through REST
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminApi]:
    """One SQLite gateway for the module: what is checked here is the crypto path, which
    does not depend on the store (the API suites run on PostgreSQL too), and each key is
    generated once."""
    with open_gateway(tmp_path_factory.mktemp("wycheproof-gateway")) as (api, admin):
        yield AdminApi(api, admin)


@dataclass(frozen=True)
class SignatureFile:
    file: str
    algorithm: str  # kmsgate algorithm named on every verify item
    key_type: str  # the type kmsgate must derive from every group's public key
    group_type: str  # Wycheproof's test group type
    sha: str | None  # the group's hash (None for Ed25519)


SIGNATURE_FILES = [
    SignatureFile(
        "ecdsa_secp256r1_sha256_test.json", "ecdsa-sha256", "ecdsa-p256", "EcdsaVerify", "SHA-256"
    ),
    SignatureFile(
        "ecdsa_secp384r1_sha384_test.json", "ecdsa-sha384", "ecdsa-p384", "EcdsaVerify", "SHA-384"
    ),
    SignatureFile("ed25519_test.json", "ed25519", "ed25519", "EddsaVerify", None),
    SignatureFile(
        "rsa_pss_3072_sha256_mgf1_32_test.json",
        "rsa-pss-sha256",
        "rsa-3072",
        "RsassaPssVerify",
        "SHA-256",
    ),
    SignatureFile(
        "rsa_signature_3072_sha256_test.json",
        "rsa-pkcs1-sha256",
        "rsa-3072",
        "RsassaPkcs1Verify",
        "SHA-256",
    ),
]


def _group_pem(group: dict[str, Any]) -> str:
    """The group's public key as PEM SubjectPublicKeyInfo (from PEM, else from DER)."""
    if group.get("publicKeyPem"):
        return str(group["publicKeyPem"])
    der = bytes.fromhex(group["publicKeyDer"])
    key = serialization.load_der_public_key(der)
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _check_group_parameters(spec: SignatureFile, group: dict[str, Any]) -> None:
    """The file's groups use exactly the parameters kmsgate's algorithm fixes."""
    assert group["type"] == spec.group_type
    assert group.get("sha") == spec.sha
    if spec.group_type == "RsassaPssVerify":
        # kmsgate's PSS: MGF1 with the message hash, salt length = hash length
        assert (group["mgf"], group["mgfSha"], group["sLen"]) == ("MGF1", spec.sha, 32)


def _structurally_impossible(spec: SignatureFile, group: dict[str, Any], sig: bytes) -> bool:
    """Whether no key of the group could have made `sig` whatever the message: the wrong
    length for Ed25519 (64 bytes) or RSA (the modulus size), or not a DER ECDSA-Sig-Value.
    Only such a case may be refused with a per-item 4xx instead of `valid: false`."""
    if spec.key_type == "ed25519":
        return len(sig) != 64
    if spec.key_type.startswith("rsa-"):
        return len(sig) != group["keySize"] // 8
    try:
        decode_dss_signature(sig)
    except ValueError:
        return True
    return False


# per-item error codes that mean "refused as malformed" (4xx), as opposed to a failure
_REFUSAL_CODES = frozenset({"invalid_request", "validation_failed"})


@dataclass
class Tally:
    """Outcomes of one vector file."""

    groups: int = 0
    imported: int = 0
    not_imported: list[str] = field(default_factory=list)
    ran: collections.Counter[str] = field(default_factory=collections.Counter)
    impossible: int = 0  # invalid cases that are structurally impossible signatures
    refused: list[str] = field(default_factory=list)  # ... of those, answered with a 4xx
    acceptable: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)

    def summary(self, name: str) -> str:
        return (
            f"{name}: groups {self.groups} (imported {self.imported}, "
            f"not imported {len(self.not_imported)}); cases valid {self.ran['valid']}, "
            f"invalid {self.ran['invalid']} (structurally impossible {self.impossible}, "
            f"refused with a per-item 4xx {len(self.refused)}), "
            f"acceptable {self.ran['acceptable']} (outcomes {dict(self.acceptable)})"
        )


def _judge(
    tally: Tally, where: str, test: dict[str, Any], impossible: bool, reply: dict[str, Any]
) -> None:
    result = test["result"]
    tally.ran[result] += 1
    tally.impossible += result == "invalid" and impossible
    if "error" in reply:
        code = reply["error"].get("code", "?")
        outcome = f"error:{code}"
        if result == "invalid" and impossible and code in _REFUSAL_CODES:
            tally.refused.append(f"{where}: {code}")
        elif result == "acceptable" and code in _REFUSAL_CODES:
            pass  # recorded below; only a 5xx-class error is a finding
        else:
            tally.failures.append(f"{where} ({result}) answered with error {reply['error']}")
    else:
        valid = reply.get("valid")
        outcome = f"valid={valid}"
        if not isinstance(valid, bool):
            tally.failures.append(f"{where}: malformed reply {reply}")
        elif result == "valid" and valid is not True:
            tally.failures.append(f"{where} ({test['comment']}): valid signature rejected")
        elif result == "invalid" and valid is not False:
            tally.failures.append(
                f"{where} ({test['comment']}, {test['flags']}): invalid signature accepted"
            )
    if result == "acceptable":
        tally.acceptable[outcome] += 1


SIGNATURE_CASES = [
    pytest.param(spec, form, id=f"{spec.file.removesuffix('_test.json')}-{form}")
    for spec in SIGNATURE_FILES
    for form in (("input",) if spec.sha is None else ("input", "digest"))
]


def _message_field(spec: SignatureFile, form: str, msg: bytes) -> dict[str, str]:
    """The verify item's message: the bytes themselves, or their prehashed `digest`."""
    if form == "input":
        return {"input": b64(msg)}
    assert spec.sha is not None
    return {"digest": b64(hashlib.new(spec.sha.replace("-", "").lower(), msg).digest())}


@pytest.mark.parametrize(("spec", "form"), SIGNATURE_CASES)
def test_signature_vectors_through_rest(gateway: AdminApi, spec: SignatureFile, form: str) -> None:
    """Every case of the file through REST verify, sending the message (`input`) or, for the
    hash-based algorithms, its digest (`digest`, verified as prehashed)."""
    data = load_vectors(spec.file)
    stem = spec.file.removesuffix("_test.json").replace("_", "-")
    tally = Tally()
    for index, group in enumerate(data["testGroups"]):
        tally.groups += 1
        _check_group_parameters(spec, group)
        name = f"wp-{stem}-{form}-{index}"
        created = gateway.call(
            "POST",
            "/v1/keys",
            json={"name": name, "purpose": "wycheproof", "public_key": _group_pem(group)},
        )
        if created.status_code != 201:
            tally.not_imported.append(f"group {index}: {created.status_code} {created.text}")
            continue
        tally.imported += 1
        key = created.json()
        assert key["type"] == spec.key_type, key
        assert key["verify_only"] is True, key
        tests = group["tests"]
        for start in range(0, len(tests), BATCH_LIMIT):
            chunk = tests[start : start + BATCH_LIMIT]
            items = [
                {
                    **_message_field(spec, form, bytes.fromhex(t["msg"])),
                    "signature": b64(bytes.fromhex(t["sig"])),
                    "algorithm": spec.algorithm,
                }
                for t in chunk
            ]
            r = gateway.call("POST", f"/v1/keys/{name}/verify", json={"batch": items})
            assert r.status_code == 200, f"group {index}: {r.status_code} {r.text}"
            replies = r.json()["batch"]
            assert len(replies) == len(chunk)
            for test, reply in zip(chunk, replies, strict=True):
                where = f"group {index} tcId {test['tcId']}"
                impossible = _structurally_impossible(spec, group, bytes.fromhex(test["sig"]))
                _judge(tally, where, test, impossible, reply)

    summary = tally.summary(f"{spec.file} [{form}]")
    print(summary)
    expected = collections.Counter(t["result"] for g in data["testGroups"] for t in g["tests"])
    assert tally.not_imported == [], f"{summary}\nnot imported: {tally.not_imported}"
    assert tally.failures == [], summary + "\n" + "\n".join(tally.failures)
    assert tally.ran == expected, f"{summary}\nnot every case ran: {expected}"
    assert tally.ran["valid"] > 0 and tally.ran["invalid"] > 0, summary


def test_verify_reports_the_imported_key_version(gateway: AdminApi) -> None:
    """A positive control on the path above: a valid vector reports key_version 1, and the
    same signature over a different message is rejected."""
    data = load_vectors("ecdsa_secp256r1_sha256_test.json")
    group = data["testGroups"][0]
    case = next(t for t in group["tests"] if t["result"] == "valid")
    r = gateway.call(
        "POST",
        "/v1/keys",
        json={"name": "wp-control", "purpose": "wycheproof", "public_key": _group_pem(group)},
    )
    assert r.status_code == 201, r.text
    item = {
        "input": b64(bytes.fromhex(case["msg"])),
        "signature": b64(bytes.fromhex(case["sig"])),
    }
    ok = gateway.call("POST", "/v1/keys/wp-control/verify", json=item)
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"valid": True, "key_version": 1}
    other = gateway.call(
        "POST",
        "/v1/keys/wp-control/verify",
        json={**item, "input": b64(bytes.fromhex(case["msg"]) + b"x")},
    )
    assert other.json() == {"valid": False, "key_version": None}


# --------------------------------------------------------------------------------------------
# HMAC-SHA256 and AES-256-GCM through the softkms backend
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def softkms() -> SoftKmsBackend:
    return SoftKmsBackend("wycheproof", secrets.token_bytes(32))


def _sealed(backend: SoftKmsBackend, key_type: KeyType, tag: str, secret: bytes) -> BackendKey:
    """`secret` sealed into a BackendKey (a unique ref each time: softkms caches by ref)."""
    name = f"wp-{tag}"
    return BackendKey(
        ref=f"softkms:{name}/1",
        key_type=key_type,
        name=name,
        version=1,
        material=backend.seal(secret, name, 1),
    )


def _cases(file: str, keep: Any) -> list[Any]:
    """pytest params for the tests of `file` whose group passes `keep`."""
    data = load_vectors(file)
    return [
        pytest.param(group, test, id=f"tc{test['tcId']}")
        for group in data["testGroups"]
        if keep(group)
        for test in group["tests"]
    ]


HMAC_FILE = "hmac_sha256_test.json"
HMAC_FULL_TAG_BITS = 256


@pytest.mark.parametrize(("group", "test"), _cases(HMAC_FILE, lambda g: True))
def test_hmac_sha256_vectors(softkms: SoftKmsBackend, group: Any, test: Any) -> None:
    """kmsgate accepts full-length tags only: a `valid` vector with a truncated tag
    (tagSize < 256) must be rejected like an invalid one."""
    key = _sealed(softkms, KeyType.HMAC_SHA256, f"hmac-{test['tcId']}", bytes.fromhex(test["key"]))
    msg, tag = bytes.fromhex(test["msg"]), bytes.fromhex(test["tag"])
    assert len(tag) * 8 == group["tagSize"]
    expected = test["result"] == "valid" and group["tagSize"] == HMAC_FULL_TAG_BITS
    assert softkms.verify_mac(key, msg, tag, HashName.SHA256) is expected
    if test["result"] == "valid":
        # The backend's own MAC is the full tag, of which the vector's is a prefix.
        full = softkms.mac(key, msg, HashName.SHA256)
        assert len(full) == 32
        assert full[: len(tag)] == tag


def test_hmac_sha256_scope() -> None:
    data = load_vectors(HMAC_FILE)
    counts = collections.Counter(
        (g["tagSize"], t["result"]) for g in data["testGroups"] for t in g["tests"]
    )
    print(f"{HMAC_FILE}: {dict(counts)} (truncated 128-bit tags run, expected invalid)")
    assert sum(counts.values()) == data["numberOfTests"]


AES_GCM_FILE = "aes_gcm_test.json"


def _aes_gcm_in_scope(group: dict[str, Any]) -> bool:
    return (group["keySize"], group["ivSize"], group["tagSize"]) == (256, 96, 128)


@pytest.mark.parametrize(("group", "test"), _cases(AES_GCM_FILE, _aes_gcm_in_scope))
def test_aes_gcm_vectors_through_unwrap(softkms: SoftKmsBackend, group: Any, test: Any) -> None:
    key = _sealed(softkms, KeyType.AES_256_GCM, f"gcm-{test['tcId']}", bytes.fromhex(test["key"]))
    iv, aad, msg = (bytes.fromhex(test[f]) for f in ("iv", "aad", "msg"))
    blob = iv + bytes.fromhex(test["ct"]) + bytes.fromhex(test["tag"])
    if test["result"] == "valid":
        assert softkms.unwrap(key, blob, aad) == msg
    else:
        assert test["result"] == "invalid"
        with pytest.raises(DecryptionFailed):
            softkms.unwrap(key, blob, aad)
    # wrap() under the same key: a fresh nonce, the same format, and a round trip.
    wrapped = softkms.wrap(key, msg, aad)
    assert len(wrapped) == 12 + len(msg) + 16
    assert softkms.unwrap(key, wrapped, aad) == msg
    assert AESGCM(bytes.fromhex(test["key"])).decrypt(wrapped[:12], wrapped[12:], aad) == msg


def test_aes_gcm_scope() -> None:
    data = load_vectors(AES_GCM_FILE)
    groups = data["testGroups"]
    in_scope = [t for g in groups if _aes_gcm_in_scope(g) for t in g["tests"]]
    out = collections.Counter(
        "key size " + str(g["keySize"]) if g["keySize"] != 256 else f"iv size {g['ivSize']}"
        for g in groups
        if not _aes_gcm_in_scope(g)
        for _ in g["tests"]
    )
    assert all(g["tagSize"] == 128 for g in groups)
    results = collections.Counter(t["result"] for t in in_scope)
    print(
        f"{AES_GCM_FILE}: run {len(in_scope)} {dict(results)}; out of scope "
        f"{sum(out.values())} (128/192-bit keys, non-96-bit IVs): {dict(out)}"
    )
    assert len(in_scope) + sum(out.values()) == data["numberOfTests"]
    assert results["valid"] > 0 and results["invalid"] > 0
