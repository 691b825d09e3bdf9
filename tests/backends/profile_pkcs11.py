"""Conformance profile of the pkcs11 backend: a fresh SoftHSM2 token for the session.

SoftHSM 2.6 offers CKM_EDDSA, so the token holds every key type; keys never leave it
(`extract=None`).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

import pytest

from kmsgate.algorithms import KeyType
from kmsgate.backends.base import KeyBackend
from kmsgate.config import BackendSettings
from tests.backends.profile import BackendProfile
from tests.softhsm import softhsm_token

CONFORMANCE_TOKEN = "kmsgate-conformance"


@contextlib.contextmanager
def _start_pkcs11(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyBackend]:
    # a label of its own per start: a session may start the profile twice (the conformance
    # suite, the envelope tests) while the first token still exists
    label = f"{CONFORMANCE_TOKEN}-{secrets.token_hex(3)}"
    with softhsm_token(tmp_path_factory, label) as token:
        from kmsgate.backends.pkcs11 import Pkcs11Backend  # python-pkcs11 is there (checked)

        backend = Pkcs11Backend.from_config("pkcs11", BackendSettings(**token.backend_config()))
        try:
            yield backend
        finally:
            backend.close()


PROFILE = BackendProfile(start=_start_pkcs11, key_types=frozenset(KeyType), extract=None)
