"""Small helpers shared by the REST test modules: base64 as the API carries bytes, and key
creation through `POST /v1/keys`."""

from __future__ import annotations

import base64
from typing import Any

from tests.gateway import Api


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
