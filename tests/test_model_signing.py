"""`kmsgate model sign/verify` against a real gateway, judged by the stock model_signing.

A module-scoped `kmsgate serve --dev` (real uvicorn, see tests/test_cli.py) signs; the stock
`model_signing` 1.1 Python API and CLI verify the bundles with the PEM public key. Every test
uses its own key and a small generated model (nested dirs, a hidden file, git files, names
whose string order differs from path order).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from kmsgate.cli.model import model_app
from kmsgate.client import ApiError, Client
from kmsgate.model_signing import (
    BuildInfo,
    Failure,
    GatewaySigner,
    GatewayTrust,
    ManifestError,
    ModelVerificationError,
    PublicKeyTrust,
    SigningError,
    TrustBundle,
    VerifyOptions,
    export_trust_bundle,
    require_verified,
    sign_model,
    verify_model,
)
from kmsgate.model_signing import manifest as mf
from kmsgate.model_signing import sign as signing
from kmsgate.model_signing.bundle import BundleError, SignedBundle, pae
from kmsgate.model_signing.manifest import hash_files
from kmsgate.model_signing.provenance import parse_time
from kmsgate.text import utc_timestamp
from tests.components import require_component
from tests.test_cli import Gateway, running_gateway

try:
    import model_signing
except ImportError:  # pragma: no cover - CI installs it (dev extra)
    require_component("model_signing", "pip install model-signing (the stock verifier)")
pytestmark = pytest.mark.timeout(120)

STOCK_CLI = [sys.executable, "-m", "model_signing"]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("gateway")) as gateway:
        yield gateway


@pytest.fixture
def client(gw: Gateway) -> Iterator[Client]:
    with Client(gw.addr, gw.root_token) as c:
        yield c


_counter = iter(range(10_000))


@pytest.fixture
def key(client: Client) -> str:
    name = f"model-key-{next(_counter)}"
    client.create_key(name, "ecdsa-p256", "model-sign")
    return name


def make_model(root: Path) -> Path:
    model = root / "my-model"
    files = {
        "config.json": b'{"layers": 2}\n',
        "weights/layer-0.bin": os.urandom(200_000),
        "weights/layer-1.bin": os.urandom(70_000),
        "a/b": b"nested",
        "a-b": b"dash sorts before slash as a string",
        "tokenizer/vocab/.hidden": b"hidden file",
        "empty.txt": b"",
        ".gitignore": b"*.pyc\n",
    }
    for name, data in files.items():
        path = model / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return model


def pem_file(tmp_path: Path, pem: str, name: str = "pub.pem") -> Path:
    path = tmp_path / name
    path.write_text(pem)
    return path


def stock_api_verify(model: Path, bundle: Path, pub: Path) -> None:
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=pub).verify(model, bundle)


def stock_cli_verify(model: Path, bundle: Path, pub: Path) -> subprocess.CompletedProcess[str]:
    args = ["verify", "key", str(model), "--signature", str(bundle), "--public_key", str(pub)]
    return subprocess.run(
        [*STOCK_CLI, *args], capture_output=True, text=True, timeout=60, check=False
    )


def flip_byte(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_stock_model_signing_verifies_and_catches_one_flipped_byte(
    tmp_path: Path, client: Client, key: str
) -> None:
    model = make_model(tmp_path)
    result = sign_model(model, GatewaySigner(client, key))
    pub = pem_file(tmp_path, result.public_key_pem)

    stock_api_verify(model, result.bundle_path, pub)
    run = stock_cli_verify(model, result.bundle_path, pub)
    assert run.returncode == 0, run.stderr
    assert "Verification succeeded" in run.stdout
    report = verify_model(model, result.bundle_path, PublicKeyTrust.from_pem(result.public_key_pem))
    assert report.ok and report.files == 8  # 7 model files + checksums.json (.gitignore ignored)

    flip_byte(model / "weights/layer-1.bin", 12_345)
    with pytest.raises(ValueError, match="Hash mismatch for") as stock_error:
        stock_api_verify(model, result.bundle_path, pub)
    # the message is a repr (its quoting depends on the digest bytes): look for the name only
    assert "weights/layer-1.bin" in str(stock_error.value)
    run = stock_cli_verify(model, result.bundle_path, pub)
    assert run.returncode == 1 and "weights/layer-1.bin" in run.stderr
    with pytest.raises(ModelVerificationError) as info:
        verify_model(model, result.bundle_path, PublicKeyTrust.from_pem(result.public_key_pem))
    assert info.value.failure is Failure.DIGEST_MISMATCH
    assert info.value.report.integrity["mismatched"] == ["weights/layer-1.bin"]


def test_bundle_follows_model_signing_format(tmp_path: Path, client: Client, key: str) -> None:
    model = make_model(tmp_path)
    out = tmp_path / "out" / "signature.json"
    out.parent.mkdir()
    result = sign_model(model, GatewaySigner(client, key), bundle_path=out)
    doc = json.loads(out.read_text())
    assert doc["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    pem = result.public_key_pem.encode()
    assert doc["verificationMaterial"] == {
        "publicKey": {"hint": hashlib.sha256(pem).hexdigest()},
        "tlogEntries": [],
    }
    env = doc["dsseEnvelope"]
    assert env["payloadType"] == "application/vnd.in-toto+json"
    (sig,) = env["signatures"]
    assert sig["keyid"] == f"{key}:v1"
    payload = base64.b64decode(env["payload"])
    statement = json.loads(payload)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://model_signing/signature/v1.0"
    predicate = statement["predicate"]
    assert predicate["serialization"] == {
        "method": "files",
        "hash_type": "sha256",
        "allow_symlinks": False,
        "ignore_paths": [".git", ".gitattributes", ".github", ".gitignore"],
    }
    names = [r["name"] for r in predicate["resources"]]
    assert names == sorted(names, key=lambda n: PurePosixPath(n).parts)
    assert names.index("a/b") < names.index("a-b")  # path order, not string order
    expected = {
        str(p.relative_to(model).as_posix()): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in model.rglob("*")
        if p.is_file() and p.name != ".gitignore"
    }
    assert {r["name"]: r["digest"] for r in predicate["resources"]} == expected
    root = hashlib.sha256(b"".join(bytes.fromhex(r["digest"]) for r in predicate["resources"]))
    assert statement["subject"] == [{"name": "my-model", "digest": {"sha256": root.hexdigest()}}]
    # the DSSE signature verifies independently over the PAE
    public_key = serialization.load_pem_public_key(pem)
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(
        base64.b64decode(sig["sig"]),
        b"DSSEv1 28 application/vnd.in-toto+json %d " % len(payload) + payload,
        ec.ECDSA(hashes.SHA256()),
    )
    checksums = json.loads((model / "checksums.json").read_text())
    assert {f["path"]: f["sha256"] for f in checksums["files"]} == {
        k: v for k, v in expected.items() if k != "checksums.json"
    }


def test_pae_matches_dsse_spec_example() -> None:
    # github.com/secure-systems-lab/dsse protocol.md (test vector):
    # "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_missing_extra_wrong_key_and_bad_signature(
    tmp_path: Path, client: Client, key: str
) -> None:
    model = make_model(tmp_path)
    result = sign_model(model, GatewaySigner(client, key))
    trust = PublicKeyTrust.from_pem(result.public_key_pem)
    pub = pem_file(tmp_path, result.public_key_pem)

    def failure() -> Failure:
        with pytest.raises(ModelVerificationError) as info:
            verify_model(model, result.bundle_path, trust)
        return info.value.failure

    (model / "extra.bin").write_bytes(b"x")
    assert failure() is Failure.EXTRA_FILES
    assert stock_cli_verify(model, result.bundle_path, pub).returncode == 1
    (model / "extra.bin").unlink()
    moved = (model / "a-b").read_bytes()
    (model / "a-b").unlink()
    assert failure() is Failure.MISSING_FILES
    assert stock_cli_verify(model, result.bundle_path, pub).returncode == 1
    (model / "a-b.renamed").write_bytes(moved)  # a rename: both names are reported
    with pytest.raises(ModelVerificationError) as renamed:
        verify_model(model, result.bundle_path, trust)
    assert renamed.value.failure is Failure.MISSING_FILES
    assert renamed.value.detail == "missing files: a-b; extra files: a-b.renamed"
    (model / "a-b.renamed").rename(model / "a-b")
    assert verify_model(model, result.bundle_path, trust).ok

    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(ModelVerificationError) as info:
        verify_model(model, result.bundle_path, PublicKeyTrust(other))
    assert info.value.failure is Failure.KEY_MISMATCH

    doc = json.loads(result.bundle_path.read_text())
    sig = bytearray(base64.b64decode(doc["dsseEnvelope"]["signatures"][0]["sig"]))
    sig[-1] ^= 1
    doc["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    result.bundle_path.write_text(json.dumps(doc))
    assert failure() is Failure.SIGNATURE
    result.bundle_path.write_text("{not json")
    assert failure() is Failure.FORMAT


@pytest.mark.parametrize("key_type", ["ecdsa-p384", "ed25519", "rsa-3072"])
def test_other_key_types(tmp_path: Path, client: Client, key_type: str) -> None:
    name = f"model-{key_type}-{next(_counter)}"
    client.create_key(name, key_type, "model-sign")
    model = make_model(tmp_path)
    result = sign_model(model, GatewaySigner(client, name))
    assert verify_model(
        model, result.bundle_path, PublicKeyTrust.from_pem(result.public_key_pem)
    ).ok
    if key_type == "ecdsa-p384":  # the stock verifier only takes EC keys
        assert result.algorithm == "ecdsa-sha384"
        stock_api_verify(model, result.bundle_path, pem_file(tmp_path, result.public_key_pem))
    flip_byte(model / "config.json")
    with pytest.raises(ModelVerificationError) as info:
        verify_model(model, result.bundle_path, PublicKeyTrust.from_pem(result.public_key_pem))
    assert info.value.failure is Failure.DIGEST_MISMATCH


def test_ignore_patterns_are_recorded_for_the_stock_verifier(
    tmp_path: Path, client: Client, key: str
) -> None:
    model = make_model(tmp_path)
    (model / "runs").mkdir()
    (model / "runs" / "events.out").write_bytes(b"tensorboard")
    (model / "train.log").write_text("log")
    result = sign_model(model, GatewaySigner(client, key), ignore=["*.log", "runs"])
    resources = {f.name for f in result.manifest.files}
    assert "train.log" not in resources and "runs/events.out" not in resources
    assert {"train.log", "runs"} <= set(result.manifest.ignore_paths)
    (model / "runs" / "events.out").write_bytes(b"changed after signing")
    pub = pem_file(tmp_path, result.public_key_pem)
    stock_api_verify(model, result.bundle_path, pub)
    assert verify_model(
        model, result.bundle_path, PublicKeyTrust.from_pem(result.public_key_pem)
    ).ok


def _mark_compromised(client: Client, key: str, version: int, since: datetime) -> None:
    client.key_action(key, f"versions/{version}/compromised", {"since": since.isoformat()})


def test_gateway_rejects_signature_made_after_compromise(
    tmp_path: Path, client: Client, key: str
) -> None:
    model = make_model(tmp_path)
    result = sign_model(model, GatewaySigner(client, key))
    trust = GatewayTrust(client, key)
    assert verify_model(model, result.bundle_path, trust).key_status["checked"] is True

    client.key_action(key, "rotate")
    # compromised since one minute before the signing time: the bundle must be rejected
    _mark_compromised(client, key, 1, result.signed_at - timedelta(minutes=1))
    with pytest.raises(ModelVerificationError) as info:
        verify_model(model, result.bundle_path, trust)
    assert info.value.failure is Failure.KEY_STATUS
    assert "compromised" in info.value.detail
    # without a token the public JWKS leaves the compromised version out: that is the
    # missing token's error (exit 2), not a key that does not match (exit 11)
    with Client(client.addr, anonymous=True) as anonymous, pytest.raises(ApiError) as refused:
        verify_model(model, result.bundle_path, GatewayTrust(anonymous, key))
    assert refused.value.status == 401
    # offline: the same verdict from an exported trust bundle
    bundle_file = tmp_path / "trust.json"
    bundle_file.write_text(json.dumps(export_trust_bundle(client, [key])))
    with pytest.raises(ModelVerificationError) as info:
        verify_model(model, result.bundle_path, TrustBundle.load(bundle_file))
    assert info.value.failure is Failure.KEY_STATUS
    # the stock verifier knows nothing about key status: it still accepts (documented)
    stock_api_verify(model, result.bundle_path, pem_file(tmp_path, result.public_key_pem))


def test_a_trust_bundle_listing_a_key_twice_holds_it_to_both_listings(
    tmp_path: Path, client: Client, key: str
) -> None:
    """The compromised version's public key is also in the trust bundle under another name
    (an imported copy, with no compromise marked), listed first: the bundle, its
    provenance removed (no signing time), is still refused. Before, the first listing whose
    hint matched decided, and the copy let the model through."""
    model = make_model(tmp_path)
    result = sign_model(model, GatewaySigner(client, key))
    client.key_action(key, "rotate")
    _mark_compromised(client, key, 1, result.signed_at - timedelta(minutes=1))
    doc = export_trust_bundle(client, [key])
    (listed,) = [v for v in doc["keys"][0]["versions"] if v["version"] == 1]
    copy = {**listed, "compromised_since": None}
    doubled = {**doc, "keys": [{"name": "a-copy", "versions": [copy]}, *doc["keys"]]}
    assert result.provenance_path is not None
    result.provenance_path.unlink()
    with pytest.raises(ModelVerificationError) as info:
        verify_model(model, result.bundle_path, TrustBundle.parse(doubled))
    assert info.value.failure is Failure.KEY_STATUS, info.value.detail
    assert f"{key} v1 is compromised" in info.value.detail


def test_signature_made_before_compromise_still_verifies(
    tmp_path: Path, client: Client, key: str
) -> None:
    model = make_model(tmp_path)
    result = sign_model(model, GatewaySigner(client, key))
    client.key_action(key, "rotate")
    _mark_compromised(client, key, 1, result.signed_at + timedelta(minutes=1))
    assert verify_model(model, result.bundle_path, GatewayTrust(client, key)).ok
    doc = export_trust_bundle(client, [key])
    assert verify_model(model, result.bundle_path, TrustBundle.parse(doc)).ok
    # without provenance there is no signing time: a compromised version is rejected
    assert result.provenance_path is not None
    result.provenance_path.unlink()
    with pytest.raises(ModelVerificationError) as info:
        verify_model(model, result.bundle_path, GatewayTrust(client, key))
    assert info.value.failure is Failure.KEY_STATUS


def test_trust_bundle_and_a_bundle_without_signing_time(
    tmp_path: Path, client: Client, key: str
) -> None:
    """Without a provenance there is no signing time: an exported trust bundle still accepts
    a version never compromised (nothing it signed predates its creation), and refuses one
    whose window an operator narrowed, or closed, or a compromised one."""
    model = make_model(tmp_path)
    result = sign_model(model, GatewaySigner(client, key))
    assert result.provenance_path is not None
    result.provenance_path.unlink()
    doc = export_trust_bundle(client, [key])
    version = doc["keys"][0]["versions"][0]
    assert version["created_at"] and version["not_before"] is None
    report = verify_model(model, result.bundle_path, TrustBundle.parse(doc))
    assert report.key_status["checked"] is True

    def refused(**window: str | None) -> str:
        changed = json.loads(json.dumps(doc))
        changed["keys"][0]["versions"][0].update(window)
        with pytest.raises(ModelVerificationError) as info:
            verify_model(model, result.bundle_path, TrustBundle.parse(changed))
        assert info.value.failure is Failure.KEY_STATUS
        return info.value.detail

    created = parse_time(version["created_at"])
    later, past = created + timedelta(seconds=1), created - timedelta(days=1)
    assert "not valid before" in refused(not_before=utc_timestamp(later))
    assert "not valid after" in refused(not_after=utc_timestamp(datetime.now(UTC)))
    assert "compromised since" in refused(compromised_since=utc_timestamp(later))
    # an export without the creation time (as before it had one) cannot tell its window
    # from the creation: refused, as it was
    assert "no signing time" in refused(created_at=None, not_before=version["created_at"])
    # a window that holds from before the creation until after now
    future = utc_timestamp(datetime.now(UTC) + timedelta(days=1))
    widened = json.loads(json.dumps(doc))
    widened["keys"][0]["versions"][0].update(not_before=utc_timestamp(past), not_after=future)
    assert verify_model(model, result.bundle_path, TrustBundle.parse(widened)).ok


def test_trust_bundle_refuses_a_signing_time_before_the_version(
    tmp_path: Path, client: Client, key: str
) -> None:
    model = make_model(tmp_path)
    result = sign_model(model, GatewaySigner(client, key))
    doc = export_trust_bundle(client, [key])
    assert verify_model(model, result.bundle_path, TrustBundle.parse(doc)).ok
    later = result.signed_at + timedelta(seconds=1)
    doc["keys"][0]["versions"][0]["created_at"] = utc_timestamp(later)
    with pytest.raises(ModelVerificationError) as info:
        verify_model(model, result.bundle_path, TrustBundle.parse(doc))
    assert info.value.failure is Failure.KEY_STATUS
    assert "after the signing time" in info.value.detail


def test_provenance_and_policy_digest(
    tmp_path: Path, client: Client, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "GITHUB_ACTIONS": "true",
        "GITHUB_SERVER_URL": "https://github.com",
        "GITHUB_REPOSITORY": "acme/models",
        "GITHUB_WORKFLOW_REF": "acme/models/.github/workflows/train.yml@refs/heads/main",
        "GITHUB_SHA": "0123456789abcdef0123456789abcdef01234567",
        "GITHUB_RUN_ID": "42",
        "TRAIN_IMAGE_DIGEST": "sha256:" + "ab" * 32,
    }.items():
        monkeypatch.setenv(name, value)
    model = make_model(tmp_path)
    build = BuildInfo(dataset_snapshot="s3://data/risk@2026-11-01", parameters={"lr": "0.001"})
    result = sign_model(model, GatewaySigner(client, key), build=build)
    policy_digest = client.request("GET", "/v1/sys/policy").json()["digest"]
    assert result.policy_digest == policy_digest

    assert result.provenance_path is not None
    doc = json.loads(result.provenance_path.read_text())
    statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    assert statement["subject"][0]["digest"]["sha256"] == result.manifest.root_digest().hex()
    predicate = statement["predicate"]
    assert predicate["runDetails"]["builder"]["id"] == (
        "https://github.com/acme/models/.github/workflows/train.yml@refs/heads/main"
    )
    deps = predicate["buildDefinition"]["resolvedDependencies"]
    assert {
        "uri": "git+https://github.com/acme/models",
        "digest": {"gitCommit": "0123456789abcdef0123456789abcdef01234567"},
    } in deps
    assert {"name": "training-container", "digest": {"sha256": "ab" * 32}} in deps
    kms = predicate["buildDefinition"]["internalParameters"]["kmsgate"]
    assert kms["key"] == key and kms["key_version"] == 1 and kms["policy_digest"] == policy_digest

    trust = PublicKeyTrust.from_pem(result.public_key_pem)
    report = verify_model(
        model, result.bundle_path, trust, VerifyOptions(expect_policy_digest=policy_digest)
    )
    assert (
        report.provenance is not None
        and report.provenance.git_sha == "0123456789abcdef0123456789abcdef01234567"
    )
    with pytest.raises(ModelVerificationError) as info:
        verify_model(
            model,
            result.bundle_path,
            trust,
            VerifyOptions(expect_policy_digest="sha256:" + "0" * 64),
        )
    assert info.value.failure is Failure.POLICY_DIGEST

    # a provenance for another model (same key) does not pass for this one
    other = make_model(tmp_path / "other")
    (other / "config.json").write_text("different")
    other_result = sign_model(other, GatewaySigner(client, key))
    assert other_result.provenance_path is not None
    with pytest.raises(ModelVerificationError) as info:
        verify_model(
            model,
            result.bundle_path,
            trust,
            VerifyOptions(provenance_path=other_result.provenance_path),
        )
    assert info.value.failure is Failure.PROVENANCE
    # a required provenance that is not there is a provenance failure (17), not format (10)
    assert result.provenance_path is not None
    result.provenance_path.unlink()
    for options in (
        VerifyOptions(require_provenance=True),
        VerifyOptions(expect_policy_digest="sha256:" + "0" * 64),
    ):
        with pytest.raises(ModelVerificationError) as info:
            verify_model(model, result.bundle_path, trust, options)
        assert info.value.failure is Failure.PROVENANCE, options


ACCEPTANCE = """package registry.accept

default allow = false

allow {
  input.tags.security_decision == "PASS"
  input.artifacts.signatures.model == true
  input.artifacts.attestation == true
  input.artifacts.checksums == true
  input.meta.git_sha != ""
  input.meta.container_digest != ""
  input.meta.dataset_snapshot != ""
}

deny[msg] {
  input.tags.security_decision != "PASS"
  msg := sprintf("security_decision is %v", [input.tags.security_decision])
}
"""


def test_acceptance_policy(tmp_path: Path, client: Client, key: str) -> None:
    policy = tmp_path / "acceptance.rego"
    policy.write_text(ACCEPTANCE)
    build = dict(git_sha="abc123", container_digest="sha256:" + "cd" * 32, dataset_snapshot="ds@1")
    model = make_model(tmp_path)
    ok = sign_model(
        model,
        GatewaySigner(client, key),
        build=BuildInfo(**build, parameters={"security_decision": "PASS"}),
    )
    trust = PublicKeyTrust.from_pem(ok.public_key_pem)
    report = verify_model(model, ok.bundle_path, trust, VerifyOptions(policy=policy))
    assert report.acceptance == {"package": "registry.accept", "allow": True, "deny": []}

    sign_model(
        model,
        GatewaySigner(client, key),
        build=BuildInfo(**build, parameters={"security_decision": "FAIL"}),
    )
    with pytest.raises(ModelVerificationError) as info:
        verify_model(model, ok.bundle_path, trust, VerifyOptions(policy=policy))
    assert info.value.failure is Failure.ACCEPTANCE
    assert "security_decision is FAIL" in info.value.detail


def test_cli_sign_and_verify(tmp_path: Path, gw: Gateway, client: Client, key: str) -> None:
    runner = CliRunner()
    env = {"KMSGATE_ADDR": gw.addr, "KMSGATE_TOKEN": gw.root_token}
    model = make_model(tmp_path)
    bundle = tmp_path / "model.sig"
    signed = runner.invoke(
        model_app,
        ["sign", str(model), "--key", key, "-o", str(bundle), "--param", "epochs=3"],
        env=env,
    )
    assert signed.exit_code == 0, signed.output
    info = json.loads(signed.stdout)
    assert info["key_version"] == 1 and info["files"] == 8
    pub = pem_file(tmp_path, client.public_key(key, 1))

    ok = runner.invoke(
        model_app, ["verify", str(model), "-b", str(bundle), "--public-key", str(pub)]
    )
    assert ok.exit_code == 0, ok.output
    assert "verified: my-model sha256:" in ok.stdout
    via_gateway = runner.invoke(
        model_app,
        ["verify", str(model), "-b", str(bundle), "--gateway", gw.addr, "--key", key, "--json"],
        env=env,
    )
    assert via_gateway.exit_code == 0, via_gateway.output
    report = json.loads(via_gateway.stdout)
    assert report["ok"] and report["key_status"]["source"] == "gateway"
    assert [c["name"] for c in report["checks"]] == [
        "bundle",
        "key",
        "signature",
        "files",
        "provenance",
        "key_status",
    ]

    flip_byte(model / "weights" / "layer-0.bin", 7)
    bad = runner.invoke(
        model_app, ["verify", str(model), "-b", str(bundle), "--public-key", str(pub), "--json"]
    )
    assert bad.exit_code == Failure.DIGEST_MISMATCH == 13
    assert json.loads(bad.stdout)["error"]["code"] == "digest_mismatch"
    assert bad.stderr.strip().splitlines() == [
        "error: digest_mismatch: digest mismatch: weights/layer-0.bin"
    ]
    none = runner.invoke(model_app, ["verify", str(model), "-b", str(bundle)])
    assert none.exit_code == 2 and "exactly one of" in none.stderr


def test_a_bare_public_key_names_no_signer_from_the_unsigned_keyid(
    tmp_path: Path, client: Client, key: str
) -> None:
    """No signature covers the DSSE keyid: with --public-key alone, verify says "signed by
    the key in PEM" and its JSON names no key (it used to name the keyid's, whatever it
    was). A verified provenance, signed by that key, names the key version, and one that
    disagrees with the keyid still fails."""
    runner = CliRunner()
    model = make_model(tmp_path)
    result = sign_model(model, GatewaySigner(client, key))
    pub = pem_file(tmp_path, result.public_key_pem)
    args = ["verify", str(model), "--public-key", str(pub)]
    proven = runner.invoke(model_app, args)
    assert proven.exit_code == 0 and proven.stdout.strip().endswith(f"signed by {key} v1")

    assert result.provenance_path is not None
    for path in (result.bundle_path, result.provenance_path):
        doc = json.loads(path.read_text())
        doc["dsseEnvelope"]["signatures"][0]["keyid"] = "release-sign:v9"
        path.write_text(json.dumps(doc))
    forged = runner.invoke(model_app, args)
    assert forged.exit_code == Failure.PROVENANCE, forged.output
    assert "the provenance names another key version than the signature" in forged.stderr
    result.provenance_path.unlink()
    plain = runner.invoke(model_app, args)
    assert plain.exit_code == 0, plain.output
    assert plain.stdout.strip().endswith(f"signed by the key in {pub}")
    report = json.loads(runner.invoke(model_app, [*args, "--json"]).stdout)
    assert report["signature"]["keyid"] == "release-sign:v9"  # shown as what it is
    assert (report["signature"]["key"], report["signature"]["key_version"]) == (None, None)


def test_cli_sign_errors_are_one_line(tmp_path: Path, gw: Gateway, key: str) -> None:
    runner = CliRunner()
    env = {"KMSGATE_ADDR": gw.addr, "KMSGATE_TOKEN": gw.root_token}
    model = make_model(tmp_path)
    missing = runner.invoke(model_app, ["sign", str(model), "--key", "no-such-key"], env=env)
    assert missing.exit_code == 2
    assert len(missing.stderr.strip().splitlines()) == 1 and "error:" in missing.stderr
    (model / "link").symlink_to(model / "config.json")
    link = runner.invoke(model_app, ["sign", str(model), "--key", key], env=env)
    assert link.exit_code == 2, link.output
    assert link.stderr.strip() == "error: link is a symbolic link (use --allow-symlinks)"
    assert not (model / "model.sig").exists()
    (model / "link").unlink()
    into_dir = runner.invoke(model_app, ["sign", str(model), "--key", key, "-o", str(tmp_path)])
    assert into_dir.exit_code == 2
    assert into_dir.stderr.strip() == f"error: {tmp_path} is a directory: give the file to write"
    gone = tmp_path / "gone"
    for command in (["sign", str(gone), "--key", key], ["verify", str(gone), "--key", key]):
        result = runner.invoke(model_app, command, env=env)
        assert result.exit_code == 2
        assert result.stderr.strip() == f"error: {gone}: no such directory"
    # with --json, an error is a JSON report on stdout too (a pipe into jq gets one)
    as_json = runner.invoke(model_app, ["verify", str(gone), "--key", key, "--json"], env=env)
    assert as_json.exit_code == 2
    assert json.loads(as_json.stdout) == {
        "ok": False,
        "exit_code": 2,
        "error": {"code": "error", "detail": f"{gone}: no such directory"},
    }


def test_stock_signed_bundle_verifies_with_kmsgate(tmp_path: Path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "k.pem"
    key_file.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    model = make_model(tmp_path)
    sig = tmp_path / "stock.sig"
    model_signing.signing.Config().use_elliptic_key_signer(private_key=key_file).sign(model, sig)
    trust = PublicKeyTrust(private.public_key())
    assert verify_model(model, sig, trust).files == 7
    flip_byte(model / "a" / "b")
    with pytest.raises(ModelVerificationError) as info:
        verify_model(model, sig, trust)
    assert info.value.failure is Failure.DIGEST_MISMATCH


def test_cli_trust_bundle_offline_gate(
    tmp_path: Path, gw: Gateway, client: Client, key: str
) -> None:
    runner = CliRunner()
    env = {"KMSGATE_ADDR": gw.addr, "KMSGATE_TOKEN": gw.root_token}
    model = make_model(tmp_path)
    result = sign_model(model, GatewaySigner(client, key))
    trust = tmp_path / "trust.json"
    exported = runner.invoke(model_app, ["trust-bundle", key, "-o", str(trust)], env=env)
    assert exported.exit_code == 0, exported.output
    args = ["verify", str(model), "--trust-bundle", str(trust)]
    assert runner.invoke(model_app, args).exit_code == 0
    client.key_action(key, "rotate")
    _mark_compromised(client, key, 1, result.signed_at - timedelta(seconds=1))
    again = ["trust-bundle", key, "-o", str(trust)]
    kept = runner.invoke(model_app, again, env=env)  # an existing bundle: only with --force
    assert kept.exit_code == 2 and "exists (use --force" in kept.stderr
    assert runner.invoke(model_app, [*again, "--force"], env=env).exit_code == 0
    rejected = runner.invoke(model_app, [*args, "--json"])
    assert rejected.exit_code == Failure.KEY_STATUS == 16, rejected.output
    assert json.loads(rejected.stdout)["error"]["code"] == "key_status"
    assert "compromised since" in rejected.stderr
    # a key that is not enabled has no trust bundle: it could not say so
    client.key_action(key, "disable")
    refused = runner.invoke(model_app, [*again, "--force"], env=env)
    assert refused.exit_code == 2 and "is disabled: a trust bundle" in refused.stderr
    client.key_action(key, "enable")
    # the model server's gate reads the same trust bundle from its environment
    gate_env = {"MODEL_SIGNING_REQUIRED": "1", "MODEL_SIGNING_TRUST_BUNDLE": str(trust)}
    with pytest.raises(ModelVerificationError) as refused:
        require_verified(model, env=gate_env)
    assert refused.value.failure is Failure.KEY_STATUS


def test_ci_signer_with_only_the_ml_sec_role(tmp_path: Path) -> None:
    """The least-privilege CI path (seed 002): a token whose only role is `ml-sec`, in a
    `prod` gateway, may sign with a `model-sign` key but not read it: the public key then
    comes from the public JWKS, and the stock verifier accepts the bundle."""
    (tmp_path / "gw").mkdir()
    with running_gateway(tmp_path / "gw", KMSGATE_ENV="prod") as gw:
        with Client(gw.addr, gw.root_token) as admin:
            admin.create_key("ci-model", "ecdsa-p256", "model-sign")
            signer_token = admin.create_token(["ml-sec"])["token"]
            pem = admin.public_key("ci-model")
            gateway_policy = admin.request("GET", "/v1/sys/policy").json()["digest"]
        model = make_model(tmp_path)
        with Client(gw.addr, signer_token) as ci:
            result = sign_model(model, GatewaySigner(ci, "ci-model"))
        assert result.public_key_pem.strip() == pem.strip()
        stock_api_verify(model, result.bundle_path, pem_file(tmp_path, pem))
        # the provenance names the policy that authorised the signature, although this
        # token may not read the policy (the sign reply's header says it)
        assert result.policy_digest == gateway_policy
        assert result.provenance_path is not None
        envelope = json.loads(result.provenance_path.read_text())["dsseEnvelope"]
        assert gateway_policy in base64.b64decode(envelope["payload"]).decode()
        # a model-sign key made private: the token may sign but nothing gives it the public
        # key a bundle names; the error says so (it used to be "no public key set")
        with Client(gw.addr, gw.root_token) as admin:
            admin.create_key("ci-private", "ecdsa-p256", "model-sign", public=False)
        other = make_model(tmp_path / "other")
        with Client(gw.addr, signer_token) as ci, pytest.raises(SigningError) as info:
            sign_model(other, GatewaySigner(ci, "ci-private"))
        assert "does not publish its public key" in str(info.value)
        assert "policy_denied" in str(info.value)
        assert not (other / "checksums.json").exists()
        # every version compromised: the public JWKS lists none, and the token may not read
        # the key; the signer says why the gateway will not sign (it said policy_denied)
        with Client(gw.addr, gw.root_token) as admin:
            admin.create_key("ci-compromised", "ecdsa-p256", "model-sign")
            _mark_compromised(admin, "ci-compromised", 1, datetime.now(UTC))
        with Client(gw.addr, signer_token) as ci, pytest.raises(ApiError) as refused:
            sign_model(other, GatewaySigner(ci, "ci-compromised"))
        assert (refused.value.status, refused.value.code) == (409, "key_version_unusable")
        assert "version 1 of 'ci-compromised' is compromised" in refused.value.detail
        assert not (other / "checksums.json").exists()


def test_a_model_signed_with_its_git_paths_verifies_with_them(
    tmp_path: Path, client: Client, key: str
) -> None:
    """`--no-ignore-git-paths` signs .git too; verifying then checks them, with no option to
    remember (it read them as missing), and the stock verifier agrees when told the same."""
    model = make_model(tmp_path)
    (model / ".git").mkdir()
    (model / ".git" / "config").write_text("[core]\n")
    result = sign_model(model, GatewaySigner(client, key), ignore_git_paths=False)
    assert {".git/config", ".gitignore"} <= {f.name for f in result.manifest.files}
    trust = PublicKeyTrust.from_pem(result.public_key_pem)
    assert verify_model(model, result.bundle_path, trust).ok
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=[], ignore_git_paths=False)
    pub = pem_file(tmp_path, result.public_key_pem)
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=pub).set_hashing_config(
        hashing
    ).verify(model, result.bundle_path)
    flip_byte(model / ".git" / "config")
    with pytest.raises(ModelVerificationError) as info:
        verify_model(model, result.bundle_path, trust)
    assert info.value.report.integrity["mismatched"] == [".git/config"]
    # signed so without any git path, then some planted: extra files, as the stock
    # verifier says when told the same (kmsgate's used to ignore them: it has no option)
    bare = make_model(tmp_path / "bare")
    (bare / ".gitignore").unlink()
    signed = sign_model(bare, GatewaySigner(client, key), ignore_git_paths=False)
    (bare / ".gitattributes").write_text("* filter=evil\n")
    (bare / ".git").mkdir()
    (bare / ".git" / "config").write_text("planted\n")
    with pytest.raises(ModelVerificationError) as info:
        verify_model(bare, signed.bundle_path, PublicKeyTrust.from_pem(signed.public_key_pem))
    assert info.value.report.integrity["extra"] == [".git/config", ".gitattributes"]


def test_a_symlinked_directory_is_never_signed_past(
    tmp_path: Path, client: Client, key: str
) -> None:
    """With --allow-symlinks, a file symlink is signed as its file. A directory symlink is
    refused (model_signing does not follow it: the files behind it would be covered by no
    signature) unless ignored; and one added after signing fails kmsgate's verification
    (the stock verifier does not notice it). Both tools accept the bundle."""
    model = make_model(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f1").write_bytes(b"behind the link")
    (model / "dirlink").symlink_to(outside, target_is_directory=True)
    (model / "filelink").symlink_to(model / "config.json")
    with pytest.raises(ManifestError, match="dirlink is a symbolic link to a directory"):
        sign_model(model, GatewaySigner(client, key), allow_symlinks=True)
    (model / "dirlink").unlink()
    result = sign_model(model, GatewaySigner(client, key), allow_symlinks=True)
    assert "filelink" in {f.name for f in result.manifest.files}
    pub = pem_file(tmp_path, result.public_key_pem)
    hashing = model_signing.hashing.Config().set_allow_symlinks(True)
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=pub).set_hashing_config(
        hashing
    ).verify(model, result.bundle_path)
    trust = PublicKeyTrust.from_pem(pub.read_text())
    assert verify_model(model, result.bundle_path, trust).ok
    (model / "plugins").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ModelVerificationError) as info:
        verify_model(model, result.bundle_path, trust)
    assert info.value.failure is Failure.EXTRA_FILES


def test_signing_writes_nothing_into_the_model_unless_it_succeeds(
    tmp_path: Path, client: Client, key: str
) -> None:
    """checksums.json is written with the bundle, after the gateway signed: a refused
    signing (here a disabled key) leaves the model as it was. A checksums.json of the
    model's own is never overwritten, and one an earlier signing wrote is not signed as a
    model file by --no-checksums (verification would read it as kmsgate's and fail). An
    ECDSA hash other than the curve's is refused before hashing: nobody could verify it."""
    model = make_model(tmp_path)
    before = sorted(p.name for p in model.iterdir())
    client.key_action(key, "disable")
    with pytest.raises(ApiError, match="key_disabled"):
        sign_model(model, GatewaySigner(client, key))
    assert sorted(p.name for p in model.iterdir()) == before
    client.key_action(key, "enable")

    with pytest.raises(SigningError, match="bundle the model_signing verifier rejects"):
        sign_model(model, GatewaySigner(client, key, algorithm="ecdsa-sha512"))

    own = model / "checksums.json"
    # the vendor's, even one sharing kmsgate's members (it used to be taken for kmsgate's
    # by its "algorithm" alone, and overwritten)
    for theirs in ('{"vendor": "theirs"}', '{"algorithm": "sha256", "files": [], "note": "v"}'):
        own.write_text(theirs)
        with pytest.raises(SigningError, match="the model's own file"):
            sign_model(model, GatewaySigner(client, key))
        assert own.read_text() == theirs
    own.unlink()
    sign_model(model, GatewaySigner(client, key))
    (model / "config.json").write_bytes(b'{"layers": 3}\n')
    with pytest.raises(SigningError, match="written by an earlier signing"):
        sign_model(model, GatewaySigner(client, key), checksums=False)


def test_a_model_with_nothing_left_to_sign_is_refused(
    tmp_path: Path, client: Client, key: str
) -> None:
    """A signature over no file (an empty directory, or every file ignored) would make any
    directory of ignored files verify: a CI job pointed at the wrong path must fail."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ManifestError, match="no file to sign"):
        sign_model(empty, GatewaySigner(client, key), checksums=False)
    model = make_model(tmp_path)
    with pytest.raises(ManifestError, match="no file to sign"):
        sign_model(model, GatewaySigner(client, key), ignore=["*"])
    assert not (model / "model.sig").exists()


def test_a_signature_never_replaces_a_file_of_the_model(
    tmp_path: Path, client: Client, key: str
) -> None:
    """-o (or --provenance-out) naming a model file, or checksums.json, is refused: the
    weights were replaced by the bundle and left out of the signature. A bundle from an
    earlier signing is replaced, as re-signing does."""
    model = make_model(tmp_path)
    weights = model / "weights" / "layer-0.bin"
    before = weights.read_bytes()
    for output in (weights, model / "checksums.json"):
        with pytest.raises(SigningError, match="is a file of the model"):
            sign_model(model, GatewaySigner(client, key), bundle_path=output)
    with pytest.raises(SigningError, match="is a file of the model"):
        sign_model(model, GatewaySigner(client, key), provenance_path=model / "config.json")
    assert weights.read_bytes() == before
    inside = model / "sig" / "my.sig"
    inside.parent.mkdir()
    for _ in range(2):  # the second signing replaces the first one's bundle
        sign_model(model, GatewaySigner(client, key), bundle_path=inside)

    # outside the model too: someone's file is not replaced; one path for the bundle and
    # the provenance is refused (one would replace the other); so is leaving out
    # checksums.json by --ignore (it is kmsgate's own file)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    link = tmp_path / "link.sig"  # the rename would replace the link, not write through it
    link.symlink_to(inside)
    since = {"action": "sign", "since": datetime.now(UTC).isoformat()}
    refusals = (
        ({"bundle_path": notes}, "exists and is not a signature"),
        ({"bundle_path": link}, "is a symbolic link"),
        ({"provenance_path": tmp_path / "link.sig"}, "is a symbolic link"),
        ({"bundle_path": tmp_path / "x.sig", "provenance_path": tmp_path / "x.sig"}, "both be"),
        ({"ignore": ["checksums.json"]}, "sign with --no-checksums"),
    )
    for options, message in refusals:
        with pytest.raises(SigningError, match=message):
            sign_model(model, GatewaySigner(client, key), **options)  # type: ignore[arg-type]
    assert notes.read_text() == "mine" and not (tmp_path / "x.sig").exists()
    assert link.is_symlink()
    signed = client.request("GET", "/v1/audit", params=since).json()["events"]
    assert signed == []  # refused before the gateway signed anything


def test_an_ed25519_key_and_a_large_model_get_advice_that_can_be_followed(
    tmp_path: Path, client: Client, gw: Gateway
) -> None:
    """Ed25519 signs the statement whole: past the gateway's input limit the error says to
    use an ECDSA key (the gateway's own advice, "send a digest", cannot be followed). A
    bundle signed with it is told to be kmsgate's only: the stock verifier takes EC keys."""
    name = f"ed-model-{next(_counter)}"
    client.create_key(name, "ed25519", "model-sign")
    env = {"KMSGATE_ADDR": gw.addr, "KMSGATE_TOKEN": gw.root_token}
    signed = CliRunner().invoke(
        model_app, ["sign", str(make_model(tmp_path)), "--key", name], env=env
    )
    assert signed.exit_code == 0, signed.output
    assert "the stock model_signing verifier takes ECDSA keys only" in signed.stderr
    model = tmp_path / "many"
    model.mkdir()
    for i in range(2_000):
        (model / f"f{i:04d}").write_bytes(b"x")
    with pytest.raises(SigningError, match="sign a model of this many files with an ECDSA key"):
        sign_model(model, GatewaySigner(client, name))


def test_an_rsa_pkcs1_bundle_verifies_with_its_algorithm_and_says_so_without(
    tmp_path: Path, client: Client
) -> None:
    """RSA's default is PSS: a PKCS#1 v1.5 bundle verifies with `algorithm`, and without it
    the refusal says that another padding needs --algorithm."""
    name = f"model-rsa-{next(_counter)}"
    client.create_key(name, "rsa-3072", "model-sign")
    model = make_model(tmp_path)
    signer = GatewaySigner(client, name, algorithm="rsa-pkcs1-sha256")
    result = sign_model(model, signer)
    trust = PublicKeyTrust.from_pem(result.public_key_pem)
    options = VerifyOptions(algorithm="rsa-pkcs1-sha256")
    assert verify_model(model, result.bundle_path, trust, options).ok
    with pytest.raises(ModelVerificationError, match="another RSA padding needs --algorithm"):
        verify_model(model, result.bundle_path, trust)


def test_a_symlink_added_after_signing_names_why_not_an_option(
    tmp_path: Path, client: Client, key: str
) -> None:
    """Verify has no --allow-symlinks: its refusal of a symlink says the model was signed
    without it, instead of suggesting an option verify does not have."""
    model = make_model(tmp_path)
    result = sign_model(model, GatewaySigner(client, key))
    (model / "link").symlink_to(model / "config.json")
    trust = PublicKeyTrust.from_pem(result.public_key_pem)
    with pytest.raises(ModelVerificationError, match="signed without --allow-symlinks") as info:
        verify_model(model, result.bundle_path, trust)
    assert info.value.failure is Failure.EXTRA_FILES


def test_ctrl_c_while_a_huge_file_is_hashed_stops_at_once(tmp_path: Path) -> None:
    """Ctrl-C used to wait for every file being hashed to be read to its end (seconds to
    minutes for a large weights file); the hashing threads now stop within one chunk."""
    huge = tmp_path / "model.bin"
    with huge.open("wb") as f:
        f.truncate(16 << 30)  # sparse: 16 GiB to hash, nothing on disk
    main = threading.main_thread().ident
    assert main is not None
    started = time.monotonic()
    timer = threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            hash_files(tmp_path, ["model.bin"])
    finally:
        timer.cancel()
    assert time.monotonic() - started < 2.0


def test_a_second_signature_leaves_the_first_one_verifying(
    tmp_path: Path, client: Client, key: str
) -> None:
    """Signing a signed model again (another key: a second signer, or the next key after a
    rotation) leaves out the signatures already there and writes the same checksums.json:
    the first signature still verifies, with kmsgate and with the stock verifier. A
    signature written inside the model records the earlier ones as ignored."""
    model = make_model(tmp_path)
    first = sign_model(model, GatewaySigner(client, key))
    second_key = f"model-key-{next(_counter)}"
    client.create_key(second_key, "ecdsa-p256", "model-sign")
    checksums = (model / "checksums.json").read_bytes()
    second = sign_model(model, GatewaySigner(client, second_key), bundle_path=tmp_path / "b.sig")
    assert (model / "checksums.json").read_bytes() == checksums
    assert second.left_out == ("model.sig", "model.sig.provenance.json")  # and said so
    for result in (first, second):
        trust = PublicKeyTrust.from_pem(result.public_key_pem)
        assert verify_model(model, result.bundle_path, trust).ok
    stock_api_verify(model, first.bundle_path, pem_file(tmp_path, first.public_key_pem))

    inside = sign_model(model, GatewaySigner(client, second_key), bundle_path=model / "two.sig")
    assert (model / "checksums.json").read_bytes() == checksums
    trust = PublicKeyTrust.from_pem(inside.public_key_pem)
    assert verify_model(model, inside.bundle_path, trust).ok
    stock_api_verify(model, inside.bundle_path, pem_file(tmp_path, inside.public_key_pem, "2.pem"))


def test_a_first_signature_over_one_mib_is_left_out_of_the_second(
    tmp_path: Path, client: Client, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An earlier bundle grows with the model's file count (~6,500 files of short names
    make 1 MiB; here fewer, with long names): however large, it is left out of the next
    signing and the first signature goes on verifying (it used to be signed as a model
    file past 1 MiB, and checksums.json rewritten). A file named like a signature that
    holds JSON but no bundle stops the signing before anything changes."""
    model = tmp_path / "big"
    folder = model / ("d" * 200)
    folder.mkdir(parents=True)
    for i in range(2_000):
        (folder / f"{i:05d}{'f' * 200}").write_bytes(b"%d" % i)
    first = sign_model(model, GatewaySigner(client, key))
    assert first.bundle_path.stat().st_size > 1 << 20
    second_key = f"model-key-{next(_counter)}"
    client.create_key(second_key, "ecdsa-p256", "model-sign")
    checksums = (model / "checksums.json").read_bytes()
    second = sign_model(model, GatewaySigner(client, second_key), bundle_path=tmp_path / "2.sig")
    assert second.left_out == ("model.sig", "model.sig.provenance.json")
    assert (model / "checksums.json").read_bytes() == checksums
    for result in (first, second):
        trust = PublicKeyTrust.from_pem(result.public_key_pem)
        assert verify_model(model, result.bundle_path, trust).ok
    stock_api_verify(model, first.bundle_path, pem_file(tmp_path, first.public_key_pem))

    (model / "copy.sig").write_bytes(first.bundle_path.read_bytes()[:1000])  # cut short
    refused = r"copy\.sig is named like a signature and starts like JSON"
    with pytest.raises(SigningError, match=refused):
        sign_model(model, GatewaySigner(client, second_key), bundle_path=tmp_path / "3.sig")
    assert (model / "checksums.json").read_bytes() == checksums
    assert not (tmp_path / "3.sig").exists()
    # past the largest bundle read (256 MiB; here 1 MiB), a bundle is not read whole: refused
    (model / "copy.sig").unlink()
    monkeypatch.setattr(signing, "_MAX_BUNDLE_BYTES", 1 << 20)
    with pytest.raises(SigningError, match=r"model\.sig is named .* at most 1 MiB"):
        sign_model(model, GatewaySigner(client, second_key), bundle_path=tmp_path / "3.sig")
    assert not (tmp_path / "3.sig").exists()


def test_a_signing_that_cannot_write_every_file_leaves_the_model_as_it_was(
    tmp_path: Path, client: Client, key: str
) -> None:
    """The provenance cannot be written once the gateway signed (its temporary file's name is
    over NAME_MAX: every check passes and the write fails, as on a full disk): no
    checksums.json nor bundle is written into a model signed for the first time, and a
    model signed before keeps its signature files byte for byte, still verifying."""
    unwritable = tmp_path / ("p" * 250)
    fresh = make_model(tmp_path / "fresh")
    files = sorted(fresh.rglob("*"))
    with pytest.raises(OSError) as caught:
        sign_model(fresh, GatewaySigner(client, key), provenance_path=unwritable)
    assert sorted(fresh.rglob("*")) == files
    assert caught.value.filename == str(unwritable)  # the error names it

    model = make_model(tmp_path / "signed")
    first = sign_model(model, GatewaySigner(client, key))
    before = {p: p.read_bytes() for p in model.rglob("*") if p.is_file()}
    with pytest.raises(OSError):
        sign_model(model, GatewaySigner(client, key), provenance_path=unwritable)
    assert {p: p.read_bytes() for p in model.rglob("*") if p.is_file()} == before
    assert verify_model(model, first.bundle_path, PublicKeyTrust.from_pem(first.public_key_pem)).ok


def test_a_directory_that_cannot_be_listed_or_a_name_that_is_not_utf8_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither is left out of the signature silently (os.walk skips an unreadable
    directory; a name with an undecodable byte used to crash the statement's encoding)."""
    model = make_model(tmp_path)
    (model / "bad\udcff.bin").write_bytes(b"x")  # the byte 0xff, as os.fsdecode gives it
    with pytest.raises(mf.ManifestError, match="not UTF-8 cannot be signed"):
        mf.list_files(model)
    (model / "bad\udcff.bin").unlink()
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        if str(path).endswith("weights"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(mf.ManifestError, match=r"cannot read .*weights: Permission denied"):
        mf.list_files(model)


def test_a_model_named_dot_dot_is_named_as_model_signing_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kmsgate model sign ..` names the subject after the directory `..` is, as the stock
    signer does, not `..`."""
    (tmp_path / "models" / "inner").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "models" / "inner")
    assert mf.model_name_of(Path("..")) == "models"
    assert mf.model_name_of(Path(".")) == "inner"
    assert mf.model_name_of(tmp_path / "models") == "models"


@pytest.mark.timeout(20)
def test_thousands_of_files_an_ignore_glob_matches_are_listed_in_linear_time(
    tmp_path: Path,
) -> None:
    """3,000 `*.log` files beside the model's: each is recorded as an ignored path and none
    is signed. Each file used to be looked up against every path recorded before it (3,000
    took minutes, past this test's 20 s); now by its prefixes in a set."""
    model = tmp_path / "m"
    (model / "runs").mkdir(parents=True)
    for n in range(3000):
        (model / "runs" / f"{n}.log").write_bytes(b"")
    (model / "weights.bin").write_bytes(b"w")
    (model / "runs" / "keep.bin").write_bytes(b"k")
    names, matched = mf.list_files(model, [".git"], patterns=["*.log"])
    assert sorted(names) == ["runs/keep.bin", "weights.bin"]
    assert len(matched) == 3000 and "runs/2999.log" in matched
    again, _ = mf.list_files(model, [".git", *matched])  # as verify reads the manifest
    assert again == names


def test_odd_inputs_are_clear_errors_not_crashes(tmp_path: Path) -> None:
    """A bundle nested 200,000 levels deep, a model tree nested past Python's recursion
    limit, and a model directory whose name is not UTF-8 are each refused with a reason
    (they used to end in "unexpected RecursionError/UnicodeEncodeError (a bug?)")."""
    with pytest.raises(BundleError, match="nested too deeply"):
        SignedBundle.from_json(b"[" * 200_000)
    deep = path = tmp_path / "deep"
    for _ in range(1_100):  # level by level: Path.mkdir(parents=True) recurses too
        path.mkdir()
        path = path / "d"
    try:
        with pytest.raises(ManifestError, match="nested too deeply"):
            mf.list_files(deep)
    finally:  # shutil.rmtree, and pytest's clean-up of old temp dirs with it, recurses too
        while path != deep:
            path = path.parent
            path.rmdir()
    odd = tmp_path / os.fsdecode(b"model-\xff")
    odd.mkdir()
    with pytest.raises(ManifestError, match="not UTF-8"):
        mf.model_name_of(odd)
