"""Fixtures of the backend conformance suite.

`backend` is parametrised over `PROFILES`: one entry per backend, each a factory that starts
the backend (and, for the remote ones, its real test component: SoftHSM, OpenBao, moto) and
yields a `KeyBackend`, plus what the suite must know about it. Adding a backend means adding
one profile here; every conformance test then runs against it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import load_der_private_key

from kmsgate.algorithms import KeyType
from kmsgate.backends.base import BackendKey, KeyBackend, KeySpec
from kmsgate.backends.softkms import SoftKmsBackend, create_root_key_file, read_root_key_file

__all__ = ["PROFILES", "BackendProfile", "KeyFactory"]


@dataclass(frozen=True)
class BackendProfile:
    """One backend under test."""

    start: Callable[[pytest.TempPathFactory], AbstractContextManager[KeyBackend]]
    """Start the backend (and its test component); the context manager tears both down."""

    key_types: frozenset[KeyType]
    """The key types it must hold; `create_key` must raise NotSupported for the others."""

    extract: Callable[[KeyBackend, BackendKey], PrivateKeyTypes | bytes] | None = None
    """White-box: the private key (or secret) behind a BackendKey, for checking that the
    `material` never holds it in the clear. None when keys cannot leave the backend (an HSM,
    a KMS): the material is then a handle, checked only for not being key-sized secrets."""


# -- softkms --------------------------------------------------------------------------------


@contextlib.contextmanager
def _start_softkms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyBackend]:
    root_file = tmp_path_factory.mktemp("softkms") / "root.key"
    create_root_key_file(root_file)
    backend = SoftKmsBackend("softkms", read_root_key_file(root_file))
    try:
        yield backend
    finally:
        backend.close()


def _extract_softkms(backend: KeyBackend, key: BackendKey) -> PrivateKeyTypes | bytes:
    assert isinstance(backend, SoftKmsBackend)
    assert key.material is not None
    plain = backend.unseal(key.material, key.name, key.version)
    if key.key_type.is_asymmetric:
        return load_der_private_key(plain, password=None)
    return plain


PROFILES: dict[str, BackendProfile] = {
    "softkms": BackendProfile(
        start=_start_softkms, key_types=frozenset(KeyType), extract=_extract_softkms
    ),
    # "pkcs11": SoftHSM2 token per session; "hashivault": OpenBao -dev; "awskms": moto_server.
}


@pytest.fixture(scope="session", params=list(PROFILES))
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A started backend, once per session per profile. Its `name` is the profile's key."""
    with PROFILES[request.param].start(tmp_path_factory) as started:
        assert started.name == request.param, "a profile must name its backend after itself"
        yield started


@pytest.fixture(scope="session")
def profile(backend: KeyBackend) -> BackendProfile:
    return PROFILES[backend.name]


@dataclass
class KeyFactory:
    """Keys of a backend: `get` shares one key per type across the session (RSA keygen takes
    seconds); `fresh` makes a new one for tests that spend it (destroy)."""

    backend: KeyBackend
    profile: BackendProfile
    _shared: dict[KeyType, BackendKey] = field(default_factory=dict)
    _counter: Iterator[int] = field(default_factory=itertools.count)

    def require(self, key_type: KeyType) -> None:
        if key_type not in self.profile.key_types:
            pytest.skip(f"backend {self.backend.name} does not hold {key_type} keys (profile)")

    def fresh(self, key_type: KeyType, version: int = 1) -> BackendKey:
        self.require(key_type)
        name = f"conformance-{key_type}-{next(self._counter)}"
        return self.backend.create_key(KeySpec(name, version, key_type, {"suite": "conformance"}))

    def get(self, key_type: KeyType) -> BackendKey:
        if key_type not in self._shared:
            self._shared[key_type] = self.fresh(key_type)
        return self._shared[key_type]


@pytest.fixture(scope="session")
def keys(backend: KeyBackend, profile: BackendProfile) -> KeyFactory:
    return KeyFactory(backend, profile)
