"""`kmsgate.model_signing.require_verified`: the model server's gate (seed 003).

Bundles are made by the stock model_signing signer with a local P-256 key (so these tests
need no gateway, and also show that kmsgate verifies stock bundles); the gateway-signed path
is covered in tests/test_model_signing.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kmsgate.model_signing import (
    Failure,
    ModelSigningRequired,
    ModelVerificationError,
    require_verified,
)
from tests.components import require_component

try:
    import model_signing
except ImportError:  # pragma: no cover - CI installs it (dev extra)
    require_component("model_signing", "pip install model-signing (the stock verifier)")
pytestmark = pytest.mark.timeout(60)


def _pem(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, str]:
    """(model dir with model.sig inside, PEM public key)."""
    private = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "signing.pem"
    key_file.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    model = tmp_path / "model"
    (model / "weights").mkdir(parents=True)
    (model / "weights" / "w.bin").write_bytes(bytes(range(256)) * 64)
    (model / "config.json").write_text('{"a": 1}')
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=["model.sig"])
    model_signing.signing.Config().set_hashing_config(hashing).use_elliptic_key_signer(
        private_key=key_file
    ).sign(model, model / "model.sig")
    return model, _pem(private.public_key())


def load_model(path: Path, *, env: dict[str, str], loaded: list[Path]) -> None:
    """A model server's loader: the gate first, then the (pretend) load."""
    require_verified(path, env=env)
    loaded.append(path)


def test_verified_model_loads(signed: tuple[Path, str]) -> None:
    model, pem = signed
    loaded: list[Path] = []
    load_model(
        model, env={"MODEL_SIGNING_REQUIRED": "true", "MODEL_SIGNING_PUBKEY": pem}, loaded=loaded
    )
    assert loaded == [model]


def test_pubkey_may_be_a_path(signed: tuple[Path, str], tmp_path: Path) -> None:
    model, pem = signed
    (tmp_path / "pub.pem").write_text(pem)
    env = {"MODEL_SIGNING_REQUIRED": "1", "MODEL_SIGNING_PUBKEY": str(tmp_path / "pub.pem")}
    report = require_verified(model, env=env)
    assert report is not None and report.files == 2
    # the argument takes what the variable takes: a path (str or Path) as well as the PEM
    for given in (str(tmp_path / "pub.pem"), tmp_path / "pub.pem", pem.encode()):
        assert require_verified(model, public_key=given, required=True, env={}) is not None
    with pytest.raises(ModelSigningRequired, match="cannot read public key"):
        require_verified(model, public_key=tmp_path / "absent.pem", env={})


@pytest.mark.parametrize("required", ["true", "false", ""])
def test_tampered_model_raises_before_load_even_if_not_required(
    signed: tuple[Path, str], required: str
) -> None:
    model, pem = signed
    data = bytearray((model / "weights" / "w.bin").read_bytes())
    data[100] ^= 0xFF
    (model / "weights" / "w.bin").write_bytes(bytes(data))
    loaded: list[Path] = []
    env = {"MODEL_SIGNING_REQUIRED": required, "MODEL_SIGNING_PUBKEY": pem}
    with pytest.raises(ModelVerificationError) as info:
        load_model(model, env=env, loaded=loaded)
    assert info.value.failure is Failure.DIGEST_MISMATCH
    assert loaded == []


def test_wrong_key_raises(signed: tuple[Path, str]) -> None:
    model, _ = signed
    other = _pem(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(ModelVerificationError) as info:
        require_verified(model, env={"MODEL_SIGNING_PUBKEY": other})
    assert info.value.failure is Failure.KEY_MISMATCH


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MODEL_SIGNING_REQUIRED": "true"}, "MODEL_SIGNING_PUBKEY is not set"),
        (
            {"MODEL_SIGNING_REQUIRED": "yes", "MODEL_SIGNING_PUBKEY": "/nonexistent.pem"},
            "cannot read",
        ),
    ],
)
def test_required_without_key(signed: tuple[Path, str], env: dict[str, str], message: str) -> None:
    model, _ = signed
    with pytest.raises(ModelSigningRequired, match=message):
        require_verified(model, env=env)


def test_missing_signature(signed: tuple[Path, str], caplog: pytest.LogCaptureFixture) -> None:
    model, pem = signed
    (model / "model.sig").unlink()
    with pytest.raises(ModelSigningRequired, match="signature missing"):
        require_verified(model, env={"MODEL_SIGNING_REQUIRED": "TRUE", "MODEL_SIGNING_PUBKEY": pem})
    with caplog.at_level(logging.WARNING, logger="kmsgate.model_signing"):
        assert require_verified(model, env={"MODEL_SIGNING_PUBKEY": pem}) is None
    assert "unverified" in caplog.text
    gone = model.parent / "no-such-model"
    with pytest.raises(ModelSigningRequired, match="no such model, nor signature"):
        require_verified(gone, env={"MODEL_SIGNING_REQUIRED": "1", "MODEL_SIGNING_PUBKEY": pem})


@pytest.mark.parametrize("value", ["y", "enabled", "required", "2", "treu"])
def test_an_unreadable_required_setting_never_loads_an_unsigned_model(
    signed: tuple[Path, str], value: str
) -> None:
    """MODEL_SIGNING_REQUIRED is true (1/true/yes/on) or false (0/false/no/off, unset);
    anything else is refused: a typo of "yes" loaded unsigned models with a warning."""
    model, pem = signed
    (model / "model.sig").unlink()
    with pytest.raises(ModelSigningRequired, match="neither true"):
        require_verified(model, env={"MODEL_SIGNING_REQUIRED": value, "MODEL_SIGNING_PUBKEY": pem})
    for off in ("0", "off", " No "):
        env = {"MODEL_SIGNING_REQUIRED": off, "MODEL_SIGNING_PUBKEY": pem}
        assert require_verified(model, env=env) is None


def test_explicit_arguments_override_env(signed: tuple[Path, str], tmp_path: Path) -> None:
    model, pem = signed
    moved = tmp_path / "elsewhere.sig"
    (model / "model.sig").rename(moved)
    # the bundle was made while model.sig was inside the model, and is listed as ignored
    report = require_verified(model, bundle=moved, public_key=pem, required=True, env={})
    assert report is not None
