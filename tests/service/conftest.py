"""Use-case tests: the service layer called directly, without HTTP (SQLite store, softkms,
shipped policies, the real audit file)."""

from __future__ import annotations

import pytest

from kmsgate.auth import Principal
from kmsgate.service import Ctx, Service
from kmsgate.service.requests import NewKey

ADMIN = Principal(id="token:admin", kind="token", roles=("admin",))
NOBODY = Principal(id="token:nobody", kind="token", roles=("nobody",))
CTX = Ctx("test")


@pytest.fixture
def new_key(service: Service):
    """Create a key as admin: `new_key(name, type)` -> the catalogue's Key."""

    def create(name: str, key_type: str = "ecdsa-p256", **fields: object):
        return service.keys.create(
            ADMIN, CTX, NewKey(name=name, type=key_type, purpose="test", **fields)
        )

    return create
