"""Conformance profile: the hashivault backend against a real OpenBao dev server (Transit).

Keys never leave Transit (created non-exportable), so there is nothing to extract: the
suite checks signatures with the public keys Transit published, independently of Transit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from kmsgate.algorithms import KeyType
from kmsgate.backends.base import KeyBackend
from kmsgate.backends.hashivault import HashiVaultBackend
from kmsgate.config import BackendSettings
from tests.backends.profile import BackendProfile
from tests.openbao import running_openbao


@contextlib.contextmanager
def _start(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyBackend]:
    with running_openbao(tmp_path_factory.mktemp("openbao-conformance")) as server:
        cfg = BackendSettings(
            type="hashivault", addr=server.addr, token=server.root_token, mount="transit"
        )
        backend = HashiVaultBackend.from_config("hashivault", cfg)
        try:
            yield backend
        finally:
            backend.close()


PROFILE = BackendProfile(start=_start, key_types=frozenset(KeyType), extract=None)
