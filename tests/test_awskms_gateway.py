"""The awskms backend against a real moto_server over HTTP, through the gateway and directly.

Every KMS request goes through `KmsProxy` (tests/moto.py), a loopback HTTP proxy that records
the request bodies and can answer with ThrottlingException, so the tests can check what
kmsgate *sent* where moto's answer proves nothing (DIGEST mode, see below).

moto gaps, and how each is handled here (docs/backends/awskms.md):
- RAW-mode signatures are real: `openssl` verifies them with the public key kmsgate serves.
- MessageType=DIGEST is ignored by moto, so a prehashed signature from moto cannot verify
  (kmsgate withholds it: 502).
  `test_digest_request_shape` checks the request kmsgate sends (type, algorithm, exact
  digest bytes) and, independently of moto, that the digest fitting kmsgate does for ECDSA
  with a non-native hash is correct; `test_moto_still_ignores_digest` pins the gap.
- RSA-PSS: moto's salt is the maximum; kmsgate checks every signature a remote backend
  makes, and withholds that one (502).
- Disabled keys still work in moto: a key disabled in kmsgate is refused by kmsgate.
moto's own Verify is never used.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from kmsgate.algorithms import SIGN_ALGORITHMS, HashName, KeyType, sign_algorithm
from kmsgate.backends.awskms import AwsKmsBackend, AwsKmsSettings, sign_plan
from kmsgate.backends.base import KeySpec, SignMessage
from kmsgate.config import BackendSettings
from kmsgate.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    Conflict,
    DecryptionFailed,
    InvalidRequest,
    KeyDestroyed,
    NotSupported,
)
from kmsgate.service import Ctx
from kmsgate.service.gate import Outcome
from tests import helpers
from tests.gateway import Api, open_gateway
from tests.helpers import b64, unb64
from tests.moto import DUMMY_CREDENTIALS, KmsProxy, MotoServer, running_moto

MESSAGE = b"kmsgate awskms test message \x00\xff" * 20


def gateway(tmp_path: Path, backends: dict[str, Any]) -> AbstractContextManager[tuple[Api, str]]:
    return open_gateway(tmp_path, backends={"local": {"type": "softkms"}, **backends})


@pytest.fixture
def aws(tmp_path: Path, moto_server: MotoServer, kms_proxy: KmsProxy) -> Iterator[tuple[Api, str]]:
    """A gateway with backend `aws` (moto behind the recording proxy, fast retries) and
    `awslimited` (the same, with a 1 request/s ECC sign rate limit)."""
    common = {"pending_window_days": 7, "max_attempts": 3, "backoff_base": 0.01, "retry_after": 2}
    backends = {
        "aws": moto_server.backend_settings(kms_proxy.endpoint, **common),
        "awslimited": moto_server.backend_settings(
            kms_proxy.endpoint, rate_limits={"ecc": 1.0, "burst": 1.0, "max_wait": 0}, **common
        ),
    }
    with gateway(tmp_path, backends) as started:
        yield started


def name() -> str:
    return f"k{secrets.token_hex(4)}.test"  # a dot: exercises the alias mapping


create_key = functools.partial(
    helpers.create_key, backend="aws", labels={"env": "test", "owner": "team-a"}
)
"""Create a key on backend `aws` (or `backend=`), labelled as the tag tests expect."""


def sign(api: Api, admin: str, key_name: str, **item: Any) -> Any:
    return api.call("POST", f"/v1/keys/{key_name}/sign", admin, json=item)


def arn_of(api: Api, key_name: str, version: int) -> str:
    key = api.service.catalogue.get(key_name)
    return key.versions[version].backend_ref.removeprefix("awskms:").rsplit("#", 1)[0]


def openssl_verify(openssl: str, digest: str, pub: Path, data: Path, sig: Path, *pss: str) -> bool:
    cmd = [openssl, "dgst", f"-{digest}", "-verify", str(pub)]
    for opt in pss:
        cmd += ["-sigopt", opt]
    cmd += ["-signature", str(sig), str(data)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    out = proc.stdout + proc.stderr
    verified = proc.returncode == 0 and "Verified OK" in out
    assert verified or proc.returncode == 1, out
    return verified


# --------------------------------------------------------------------------------------------
# sign / verify
# --------------------------------------------------------------------------------------------


@pytest.mark.interop
@pytest.mark.parametrize(
    ("key_type", "alg", "aws_alg"),
    [
        ("ecdsa-p256", "ecdsa-sha256", "ECDSA_SHA_256"),
        ("ecdsa-p384", "ecdsa-sha384", "ECDSA_SHA_384"),
        ("rsa-3072", "rsa-pkcs1-sha256", "RSASSA_PKCS1_V1_5_SHA_256"),
        ("rsa-3072", "rsa-pkcs1-sha512", "RSASSA_PKCS1_V1_5_SHA_512"),
    ],
)
def test_raw_signatures_verify_with_openssl(
    aws, kms_proxy, openssl_bin, tmp_path, key_type, alg, aws_alg
):
    api, admin = aws
    key_name = name()
    create_key(api, admin, key_name, key_type)
    r = sign(api, admin, key_name, input=b64(MESSAGE), algorithm=alg)
    assert r.status_code == 200, r.text
    signature = unb64(r.json()["signature"])
    # the request kmsgate sent: RAW, the message itself, AWS's algorithm name
    (request,) = kms_proxy.of("Sign")
    assert request.body["MessageType"] == "RAW"
    assert request.body["SigningAlgorithm"] == aws_alg
    assert request.blob("Message") == MESSAGE
    assert request.body["KeyId"] == arn_of(api, key_name, 1)

    pem = api.call("GET", f"/v1/keys/{key_name}/public-key", admin)
    assert pem.status_code == 200
    pub, data, tampered, sig = (tmp_path / f for f in ("pub.pem", "m", "m2", "sig"))
    pub.write_bytes(pem.content)
    data.write_bytes(MESSAGE)
    tampered.write_bytes(MESSAGE + b"!")
    sig.write_bytes(signature)
    digest = alg.rsplit("-", 1)[1]
    assert openssl_verify(openssl_bin, digest, pub, data, sig)
    assert not openssl_verify(openssl_bin, digest, pub, tampered, sig)

    verified = api.call(
        "POST",
        f"/v1/keys/{key_name}/verify",
        admin,
        json={"input": b64(MESSAGE), "signature": b64(signature), "algorithm": alg},
    )
    assert verified.json() == {"valid": True, "key_version": 1}
    assert not kms_proxy.of("Verify"), "verification is local, never moto's Verify"


def test_a_signature_its_public_key_does_not_verify_is_withheld(aws, kms_proxy):
    """moto signs RSA-PSS with the maximum salt (AWS and kmsgate's strict verifier: salt =
    hash length; tests/backends/profile_awskms.py shows it is still a PSS signature): the
    signature does not verify under the key's public key, so kmsgate withholds it (502)
    after asking AWS, as it would a signature from a key replaced outside kmsgate."""
    api, admin = aws
    key_name = name()
    create_key(api, admin, key_name, "rsa-3072")
    kms_proxy.clear()
    r = sign(api, admin, key_name, input=b64(MESSAGE), algorithm="rsa-pss-sha256")
    assert r.status_code == 502, r.text
    assert r.json()["code"] == "backend_error" and "signature" not in r.json()
    assert "does not verify" in r.json()["detail"]
    (request,) = kms_proxy.of("Sign")
    assert request.body["SigningAlgorithm"] == "RSASSA_PSS_SHA_256"
    pkcs1 = sign(api, admin, key_name, input=b64(MESSAGE), algorithm="rsa-pkcs1-sha256")
    assert pkcs1.status_code == 200, pkcs1.text  # the same key, where moto signs as AWS


def test_digest_request_shape(aws, kms_proxy):
    """DIGEST cannot be checked against moto (it hashes the digest again), so this checks
    what kmsgate sends: MessageType=DIGEST, AWS's algorithm, and exactly the digest bytes;
    messages over 4096 bytes are hashed locally and sent as DIGEST; ECDSA with a non-native
    hash sends the digest fitted to the curve (checked to be correct below, without moto)."""
    api, admin = aws
    p256, rsa = name(), name()
    create_key(api, admin, p256, "ecdsa-p256")
    create_key(api, admin, rsa, "rsa-3072")
    big = secrets.token_bytes(10_000)
    cases = [
        (
            p256,
            {"digest": b64(hashlib.sha256(MESSAGE).digest())},
            "ECDSA_SHA_256",
            hashlib.sha256(MESSAGE).digest(),
        ),
        (p256, {"input": b64(big)}, "ECDSA_SHA_256", hashlib.sha256(big).digest()),
        (
            p256,
            {"input": b64(MESSAGE), "algorithm": "ecdsa-sha384"},
            "ECDSA_SHA_256",
            hashlib.sha384(MESSAGE).digest()[:32],
        ),
        (
            rsa,
            {"digest": b64(hashlib.sha512(MESSAGE).digest()), "algorithm": "rsa-pss-sha512"},
            "RSASSA_PSS_SHA_512",
            hashlib.sha512(MESSAGE).digest(),
        ),
        (
            rsa,
            {"input": b64(big), "algorithm": "rsa-pkcs1-sha384"},
            "RSASSA_PKCS1_V1_5_SHA_384",
            hashlib.sha384(big).digest(),
        ),
    ]
    for key_name, item, aws_alg, message in cases:
        kms_proxy.clear()
        r = sign(api, admin, key_name, **item)
        # moto signs H(digest): kmsgate's check of the signature withholds it
        assert r.status_code == 502 and "does not verify" in r.json()["detail"], r.text
        (request,) = kms_proxy.of("Sign")
        assert request.body["MessageType"] == "DIGEST", item
        assert request.body["SigningAlgorithm"] == aws_alg
        assert request.blob("Message") == message
    # a digest of the wrong length never reaches AWS (moto would sign it)
    kms_proxy.clear()
    r = sign(api, admin, p256, digest=b64(b"\x01" * 31))
    assert r.status_code == 400
    assert not kms_proxy.of("Sign")

    # the fitted digest is right (FIPS 186-5: ECDSA takes the leftmost bits of the hash):
    # sign the fitted digest as a prehashed native-hash ECDSA signature with a local key,
    # verify it as an ECDSA signature with the other hash over the message.
    for curve, key_type, native, hash_name in [
        (ec.SECP256R1(), KeyType.ECDSA_P256, hashes.SHA256(), "sha384"),
        (ec.SECP256R1(), KeyType.ECDSA_P256, hashes.SHA256(), "sha512"),
        (ec.SECP384R1(), KeyType.ECDSA_P384, hashes.SHA384(), "sha256"),
        (ec.SECP384R1(), KeyType.ECDSA_P384, hashes.SHA384(), "sha512"),
    ]:
        private = ec.generate_private_key(curve)
        plan = sign_plan(key_type, SIGN_ALGORITHMS[f"ecdsa-{hash_name}"], MESSAGE, prehashed=False)
        assert plan.message_type == "DIGEST" and len(plan.message) == native.digest_size
        signature = private.sign(plan.message, ec.ECDSA(utils.Prehashed(native)))
        other = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
        private.public_key().verify(signature, MESSAGE, ec.ECDSA(other[hash_name]()))
        with pytest.raises(InvalidSignature):
            private.public_key().verify(signature, MESSAGE + b"!", ec.ECDSA(other[hash_name]()))


def test_moto_still_ignores_digest(moto_server):
    """Pins the moto gap the conformance profile excludes: a DIGEST-mode signature from moto
    is a signature over SHA-256(digest). When this fails, moto implements DIGEST: drop the
    exclusion in tests/backends/profile_awskms.py."""
    client = moto_server.client()
    arn = client.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
    public = serialization.load_der_public_key(client.get_public_key(KeyId=arn)["PublicKey"])
    assert isinstance(public, ec.EllipticCurvePublicKey)
    digest = hashlib.sha256(MESSAGE).digest()
    signature = client.sign(
        KeyId=arn, Message=digest, MessageType="DIGEST", SigningAlgorithm="ECDSA_SHA_256"
    )["Signature"]
    with pytest.raises(InvalidSignature):
        public.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    public.verify(signature, digest, ec.ECDSA(hashes.SHA256()))  # = sign(SHA-256(digest))


# --------------------------------------------------------------------------------------------
# kmsgate's states, rotation, deletion
# --------------------------------------------------------------------------------------------


def test_disabled_in_kmsgate_refuses_although_moto_would_sign(aws, kms_proxy, moto_server):
    api, admin = aws
    key_name = name()
    create_key(api, admin, key_name, "ecdsa-p256")
    assert sign(api, admin, key_name, input=b64(MESSAGE)).status_code == 200
    assert api.call("POST", f"/v1/keys/{key_name}/disable", admin).status_code == 200
    kms_proxy.clear()
    r = sign(api, admin, key_name, input=b64(MESSAGE))
    assert r.status_code == 409
    assert r.json()["code"] == "key_disabled"
    assert not kms_proxy.of("Sign"), "refused by kmsgate before any request"
    # ... although the KMS key itself is enabled and moto signs with it
    arn = arn_of(api, key_name, 1)
    client = moto_server.client()
    assert client.describe_key(KeyId=arn)["KeyMetadata"]["KeyState"] == "Enabled"
    assert client.sign(
        KeyId=arn, Message=MESSAGE, MessageType="RAW", SigningAlgorithm="ECDSA_SHA_256"
    )["Signature"]
    assert api.call("POST", f"/v1/keys/{key_name}/enable", admin).status_code == 200
    assert sign(api, admin, key_name, input=b64(MESSAGE)).status_code == 200


@pytest.mark.interop
def test_rotating_an_asymmetric_key_creates_a_new_kms_key(
    aws, kms_proxy, moto_server, openssl_bin, tmp_path
):
    api, admin = aws
    key_name = name()
    create_key(api, admin, key_name, "ecdsa-p256")
    old = sign(api, admin, key_name, input=b64(MESSAGE)).json()
    kms_proxy.clear()
    r = api.call("POST", f"/v1/keys/{key_name}/rotate", admin)
    assert r.status_code == 200, r.text
    assert r.json()["primary_version"] == 2
    assert len(kms_proxy.of("CreateKey")) == 1 and not kms_proxy.of("RotateKeyOnDemand")
    arn1, arn2 = arn_of(api, key_name, 1), arn_of(api, key_name, 2)
    assert arn1 != arn2
    client = moto_server.client()
    alias = "alias/kmsgate/" + key_name.replace(".", "/")
    assert client.describe_key(KeyId=alias)["KeyMetadata"]["Arn"] == arn2
    tags = {t["TagKey"]: t["TagValue"] for t in client.list_resource_tags(KeyId=arn2)["Tags"]}
    assert tags["kmsgate:name"] == key_name and tags["kmsgate:version"] == "2"
    assert tags["env"] == "test" and tags["owner"] == "team-a"

    new = sign(api, admin, key_name, input=b64(MESSAGE)).json()
    assert (old["key_version"], new["key_version"]) == (1, 2)
    for made in (old, new):
        verified = api.call(
            "POST",
            f"/v1/keys/{key_name}/verify",
            admin,
            json={"input": b64(MESSAGE), "signature": made["signature"]},
        )
        assert verified.json() == {"valid": True, "key_version": made["key_version"]}
    # openssl: the old signature under version 1's public key, not version 2's
    data, sig = tmp_path / "m", tmp_path / "sig"
    data.write_bytes(MESSAGE)
    sig.write_bytes(unb64(old["signature"]))
    for version, expected in ((1, True), (2, False)):
        pub = tmp_path / f"v{version}.pem"
        pem = api.call("GET", f"/v1/keys/{key_name}/public-key?version={version}", admin)
        pub.write_bytes(pem.content)
        assert openssl_verify(openssl_bin, "sha256", pub, data, sig) is expected


def backend_of(api: Api) -> AwsKmsBackend:
    backend = api.service.registry.get("aws")
    assert isinstance(backend, AwsKmsBackend)
    return backend


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "hmac-sha256"])
def test_a_rotation_that_loses_a_race_leaves_the_alias_on_the_winner(aws, moto_server, key_type):
    """Two rotations at once: the one the catalogue refuses destroys its KMS key, and
    the alias still names the version that won (it used to be moved to the loser's key,
    then deleted with it)."""
    api, admin = aws
    key_name = name()
    create_key(api, admin, key_name, key_type)
    stale = api.service.catalogue.get(key_name)  # what the losing rotation read
    assert api.call("POST", f"/v1/keys/{key_name}/rotate", admin).status_code == 200
    with pytest.raises(Conflict):
        api.service.keys._rotate(stale, Outcome())
    alias = "alias/kmsgate/" + key_name.replace(".", "/")
    described = moto_server.client().describe_key(KeyId=alias)["KeyMetadata"]
    assert described["Arn"] == arn_of(api, key_name, 2)
    assert described["KeyState"] == "Enabled"


def test_a_symmetric_rotation_that_loses_a_race_leaves_the_winners_version_usable(aws):
    """Two rotations of an aes-256-gcm key at once: both rotate the one KMS key and make
    the same reference for the new version. The loser's undo leaves it alone: the
    winner's version encrypts and decrypts (it was refused as destroyed until restart)."""
    api, admin = aws
    key_name = name()
    create_key(api, admin, key_name, "aes-256-gcm", "envelope-data")
    stale = api.service.catalogue.get(key_name)  # what the losing rotation read
    assert api.call("POST", f"/v1/keys/{key_name}/rotate", admin).status_code == 200
    with pytest.raises(Conflict):
        api.service.keys._rotate(stale, Outcome())
    sealed = api.call("POST", f"/v1/keys/{key_name}/encrypt", admin, json={"plaintext": "aGk="})
    assert sealed.status_code == 200, sealed.text
    assert sealed.json()["key_version"] == 2
    opened = api.call(
        "POST",
        f"/v1/keys/{key_name}/decrypt",
        admin,
        json={"ciphertext": sealed.json()["ciphertext"]},
    )
    assert opened.status_code == 200 and opened.json()["plaintext"] == "aGk=", opened.text


def test_a_rotation_with_the_backend_in_another_region_is_refused(aws):
    """The region a key's versions live in is kept: with `region` changed, a rotation is
    refused (a new version would go to the other region, and fail there later)."""
    api, admin = aws
    key_name = name()
    create_key(api, admin, key_name, "ecdsa-p256")
    key = api.service.catalogue.get(key_name)
    settings = backend_of(api).settings.model_dump() | {"region": "eu-west-1"}
    elsewhere = AwsKmsBackend("aws", AwsKmsSettings.model_validate(settings))
    previous = key.backend_key(key.versions[1])
    with pytest.raises(BackendError, match=r"region us-east-1.*correct its `region`"):
        elsewhere.create_key(KeySpec(key_name, 2, KeyType.ECDSA_P256, previous=previous))


def test_rotating_a_symmetric_key_rotates_on_demand(aws, kms_proxy):
    api, admin = aws
    key_name = name()
    create_key(api, admin, key_name, "aes-256-gcm")
    backend = backend_of(api)
    v1 = api.service.catalogue.get(key_name)
    wrapped = backend.wrap(v1.backend_key(v1.versions[1]), b"data key", b"ctx")
    kms_proxy.clear()
    assert api.call("POST", f"/v1/keys/{key_name}/rotate", admin).status_code == 200
    assert len(kms_proxy.of("RotateKeyOnDemand")) == 1 and not kms_proxy.of("CreateKey")
    key = api.service.catalogue.get(key_name)
    assert arn_of(api, key_name, 1) == arn_of(api, key_name, 2)  # one KMS key
    assert key.versions[1].backend_ref != key.versions[2].backend_ref
    assert b'"rotation":1' in (key.versions[2].material or b"")
    # ciphertext made before the rotation still unwraps (AWS picks the key material)
    assert backend.unwrap(key.backend_key(key.versions[2]), wrapped, b"ctx") == b"data key"
    assert backend.unwrap(key.backend_key(key.versions[1]), wrapped, b"ctx") == b"data key"


def test_rotating_a_symmetric_key_whose_kms_key_is_gone_says_destroyed(aws, tmp_path):
    """A KMS key gone from AWS (here: the backend pointed at a moto that never held it, as
    after a state loss) is a destroyed key to rotate, as to every other operation."""
    api, admin = aws
    key_name = name()
    create_key(api, admin, key_name, "aes-256-gcm", "envelope-data")
    key = api.service.catalogue.get(key_name)
    with running_moto(tmp_path / "empty") as empty:
        settings = BackendSettings(**empty.backend_settings())
        elsewhere = AwsKmsBackend.from_config("aws", settings)
        previous = key.backend_key(key.versions[1])
        with pytest.raises(KeyDestroyed, match="no longer exists"):
            elsewhere.create_key(KeySpec(key_name, 2, KeyType.AES_256_GCM, previous=previous))


def test_a_symmetric_key_rotates_its_own_kms_key_whatever_the_alias_names(aws, moto_server):
    """The alias moves after the catalogue took a version, and may fail to: a rotation
    rotates the KMS key of the version before it, never the key the alias names (another
    key's, if the alias was left elsewhere), and mends the alias."""
    api, admin = aws
    key_name = name()
    create_key(api, admin, key_name, "aes-256-gcm")
    arn = arn_of(api, key_name, 1)
    client = moto_server.client()
    stranger = client.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")
    alias = "alias/kmsgate/" + key_name.replace(".", "/")
    client.update_alias(AliasName=alias, TargetKeyId=stranger["KeyMetadata"]["KeyId"])
    assert api.call("POST", f"/v1/keys/{key_name}/rotate", admin).status_code == 200
    assert arn_of(api, key_name, 2) == arn
    assert client.describe_key(KeyId=alias)["KeyMetadata"]["Arn"] == arn  # mended


def test_deletion_schedules_key_deletion_and_kmsgate_refuses(aws, kms_proxy, moto_server):
    api, admin = aws
    key_name = name()
    create_key(api, admin, key_name, "ecdsa-p256")
    arn = arn_of(api, key_name, 1)
    r = api.call("POST", f"/v1/keys/{key_name}/schedule-deletion", admin, json={"pending_days": 7})
    assert r.status_code == 200
    assert sign(api, admin, key_name, input=b64(MESSAGE)).json()["code"] == "key_pending_deletion"
    kms_proxy.clear()
    later = datetime.now(UTC) + timedelta(days=8)
    assert api.service.keys.destroy_due(Ctx("t"), later) == [key_name]
    (request,) = kms_proxy.of("ScheduleKeyDeletion")
    assert request.body["PendingWindowInDays"] == 7
    assert len(kms_proxy.of("DeleteAlias")) == 1
    meta = moto_server.client().describe_key(KeyId=arn)["KeyMetadata"]
    assert meta["KeyState"] == "PendingDeletion"
    r = sign(api, admin, key_name, input=b64(MESSAGE))
    assert r.status_code == 409 and r.json()["code"] == "key_destroyed"


# --------------------------------------------------------------------------------------------
# throttling and rate limits
# --------------------------------------------------------------------------------------------


def test_throttling_retries_then_503_with_retry_after(aws, kms_proxy):
    api, admin = aws
    key_name = name()
    create_key(api, admin, key_name, "ecdsa-p256")
    kms_proxy.clear()
    kms_proxy.throttle_next(100)
    r = sign(api, admin, key_name, input=b64(MESSAGE))
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "backend_unavailable"
    assert r.headers["retry-after"] == "2"
    assert "Throttl" not in r.text  # AWS's text is never echoed
    assert kms_proxy.throttled == 3 == len(kms_proxy.of("Sign"))  # max_attempts
    # throttled twice, then served: the retries absorb it
    kms_proxy.clear()
    kms_proxy.throttle_next(2)
    r = sign(api, admin, key_name, input=b64(MESSAGE))
    assert r.status_code == 200, r.text
    assert kms_proxy.throttled == 2 and len(kms_proxy.of("Sign")) == 3


def test_rate_limit_gives_503_without_calling_aws(aws, kms_proxy):
    api, admin = aws
    key_name = name()
    create_key(api, admin, key_name, "ecdsa-p256", backend="awslimited")
    kms_proxy.clear()
    first = sign(api, admin, key_name, input=b64(MESSAGE))
    second = sign(api, admin, key_name, input=b64(MESSAGE))
    assert first.status_code == 200, first.text
    assert second.status_code == 503 and second.json()["code"] == "backend_unavailable"
    assert second.headers["retry-after"] == "1"
    assert len(kms_proxy.of("Sign")) == 1
    time.sleep(1.05)
    assert sign(api, admin, key_name, input=b64(MESSAGE)).status_code == 200


# --------------------------------------------------------------------------------------------
# MAC, encryption context, ReEncrypt, data keys
# --------------------------------------------------------------------------------------------


def test_mac_through_the_gateway(aws, kms_proxy):
    api, admin = aws
    key_name = name()
    create_key(api, admin, key_name, "hmac-sha256")
    r = api.call("POST", f"/v1/keys/{key_name}/mac", admin, json={"input": b64(MESSAGE)})
    assert r.status_code == 200, r.text
    tag = unb64(r.json()["mac"])
    assert len(tag) == 32
    (request,) = kms_proxy.of("GenerateMac")
    assert request.body["MacAlgorithm"] == "HMAC_SHA_256"
    for data, candidate, valid in [
        (MESSAGE, tag, True),
        (MESSAGE + b"!", tag, False),
        (MESSAGE, tag[:-1] + bytes([tag[-1] ^ 1]), False),
    ]:
        r = api.call(
            "POST",
            f"/v1/keys/{key_name}/mac/verify",
            admin,
            json={"input": b64(data), "mac": b64(candidate)},
        )
        assert r.json()["valid"] is valid


def test_encryption_context_data_keys_and_reencrypt(aws, kms_proxy):
    api, admin = aws
    first, second = name(), name()
    create_key(api, admin, first, "aes-256-gcm")
    create_key(api, admin, second, "aes-256-gcm")
    backend = backend_of(api)
    k1 = api.service.catalogue.get(first)
    k2 = api.service.catalogue.get(second)
    src, dst = k1.backend_key(k1.versions[1]), k2.backend_key(k2.versions[1])

    kms_proxy.clear()
    backend.wrap(src, b"secret", b"\x00aad")
    (request,) = kms_proxy.of("Encrypt")
    assert request.body["EncryptionContext"] == {
        "kmsgate:key": first,
        "kmsgate:aad": base64.urlsafe_b64encode(b"\x00aad").decode(),
    }

    blob = backend.encrypt(src, b"hello", {"tenant": "a"})
    assert backend.decrypt(src, blob, {"tenant": "a"}) == b"hello"
    for wrong in ({"tenant": "b"}, {}, {"tenant": "a", "x": "y"}):
        with pytest.raises(DecryptionFailed):
            backend.decrypt(src, blob, wrong)
    with pytest.raises(DecryptionFailed):
        backend.decrypt(dst, blob, {"tenant": "a"})  # another KMS key
    with pytest.raises(InvalidRequest):
        backend.encrypt(src, b"x", {"kmsgate:key": "forged"})

    plaintext, wrapped = backend.generate_data_key(src, 32, {"purpose": "dek"})
    assert plaintext is not None and len(plaintext) == 32
    assert backend.decrypt(src, wrapped, {"purpose": "dek"}) == plaintext
    none, wrapped2 = backend.generate_data_key(src, 32, include_plaintext=False)
    assert none is None and len(backend.decrypt(src, wrapped2)) == 32

    kms_proxy.clear()
    moved = backend.rewrap(
        src, blob, dst, source_context={"tenant": "a"}, destination_context={"tenant": "c"}
    )
    (request,) = kms_proxy.of("ReEncrypt")
    assert request.body["SourceKeyId"] == arn_of(api, first, 1)
    assert request.body["DestinationKeyId"] == arn_of(api, second, 1)
    assert not kms_proxy.of("Decrypt") and not kms_proxy.of("Encrypt")  # stays in KMS
    assert backend.decrypt(dst, moved, {"tenant": "c"}) == b"hello"
    with pytest.raises(DecryptionFailed):
        backend.rewrap(src, blob, dst, source_context={"tenant": "zz"})


# --------------------------------------------------------------------------------------------
# backend construction, adoption, errors
# --------------------------------------------------------------------------------------------


def test_config_errors_name_fields_not_values():
    with pytest.raises(ConfigError, match="secret_access_key") as info:
        AwsKmsBackend.from_config(
            "aws", BackendSettings(type="awskms", region="us-east-1", secret_access_key="s3cr3t")
        )
    assert "s3cr3t" not in str(info.value)
    with pytest.raises(ConfigError, match="pending_window_days"):
        AwsKmsBackend.from_config(
            "aws", BackendSettings(type="awskms", region="us-east-1", pending_window_days=3)
        )
    with pytest.raises(ConfigError):
        AwsKmsBackend.from_config(
            "aws", BackendSettings(type="awskms", region="us-east-1", alias_prefix="alias/aws/")
        )
    with pytest.raises(ConfigError, match="profile"):
        AwsKmsBackend.from_config(
            "aws", BackendSettings(type="awskms", region="us-east-1", profile="kmsgate-nope")
        )


@pytest.mark.parametrize(
    ("endpoint_url", "accepted"),
    [
        ("http://10.1.2.3:5000", False),
        ("http://localstack:4566", False),
        ("http://127.0.0.1:5000", True),
        ("http://[::1]:5000", True),
        ("http://localhost:4566", True),
        ("https://kms.eu-west-1.amazonaws.com", True),
        ("https://vpce-0123.kms.eu-west-1.vpce.amazonaws.com", True),
    ],
)
def test_plain_http_endpoint_only_on_loopback(endpoint_url, accepted):
    """SigV4 keeps the secret key off the wire, but plaintext and data keys are not: an
    http:// endpoint_url must be a loopback one (moto, LocalStack on this host)."""
    cfg = BackendSettings(
        type="awskms",
        region="us-east-1",
        endpoint_url=endpoint_url,
        access_key_id="test",
        secret_access_key="s3cr3t",
    )
    if accepted:
        AwsKmsBackend.from_config("aws", cfg).close()
        return
    with pytest.raises(
        ConfigError, match=r"endpoint_url: refusing plain http://.*https://"
    ) as info:
        AwsKmsBackend.from_config("aws", cfg)
    assert "s3cr3t" not in str(info.value)


KEY_POLICY = """{
  "Version": "2012-10-17",
  "Statement": [
    {"Sid": "kmsgate uses and manages its keys", "Effect": "Allow",
     "Principal": {"AWS": "arn:aws:iam::123456789012:role/kmsgate"},
     "Action": ["kms:Sign", "kms:Encrypt", "kms:Decrypt", "kms:PutKeyPolicy"], "Resource": "*"}
  ]
}
"""


def kms_key_policy(moto_server: MotoServer, key_ref: str) -> dict[str, Any]:
    """The key policy AWS (moto) holds for the KMS key of a version's `ref`."""
    arn = key_ref.removeprefix("awskms:").rsplit("#", 1)[0]
    policy = moto_server.client().get_key_policy(KeyId=arn, PolicyName="default")["Policy"]
    return json.loads(policy)


def test_keys_kmsgate_creates_get_the_configured_key_policy(moto_server, tmp_path):
    policy_file = tmp_path / "key-policy.json"
    policy_file.write_text(KEY_POLICY)
    configured = BackendSettings(**moto_server.backend_settings(key_policy_file=str(policy_file)))
    backend = AwsKmsBackend.from_config("aws", configured)
    policy_file.write_text("read once, at start")
    try:
        first = backend.create_key(KeySpec("p", 1, KeyType.ECDSA_P256))
        second = backend.create_key(KeySpec("p", 2, KeyType.ECDSA_P256, previous=first))
        hmac_key = backend.create_key(KeySpec("h", 1, KeyType.HMAC_SHA256))
        for key in (first, second, hmac_key):  # every CreateKey, a new version's too
            assert kms_key_policy(moto_server, key.ref) == json.loads(KEY_POLICY)
    finally:
        backend.close()
    backend = AwsKmsBackend.from_config("aws", BackendSettings(**moto_server.backend_settings()))
    try:  # without the setting, AWS's default: IAM policies of the account decide
        default = kms_key_policy(
            moto_server, backend.create_key(KeySpec("d", 1, KeyType.ECDSA_P256)).ref
        )
        assert [s["Sid"] for s in default["Statement"]] == ["Enable IAM User Permissions"]
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        pytest.param(b"Version: 2012-10-17", "is not JSON", id="yaml"),
        pytest.param(b'{"Version": "2012-10-17",}', "is not JSON", id="trailing-comma"),
        pytest.param('{"Statement": []}'.encode("utf-16"), "is not JSON in UTF-8", id="utf-16"),
        pytest.param(b'[{"Version": "2012-10-17"}]', "is not a JSON object", id="array"),
        pytest.param(
            b'{"Statement": []}' + b" " * (32 * 1024 - 16), "larger than 32 KiB", id="32-kib-1"
        ),
        pytest.param(None, "cannot be read", id="missing"),
    ],
)
def test_an_unusable_key_policy_file_is_a_config_error_naming_it(tmp_path, content, why):
    policy_file = tmp_path / "key-policy.json"
    if content is not None:
        policy_file.write_bytes(content)
    cfg = BackendSettings(
        type="awskms", region="us-east-1", key_policy_file=str(policy_file), **DUMMY_CREDENTIALS
    )
    with pytest.raises(ConfigError) as refused:
        AwsKmsBackend.from_config("aws", cfg)
    message = str(refused.value)
    assert f"key_policy_file {policy_file}" in message and why in message
    assert "\n" not in message


def test_a_key_policy_of_32_kib_is_taken(tmp_path):
    policy_file = tmp_path / "key-policy.json"
    policy_file.write_bytes(b'{"Statement": []}' + b" " * (32 * 1024 - 17))
    cfg = BackendSettings(
        type="awskms", region="us-east-1", key_policy_file=str(policy_file), **DUMMY_CREDENTIALS
    )
    AwsKmsBackend.from_config("aws", cfg).close()


def test_unreachable_endpoint_is_503_and_status_not_ok():
    from tests.components import free_port

    settings = AwsKmsSettings(
        region="us-east-1",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        access_key_id="testing",
        secret_access_key="testing",
        max_attempts=2,
        backoff_base=0.01,
        connect_timeout=1,
    )
    backend = AwsKmsBackend("aws", settings)
    try:
        with pytest.raises(BackendUnavailable) as caught:
            backend.create_key(KeySpec("x", 1, KeyType.ECDSA_P256))
        assert caught.value.detail == "backend 'aws' is unreachable"
        # as hashivault's: the readiness reply names the backend, the detail the state
        status = backend.status()
        assert (status.ok, status.detail) == (False, "unreachable")
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("key_spec", "key_usage", "key_type", "message"),
    [
        (
            "ECC_NIST_P256",
            "SIGN_VERIFY",
            KeyType.ECDSA_P384,
            "the AWS KMS key is ECC_NIST_P256, not ecdsa-p384 (ECC_NIST_P384)",
        ),
        (
            "SYMMETRIC_DEFAULT",
            "ENCRYPT_DECRYPT",
            KeyType.ECDSA_P256,
            "the AWS KMS key is SYMMETRIC_DEFAULT, not ecdsa-p256 (ECC_NIST_P256)",
        ),
        (
            "RSA_3072",
            "ENCRYPT_DECRYPT",
            KeyType.RSA_3072,
            "the AWS KMS key is RSA_3072 for ENCRYPT_DECRYPT, not for SIGN_VERIFY as rsa-3072 "
            "needs",
        ),
    ],
)
def test_adopting_a_key_of_another_type_names_both_types(
    moto_server, key_spec, key_usage, key_type, message
):
    backend = AwsKmsBackend(
        "aws",
        AwsKmsSettings(
            region="us-east-1",
            endpoint_url=moto_server.endpoint,
            access_key_id="testing",
            secret_access_key="testing",
        ),
    )
    try:
        arn = moto_server.client().create_key(KeySpec=key_spec, KeyUsage=key_usage)["KeyMetadata"][
            "Arn"
        ]
        with pytest.raises(InvalidRequest) as refused:
            backend.adopt_key(KeySpec("k", 1, key_type), f"awskms:{arn}")
        assert str(refused.value.detail) == message
    finally:
        backend.close()


def test_adopt_existing_key_and_ed25519_not_offered_by_moto(moto_server):
    settings = AwsKmsSettings(
        region="us-east-1",
        endpoint_url=moto_server.endpoint,
        access_key_id="testing",
        secret_access_key="testing",
    )
    backend = AwsKmsBackend("aws", settings)
    client = moto_server.client()
    try:
        arn = client.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")[
            "KeyMetadata"
        ]["Arn"]
        client.create_alias(AliasName="alias/ceremony-kek", TargetKeyId=arn)
        spec = KeySpec("kmsgate-root-kek", 1, KeyType.AES_256_GCM)
        adopted = backend.adopt_key(spec, "awskms:alias/ceremony-kek")
        assert adopted.ref == f"awskms:{arn}#1"
        assert backend.unwrap(adopted, backend.wrap(adopted, b"root key", b"r"), b"r") == (
            b"root key"
        )
        with pytest.raises(InvalidRequest):
            backend.adopt_key(KeySpec("k", 1, KeyType.ECDSA_P256), arn)  # wrong type
        backend.destroy(adopted)  # adopted: forgotten, left as it is in AWS
        assert client.describe_key(KeyId=arn)["KeyMetadata"]["KeyState"] == "Enabled"
        with pytest.raises(KeyDestroyed):
            backend.wrap(adopted, b"x", b"")
        with pytest.raises(NotSupported):
            backend.create_key(KeySpec("ed", 1, KeyType.ED25519))
        # MAC size limits are AWS's, checked before any request
        hmac_key = backend.create_key(KeySpec("h", 1, KeyType.HMAC_SHA384))
        with pytest.raises(InvalidRequest):
            backend.mac(hmac_key, b"x" * 4097, HashName.SHA384)
        with pytest.raises(InvalidRequest):
            backend.mac(hmac_key, b"x", HashName.SHA256)
    finally:
        backend.close()


def test_a_kms_key_already_managed_is_not_adopted_under_another_name(aws, moto_server):
    """Adopting a KMS key that is already a version of a key (kmsgate's own, or adopted
    before, by ARN or by alias) is a 409: the copy would sign for a key disabled,
    scheduled for deletion or compromised under its first name."""
    api, admin = aws
    own = name()
    create_key(api, admin, own, "ecdsa-p256")
    arn = arn_of(api, own, 1)
    client = moto_server.client()
    ceremony = client.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    client.create_alias(
        AliasName=f"alias/ceremony-{secrets.token_hex(4)}", TargetKeyId=ceremony["Arn"]
    )
    alias = client.list_aliases(KeyId=ceremony["KeyId"])["Aliases"][0]["AliasName"]
    body = {"type": "ecdsa-p256", "purpose": "p", "backend": "aws"}
    first = api.call(
        "POST", "/v1/keys", admin, json={**body, "name": name(), "uri": f"awskms:{alias}"}
    )
    assert first.status_code == 201, first.text
    for uri, holder in (
        (f"awskms:{arn}", own),
        (f"awskms:{ceremony['Arn']}", first.json()["name"]),
    ):
        again = api.call("POST", "/v1/keys", admin, json={**body, "name": name(), "uri": uri})
        assert again.status_code == 409, again.text
        assert f"already version 1 of key {holder!r}" in again.json()["detail"]


def test_a_key_in_another_region_than_the_backends_is_a_config_error_not_destroyed(
    aws, moto_server
):
    """The backend's `region` changed after its keys were made: AWS answers "not found"
    for their ARNs, which read as "key destroyed". The gateway says what is wrong."""
    api, admin = aws
    key_name = name()
    create_key(api, admin, key_name, "ecdsa-p256")
    key = api.service.catalogue.get(key_name)
    settings = moto_server.backend_settings(region="ap-south-1")
    elsewhere = AwsKmsBackend.from_config("aws", BackendSettings(**settings))
    try:
        message = SignMessage(MESSAGE, sign_algorithm(KeyType.ECDSA_P256, None), False)
        [refused] = elsewhere.sign_many(key.backend_key(key.versions[1]), [message])
        assert isinstance(refused, BackendError)
        assert "is a KMS key in region us-east-1, but backend 'aws' uses region ap-south-1" in (
            refused.detail
        )
    finally:
        elsewhere.close()


def test_an_endpoint_that_never_answers_is_503_after_one_read_timeout(moto_server):
    """A hung endpoint (it takes the connection and never answers) held each request for
    read_timeout x max_attempts (40 s with the defaults); a request sent and unanswered is
    not tried again (it may have been carried out)."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # connections queue in the kernel; nobody reads them
        endpoint = f"http://127.0.0.1:{hung.getsockname()[1]}"
        settings = moto_server.backend_settings(endpoint, read_timeout=0.5, max_attempts=4)
        backend = AwsKmsBackend.from_config("aws", BackendSettings(**settings))
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="not answering"):
            backend.create_key(KeySpec("hung", 1, KeyType.ECDSA_P256))
        assert time.monotonic() - started < 2
        assert backend.requests == 1
