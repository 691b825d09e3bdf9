"""Fixtures of the backend conformance suite.

`backend` is parametrised over `PROFILES`: one entry per backend, each a factory that starts
the backend (and, for the remote ones, its real test component: SoftHSM, OpenBao, moto) and
yields a `KeyBackend`, plus what the suite must know about it. Adding a backend means adding
one profile here; every conformance test then runs against it.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import load_der_private_key

from kmsgate.algorithms import KeyType
from kmsgate.backends.base import BackendKey, KeyBackend, KeySpec
from kmsgate.backends.softkms import SoftKmsBackend, create_root_key_file, read_root_key_file
from tests.backends.profile import BackendProfile

__all__ = ["PROFILES", "BackendProfile", "KeyFactory"]


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


def _discover() -> dict[str, BackendProfile]:
    """softkms plus every `profile_<backend>.py` module here (each defines `PROFILE`)."""
    profiles = {
        "softkms": BackendProfile(
            start=_start_softkms, key_types=frozenset(KeyType), extract=_extract_softkms
        )
    }
    for path in sorted(Path(__file__).parent.glob("profile_*.py")):
        module = importlib.import_module(f"tests.backends.{path.stem}")
        profiles[path.stem.removeprefix("profile_")] = module.PROFILE
    return profiles


PROFILES: dict[str, BackendProfile] = _discover()


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
