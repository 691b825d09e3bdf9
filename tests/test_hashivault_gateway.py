"""The hashivault backend against a real OpenBao, through the gateway and directly.

Gateway: keys created with `backend: vault`, signatures checked by the `openssl` CLI, a
1,000-item batch counted in OpenBao's own audit log, rotation, MACs, 403 -> 502, and an
outage (process stopped by PID, restarted sealed, unsealed) -> 503 then recovery without
restarting kmsgate. Backend: version mapping and destroy semantics, token renewal, AppRole
(re-login after revocation), min_decryption_version, derived keys, auto-unseal handle,
namespaces, a TLS CA bundle, config errors.

Every test uses its own key prefix, so tests sharing the session's server never collide.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import hvac.exceptions
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kmsgate.algorithms import SIGN_ALGORITHMS, HashName, KeyType
from kmsgate.backends.base import BackendKey, BackendStatus, KeySpec
from kmsgate.backends.hashivault import HashiVaultBackend
from kmsgate.backends.hashivault import client as vault_client
from kmsgate.config import BackendSettings
from kmsgate.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    Conflict,
    DecryptionFailed,
    InvalidRequest,
    KeyDestroyed,
    NotFound,
)
from tests import helpers
from tests.components import LOOPBACK
from tests.gateway import Api, open_gateway
from tests.helpers import b64, self_signed, unb64
from tests.openbao import (
    OpenBaoServer,
    count_audit_requests,
    persistent_openbao,
    running_openbao,
)
from tests.test_cli import running_gateway

MESSAGE = b"kmsgate hashivault test message"
TRANSIT_POLICY = 'path "transit/*" { capabilities = ["create", "read", "update", "delete"] }'


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own (the session's OpenBao is shared)."""
    return f"t{secrets.token_hex(4)}-"


def vault_config(addr: str, prefix: str, **auth: Any) -> dict[str, Any]:
    return {"type": "hashivault", "addr": addr, "mount": "transit", "key_prefix": prefix, **auth}


def make_backend(addr: str, prefix: str, **extra: Any) -> HashiVaultBackend:
    return HashiVaultBackend.from_config(
        "vault", BackendSettings(**vault_config(addr, prefix, **extra))
    )


def token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "vault-token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def gateway(tmp_path: Path, vault: dict[str, Any]) -> Iterator[tuple[Api, str, HashiVaultBackend]]:
    """A real gateway (SQLite, softkms `local`, shipped policies) with backend `vault`."""
    with open_gateway(tmp_path, backends={"local": {"type": "softkms"}, "vault": vault}) as (
        api,
        admin,
    ):
        backend = api.service.registry.get("vault")
        assert isinstance(backend, HashiVaultBackend)
        yield api, admin, backend


@pytest.fixture
def vault_gateway(
    tmp_path: Path, openbao_server: OpenBaoServer, prefix: str
) -> Iterator[tuple[Api, str, HashiVaultBackend]]:
    cfg = vault_config(
        openbao_server.addr, prefix, token_file=str(token_file(tmp_path, openbao_server.root_token))
    )
    with gateway(tmp_path, cfg) as started:
        yield started


create_key = functools.partial(helpers.create_key, backend="vault")


def transit_key(server: OpenBaoServer, transit_name: str) -> dict[str, Any]:
    data: dict[str, Any] = server.client().adapter.get(f"/v1/transit/keys/{transit_name}")["data"]
    return data


def same_public_key(pem_a: str | bytes, transit_value: str) -> bool:
    a = serialization.load_pem_public_key(pem_a if isinstance(pem_a, bytes) else pem_a.encode())
    if transit_value.startswith("-----BEGIN"):
        b = serialization.load_pem_public_key(transit_value.encode())
        fmt = serialization.PublicFormat.SubjectPublicKeyInfo
        return a.public_bytes(serialization.Encoding.DER, fmt) == b.public_bytes(
            serialization.Encoding.DER, fmt
        )
    raw = a.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw == unb64(transit_value)


# --------------------------------------------------------------------------------------------
# through the gateway
# --------------------------------------------------------------------------------------------


def openssl_verify(openssl: str, alg: str, pub: Path, data: Path, sig: Path) -> bool:
    if alg == "ed25519":
        cmd = [
            openssl,
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            pub,
            "-rawin",
            "-in",
            data,
            "-sigfile",
            sig,
        ]
    else:
        digest = alg.rsplit("-", 1)[1]
        cmd = [openssl, "dgst", f"-{digest}", "-verify", pub]
        if alg.startswith("rsa-pss-"):
            # strict: salt length = digest length, MGF1 with the message hash
            cmd += [
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                f"rsa_pss_saltlen:{hashlib.new(digest).digest_size}",
            ]
            cmd += ["-sigopt", f"rsa_mgf1_md:{digest}"]
        cmd += ["-signature", sig, data]
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=30, check=False
    )
    out = proc.stdout + proc.stderr
    verified = proc.returncode == 0 and ("Verified OK" in out or "Verified Successfully" in out)
    assert verified or proc.returncode == 1, proc.stdout + proc.stderr
    return verified


@pytest.mark.interop
@pytest.mark.parametrize(
    ("key_type", "algorithms"),
    [
        ("ed25519", ["ed25519"]),
        ("ecdsa-p256", ["ecdsa-sha256", "ecdsa-sha512"]),
        ("ecdsa-p384", ["ecdsa-sha384"]),
        ("rsa-3072", ["rsa-pss-sha256", "rsa-pss-sha512", "rsa-pkcs1-sha384"]),
    ],
)
def test_openssl_verifies_signatures_made_in_openbao(
    vault_gateway, openbao_server, openssl_bin, prefix, tmp_path, key_type, algorithms
):
    api, admin, _ = vault_gateway
    key = create_key(api, admin, "k", key_type)
    assert (key["backend"], key["primary_version"]) == ("vault", 1)
    pem = api.call("GET", "/v1/keys/k/public-key", admin).content
    # the key lives in Transit: kmsgate's public key is the one Transit publishes
    transit = transit_key(openbao_server, f"{prefix}k")
    assert (transit["type"], transit["exportable"]) == (key_type, False)
    assert same_public_key(pem, transit["keys"]["1"]["public_key"])
    pub, data, tampered = tmp_path / "pub.pem", tmp_path / "msg", tmp_path / "tampered"
    pub.write_bytes(pem)
    data.write_bytes(MESSAGE)
    tampered.write_bytes(MESSAGE + b"!")
    for alg in algorithms:
        for form in ("input", "digest"):
            if form == "digest" and alg == "ed25519":
                continue
            value = (
                MESSAGE if form == "input" else hashlib.new(alg.rsplit("-", 1)[1], MESSAGE).digest()
            )
            r = api.call(
                "POST", "/v1/keys/k/sign", admin, json={form: b64(value), "algorithm": alg}
            )
            assert r.status_code == 200, r.text
            assert (r.json()["key_version"], r.json()["algorithm"]) == (1, alg)
            sig = tmp_path / "sig"
            sig.write_bytes(unb64(r.json()["signature"]))
            assert openssl_verify(openssl_bin, alg, pub, data, sig), (alg, form)
            assert not openssl_verify(openssl_bin, alg, pub, tampered, sig), (alg, form)
            verify = api.call(
                "POST", "/v1/keys/k/verify", admin,
                json={"input": b64(MESSAGE), "signature": r.json()["signature"], "algorithm": alg},
            )  # fmt: skip
            assert verify.json() == {"valid": True, "key_version": 1}


def test_batch_of_1000_signs_costs_at_most_10_vault_requests(vault_gateway, openbao_server):
    api, admin, backend = vault_gateway
    create_key(api, admin, "batch", "ecdsa-p256")
    pub = serialization.load_pem_public_key(
        api.call("GET", "/v1/keys/batch/public-key", admin).content
    )
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    messages = [f"message {i}".encode() for i in range(1000)]

    client_requests: list[str] = []
    hook = lambda response, *args, **kwargs: client_requests.append(response.request.path_url)  # noqa: E731
    backend.http_session.hooks["response"].append(hook)
    assert openbao_server.audit_log is not None
    start, _ = count_audit_requests(openbao_server.audit_log)
    try:
        r = api.call(
            "POST",
            "/v1/keys/batch/sign",
            admin,
            json={"batch": [{"input": b64(m)} for m in messages]},
        )
    finally:
        backend.http_session.hooks["response"].remove(hook)
    _, server_paths = count_audit_requests(openbao_server.audit_log, start)

    assert r.status_code == 200, r.text
    results = r.json()["batch"]
    assert len(results) == 1000
    for message, item in zip(messages, results, strict=True):
        assert item["key_version"] == 1
        pub.verify(unb64(item["signature"]), message, ec.ECDSA(hashes.SHA256()))
    print(f"\n1,000 signs: {len(server_paths)} requests in OpenBao's audit log {server_paths}, "
          f"{len(client_requests)} seen by the client")  # fmt: skip
    assert 1 <= len(server_paths) <= 10
    assert all(p.startswith("transit/sign/") for p in server_paths)
    assert len(client_requests) == len(server_paths)


def test_a_batch_of_1000_macs_costs_at_most_10_vault_requests(vault_gateway, openbao_server):
    """MACs went one Transit request per item (1,000 for a batch); they now go as signs do,
    `batch_size` per request. Each MAC is checked against Transit's own for the same input."""
    api, admin, _ = vault_gateway
    create_key(api, admin, "mac-batch", "hmac-sha256")
    messages = [f"message {i}".encode() for i in range(1000)]
    start, _ = count_audit_requests(openbao_server.audit_log)
    r = api.call(
        "POST",
        "/v1/keys/mac-batch/mac",
        admin,
        json={"batch": [{"input": b64(m)} for m in messages]},
    )
    _, paths = count_audit_requests(openbao_server.audit_log, start)
    assert r.status_code == 200, r.text
    tags = [unb64(item["mac"]) for item in r.json()["batch"]]
    assert 1 <= len(paths) <= 10 and all(p.startswith("transit/hmac/") for p in paths), paths
    transit_name = api.service.catalogue.get("mac-batch").versions[1].backend_ref
    name = transit_name.split("/")[-1].split("#")[0]
    for index in (0, 499, 999):
        theirs = openbao_server.client().adapter.post(
            f"/v1/transit/hmac/{name}/sha2-256", json={"input": b64(messages[index])}
        )["data"]["hmac"]
        assert base64.b64decode(theirs.split(":")[2]) == tags[index]
    single = api.call("POST", "/v1/keys/mac-batch/mac", admin, json={"input": b64(messages[7])})
    assert unb64(single.json()["mac"]) == tags[7]


def test_mixed_batch_groups_by_algorithm_and_keeps_item_errors(vault_gateway, openbao_server):
    api, admin, _ = vault_gateway
    create_key(api, admin, "mixed", "ecdsa-p384")
    pub = serialization.load_pem_public_key(
        api.call("GET", "/v1/keys/mixed/public-key", admin).content
    )
    digest = hashlib.sha512(MESSAGE).digest()
    batch = [
        {"input": b64(MESSAGE)},
        {"digest": b64(digest), "algorithm": "ecdsa-sha512"},
        {"input": b64(MESSAGE), "algorithm": "rsa-pss-sha256"},  # does not fit the key
        {"digest": b64(digest[:20]), "algorithm": "ecdsa-sha512"},  # wrong digest size
        {"input": b64(MESSAGE + b"2")},
    ]
    start, _ = count_audit_requests(openbao_server.audit_log)
    r = api.call("POST", "/v1/keys/mixed/sign", admin, json={"batch": batch})
    _, paths = count_audit_requests(openbao_server.audit_log, start)
    items = r.json()["batch"]
    assert [("error" in item) for item in items] == [False, False, True, True, False]
    assert items[2]["error"]["code"] == items[3]["error"]["code"] == "invalid_request"
    pub.verify(unb64(items[0]["signature"]), MESSAGE, ec.ECDSA(hashes.SHA384()))
    pub.verify(unb64(items[1]["signature"]), MESSAGE, ec.ECDSA(hashes.SHA512()))
    pub.verify(unb64(items[4]["signature"]), MESSAGE + b"2", ec.ECDSA(hashes.SHA384()))
    assert len(paths) == 2  # one per (algorithm, prehashed) group


def test_rotation_maps_kmsgate_versions_onto_transit_versions(
    vault_gateway, openbao_server, prefix
):
    api, admin, _ = vault_gateway
    create_key(api, admin, "rot", "ed25519")
    r = api.call("POST", "/v1/keys/rot/rotate", admin)
    assert r.status_code == 200, r.text
    assert r.json()["primary_version"] == 2
    transit = transit_key(openbao_server, f"{prefix}rot")
    assert transit["latest_version"] == 2
    pems = {
        v: api.call("GET", f"/v1/keys/rot/public-key?version={v}", admin).content for v in (1, 2)
    }
    assert pems[1] != pems[2]
    for v in (1, 2):
        assert same_public_key(pems[v], transit["keys"][str(v)]["public_key"])
        r = api.call("POST", "/v1/keys/rot/sign", admin, json={"input": b64(MESSAGE), "version": v})
        assert r.json()["key_version"] == v
        sig = unb64(r.json()["signature"])
        serialization.load_pem_public_key(pems[v]).verify(sig, MESSAGE)
        other = serialization.load_pem_public_key(pems[3 - v])
        with pytest.raises(InvalidSignature):
            other.verify(sig, MESSAGE)
    # the default is the primary version
    r = api.call("POST", "/v1/keys/rot/sign", admin, json={"input": b64(MESSAGE)})
    assert r.json()["key_version"] == 2


@pytest.mark.parametrize(
    ("key_type", "transit_alg", "size"),
    [("hmac-sha256", "sha2-256", 32), ("hmac-sha512", "sha2-512", 64)],
)
def test_mac_through_gateway_agrees_with_transit(
    vault_gateway, openbao_server, prefix, key_type, transit_alg, size
):
    api, admin, _ = vault_gateway
    create_key(api, admin, "m", key_type)
    transit = transit_key(openbao_server, f"{prefix}m")
    assert (transit["type"], transit["key_size"]) == ("hmac", size)
    r = api.call("POST", "/v1/keys/m/mac", admin, json={"input": b64(MESSAGE)})
    assert r.status_code == 200, r.text
    tag = unb64(r.json()["mac"])
    assert len(tag) == size
    # Transit's own verify agrees: the tag is its HMAC of the input under version 1
    check = openbao_server.client().adapter.post(
        f"/v1/transit/verify/{prefix}m",
        json={"input": b64(MESSAGE), "hmac": f"vault:v1:{b64(tag)}", "hash_algorithm": transit_alg},
    )
    assert check["data"]["valid"] is True
    ok = api.call(
        "POST", "/v1/keys/m/mac/verify", admin, json={"input": b64(MESSAGE), "mac": b64(tag)}
    )
    assert ok.json()["valid"] is True
    bad = api.call(
        "POST",
        "/v1/keys/m/mac/verify",
        admin,
        json={"input": b64(MESSAGE), "mac": b64(tag[:-1] + bytes([tag[-1] ^ 1]))},
    )
    assert bad.json()["valid"] is False


def test_permission_denied_for_kmsgate_token_is_502_without_vault_text(
    tmp_path, openbao_server, prefix
):
    root = openbao_server.client()
    policy = f"no-sign-{prefix}"
    root.sys.create_or_update_policy(
        policy, 'path "transit/keys/*" { capabilities = ["create", "read", "update"] }'
    )
    limited = root.auth.token.create(policies=[policy], ttl="10m")["auth"]["client_token"]
    cfg = vault_config(openbao_server.addr, prefix, token_file=str(token_file(tmp_path, limited)))
    with gateway(tmp_path, cfg) as (api, admin, _):
        create_key(api, admin, "denied", "ecdsa-p256")
        r = api.call("POST", "/v1/keys/denied/sign", admin, json={"input": b64(MESSAGE)})
        assert r.status_code == 502
        problem = r.json()
        assert problem["code"] == "backend_error"
        text = r.text.lower()
        for vault_text in (
            "1 error occurred",
            "/v1/",
            openbao_server.addr,
            "transit/sign",
            limited.lower(),
        ):
            assert vault_text.lower() not in text
        assert "retry-after" not in r.headers


# --------------------------------------------------------------------------------------------
# outage and recovery
# --------------------------------------------------------------------------------------------


def test_openbao_stopped_gives_503_and_kmsgate_recovers_without_restart(tmp_path):
    """A persistent OpenBao (raft) holds the key. Stopped by PID: 503 + Retry-After, ready
    503. Started again: still 503 while sealed. Unsealed: the same key (same public key,
    made before the outage) signs again through the same gateway process."""
    with persistent_openbao(tmp_path / "bao") as server:
        cfg = vault_config(
            server.addr,
            "kmsgate-",
            token_file=str(token_file(tmp_path, server.root_token)),
            timeout=2,
            retry_after=7,
        )
        with gateway(tmp_path, cfg) as (api, admin, _):
            create_key(api, admin, "steady", "ecdsa-p256")
            pem = api.call("GET", "/v1/keys/steady/public-key", admin).content
            pub = serialization.load_pem_public_key(pem)
            before = api.call("POST", "/v1/keys/steady/sign", admin, json={"input": b64(MESSAGE)})
            assert before.status_code == 200
            assert api.call("GET", "/v1/sys/ready", None).status_code == 200

            pid = server.pid
            server.stop()
            assert server.process is not None and server.process.poll() is not None, (
                f"bao {pid} still runs"
            )
            down = api.call("POST", "/v1/keys/steady/sign", admin, json={"input": b64(MESSAGE)})
            assert down.status_code == 503, down.text
            assert down.json()["code"] == "backend_unavailable"
            assert down.headers["retry-after"] == "7"
            assert server.addr not in down.text and "refused" not in down.text.lower()
            scraped = api.call("GET", "/metrics", admin).text
            assert 'kmsgate_backend_errors_total{code="backend_unavailable"} 1.0' in scraped
            ready = api.call("GET", "/v1/sys/ready", None)
            assert ready.status_code == 503
            assert ready.json()["backends"]["vault"] == {
                "type": "hashivault",
                "ok": False,
                "detail": "unreachable",
            }
            assert ready.json()["code"] == "not_ready"  # what `kmsgate health --ready` prints
            assert ready.json()["detail"] == "backend vault: unreachable"
            # verification is local: it keeps working while Vault is down
            v = api.call(
                "POST",
                "/v1/keys/steady/verify",
                admin,
                json={"input": b64(MESSAGE), "signature": before.json()["signature"]},
            )
            assert v.json()["valid"] is True

            server.start()  # same data, same port: sealed
            sealed = api.call("POST", "/v1/keys/steady/sign", admin, json={"input": b64(MESSAGE)})
            assert sealed.status_code == 503 and sealed.json()["code"] == "backend_unavailable"
            assert (
                api.call("GET", "/v1/sys/ready", None).json()["backends"]["vault"]["detail"]
                == "sealed"
            )

            server.unseal()
            after = api.call(
                "POST", "/v1/keys/steady/sign", admin, json={"input": b64(MESSAGE + b" after")}
            )
            assert after.status_code == 200, after.text
            pub.verify(
                unb64(after.json()["signature"]), MESSAGE + b" after", ec.ECDSA(hashes.SHA256())
            )
            assert api.call("GET", "/v1/sys/ready", None).status_code == 200


# --------------------------------------------------------------------------------------------
# the backend directly
# --------------------------------------------------------------------------------------------


def _sign(backend: HashiVaultBackend, key: BackendKey) -> bytes:
    return backend.sign(key, MESSAGE, SIGN_ALGORITHMS["ed25519"], prehashed=False)


def test_versions_destroy_and_rotation_rollback(openbao_server, prefix):
    backend = make_backend(openbao_server.addr, prefix, token=openbao_server.root_token)
    try:
        v1 = backend.create_key(KeySpec("d", 1, KeyType.ED25519))
        assert v1.ref == f"hashivault:transit/{prefix}d#1"
        with pytest.raises(Conflict):  # never take over an existing Transit key
            backend.create_key(KeySpec("d", 1, KeyType.ED25519))
        v2 = backend.create_key(KeySpec("d", 2, KeyType.ED25519))
        # a rotation the catalogue rolled back: the version stays and is reused
        backend.destroy(v2)
        assert transit_key(openbao_server, f"{prefix}d")["latest_version"] == 2
        again = backend.create_key(KeySpec("d", 2, KeyType.ED25519))
        assert again.public_key_pem == v2.public_key_pem
        v3 = backend.create_key(KeySpec("d", 3, KeyType.ED25519))
        for key in (v1, v2, v3):
            serialization.load_pem_public_key(key.public_key_pem.encode()).verify(
                _sign(backend, key), MESSAGE
            )

        backend.destroy(v1)  # oldest: trimmed
        info = transit_key(openbao_server, f"{prefix}d")
        assert info["min_available_version"] == 2 and sorted(info["keys"]) == ["2", "3"]
        with pytest.raises((KeyDestroyed, BackendError)):
            _sign(backend, v1)
        _sign(backend, v2)
        backend.destroy(v2)
        backend.destroy(v3)  # the last one: the whole Transit key goes
        with pytest.raises(hvac.exceptions.InvalidPath):
            transit_key(openbao_server, f"{prefix}d")
        with pytest.raises(KeyDestroyed):
            _sign(backend, v3)
        backend.destroy(v3)  # idempotent

        # rotated outside kmsgate: the next version takes Transit's newest, unused so far
        e1 = backend.create_key(KeySpec("e", 1, KeyType.ED25519))
        root = openbao_server.client()
        root.adapter.post(f"/v1/transit/keys/{prefix}e/rotate")
        root.adapter.post(f"/v1/transit/keys/{prefix}e/rotate")
        e2 = backend.create_key(KeySpec("e", 2, KeyType.ED25519, previous=e1))
        assert e2.ref == f"hashivault:transit/{prefix}e#3" and e2.version == 2
        e3 = backend.create_key(KeySpec("e", 3, KeyType.ED25519, previous=e2))
        assert e3.ref == f"hashivault:transit/{prefix}e#4"
        for key in (e1, e2, e3):
            serialization.load_pem_public_key(key.public_key_pem.encode()).verify(
                _sign(backend, key), MESSAGE
            )
    finally:
        backend.close()


def test_min_decryption_version_is_mirrored_to_transit(openbao_server, prefix):
    backend = make_backend(openbao_server.addr, prefix, token=openbao_server.root_token)
    try:
        v1 = backend.create_key(KeySpec("w", 1, KeyType.AES_256_GCM))
        v2 = backend.create_key(KeySpec("w", 2, KeyType.AES_256_GCM))
        old, new = backend.wrap(v1, b"secret one", b"ctx"), backend.wrap(v2, b"secret two", b"ctx")
        assert old[1:5] == (1).to_bytes(4, "big") and new[1:5] == (2).to_bytes(4, "big")
        assert backend.unwrap(v1, old, b"ctx") == b"secret one"
        backend.retire_versions_below(v2)
        assert transit_key(openbao_server, f"{prefix}w")["min_decryption_version"] == 2
        with pytest.raises(DecryptionFailed):
            backend.unwrap(v1, old, b"ctx")
        assert backend.unwrap(v2, new, b"ctx") == b"secret two"
    finally:
        backend.close()


def test_derived_keys_bind_the_aad_as_derivation_context(openbao_server, prefix):
    backend = make_backend(
        openbao_server.addr, prefix, token=openbao_server.root_token, derived=True
    )
    try:
        key = backend.create_key(KeySpec("dk", 1, KeyType.AES_256_GCM))
        assert transit_key(openbao_server, f"{prefix}dk")["derived"] is True
        for aad in (b"", b"tenant=a"):
            wrapped = backend.wrap(key, b"data key", aad)
            assert backend.unwrap(key, wrapped, aad) == b"data key"
        with pytest.raises(DecryptionFailed):
            backend.unwrap(key, backend.wrap(key, b"data key", b"tenant=a"), b"tenant=b")
    finally:
        backend.close()


def test_wrapping_key_for_auto_unseal_survives_transit_rotation(openbao_server, prefix):
    root = openbao_server.client()
    name = f"{prefix}unseal"
    root.adapter.post(f"/v1/transit/keys/{name}", json={"type": "aes256-gcm96"})
    root.adapter.post(f"/v1/transit/keys/{prefix}not-aes", json={"type": "ecdsa-p256"})
    backend = make_backend(openbao_server.addr, prefix, token=openbao_server.root_token)
    try:
        root_key = secrets.token_bytes(32)
        handle = backend.wrapping_key(name)
        assert (handle.key_type, handle.version) == (KeyType.AES_256_GCM, 1)
        wrapped = backend.wrap(handle, root_key, b"kmsgate softkms root key")
        root.adapter.post(f"/v1/transit/keys/{name}/rotate")
        later = backend.wrapping_key(name)
        assert later.version == 2
        assert backend.unwrap(later, wrapped, b"kmsgate softkms root key") == root_key
        with pytest.raises(DecryptionFailed):
            backend.unwrap(later, wrapped, b"another purpose")
        with pytest.raises(NotFound):
            backend.wrapping_key(f"{prefix}missing")
        with pytest.raises(InvalidRequest, match="is ecdsa-p256, not a non-exportable aes256"):
            backend.wrapping_key(f"{prefix}not-aes")
    finally:
        backend.close()


def test_token_is_renewed_before_it_expires(openbao_server, prefix):
    root = openbao_server.client()
    policy = f"transit-{prefix}"
    root.sys.create_or_update_policy(policy, TRANSIT_POLICY)

    def short_token() -> str:
        reply = root.auth.token.create(
            policies=[policy], ttl="2s", explicit_max_ttl="60s", renewable=True
        )
        return str(reply["auth"]["client_token"])

    control = short_token()  # same TTL, nobody renews it
    backend = make_backend(openbao_server.addr, prefix, token=short_token())
    try:
        key = backend.create_key(KeySpec("renew", 1, KeyType.ED25519))
        time.sleep(3.5)  # idle for longer than the original TTL
        _sign(backend, key)
        with pytest.raises(hvac.exceptions.Forbidden):
            openbao_server.client(token=control).auth.token.lookup_self()
    finally:
        backend.close()


def test_approle_login_and_relogin_after_revocation(tmp_path, openbao_server, prefix):
    root = openbao_server.client()
    mount = f"approle-{prefix.rstrip('-')}"
    policy = f"transit-{prefix}"
    root.sys.create_or_update_policy(policy, TRANSIT_POLICY)
    root.sys.enable_auth_method("approle", path=mount)
    root.auth.approle.create_or_update_approle(
        "kmsgate", token_policies=[policy], token_ttl="10m", mount_point=mount
    )
    role_id = root.auth.approle.read_role_id("kmsgate", mount_point=mount)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("kmsgate", mount_point=mount)["data"][
        "secret_id"
    ]
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(secret_id)  # the umask's 0644: anyone could log in as kmsgate
    approle = {"role_id": role_id, "secret_id_file": str(secret_file), "mount": mount}
    with pytest.raises(ConfigError, match=f"secret id file {secret_file} must not be accessible"):
        make_backend(openbao_server.addr, prefix, approle=approle)
    secret_file.chmod(0o600)
    backend = make_backend(openbao_server.addr, prefix, approle=approle)
    try:
        key = backend.create_key(KeySpec("ar", 1, KeyType.ED25519))
        _sign(backend, key)
        first_token = backend._vault.hvac.token
        root.auth.token.revoke(first_token)
        _sign(backend, key)  # 403, log in again, retried once
        assert backend._vault.hvac.token != first_token
        assert backend.status().ok
    finally:
        backend.close()


def test_namespace_is_honoured(openbao_server, prefix):
    namespace = f"ns-{prefix.rstrip('-')}"
    root = openbao_server.client()
    root.adapter.post(f"/v1/sys/namespaces/{namespace}", json={})
    openbao_server.client(namespace=namespace).sys.enable_secrets_engine("transit", path="transit")
    backend = make_backend(
        openbao_server.addr, prefix, token=openbao_server.root_token, namespace=namespace
    )
    try:
        key = backend.create_key(KeySpec("ns", 1, KeyType.ED25519))
        _sign(backend, key)
        inside = openbao_server.client(namespace=namespace).adapter.get(
            f"/v1/transit/keys/{prefix}ns"
        )
        assert inside["data"]["latest_version"] == 1
        with pytest.raises(hvac.exceptions.InvalidPath):
            transit_key(openbao_server, f"{prefix}ns")  # not in the root namespace
        # ready: Vault's health is asked in the root namespace (in another it is a 400)
        assert backend.status() == BackendStatus(True, "ok")
    finally:
        backend.close()


def test_tls_with_configured_ca_bundle(tmp_path, prefix):
    with running_openbao(tmp_path / "tls", tls=True) as server:
        assert server.addr.startswith("https://") and server.ca_cert is not None
        good = make_backend(
            server.addr, prefix, token=server.root_token, ca_cert=str(server.ca_cert)
        )
        system_store = make_backend(server.addr, prefix, token=server.root_token)
        try:
            key = good.create_key(KeySpec("tls", 1, KeyType.ED25519))
            _sign(good, key)
            assert good.status().ok
            with pytest.raises(BackendError, match="TLS"):  # the dev CA is not in the system store
                _sign(system_store, key)
            assert system_store.status().detail == "TLS verification failed"
        finally:
            good.close()
            system_store.close()


def test_a_name_transit_cannot_hold_is_refused_before_vault_is_asked(openbao_server, prefix):
    """Transit names end with a letter, digit or `_`; kmsgate's may end with `.` or `-`:
    those are 400, not Vault's "unsupported path" as a 502."""
    backend = make_backend(openbao_server.addr, prefix, token=openbao_server.root_token)
    try:
        for name in ("tr.", "a.b-", "Tr-"):
            with pytest.raises(InvalidRequest, match="cannot name a Transit key"):
                backend.create_key(KeySpec(name, 1, KeyType.ED25519))
        for name in ("t_", "a.b-c", "x"):
            _sign(backend, backend.create_key(KeySpec(name, 1, KeyType.ED25519)))
    finally:
        backend.close()


def test_a_key_made_exportable_outside_kmsgate_is_used_no_more(openbao_server, prefix):
    """kmsgate creates no exportable key; one made so in Vault (irreversibly) may have left
    it: wrapping with it (from its first use in a process) and rotating it are refused, the
    rotation said so in a garbled message ("is ecdsa-p256 and exportable, not ecdsa-p256")."""
    setup = make_backend(openbao_server.addr, prefix, token=openbao_server.root_token)
    try:
        aes = setup.create_key(KeySpec("expo-aes", 1, KeyType.AES_256_GCM))
        setup.create_key(KeySpec("expo", 1, KeyType.ED25519))
    finally:
        setup.close()
    for made in ("expo", "expo-aes"):
        openbao_server.client().adapter.post(
            f"/v1/transit/keys/{prefix}{made}/config", json={"exportable": True}
        )
    backend = make_backend(openbao_server.addr, prefix, token=openbao_server.root_token)
    try:
        with pytest.raises(BackendError, match="made exportable outside kmsgate"):
            backend.wrap(aes, b"data key", b"aad")
        with pytest.raises(BackendError, match=f"Transit key '{prefix}expo' was made exportable"):
            backend.create_key(KeySpec("expo", 2, KeyType.ED25519))
    finally:
        backend.close()


def test_a_key_made_exportable_after_its_first_use_signs_and_macs_no_more(
    openbao_server, prefix, monkeypatch
):
    """A key made exportable while kmsgate uses it: once its cached description is older
    than INFO_MAX_AGE_SECONDS (a minute; here at once), signatures and MACs are refused
    too, in a process that has used the key all along."""
    backend = make_backend(openbao_server.addr, prefix, token=openbao_server.root_token)
    try:
        signer = backend.create_key(KeySpec("late", 1, KeyType.ECDSA_P256))
        macer = backend.create_key(KeySpec("late-mac", 1, KeyType.HMAC_SHA256))
        alg = SIGN_ALGORITHMS["ecdsa-sha256"]
        backend.sign(signer, MESSAGE, alg, prehashed=False)
        backend.mac(macer, MESSAGE, HashName.SHA256)
        for made in ("late", "late-mac"):
            openbao_server.client().adapter.post(
                f"/v1/transit/keys/{prefix}{made}/config", json={"exportable": True}
            )
        backend.sign(signer, MESSAGE, alg, prehashed=False)  # the description still serves
        monkeypatch.setattr(vault_client, "INFO_MAX_AGE_SECONDS", 0.0)
        with pytest.raises(BackendError, match="made exportable outside kmsgate"):
            backend.sign(signer, MESSAGE, alg, prehashed=False)
        with pytest.raises(BackendError, match="made exportable outside kmsgate"):
            backend.mac(macer, MESSAGE, HashName.SHA256)
    finally:
        backend.close()


def test_transit_versions_kmsgate_did_not_keep_never_stop_rotations(
    vault_gateway, openbao_server, prefix
):
    """Rotations at once (the catalogue keeps one, the rest are 409) or whose reply came
    after the request timed out leave Transit versions no kmsgate version uses, as three
    rotations made in Transit directly do here. The key still rotates, the new version
    signing with Transit's newest, and `min_decrypt_version` retires by it (before,
    Transit ahead of kmsgate's numbers made every later rotation a 502 for good)."""
    api, admin, _ = vault_gateway
    create_key(api, admin, "race", "ecdsa-p256")
    with ThreadPoolExecutor(6) as pool:
        rotate = functools.partial(api.call, "POST", "/v1/keys/race/rotate", admin)
        statuses = [reply.status_code for reply in pool.map(lambda _: rotate(), range(6))]
    assert set(statuses) <= {200, 409} and 200 in statuses, statuses
    for _ in range(3):
        openbao_server.client().adapter.post(f"/v1/transit/keys/{prefix}race/rotate")
    r = api.call("POST", "/v1/keys/race/rotate", admin)
    assert r.status_code == 200, r.text
    newest = r.json()["primary_version"]
    transit = transit_key(openbao_server, f"{prefix}race")
    pem = api.call("GET", f"/v1/keys/race/public-key?version={newest}", admin).content
    assert same_public_key(pem, transit["keys"][str(transit["latest_version"])]["public_key"])
    signed = api.call("POST", "/v1/keys/race/sign", admin, json={"input": b64(MESSAGE)}).json()
    assert signed["key_version"] == newest
    serialization.load_pem_public_key(pem).verify(
        unb64(signed["signature"]), MESSAGE, ec.ECDSA(hashes.SHA256())
    )
    patched = api.call("PATCH", "/v1/keys/race", admin, json={"min_decrypt_version": newest})
    assert patched.status_code == 200, patched.text
    retired = transit_key(openbao_server, f"{prefix}race")["min_decryption_version"]
    assert retired == transit["latest_version"]


def test_a_create_whose_reply_is_lost_takes_the_key_it_made(
    vault_gateway, openbao_server, prefix, monkeypatch
):
    """Vault makes the Transit key, and the reply never comes back (a connection cut):
    the create sees the key at its first version and takes it, where before it was a 503
    and every retry a 409 (the name blocked for good, the Transit key kmsgate's own)."""
    api, admin, backend = vault_gateway
    call = backend._vault.call

    def reply_lost(method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        result = call(method, path, *args, **kwargs)
        if method == "POST" and path.endswith(f"/keys/{prefix}lost"):
            raise BackendUnavailable("connection cut")  # after Vault made the key
        return result

    monkeypatch.setattr(backend._vault, "call", reply_lost)
    created = api.call(
        "POST",
        "/v1/keys",
        admin,
        json={"name": "lost", "type": "ecdsa-p256", "purpose": "p", "backend": "vault"},
    )
    assert created.status_code == 201, created.text
    transit = transit_key(openbao_server, f"{prefix}lost")
    pem = api.call("GET", "/v1/keys/lost/public-key", admin).content
    assert same_public_key(pem, transit["keys"]["1"]["public_key"])
    signed = api.call("POST", "/v1/keys/lost/sign", admin, json={"input": b64(MESSAGE)}).json()
    serialization.load_pem_public_key(pem).verify(
        unb64(signed["signature"]), MESSAGE, ec.ECDSA(hashes.SHA256())
    )


def test_a_create_that_loses_a_race_leaves_the_winners_transit_key(
    vault_gateway, openbao_server, prefix, monkeypatch
):
    """Two requests create one name: both find no Transit key and POST it (Transit creates
    it once and answers both alike), one commits. The other is told 409, and its undo
    leaves the Transit key that the winner's key is: the winner goes on signing."""
    api, admin, backend = vault_gateway
    create_key(api, admin, "race", "aes-256-gcm", "envelope-data")
    sealed = api.call("POST", "/v1/keys/race/encrypt", admin, json={"plaintext": b64(MESSAGE)})
    assert sealed.status_code == 200, sealed.text
    # what the loser read before the winner committed and POSTed: no key, no Transit key
    catalogue, find, read = (
        api.service.catalogue,
        api.service.catalogue.find,
        backend._vault.read_info,
    )
    unseen, stale = [None], [None]
    monkeypatch.setattr(catalogue, "find", lambda n: unseen.pop() if unseen else find(n))
    monkeypatch.setattr(
        backend._vault, "read_info", lambda m, n: stale.pop() if stale else read(m, n)
    )
    body = {"name": "race", "type": "aes-256-gcm", "purpose": "envelope-data", "backend": "vault"}
    lost = api.call("POST", "/v1/keys", admin, json=body)
    assert lost.status_code == 409, lost.text
    assert not stale  # the loser did get past its existence check
    assert transit_key(openbao_server, f"{prefix}race")["latest_version"] == 1
    opened = api.call(
        "POST", "/v1/keys/race/decrypt", admin, json={"ciphertext": sealed.json()["ciphertext"]}
    )
    assert opened.status_code == 200, opened.text
    assert unb64(opened.json()["plaintext"]) == MESSAGE


def test_a_transit_key_replaced_outside_kmsgate_signs_nothing(
    vault_gateway, openbao_server, prefix
):
    """The Transit key behind a kmsgate key is deleted and made again under its name (a
    restore, a mistake): Transit signs with the new key, which the key's published public
    key does not verify. kmsgate checks the signature and withholds it (502)."""
    api, admin, _ = vault_gateway
    create_key(api, admin, "swap", "ecdsa-p256")
    item = {"input": b64(MESSAGE)}
    assert api.call("POST", "/v1/keys/swap/sign", admin, json=item).status_code == 200
    vault = openbao_server.client().adapter
    vault.post(f"/v1/transit/keys/{prefix}swap/config", json={"deletion_allowed": True})
    vault.delete(f"/v1/transit/keys/{prefix}swap")
    vault.post(f"/v1/transit/keys/{prefix}swap", json={"type": "ecdsa-p256"})
    r = api.call("POST", "/v1/keys/swap/sign", admin, json=item)
    assert r.status_code == 502, r.text
    assert r.json()["code"] == "backend_error" and "signature" not in r.json()
    assert "does not verify" in r.json()["detail"]


def test_status_reports_unreachable_without_backend_text():
    from tests.components import free_port

    backend = make_backend(f"http://127.0.0.1:{free_port()}", "x-", token="s.not-used", timeout=1)
    try:
        status = backend.status()
        assert (status.ok, status.detail) == (False, "unreachable")
        with pytest.raises(BackendUnavailable) as caught:
            backend.mac(
                BackendKey("hashivault:transit/x-m#1", KeyType.HMAC_SHA256, "m", 1),
                b"x",
                HashName.SHA256,
            )
        assert caught.value.status == 503 and "127.0.0.1" not in caught.value.detail
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "exactly one of token, token_file, approle, kubernetes"),
        ({"token": "s.SECRET-VALUE", "token_file": "/x"}, "exactly one of"),
        ({"token": "s.SECRET-VALUE", "addr": "vault:8200"}, "addr"),
        ({"token": "s.SECRET-VALUE", "mount": "../sys"}, "mount"),
        ({"token": "s.SECRET-VALUE", "unknown": 1}, "unknown"),
        ({"token_file": "/nonexistent/token"}, "cannot read token file"),
        (
            {"approle": {"role_id": "r", "secret_id": "s.SECRET-VALUE", "secret_id_file": "/x"}},
            "exactly one of secret_id",
        ),
        (
            {"kubernetes": {"role": "kmsgate"}, "client_cert": "/c.pem"},
            "client_cert and client_key",
        ),
    ],
)
def test_config_errors_never_echo_secrets(extra, message):
    cfg = {"type": "hashivault", "addr": "https://vault.example:8200", **extra}
    with pytest.raises(ConfigError, match=message) as caught:
        HashiVaultBackend.from_config("vault", BackendSettings(**cfg))
    assert "SECRET-VALUE" not in str(caught.value)


def test_a_token_file_replaced_by_an_exposed_one_gives_502_not_500(
    openbao_server, prefix, tmp_path: Path
) -> None:
    """The token file is re-read after a 403: one rewritten readable by others (a careless
    rotation) is refused then, as at start-up, and the request gets 502, never 500."""
    root = openbao_server.client()
    first = root.auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
    path = token_file(tmp_path, first)
    backend = make_backend(openbao_server.addr, prefix, token_file=str(path))
    try:
        key = backend.create_key(KeySpec("tf", 1, KeyType.ED25519))
        second = root.auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
        path.write_text(second + "\n")
        path.chmod(0o644)
        root.auth.token.revoke(first)
        with pytest.raises(BackendError, match="cannot authenticate"):
            _sign(backend, key)
        path.chmod(0o600)  # mended: the next call reads it and signs
        _sign(backend, key)
    finally:
        backend.close()


def test_a_token_file_or_client_key_others_can_read_is_refused(tmp_path: Path) -> None:
    """Anyone who reads kmsgate's Vault token signs and decrypts with its Transit keys,
    unaudited: a token file (and a TLS client key) must be the gateway user's alone."""
    token = tmp_path / "vault-token"
    token.write_text("s.SECRET-VALUE\n")
    token.chmod(0o644)
    cfg = {"type": "hashivault", "addr": "https://vault.example:8200"}
    with pytest.raises(ConfigError, match=f"token file {token} must not be accessible"):
        HashiVaultBackend.from_config("vault", BackendSettings(**cfg, token_file=str(token)))
    key = tmp_path / "client.key"
    key.write_text("not read past its mode")
    key.chmod(0o604)
    tls = {"client_cert": str(tmp_path / "client.pem"), "client_key": str(key)}
    with pytest.raises(ConfigError, match=f"client_key file {key} must not be accessible"):
        HashiVaultBackend.from_config("vault", BackendSettings(**cfg, token="t", **tls))


@pytest.mark.parametrize(
    "addr",
    [
        "http://10.1.2.3:8200",
        "http://vault.example:8200",
        "http://[2001:db8::1]:8200",
        "http://localhost.example:8200",
    ],
)
def test_plain_http_to_a_non_loopback_host_is_refused(addr):
    """Every Vault request carries the token: http:// only to a loopback host."""
    cfg = {"type": "hashivault", "addr": addr, "token": "s.SECRET-VALUE"}
    with pytest.raises(ConfigError, match=r"addr: refusing plain http://.*use https://") as caught:
        HashiVaultBackend.from_config("vault", BackendSettings(**cfg))
    assert "SECRET-VALUE" not in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "addr",
    [
        "http://127.0.0.1:8200",
        "http://127.1.2.3:8200",
        "http://[::1]:8200",
        "http://localhost:8200",
        "https://10.1.2.3:8200",
        "https://vault.example:8200",
    ],
)
def test_https_or_plain_http_to_loopback_is_accepted(addr):
    backend = HashiVaultBackend.from_config(
        "vault", BackendSettings(type="hashivault", addr=addr, token="s.not-used")
    )
    backend.close()


def test_cli_refuses_plain_http_vault_with_a_one_line_error(tmp_path):
    from tests.test_cli import assert_one_line_error, clean_env, run_cli

    config = tmp_path / "kmsgate.yaml"
    config.write_text(
        'backends:\n  vault: {type: hashivault, addr: "http://10.1.2.3:8200", token: s.x}\n'
    )
    data_dir = tmp_path / "d"
    refused = run_cli(
        ("serve", "--dev", "--data-dir", str(data_dir), "--config", str(config)), clean_env()
    )
    assert_one_line_error(refused, "backend 'vault'", "refusing plain http:// to 10.1.2.3", rc=2)


# --------------------------------------------------------------------------------------------
# natural batching (coalescing of concurrent calls)
# --------------------------------------------------------------------------------------------


def test_coalescer_stress_each_caller_gets_its_own_results():
    """64 threads x 40 calls of 1-5 items on 3 keys, through a fake `send` that checks the
    in-flight bound, fails whole batches that carry a poison item, and answers item by item.
    Every caller must get exactly its own results (or its batch's error), nobody hangs."""
    import random
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from kmsgate.backends.hashivault.coalescer import _Coalescer

    max_inflight, max_items = 2, 16
    coalescer = _Coalescer(max_items, max_inflight)
    lock = threading.Lock()
    inflight: dict[str, int] = {}
    peak: dict[str, int] = {}
    sizes: list[int] = []

    def sender(key: str):
        def send(inputs):
            with lock:
                inflight[key] = inflight.get(key, 0) + 1
                peak[key] = max(peak.get(key, 0), inflight[key])
                sizes.append(len(inputs))
            time.sleep(random.uniform(0, 0.002))
            with lock:
                inflight[key] -= 1
            if b"poison" in inputs:
                raise BackendError("batch failed")
            return [
                BackendError("item") if x == b"bad" else key.encode() + b":" + x for x in inputs
            ]

        return send

    def caller(n: int) -> int:
        rng = random.Random(n)
        done = 0
        for call in range(40):
            key = f"k{rng.randrange(3)}"
            inputs = [f"{n}.{call}.{i}".encode() for i in range(rng.randint(1, 5))]
            if rng.random() < 0.02:
                inputs.append(b"poison")
            if rng.random() < 0.05:
                inputs[0] = b"bad"
            try:
                results = coalescer.run(key, inputs, sender(key))
            except BackendError as exc:
                assert exc.detail == "batch failed"  # the whole request failed, not an item
                done += 1
                continue
            assert b"poison" not in inputs
            for x, r in zip(inputs, results, strict=True):
                if x == b"bad":
                    assert isinstance(r, BackendError)
                else:
                    assert r == key.encode() + b":" + x
            done += 1
        return done

    with ThreadPoolExecutor(64) as pool:
        futures = [pool.submit(caller, n) for n in range(64)]
        assert sum(f.result(timeout=60) for f in futures) == 64 * 40
    assert max(peak.values()) <= max_inflight
    assert max(sizes) <= max_items
    assert len(sizes) < 64 * 40  # concurrent calls were merged
    assert not coalescer._queues and not coalescer._inflight  # nothing left behind


def test_concurrent_single_signs_share_vault_requests(openbao_server, prefix):
    """32 threads x 15 single signs on one key: every signature verifies, and OpenBao's audit
    log shows fewer sign requests than signatures (they were batched), never more."""
    from concurrent.futures import ThreadPoolExecutor

    backend = make_backend(openbao_server.addr, prefix, token=openbao_server.root_token)
    try:
        key = backend.create_key(KeySpec("c", 1, KeyType.ECDSA_P256))
        public = serialization.load_pem_public_key(key.public_key_pem.encode())
        alg = SIGN_ALGORITHMS["ecdsa-sha256"]
        start, _ = count_audit_requests(openbao_server.audit_log)

        def work(n: int) -> list[tuple[bytes, bytes]]:
            out = []
            for i in range(15):
                message = f"{n}/{i}".encode()
                out.append((message, backend.sign(key, message, alg, prehashed=False)))
            return out

        with ThreadPoolExecutor(32) as pool:
            signed = [pair for chunk in pool.map(work, range(32)) for pair in chunk]
        _, paths = count_audit_requests(openbao_server.audit_log, start)
        assert len(signed) == 480
        for message, signature in signed:
            public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        sign_requests = [p for p in paths if p.startswith("transit/sign/")]
        print(f"\n480 concurrent single signs: {len(sign_requests)} Vault sign requests")
        assert len(sign_requests) < 480
    finally:
        backend.close()


# --------------------------------------------------------------------------------------------
# Kubernetes service-account login
# --------------------------------------------------------------------------------------------


def _es256_jwt(private: ec.EllipticCurvePrivateKey, claims: dict[str, Any]) -> str:
    import json as json_

    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = (
        part(json_.dumps({"alg": "ES256", "typ": "JWT"}).encode())
        + "."
        + part(json_.dumps(claims).encode())
    )
    r, s = decode_dss_signature(private.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return signing_input + "." + part(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def _throwaway_ca_pem() -> str:
    _, cert = self_signed("stand-in kubernetes CA", ca=True)
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@contextlib.contextmanager
def token_review_api(valid_tokens: set[str]) -> Iterator[tuple[str, list[str]]]:
    """A loopback stand-in for the Kubernetes TokenReview API (the only part of Kubernetes
    OpenBao calls at login): a token is authenticated iff it is in `valid_tokens`."""
    import json as json_
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    reviewed: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json_.loads(self.rfile.read(int(self.headers["Content-Length"])))
            token = body["spec"]["token"]
            reviewed.append(token)
            ok = (
                self.path == "/apis/authentication.k8s.io/v1/tokenreviews" and token in valid_tokens
            )
            status: dict[str, Any] = {"authenticated": ok}
            if ok:
                status["user"] = {
                    "username": "system:serviceaccount:kmsgate:kmsgate",
                    "uid": "sa-uid-1",
                }
                status["audiences"] = body["spec"].get("audiences") or []
            reply = json_.dumps(
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}
            ).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", reviewed
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_kubernetes_service_account_login_rereads_the_projected_token(
    tmp_path, openbao_server, prefix
):
    signer = ec.generate_private_key(ec.SECP256R1())
    claims = {
        "iss": "kubernetes/serviceaccount",
        "sub": "system:serviceaccount:kmsgate:kmsgate",
        "kubernetes.io/serviceaccount/namespace": "kmsgate",
        "kubernetes.io/serviceaccount/service-account.name": "kmsgate",
        "kubernetes.io/serviceaccount/service-account.uid": "sa-uid-1",
    }
    first, second = _es256_jwt(signer, {**claims, "n": 1}), _es256_jwt(signer, {**claims, "n": 2})
    forged = _es256_jwt(ec.generate_private_key(ec.SECP256R1()), claims)
    root = openbao_server.client()
    mount, policy = f"k8s-{prefix.rstrip('-')}", f"transit-{prefix}"
    root.sys.create_or_update_policy(policy, TRANSIT_POLICY)
    root.sys.enable_auth_method("kubernetes", path=mount)
    pem = signer.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with token_review_api({first, second}) as (k8s_api, reviewed):
        root.adapter.post(
            f"/v1/auth/{mount}/config",
            json={
                "kubernetes_host": k8s_api,
                "kubernetes_ca_cert": _throwaway_ca_pem(),  # required; unused over http
                "pem_keys": [pem.decode()],
                "disable_local_ca_jwt": True,
                "token_reviewer_jwt": "reviewer-token",
            },
        )
        root.adapter.post(
            f"/v1/auth/{mount}/role/kmsgate",
            json={
                "bound_service_account_names": ["kmsgate"],
                "bound_service_account_namespaces": ["kmsgate"],
                "token_policies": [policy],
                "token_ttl": "10m",
            },
        )
        jwt_file = tmp_path / "sa-token"
        jwt_file.write_text(first)
        backend = make_backend(
            openbao_server.addr,
            prefix,
            kubernetes={"role": "kmsgate", "jwt_file": str(jwt_file), "mount": mount},
        )
        try:
            key = backend.create_key(KeySpec("k8s", 1, KeyType.ED25519))
            _sign(backend, key)
            assert reviewed == [first]
            jwt_file.write_text(second)  # the kubelet rotated the projected token
            root.auth.token.revoke(backend._vault.hvac.token)
            _sign(backend, key)  # 403 -> log in again with the new token
            assert reviewed == [first, second]
            jwt_file.write_text(forged)  # signed by another key: OpenBao itself refuses it
            root.auth.token.revoke(backend._vault.hvac.token)
            with pytest.raises(BackendError):
                _sign(backend, key)
            assert forged not in reviewed
        finally:
            backend.close()


# --------------------------------------------------------------------------------------------
# the least-privilege policy printed in docs/backends/hashivault.md
# --------------------------------------------------------------------------------------------


def _documented_policy() -> str:
    doc = (Path(__file__).parent.parent / "docs/backends/hashivault.md").read_text()
    block = doc.split("<!-- policy:begin -->", 1)[1].split("<!-- policy:end -->", 1)[0]
    return block.split("```hcl", 1)[1].split("```", 1)[0]


def test_documented_policy_is_enough_for_a_whole_lifecycle(openbao_server, prefix):
    root = openbao_server.client()
    policy = f"kmsgate-doc-{prefix}"
    root.sys.create_or_update_policy(policy, _documented_policy())
    token = root.auth.token.create(policies=[policy], ttl="10m")["auth"]["client_token"]
    backend = make_backend(openbao_server.addr, "kmsgate-", token=token)  # the documented prefix
    try:
        assert backend.status().ok
        s1 = backend.create_key(KeySpec(f"{prefix}sig", 1, KeyType.ECDSA_P256))
        s2 = backend.create_key(KeySpec(f"{prefix}sig", 2, KeyType.ECDSA_P256))
        alg = SIGN_ALGORITHMS["ecdsa-sha256"]
        for key in (s1, s2):
            sig = backend.sign(key, MESSAGE, alg, prehashed=False)
            serialization.load_pem_public_key(key.public_key_pem.encode()).verify(
                sig, MESSAGE, ec.ECDSA(hashes.SHA256())
            )
        m = backend.create_key(KeySpec(f"{prefix}mac", 1, KeyType.HMAC_SHA384))
        assert backend.verify_mac(
            m, MESSAGE, backend.mac(m, MESSAGE, HashName.SHA384), HashName.SHA384
        )
        w1 = backend.create_key(KeySpec(f"{prefix}aes", 1, KeyType.AES_256_GCM))
        w2 = backend.create_key(KeySpec(f"{prefix}aes", 2, KeyType.AES_256_GCM))
        assert backend.unwrap(w2, backend.wrap(w2, b"dek", b"aad"), b"aad") == b"dek"
        backend.retire_versions_below(w2)
        for key in (s1, s2, m, w1, w2):  # as Keys.destroy_due does, oldest first
            backend.destroy(key)
        for name in ("sig", "mac", "aes"):
            with pytest.raises(hvac.exceptions.InvalidPath):
                transit_key(openbao_server, f"kmsgate-{prefix}{name}")
        with pytest.raises(KeyDestroyed):
            backend.wrap(w2, b"dek", b"")
        # without "create" on encrypt, Transit cannot upsert the destroyed key back
        with pytest.raises((hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest)):
            openbao_server.client(token=token).adapter.post(
                f"/v1/transit/encrypt/kmsgate-{prefix}aes", json={"plaintext": b64(b"x")}
            )
        with pytest.raises(hvac.exceptions.InvalidPath):
            transit_key(openbao_server, f"kmsgate-{prefix}aes")
    finally:
        backend.close()


def test_a_transit_key_deleted_outside_kmsgate_is_destroyed_to_encrypt_too(openbao_server, prefix):
    """Encrypt with a Transit key deleted behind kmsgate's back, after its description was
    cached: Transit takes the encrypt as an upsert, which the documented policy refuses
    (403). That is the key gone (409 key_destroyed, as decrypt and sign say), not
    kmsgate's credentials refused."""
    root = openbao_server.client()
    policy = f"kmsgate-doc-{prefix}"
    root.sys.create_or_update_policy(policy, _documented_policy())
    token = root.auth.token.create(policies=[policy], ttl="10m")["auth"]["client_token"]
    backend = make_backend(openbao_server.addr, "kmsgate-", token=token)
    try:
        key = backend.create_key(KeySpec(f"{prefix}gone", 1, KeyType.AES_256_GCM))
        backend.wrap(key, b"dek", b"aad")  # the description is cached now
        name = f"/v1/transit/keys/kmsgate-{prefix}gone"
        root.adapter.post(f"{name}/config", json={"deletion_allowed": True})
        root.adapter.delete(name)
        with pytest.raises(KeyDestroyed):
            backend.wrap(key, b"dek", b"aad")
        with pytest.raises(hvac.exceptions.InvalidPath):
            transit_key(openbao_server, f"kmsgate-{prefix}gone")
    finally:
        backend.close()


def test_patching_min_decrypt_version_retires_transit_versions(
    vault_gateway, openbao_server, prefix
):
    """Raising the minimum retires the older versions in Transit too; lowering it again
    brings them back there too (a version-1 ciphertext used to fail as "decryption failed"
    while kmsgate showed version 1 usable)."""
    api, admin, _ = vault_gateway
    create_key(api, admin, "retire", "aes-256-gcm")
    sealed = api.call("POST", "/v1/keys/retire/encrypt", admin, json={"plaintext": b64(b"v1")})
    assert sealed.status_code == 200, sealed.text
    body = {"ciphertext": sealed.json()["ciphertext"]}
    assert api.call("POST", "/v1/keys/retire/rotate", admin).status_code == 200
    r = api.call("PATCH", "/v1/keys/retire", admin, json={"min_decrypt_version": 2})
    assert r.status_code == 200, r.text
    assert r.json()["min_decrypt_version"] == 2
    assert transit_key(openbao_server, f"{prefix}retire")["min_decryption_version"] == 2
    assert api.call("POST", "/v1/keys/retire/decrypt", admin, json=body).status_code == 409
    r = api.call("PATCH", "/v1/keys/retire", admin, json={"min_decrypt_version": 1})
    assert r.status_code == 200, r.text
    assert transit_key(openbao_server, f"{prefix}retire")["min_decryption_version"] == 1
    opened = api.call("POST", "/v1/keys/retire/decrypt", admin, json=body)
    assert opened.status_code == 200 and unb64(opened.json()["plaintext"]) == b"v1"


def test_a_mount_without_transit_is_named_not_a_key_gone(openbao_server):
    """Vault answers 'no handler for route' when nothing is mounted at `mount`: creating a
    key says to enable Transit there, and a key of that mount is not reported destroyed."""
    backend = make_backend(
        openbao_server.addr, "t-", token=openbao_server.root_token, mount="nothing-here"
    )
    try:
        for attempt in (
            lambda: backend.create_key(KeySpec("k", 1, KeyType.ED25519)),
            lambda: _sign(
                backend, BackendKey("hashivault:nothing-here/t-k#1", KeyType.ED25519, "k", 1)
            ),
        ):
            with pytest.raises(
                BackendError,
                match=r"no secrets engine at nothing-here/ \(for keys: bao secrets enable",
            ):
                attempt()
    finally:
        backend.close()


@contextlib.contextmanager
def _hung_server() -> Iterator[str]:
    """The address of a server that takes connections and never answers (a Vault frozen
    mid-request)."""
    listener = socket.create_server((LOOPBACK, 0), backlog=256)
    try:
        yield f"http://{LOOPBACK}:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_a_hung_vault_slows_neither_other_keys_nor_readiness_callers(tmp_path: Path) -> None:
    """Vault taking connections and never answering (timeout 3 s): 64 unauthenticated
    readiness callers at once share one round of checks (each answer within about one
    timeout, naming the backend), and meanwhile a local key is read and created at once
    (before, every caller ran its own checks in the shared thread pool, and a local key's
    read waited seconds behind them)."""
    with _hung_server() as addr:
        config = tmp_path / "kmsgate.yaml"
        vault = vault_config(addr, "kmsgate-", token="hvs.never-used", timeout=3)
        config.write_text(json.dumps({"backends": {"local": {"type": "softkms"}, "vault": vault}}))
        with running_gateway(tmp_path, "--config", str(config)) as gw:
            auth = {"authorization": f"Bearer {gw.root_token}"}
            with httpx.Client(base_url=gw.addr, headers=auth, timeout=30) as client:
                body = {"name": "near", "type": "ecdsa-p256", "purpose": "p"}
                assert client.post("/v1/keys", json=body).status_code == 201

                def ready(_: int) -> tuple[int, float, str]:
                    started = time.monotonic()
                    reply = httpx.get(f"{gw.addr}/v1/sys/ready", timeout=30)
                    detail = reply.json()["backends"]["vault"]["detail"]
                    return reply.status_code, time.monotonic() - started, detail

                with ThreadPoolExecutor(64) as pool:
                    waiting = pool.map(ready, range(64))
                    time.sleep(1.0)  # the readiness round is under way
                    started = time.monotonic()
                    assert client.get("/v1/keys/near").status_code == 200
                    body = {"name": "nearer", "type": "ecdsa-p256", "purpose": "p"}
                    assert client.post("/v1/keys", json=body).status_code == 201
                    local = time.monotonic() - started
                    answers = list(waiting)
            assert local < 1.0, local
            assert {(status, detail) for status, _, detail in answers} == {(503, "unreachable")}
            assert max(seconds for _, seconds, _ in answers) < 8, answers
