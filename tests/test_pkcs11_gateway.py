"""The pkcs11 backend on real SoftHSM2 tokens, beyond the conformance suite: configuration,
interop with OpenSC's pkcs11-tool and the openssl CLI, adopting ceremony keys, threads and
processes, failures and recovery, and the gateway over REST (in-process and a real
`kmsgate serve` with 8 concurrent clients).

Every test that breaks a token (wrong PIN, deleted token) gets a token of its own.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from kmsgate.algorithms import SIGN_ALGORITHMS, HashName, KeyType, verify_with_public_key
from kmsgate.backends.base import BackendKey, KeySpec, SignMessage
from kmsgate.config import BackendSettings
from kmsgate.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    InvalidRequest,
    KeyDestroyed,
    NotFound,
)
from kmsgate.service import Ctx
from tests.components import free_port, require_component, wait_for_port
from tests.gateway import open_gateway
from tests.helpers import b64
from tests.softhsm import SoftHsm, SoftHsmToken, make_backend, softhsm_session, softhsm_token

pytestmark = pytest.mark.timeout(120)

MESSAGE = b"kmsgate pkcs11 gateway test message"


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    return softhsm_session(tmp_path_factory)


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmToken]:
    with softhsm_token(tmp_path_factory, "kmsgate-gw-backend") as made:
        yield made


@pytest.fixture(scope="module")
def backend(token: SoftHsmToken) -> Iterator[Any]:
    b = make_backend("hsm", token)
    yield b
    b.close()


@pytest.fixture(scope="module")
def key_of(backend) -> Callable[[KeyType], BackendKey]:
    """One key per type on the module's token, made on first use."""
    made: dict[KeyType, BackendKey] = {}

    def get(key_type: KeyType) -> BackendKey:
        if key_type not in made:
            made[key_type] = backend.create_key(KeySpec(f"gw-{key_type}", 1, key_type))
        return made[key_type]

    return get


def public_of(key: BackendKey):
    assert key.public_key_pem is not None
    return serialization.load_pem_public_key(key.public_key_pem.encode())


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


def _config(hsm_token: SoftHsmToken, **changes: Any) -> BackendSettings:
    entry = hsm_token.backend_config()
    for name, value in changes.items():
        if value is None:
            entry.pop(name, None)
        else:
            entry[name] = value
    return BackendSettings(**entry)


def test_module_path_must_be_absolute_and_allow_listed(token: SoftHsmToken, tmp_path: Path):
    from kmsgate.backends.pkcs11 import Pkcs11Backend

    copy = tmp_path / "libsofthsm2.so"
    shutil.copy(token.hsm.module, copy)
    cases = {
        "relative": ("lib/softhsm/libsofthsm2.so", {}, "absolute"),
        "dot-dot": ("/usr/lib/softhsm/../softhsm/libsofthsm2.so", {}, "absolute"),
        "not allow-listed": (str(copy), {}, "not allow-listed"),
        "missing": ("/usr/lib/pkcs11/no-such-module.so", {}, "No such file"),
        "star stays in a segment": ("/usr/lib/a/b/pkcs11/x.so", {}, "not allow-listed"),
        "relative pattern": (str(copy), {"allowed_modules": ["*.so"]}, "must be absolute"),
    }
    for what, (module, extra, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            Pkcs11Backend.from_config("hsm", _config(token, module=module, **extra))
        assert what
    # an explicit allow-list admits the copy; a group-writable module is still refused
    allowed = [f"{tmp_path}/*.so"]
    Pkcs11Backend.from_config("hsm", _config(token, module=str(copy), allowed_modules=allowed))
    copy.chmod(0o664)
    with pytest.raises(ConfigError, match="writable by others"):
        Pkcs11Backend.from_config("hsm", _config(token, module=str(copy), allowed_modules=allowed))


def test_pin_comes_from_a_file_or_the_environment_only(
    token: SoftHsmToken, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from kmsgate.backends.pkcs11 import Pkcs11Backend

    def build(**changes: Any):
        return Pkcs11Backend.from_config("hsm", _config(token, **changes))

    for key in ("pin", "user_pin", "pin_value"):
        with pytest.raises(ConfigError, match="never written in the config") as caught:
            build(**{key: "s3cr3t-PIN"})
        assert "s3cr3t" not in str(caught.value)
    with pytest.raises(ConfigError, match="exactly one of") as caught:
        build(pin_env="KMSGATE_TEST_PIN")
    with pytest.raises(ConfigError, match="exactly one of"):
        build(pin_file=None)
    with pytest.raises(ConfigError, match="not set"):
        build(pin_file=None, pin_env="KMSGATE_TEST_PIN_UNSET")
    monkeypatch.setenv("KMSGATE_TEST_PIN", token.pin)
    assert build(pin_file=None, pin_env="KMSGATE_TEST_PIN").name == "hsm"

    readable = tmp_path / "pin"
    readable.write_text(token.pin)
    readable.chmod(0o644)
    with pytest.raises(ConfigError, match=r"must not be accessible by (group or )?others"):
        build(pin_file=str(readable))
    with pytest.raises(ConfigError, match="cannot read PIN file"):
        build(pin_file=str(tmp_path / "absent"))
    # invalid values are reported without echoing them (a misplaced secret stays out of logs)
    for changes in ({"sessions": "s3cr3t-PIN"}, {"token": None}, {"x_unknown": "s3cr3t-PIN"}):
        with pytest.raises(ConfigError) as caught:
            build(**changes)
        assert "s3cr3t" not in str(caught.value)


def test_registry_builds_the_backend_lazily(token: SoftHsmToken):
    from kmsgate.backends import backend_class
    from kmsgate.backends.pkcs11 import Pkcs11Backend

    assert backend_class("pkcs11") is Pkcs11Backend
    # a token that does not exist yet: the gateway starts, the backend reports unavailable
    lazy = Pkcs11Backend.from_config("hsm", _config(token, token="kmsgate-not-yet"))
    try:
        status = lazy.status()
        # the readiness reply names the backend; the detail names the token
        assert (status.ok, status.detail) == (False, "unavailable (token label 'kmsgate-not-yet')")
        with pytest.raises(BackendUnavailable) as caught:
            lazy.create_key(KeySpec("k", 1, KeyType.ECDSA_P256))
        assert caught.value.retry_after >= 1
        assert caught.value.detail == "backend 'hsm' is unavailable (token label 'kmsgate-not-yet')"
    finally:
        lazy.close()


def test_a_module_that_is_no_pkcs11_library_is_named_as_the_cause(
    token: SoftHsmToken, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A library that loads but is not PKCS#11 (here zlib) read as "unavailable (token
    label ...)", the same as a missing token; the cause was only in the log, which now has
    the loader's message (naming the file)."""
    from kmsgate.backends.pkcs11 import Pkcs11Backend

    zlib = next(Path(d) / "libz.so.1" for d in ("/lib/x86_64-linux-gnu", "/usr/lib64", "/lib")
                if (Path(d) / "libz.so.1").exists())  # fmt: skip
    fake = tmp_path / "notp11.so"
    fake.write_bytes(zlib.read_bytes())
    fake.chmod(0o755)
    backend = Pkcs11Backend.from_config(
        "hsm", _config(token, module=str(fake), allowed_modules=[str(tmp_path / "*.so")])
    )
    try:
        expected = "unavailable: its module cannot be loaded as a PKCS#11 library"
        assert backend.status().detail == expected
        with pytest.raises(BackendUnavailable, match=f"backend 'hsm' is {expected}"):
            backend.create_key(KeySpec("k", 1, KeyType.ECDSA_P256))
        loaded = [r.getMessage() for r in caplog.records if "cannot load" in r.getMessage()]
        assert loaded and all(str(fake) in message for message in loaded), loaded
    finally:
        backend.close()


def test_token_selected_by_serial(token: SoftHsmToken, backend, key_of):
    key = key_of(KeyType.ECDSA_P256)
    alg = SIGN_ALGORITHMS["ecdsa-sha256"]
    backend.sign(key, MESSAGE, alg, prehashed=False)
    serial = backend._pool._conn.serial.decode().strip()
    by_serial = make_backend("hsm-serial", token, token=None, token_serial=serial)
    wrong = make_backend("hsm-wrong-serial", token, token_serial="0000000000000000")
    try:
        signature = by_serial.sign(key, MESSAGE, alg, prehashed=False)
        public_of(key).verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))
        with pytest.raises(BackendUnavailable):  # label matches, serial does not
            wrong.sign(key, MESSAGE, alg, prehashed=False)
    finally:
        by_serial.close()
        wrong.close()


# --------------------------------------------------------------------------------------------
# interop: pkcs11-tool and openssl
# --------------------------------------------------------------------------------------------


@pytest.mark.interop
def test_pkcs11_tool_lists_keys_as_sensitive_and_not_extractable(token, key_of):
    from kmsgate.uri import Pkcs11Uri

    types = [
        KeyType.ECDSA_P256,
        KeyType.ED25519,
        KeyType.RSA_3072,
        KeyType.HMAC_SHA256,
        KeyType.AES_256_GCM,
    ]
    refs = {t: Pkcs11Uri.parse_key_reference(key_of(t).ref) for t in types}
    objects = token.list_objects()
    for key_type, ref in refs.items():
        assert ref.token == token.label and ref.type in ("private", "secret-key")
        assert ref.id is not None and len(ref.id) == 16
        mine = [o for o in objects if o.get("ID") == ref.id.hex() and o.get("label") == ref.object]
        kinds = sorted(o["kind"].split(" Object")[0] for o in mine)
        if key_type.is_asymmetric:
            assert kinds == ["Private Key", "Public Key"], (key_type, mine)
        else:
            assert kinds == ["Secret Key"], (key_type, mine)
        for obj in mine:
            if obj["kind"].startswith(("Private Key", "Secret Key")):
                access = [a.strip() for a in obj["Access"].split(",")]
                assert "sensitive" in access and "never extractable" in access, (key_type, obj)
                assert "extractable" not in access
    kinds = {o["kind"] for o in objects}
    assert any(k.startswith("Private Key Object; RSA") for k in kinds), kinds
    assert any(k.startswith("Secret Key Object; AES length 32") for k in kinds), kinds


@pytest.mark.interop
def test_signatures_verify_with_openssl(key_of, backend, openssl_bin, tmp_path: Path):
    (tmp_path / "msg").write_bytes(MESSAGE)

    def check(key: BackendKey, alg: str, openssl_args: list[str], prehashed: bool = False):
        pub = tmp_path / "pub.pem"
        assert key.public_key_pem is not None
        pub.write_text(key.public_key_pem)
        sign_alg = SIGN_ALGORITHMS[alg]
        data = hashlib.new(alg.rsplit("-", 1)[1], MESSAGE).digest() if prehashed else MESSAGE
        (tmp_path / "sig").write_bytes(backend.sign(key, data, sign_alg, prehashed=prehashed))
        for message, ok in ((MESSAGE, True), (MESSAGE + b"!", False)):
            (tmp_path / "msg").write_bytes(message)
            argv = [openssl_bin, *[a.format(pub=pub, sig=tmp_path / "sig") for a in openssl_args]]
            proc = subprocess.run(
                [*argv, str(tmp_path / "msg")], capture_output=True, text=True, timeout=30
            )
            assert (proc.returncode == 0) is ok, (alg, ok, proc.stdout, proc.stderr)

    dgst = ["dgst", "-{h}", "-verify", "{pub}", "-signature", "{sig}"]
    pss = ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:{n}"]

    def with_hash(args: list[str], h: str, n: int = 0) -> list[str]:
        return [a.replace("{h}", h).replace("{n}", str(n)) for a in args]

    check(key_of(KeyType.ECDSA_P256), "ecdsa-sha256", with_hash(dgst, "sha256"))
    check(key_of(KeyType.ECDSA_P256), "ecdsa-sha384", with_hash(dgst, "sha384"), prehashed=True)
    check(key_of(KeyType.ECDSA_P384), "ecdsa-sha384", with_hash(dgst, "sha384"))
    rsa = key_of(KeyType.RSA_3072)
    check(rsa, "rsa-pss-sha256", with_hash(dgst + pss, "sha256", 32))
    check(rsa, "rsa-pss-sha512", with_hash(dgst + pss, "sha512", 64), prehashed=True)
    check(rsa, "rsa-pkcs1-sha384", with_hash(dgst, "sha384"))
    ed = ["pkeyutl", "-verify", "-pubin", "-inkey", "{pub}", "-rawin", "-sigfile", "{sig}", "-in"]
    check(key_of(KeyType.ED25519), "ed25519", ed)


# --------------------------------------------------------------------------------------------
# adopting keys made by a ceremony tool (pkcs11-tool)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ceremony(token: SoftHsmToken, tmp_path_factory: pytest.TempPathFactory) -> SoftHsmToken:
    """Keys made on the token by pkcs11-tool: an EC P-256 pair (id a1b2), an Ed25519 pair
    (id a5), an AES key (pkcs11-tool leaves it non-sensitive), a sensitive AES key made
    public (pkcs11-tool's default: usable without the PIN) and one made private, a P-256 pair
    whose public object was replaced by a foreign key (id c1), two pairs sharing a label."""
    if shutil.which("openssl") is None:
        require_component("openssl", "no 'openssl' on PATH")
    gen = ["--keypairgen", "--usage-sign"]
    token.pkcs11_tool(*gen, "--key-type", "EC:prime256v1", "--label", "cer-ec", "--id", "a1b2")
    token.pkcs11_tool(*gen, "--key-type", "EC:edwards25519", "--label", "cer-ed", "--id", "a5")
    aes = ("--keygen", "--key-type", "AES:32", "--usage-decrypt")
    token.pkcs11_tool(*aes, "--label", "cer-aes", "--id", "a3")
    token.pkcs11_tool(*aes, "--sensitive", "--label", "cer-aes-public", "--id", "a6")
    token.pkcs11_tool(*aes, "--sensitive", "--private", "--label", "cer-aes-private", "--id", "a7")
    token.pkcs11_tool(*gen, "--key-type", "EC:prime256v1", "--label", "cer-mm", "--id", "c1")
    token.pkcs11_tool("--delete-object", "--type", "pubkey", "--id", "c1")
    foreign = tmp_path_factory.mktemp("ceremony") / "foreign.der"
    der = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    foreign.write_bytes(der)
    token.pkcs11_tool(
        "--write-object", str(foreign), "--type", "pubkey", "--id", "c1", "--label", "cer-mm"
    )
    for key_id in ("d1", "d2"):
        token.pkcs11_tool(*gen, "--key-type", "EC:prime256v1", "--label", "cer-dup", "--id", key_id)
    return token


def test_adopt_ceremony_keys(backend, ceremony: SoftHsmToken, tmp_path: Path):
    label = ceremony.label
    for uri, key_type in (
        (f"pkcs11:token={label};object=cer-ec;type=private", KeyType.ECDSA_P256),
        ("pkcs11:id=%A1%B2", KeyType.ECDSA_P256),
        (f"pkcs11:object=cer-ed;token={label}", KeyType.ED25519),
        ("pkcs11:object=cer-dup;id=%d2;type=private", KeyType.ECDSA_P256),
    ):
        adopted = backend.adopt_key(KeySpec("adopted", 1, key_type), uri)
        assert adopted.ref.startswith(f"pkcs11:token={label};object=cer-")
        assert adopted.material is None and adopted.key_type is key_type
        alg = SIGN_ALGORITHMS["ed25519" if key_type is KeyType.ED25519 else "ecdsa-sha256"]
        signature = backend.sign(adopted, MESSAGE, alg, prehashed=False)
        assert verify_with_public_key(public_of(adopted), alg, MESSAGE, signature, prehashed=False)
    # the public key kmsgate reports is the one on the token
    exported = tmp_path / "pub.der"
    ceremony.pkcs11_tool(
        "--read-object", "--type", "pubkey", "--id", "a1b2", "-o", str(exported), login=False
    )
    adopted = backend.adopt_key(KeySpec("adopted", 1, KeyType.ECDSA_P256), "pkcs11:id=%a1%b2")
    spki = public_of(adopted).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert spki == exported.read_bytes()


def test_adopt_secret_keys(backend, key_of, ceremony: SoftHsmToken):
    """A private, sensitive AES key made by pkcs11-tool is adopted and encrypts on the token;
    kmsgate's own secret keys can be re-adopted."""
    aes = backend.adopt_key(KeySpec("adopted-aes", 1, KeyType.AES_256_GCM), "pkcs11:id=%a7")
    assert aes.ref == f"pkcs11:token={ceremony.label};object=cer-aes-private;id=%A7;type=secret-key"
    sealed = backend.wrap(aes, MESSAGE, b"aad")
    assert backend.unwrap(aes, sealed, b"aad") == MESSAGE
    for key_type in (KeyType.HMAC_SHA256, KeyType.AES_256_GCM):
        original = key_of(key_type)
        adopted = backend.adopt_key(KeySpec("re-adopted", 3, key_type), original.ref)
        assert adopted.ref == original.ref and adopted.public_key_pem is None
    again = backend.adopt_key(
        KeySpec("re-adopted", 3, KeyType.HMAC_SHA256), key_of(KeyType.HMAC_SHA256).ref
    )
    assert backend.mac(again, MESSAGE, HashName.SHA256) == backend.mac(
        key_of(KeyType.HMAC_SHA256), MESSAGE, HashName.SHA256
    )


@pytest.mark.parametrize(
    ("uri", "key_type", "error", "message"),
    [
        (
            "pkcs11:object=cer-ec",
            KeyType.ECDSA_P384,
            InvalidRequest,
            r"^the key on the token is an EC key on secp256r1, not ecdsa-p384 \(EC on secp384r1\)$",
        ),
        (
            "pkcs11:object=cer-ec",
            KeyType.RSA_3072,
            InvalidRequest,
            r"^the key on the token is an EC key on secp256r1, not rsa-3072 \(RSA-3072\)$",
        ),
        (
            "pkcs11:object=cer-ec",
            KeyType.ED25519,
            InvalidRequest,
            r"is an EC key on secp256r1, not ed25519 \(EC_EDWARDS on Ed25519\)$",
        ),
        (
            "pkcs11:object=cer-ed",
            KeyType.ECDSA_P256,
            InvalidRequest,
            r"is an EC_EDWARDS key on Ed25519, not ecdsa-p256 \(EC on secp256r1\)$",
        ),
        ("pkcs11:object=cer-ec;type=secret-key", KeyType.ECDSA_P256, InvalidRequest, "type="),
        ("pkcs11:object=cer-aes", KeyType.AES_256_GCM, InvalidRequest, "sensitive"),
        ("pkcs11:object=cer-aes-public", KeyType.AES_256_GCM, InvalidRequest, "only private"),
        ("pkcs11:object=cer-mm", KeyType.ECDSA_P256, InvalidRequest, "does not match"),
        ("pkcs11:object=cer-dup", KeyType.ECDSA_P256, InvalidRequest, "several keys"),
        ("pkcs11:object=no-such-key", KeyType.ECDSA_P256, NotFound, "no such key"),
        ("pkcs11:token=other;object=cer-ec", KeyType.ECDSA_P256, InvalidRequest, "token"),
        ("pkcs11:serial=0;object=cer-ec", KeyType.ECDSA_P256, InvalidRequest, "serial"),
        ("pkcs11:object=cer-ec?pin-value=1234", KeyType.ECDSA_P256, InvalidRequest, "pin-value"),
        ("pkcs11:object=cer-ec?module-path=/x.so", KeyType.ECDSA_P256, InvalidRequest, "module"),
        ("pkcs11:slot-id=1;object=cer-ec", KeyType.ECDSA_P256, InvalidRequest, "may select"),
        ("pkcs11:object=cer-ec;object=x", KeyType.ECDSA_P256, InvalidRequest, "more than once"),
        ("pkcs11:object=cer%zz", KeyType.ECDSA_P256, InvalidRequest, "hex digits"),
        ("softkms:x/1", KeyType.ECDSA_P256, InvalidRequest, "not a PKCS#11 URI"),
    ],
)
def test_adopt_refuses(backend, ceremony, uri, key_type, error, message):
    with pytest.raises(error, match=message):
        backend.adopt_key(KeySpec("adopted", 1, key_type), uri)


# --------------------------------------------------------------------------------------------
# threads and processes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sessions", [1, 4])
def test_threads_sign_concurrently(token: SoftHsmToken, key_of, sessions: int):
    """python-pkcs11 + SoftHSM fail at random under concurrent threads; the module lock
    makes 8 threads x (100 single + 5 batches of 20) signs all succeed and verify."""
    key = key_of(KeyType.ECDSA_P256)
    own = make_backend("hsm-threads", token, sessions=sessions)
    alg = SIGN_ALGORITHMS["ecdsa-sha256"]
    barrier = threading.Barrier(8)

    def work(i: int) -> list[tuple[bytes, bytes | Any]]:
        barrier.wait(timeout=30)
        out = []
        for n in range(100):
            m = f"{i}/{n}".encode()
            out.append((m, own.sign(key, m, alg, prehashed=False)))
        for n in range(5):
            batch = [f"{i}/b{n}/{j}".encode() for j in range(20)]
            signed = own.sign_many(key, [SignMessage(m, alg, False) for m in batch])
            out += list(zip(batch, signed, strict=True))
        return out

    try:
        with ThreadPoolExecutor(8) as pool:
            results = [r for chunk in pool.map(work, range(8)) for r in chunk]
    finally:
        own.close()
    public = public_of(key)
    assert len(results) == 8 * 200
    for message, signature in results:
        assert isinstance(signature, bytes), signature
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))


_CHILD = """
import json, sys, time
from kmsgate.algorithms import SIGN_ALGORITHMS, KeyType
from kmsgate.backends.base import BackendKey
from kmsgate.backends.pkcs11 import Pkcs11Backend
from kmsgate.config import BackendSettings
spec = json.loads(sys.argv[1])
backend = Pkcs11Backend.from_config("hsm", BackendSettings(**spec["config"]))
key = BackendKey(spec["ref"], KeyType(spec["key_type"]), "k", 1, None, spec["pem"])
while time.time() < spec["start"]:
    time.sleep(0.001)
alg = SIGN_ALGORITHMS["ecdsa-sha256"]
out = [backend.sign(key, b"%d" % i, alg, prehashed=False).hex() for i in range(spec["n"])]
backend.close()
print(json.dumps(out))
"""


def test_two_processes_each_log_in_and_sign(token: SoftHsmToken, key_of, hsm: SoftHsm):
    """Several gateway worker processes on one token: each logs in itself (at the same
    moment: SoftHSM may answer C_Login with GeneralError, which is retried)."""
    key = key_of(KeyType.ECDSA_P256)
    spec = {
        "config": token.backend_config(),
        "ref": key.ref,
        "key_type": key.key_type.value,
        "pem": key.public_key_pem,
        "start": time.time() + 2.0,
        "n": 300,
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps(spec)],
            env=hsm.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    public = public_of(key)
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        signatures = json.loads(out)
        assert len(signatures) == 300
        for i, signature in enumerate(signatures):
            public.verify(bytes.fromhex(signature), b"%d" % i, ec.ECDSA(hashes.SHA256()))


# --------------------------------------------------------------------------------------------
# failures and recovery
# --------------------------------------------------------------------------------------------


def test_wrong_pin_is_a_backend_error_until_the_pin_file_is_fixed(hsm: SoftHsm, tmp_path: Path):
    victim = hsm.init_token("kmsgate-gw-pin")
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("00000000\n")
    wrong.chmod(0o600)
    b = make_backend("hsm-pin", victim, pin_file=str(wrong))
    try:
        for _ in range(2):  # the second attempt is refused without trying the PIN again
            with pytest.raises(BackendError, match="PIN") as caught:
                b.create_key(KeySpec("k", 1, KeyType.ECDSA_P256))
            assert not isinstance(caught.value, BackendUnavailable)
            assert caught.value.status == 502 and "00000000" not in caught.value.detail
        status = b.status()
        assert not status.ok and "PIN" in status.detail
        wrong.write_text(victim.pin + "\n")  # the operator fixes the PIN source
        key = b.create_key(KeySpec("k", 1, KeyType.ECDSA_P256))
        signature = b.sign(key, MESSAGE, SIGN_ALGORITHMS["ecdsa-sha256"], prehashed=False)
        public_of(key).verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))
        assert b.status().ok
    finally:
        b.close()


def test_a_pin_file_gone_at_run_time_is_told_in_the_log_not_to_callers(
    hsm: SoftHsm, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """Readiness is public and API callers have no business with the gateway's files: they
    learn the PIN could not be read; the log says where and why."""
    victim = hsm.init_token("kmsgate-gw-pin-gone")
    pin = tmp_path / "secret-dir" / "hsm.pin"
    pin.parent.mkdir()
    pin.write_text(victim.pin + "\n")
    pin.chmod(0o600)
    b = make_backend("hsm-pin-gone", victim, pin_file=str(pin))
    pin.unlink()
    try:
        with caplog.at_level(logging.WARNING, logger="kmsgate"):
            status = b.status()
            with pytest.raises(BackendError) as caught:
                b.create_key(KeySpec("k", 1, KeyType.ECDSA_P256))
        for told in (status.detail, caught.value.detail):
            assert "the PIN could not be read" in told and "secret-dir" not in told
        assert f"cannot read PIN file {pin}" in caplog.text
    finally:
        b.close()


def test_a_refused_pin_file_is_not_tried_again_by_another_process(hsm: SoftHsm, tmp_path: Path):
    """Each worker process (or restart) used to try a wrong PIN once: three workers could
    lock a real HSM's user PIN. Sharing the data dir, the second process does not try the
    PIN file the token refused until it changes."""
    victim = hsm.init_token("kmsgate-gw-pin-shared")
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("00000000\n")
    wrong.chmod(0o600)
    state = tmp_path / "data"
    state.mkdir()
    processes = [make_backend("hsm-pin", victim, pin_file=str(wrong)) for _ in range(3)]
    for backend in processes:
        backend.keep_state_in(state)
    try:
        with pytest.raises(BackendError, match=r"rejected the configured PIN \(PinIncorrect\)"):
            processes[0].create_key(KeySpec("k", 1, KeyType.ECDSA_P256))
        with pytest.raises(BackendError, match="not retried until the PIN or the token changes"):
            processes[1].create_key(KeySpec("k", 1, KeyType.ECDSA_P256))
        assert "00000000" not in "".join(p.read_text() for p in state.iterdir())
        wrong.write_text(victim.pin + "\n")  # fixed: every process tries it
        key = processes[1].create_key(KeySpec("k", 1, KeyType.ECDSA_P256))
        processes[2].sign(key, MESSAGE, SIGN_ALGORITHMS["ecdsa-sha256"], prehashed=False)
        assert not (state / "hsm-pin.pin-refused").exists()
    finally:
        for backend in processes:
            backend.close()


def test_a_second_backend_on_a_logged_in_token_has_its_pin_checked(hsm: SoftHsm, tmp_path: Path):
    """Login state belongs to the process: a second backend on a token another backend is
    logged in to is refused C_Login (already logged in), so the token never checks its PIN.
    A wrong one is refused all the same (it used to look ready); the right one works."""
    shared = hsm.init_token("kmsgate-gw-shared")
    first = make_backend("hsm-first", shared)
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("00000000\n")
    wrong.chmod(0o600)
    second = make_backend("hsm-second", shared, pin_file=str(wrong))
    right = tmp_path / "right.pin"
    right.write_text(shared.pin + "\n")
    right.chmod(0o600)
    third = make_backend("hsm-third", shared, pin_file=str(right))
    try:
        first.create_key(KeySpec("k1", 1, KeyType.ECDSA_P256))  # logged in
        with pytest.raises(BackendError, match="so this backend's PIN was never checked"):
            second.create_key(KeySpec("k2", 1, KeyType.ECDSA_P256))
        assert not second.status().ok
        key = third.create_key(KeySpec("k3", 1, KeyType.ECDSA_P256))
        signature = third.sign(key, MESSAGE, SIGN_ALGORITHMS["ecdsa-sha256"], prehashed=False)
        public_of(key).verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))
    finally:
        for backend in (third, second, first):
            backend.close()


def _eventually(action: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_token_deleted_then_recreated_recovers_without_restart(hsm: SoftHsm, backend, key_of):
    victim = hsm.init_token("kmsgate-gw-lost")
    b = make_backend("hsm-lost", victim, retry_interval=0.3)
    alg = SIGN_ALGORITHMS["ecdsa-sha256"]
    try:
        old = b.create_key(KeySpec("k", 1, KeyType.ECDSA_P256))
        mac_key = b.create_key(KeySpec("m", 1, KeyType.HMAC_SHA256))
        b.sign(old, MESSAGE, alg, prehashed=False)
        b.mac(mac_key, MESSAGE, HashName.SHA256)
        victim.delete()
        for use in (
            lambda: b.sign(old, MESSAGE, alg, prehashed=False),
            lambda: b.sign_many(old, [SignMessage(MESSAGE, alg, False)]),
            lambda: b.mac(mac_key, MESSAGE, HashName.SHA256),
            lambda: b.create_key(KeySpec("k", 2, KeyType.ECDSA_P256)),
        ):
            with pytest.raises(BackendUnavailable) as caught:
                use()
            assert caught.value.status == 503 and caught.value.retry_after >= 1
        assert not b.status().ok
        # other backends on the same module are not disturbed
        other = backend.sign(key_of(KeyType.ECDSA_P256), MESSAGE, alg, prehashed=False)
        assert isinstance(other, bytes)

        victim.init()  # a fresh token under the same label and PIN
        new = _eventually(lambda: b.create_key(KeySpec("k", 2, KeyType.ECDSA_P256)))
        signature = b.sign(new, MESSAGE, alg, prehashed=False)
        public_of(new).verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))
        assert b.status().ok
        with pytest.raises(KeyDestroyed, match="not on the token"):
            b.sign(old, MESSAGE, alg, prehashed=False)  # its key died with the old token
        # and the module's other backend recovers from the re-initialisation transparently
        again = backend.sign(key_of(KeyType.ECDSA_P256), MESSAGE, alg, prehashed=False)
        public_of(key_of(KeyType.ECDSA_P256)).verify(again, MESSAGE, ec.ECDSA(hashes.SHA256()))
    finally:
        b.close()


def test_a_key_made_on_a_token_replaced_unseen_is_adopted(hsm: SoftHsm):
    """The token is replaced while the backend is idle and a ceremony makes a key on the new
    one: adopting it, the first call since, finds no object on the old token's sessions;
    that was a 404 `no such key on the token` until another call noticed the new token.
    Now the token is checked first (503 once), and the key is adopted on the new one."""
    victim = hsm.init_token("kmsgate-gw-swapped")
    b = make_backend("hsm-swapped", victim, retry_interval=0.3)
    try:
        b.mac(b.create_key(KeySpec("m", 1, KeyType.HMAC_SHA256)), MESSAGE, HashName.SHA256)
        victim.delete()
        victim.init()  # a fresh token under the same label and PIN
        victim.pkcs11_tool(
            "--keygen", "--key-type", "AES:32", "--sensitive", "--private", "--usage-decrypt",
            "--label", "ceremony-kek", "--id", "5e",
        )  # fmt: skip
        spec = KeySpec("kek", 1, KeyType.AES_256_GCM)
        kek = _eventually(lambda: b.adopt_key(spec, "pkcs11:object=ceremony-kek"))
        assert b.unwrap(kek, b.wrap(kek, b"data key", b"aad"), b"aad") == b"data key"
        with pytest.raises(NotFound, match="no such key on the token"):
            b.adopt_key(KeySpec("none", 1, KeyType.AES_256_GCM), "pkcs11:object=no-such-kek")
    finally:
        b.close()


def test_module_finalized_under_the_backend_is_reopened(backend, key_of, token):
    """The module loses its state (C_Finalize behind our back: every session and the login
    are gone): the next call re-initialises it, logs in again and succeeds."""
    import pkcs11

    from kmsgate.backends.pkcs11.module import _module

    key = key_of(KeyType.ED25519)
    alg = SIGN_ALGORITHMS["ed25519"]
    backend.sign(key, MESSAGE, alg, prehashed=False)
    module = _module(token.hsm.module)
    with module.lock:
        pkcs11.lib(module.path).finalize()
    signature = backend.sign(key, MESSAGE, alg, prehashed=False)
    public = public_of(key)
    assert isinstance(public, ed25519.Ed25519PublicKey)
    public.verify(signature, MESSAGE)


def test_forked_child_initialises_the_module_again(backend, key_of):
    """A process forked after C_Initialize (a pre-forking server) must not use the parent's
    sessions: the backend re-initialises the module in the child and logs in again."""
    key = key_of(KeyType.ECDSA_P256)
    alg = SIGN_ALGORITHMS["ecdsa-sha256"]
    backend.sign(key, MESSAGE, alg, prehashed=False)  # the parent is connected
    inherited = backend._pool._conn
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: sign with the inherited backend, report, exit at once
        code = 1
        try:
            signature = backend.sign(key, b"from the child", alg, prehashed=False)
            fresh = backend._pool._conn is not None and backend._pool._conn is not inherited
            os.write(write, (b"fresh:" if fresh else b"reused:") + signature)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    if done == (0, 0):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    reply = os.read(read, 4096)
    os.close(read)
    assert done[1] == 0, "the child failed or hung"
    assert reply.startswith(b"fresh:"), "the child used the parent's sessions"
    signature = reply.removeprefix(b"fresh:")
    public_of(key).verify(signature, b"from the child", ec.ECDSA(hashes.SHA256()))
    # the parent's connection is untouched
    assert backend._pool._conn is inherited
    again = backend.sign(key, MESSAGE, alg, prehashed=False)
    public_of(key).verify(again, MESSAGE, ec.ECDSA(hashes.SHA256()))


def test_destroyed_key_is_key_destroyed(backend):
    """A key object gone from a healthy token is 409 key_destroyed, as a Transit or AWS KMS
    key gone from its backend (not 502: the token works, the key is not there)."""
    key = backend.create_key(KeySpec("doomed", 1, KeyType.AES_256_GCM))
    wrapped = backend.wrap(key, b"data key", b"aad")
    backend.destroy(key)
    backend.destroy(key)  # idempotent
    with pytest.raises(KeyDestroyed, match="not on the token") as caught:
        backend.unwrap(replace(key, material=None), wrapped, b"aad")
    assert (caught.value.status, caught.value.code) == (409, "key_destroyed")


# --------------------------------------------------------------------------------------------
# the gateway over REST
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def gateway(
    token: SoftHsmToken, tmp_path: Path, **backend_extra: Any
) -> Iterator[tuple[Any, dict[str, str]]]:
    """A real gateway with backend `hsm` on `token`: the TestClient and admin headers."""
    backends = {"local": {"type": "softkms"}, "hsm": token.backend_config(**backend_extra)}
    with open_gateway(tmp_path, backends=backends) as (api, admin):
        yield api.client, {"authorization": f"Bearer {admin}"}


def test_rest_operations_on_hsm_keys(hsm: SoftHsm, tmp_path: Path):
    token = hsm.init_token("kmsgate-gw-rest")
    with gateway(token, tmp_path) as (client, auth):
        for name, key_type in (("sig", "ecdsa-p256"), ("ed", "ed25519"), ("tag", "hmac-sha256")):
            r = client.post(
                "/v1/keys",
                headers=auth,
                json={"name": name, "type": key_type, "purpose": "general", "backend": "hsm"},
            )
            assert r.status_code == 201, r.text
            assert r.json()["backend"] == "hsm"
        public = serialization.load_pem_public_key(
            client.get("/v1/keys/sig/public-key", headers=auth).content
        )
        r = client.post("/v1/keys/sig/sign", headers=auth, json={"input": b64(MESSAGE)})
        assert r.status_code == 200, r.text
        public.verify(base64.b64decode(r.json()["signature"]), MESSAGE, ec.ECDSA(hashes.SHA256()))
        digest = hashlib.sha256(MESSAGE).digest()
        items = [{"input": b64(b"m%d" % i)} for i in range(50)] + [{"digest": b64(digest)}]
        items.append({"input": b64(b"x"), "algorithm": "rsa-pss-sha256"})  # an item error
        r = client.post("/v1/keys/sig/sign", headers=auth, json={"batch": items})
        assert r.status_code == 200, r.text
        out = r.json()["batch"]
        for i in range(50):
            public.verify(
                base64.b64decode(out[i]["signature"]), b"m%d" % i, ec.ECDSA(hashes.SHA256())
            )
        public.verify(base64.b64decode(out[50]["signature"]), MESSAGE, ec.ECDSA(hashes.SHA256()))
        assert out[51]["error"]["code"] == "invalid_request"
        r = client.post(
            "/v1/keys/sig/verify",
            headers=auth,
            json={"input": b64(b"m3"), "signature": out[3]["signature"]},
        )
        assert r.json()["valid"] is True
        r = client.post("/v1/keys/ed/sign", headers=auth, json={"input": b64(MESSAGE)})
        ed_pub = serialization.load_pem_public_key(
            client.get("/v1/keys/ed/public-key", headers=auth).content
        )
        assert isinstance(ed_pub, ed25519.Ed25519PublicKey)
        ed_pub.verify(base64.b64decode(r.json()["signature"]), MESSAGE)
        tag = client.post("/v1/keys/tag/mac", headers=auth, json={"input": b64(MESSAGE)})
        assert tag.status_code == 200, tag.text
        ok = client.post(
            "/v1/keys/tag/mac/verify",
            headers=auth,
            json={"input": b64(MESSAGE), "mac": tag.json()["mac"]},
        )
        assert ok.json()["valid"] is True
        bad = client.post(
            "/v1/keys/tag/mac/verify",
            headers=auth,
            json={"input": b64(MESSAGE + b"!"), "mac": tag.json()["mac"]},
        )
        assert bad.json()["valid"] is False
        # adopt a key made by a ceremony tool, over REST
        token.pkcs11_tool(
            "--keypairgen", "--usage-sign", "--key-type", "EC:prime256v1", "--label",
            "ceremony", "--id", "0c",
        )  # fmt: skip
        body = {"name": "adopted", "type": "ecdsa-p256", "purpose": "general", "backend": "hsm"}
        refused = client.post(
            "/v1/keys",
            headers=auth,
            json={**body, "uri": "pkcs11:object=ceremony?pin-value=" + token.pin},
        )
        assert refused.status_code == 400, refused.text
        assert token.pin not in refused.text
        adopted = client.post(
            "/v1/keys", headers=auth, json={**body, "uri": "pkcs11:object=ceremony;type=private"}
        )
        assert adopted.status_code == 201, adopted.text
        assert adopted.json()["versions"][0]["adopted"] is True  # its material stays on the token
        r = client.post("/v1/keys/adopted/sign", headers=auth, json={"input": b64(MESSAGE)})
        adopted_pub = serialization.load_pem_public_key(
            client.get("/v1/keys/adopted/public-key", headers=auth).content
        )
        adopted_pub.verify(
            base64.b64decode(r.json()["signature"]), MESSAGE, ec.ECDSA(hashes.SHA256())
        )
        ready = client.get("/v1/sys/ready").json()
        assert ready["backends"]["hsm"] == {
            "type": "pkcs11",
            "ok": True,
            "detail": f"ok (token {token.label!r})",
        }


def test_rest_token_deleted_is_503_then_a_fresh_token_works(hsm: SoftHsm, tmp_path: Path):
    token = hsm.init_token("kmsgate-gw-rest-lost")
    with gateway(token, tmp_path, retry_interval=0.3) as (client, auth):

        def create(name: str) -> httpx.Response:
            body = {"name": name, "type": "ecdsa-p256", "purpose": "general", "backend": "hsm"}
            return client.post("/v1/keys", headers=auth, json=body)

        def sign(name: str) -> httpx.Response:
            return client.post(f"/v1/keys/{name}/sign", headers=auth, json={"input": b64(MESSAGE)})

        assert create("old").status_code == 201
        assert sign("old").status_code == 200
        token.delete()
        for reply in (sign("old"), sign("old"), create("new")):
            assert reply.status_code == 503, reply.text
            assert reply.json()["code"] == "backend_unavailable"
            assert int(reply.headers["retry-after"]) >= 1
            assert "softhsm" not in reply.text.lower()  # no backend error text to clients
        ready = client.get("/v1/sys/ready")
        assert ready.status_code == 503
        assert ready.json()["backends"]["hsm"]["ok"] is False
        assert ready.json()["detail"] == f"backend hsm: unavailable (token label {token.label!r})"

        token.init()  # a fresh token is configured under the same label and PIN
        deadline = time.monotonic() + 10
        while (reply := create("new")).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reply.status_code == 201, reply.text
        signed = sign("new")
        assert signed.status_code == 200
        public = serialization.load_pem_public_key(
            client.get("/v1/keys/new/public-key", headers=auth).content
        )
        public.verify(
            base64.b64decode(signed.json()["signature"]), MESSAGE, ec.ECDSA(hashes.SHA256())
        )
        gone = sign("old")  # the old key died with the old token
        assert gone.status_code == 409 and gone.json()["code"] == "key_destroyed"
        assert client.get("/v1/sys/ready").status_code == 200


@contextlib.contextmanager
def real_server(
    hsm: SoftHsm, token: SoftHsmToken, tmp_path: Path, workers: int = 1
) -> Iterator[tuple[str, str]]:
    """`kmsgate serve --dev --config` on a free loopback port; yields (url, root token)."""
    config = tmp_path / "kmsgate.yaml"
    config.write_text(yaml.safe_dump({"backends": {"hsm": token.backend_config()}}))
    data = tmp_path / "data"
    port = free_port()
    env = {k: v for k, v in hsm.env().items() if not k.startswith("KMSGATE_")}
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-c", "from kmsgate.cli import main; main()", "serve", "--dev",
                "--config", str(config), "--data-dir", str(data), "--port", str(port),
                "--workers", str(workers),
            ],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        token_file = data / "root-token"
        deadline = time.monotonic() + 30
        while not token_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", token_file.read_text().strip()
    except BaseException:
        print(log.read_text(errors="replace")[-3000:])
        raise
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue


def test_8_clients_x_500_signs_through_a_real_server(hsm: SoftHsm, tmp_path: Path):
    """`kmsgate serve --workers 2`: each worker process logs in to the token itself."""
    token = hsm.init_token("kmsgate-gw-load")
    with real_server(hsm, token, tmp_path, workers=2) as (url, root):
        auth = {"authorization": f"Bearer {root}"}
        r = httpx.post(
            f"{url}/v1/keys",
            headers=auth,
            json={"name": "load", "type": "ecdsa-p256", "purpose": "general", "backend": "hsm"},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        # the other worker sees the new key after its catalogue refresh (about 1 s): wait
        # until fresh connections (spread over both workers) all sign
        deadline = time.monotonic() + 15
        while True:
            replies = [
                httpx.post(
                    f"{url}/v1/keys/load/sign",
                    headers={**auth, "connection": "close"},
                    json={"input": b64(b"warm-up")},
                    timeout=30,
                ).status_code
                for _ in range(8)
            ]
            if replies == [200] * 8 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert replies == [200] * 8, replies
        public = serialization.load_pem_public_key(
            httpx.get(f"{url}/v1/keys/load/public-key", headers=auth, timeout=30).content
        )
        host, port = url.removeprefix("http://").split(":")
        barrier = threading.Barrier(8)

        def client(i: int) -> list[tuple[bytes, int, bytes]]:
            """500 signs on one keep-alive connection (http.client: a light client, so the
            8 client threads do not starve the server of CPU)."""
            out = []
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            headers = {**auth, "content-type": "application/json"}
            try:
                barrier.wait(timeout=30)
                for n in range(500):
                    message = b"client %d message %d" % (i, n)
                    body = json.dumps({"input": b64(message)})
                    conn.request("POST", "/v1/keys/load/sign", body=body, headers=headers)
                    reply = conn.getresponse()
                    data = reply.read()
                    signature = json.loads(data)["signature"] if reply.status == 200 else ""
                    out.append((message, reply.status, base64.b64decode(signature)))
            finally:
                conn.close()
            return out

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            results = [r for chunk in pool.map(client, range(8)) for r in chunk]
        elapsed = time.monotonic() - started
        statuses: dict[int, int] = {}
        for _, status, _ in results:
            statuses[status] = statuses.get(status, 0) + 1
        assert statuses == {200: 4000}, statuses
        for message, _, signature in results:
            public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        print(f"8 x 500 REST signs through SoftHSM: {4000 / elapsed:.0f} req/s")


# --------------------------------------------------------------------------------------------
# scripts/bench_pkcs11.py
# --------------------------------------------------------------------------------------------


def test_bench_pkcs11_quick(hsm: SoftHsm, tmp_path: Path):
    """The benchmark end to end, in a tiny form (1 worker, 1 session, 1 s samples)."""
    out = tmp_path / "bench.json"
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_pkcs11.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--duration", "1", "--warmup", "0.3", "--repeat", "1",
         "--workers", "1", "--sessions", "1", "--json", str(out)],
        env=hsm.env(), capture_output=True, text=True, timeout=100, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["errors"] == 0
    assert report["direct"]["1_proc"] > 0
    rates = report["gateway"]["sessions_1"]
    assert rates["batch"] > rates["single"] > 0
    assert "batch goal >= 70%" in proc.stdout


def test_deleting_an_adopted_key_never_destroys_the_ceremony_key(hsm: SoftHsm, tmp_path: Path):
    token = hsm.init_token("kmsgate-gw-adopt")
    gen = ["--keypairgen", "--usage-sign", "--key-type", "EC:prime256v1"]
    token.pkcs11_tool(*gen, "--label", "ceremony-root", "--id", "e1")
    uri = f"pkcs11:token={token.label};object=ceremony-root;type=private"
    with gateway(token, tmp_path) as (client, auth):
        body = {"name": "adopted", "type": "ecdsa-p256", "purpose": "ceremony", "backend": "hsm"}
        r = client.post("/v1/keys", headers=auth, json={**body, "uri": uri})
        assert r.status_code == 201, r.text
        r = client.post("/v1/keys/adopted/sign", headers=auth, json={"input": b64(MESSAGE)})
        assert r.status_code == 200, r.text
        r = client.post(
            "/v1/keys/adopted/schedule-deletion", headers=auth, json={"pending_days": 7}
        )
        assert r.json()["state"] == "pending_deletion"
        service = client.app.state.service
        later = datetime.now(UTC) + timedelta(days=8)
        # while it is a version of `adopted`, neither its URI nor a kmsgate key adopts again
        r = client.post("/v1/keys", headers=auth, json={**body, "name": "twice", "uri": uri})
        assert r.status_code == 409, r.text
        assert "already version 1 of key 'adopted'" in r.json()["detail"]
        own = {**body, "name": "own", "uri": None}
        assert client.post("/v1/keys", headers=auth, json=own).status_code == 201
        own_uri = f"pkcs11:token={token.label};object=own.v1;type=private"
        r = client.post("/v1/keys", headers=auth, json={**body, "name": "copy", "uri": own_uri})
        assert r.status_code == 409, r.text
        assert "already version 1 of key 'own'" in r.json()["detail"]
        assert service.keys.destroy_due(Ctx("t"), later) == ["adopted"]
        assert client.get("/v1/keys/adopted", headers=auth).json()["state"] == "destroyed"
        # the token still holds the ceremony key: it can be adopted again and signs
        r = client.post("/v1/keys", headers=auth, json={**body, "name": "again", "uri": uri})
        assert r.status_code == 201, r.text
        r = client.post("/v1/keys/again/sign", headers=auth, json={"input": b64(MESSAGE)})
        assert r.status_code == 200, r.text
