"""Small helpers shared by the test modules: base64 as the API carries bytes, key creation
through `POST /v1/keys`, and a script of scripts/ loaded as a module."""

from __future__ import annotations

import base64
import importlib.util
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.gateway import Api

JSON_TYPE = {"content-type": "application/json"}
UTC_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
"""How every reply writes a time: RFC 3339, UTC with `Z`, microseconds (fixed width)."""
"""The headers of a request whose body is sent raw (`content=`) as JSON."""


SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str) -> ModuleType:
    """scripts/`name`.py as a module (registered in sys.modules: dataclasses look their
    module up)."""
    spec = importlib.util.spec_from_file_location(f"kmsgate_{name}_script", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def b64(data: bytes) -> str:
    """`data` as the API's base64 text."""
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    """The bytes behind the API's base64 `text`."""
    return base64.b64decode(text)


def create_key(
    api: Api,
    token: str,
    name: str,
    key_type: str = "ecdsa-p256",
    purpose: str = "general",
    backend: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Create key `name` through `POST /v1/keys` (on `backend` if given; `fields` are further
    body fields such as `labels`), assert 201 and return the key as JSON."""
    body = {"name": name, "type": key_type, "purpose": purpose, **fields}
    if backend:
        body["backend"] = backend
    r = api.call("POST", "/v1/keys", token, json=body)
    assert r.status_code == 201, r.text
    key: dict[str, Any] = r.json()
    return key


def self_signed(
    common_name: str,
    *,
    ca: bool = False,
    lifetime: timedelta = timedelta(days=1),
    extensions: Sequence[x509.ExtensionType] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh P-256 key and a self-signed certificate for it (from a minute ago), a CA
    certificate with `ca`, with `extensions` (critical): a stranger to every kmsgate CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + lifetime)
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=True)
    return key, builder.sign(key, hashes.SHA256())


def issued_by(
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    name: x509.GeneralName,
    *,
    serial: int | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh P-256 key and a one-day leaf certificate for `name` (empty subject, so a
    critical SAN) signed by `issuer_key`, made without kmsgate: what another CA issues."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([name]), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )
    return key, cert
