"""What the conformance suite needs to know about one backend under test."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from kmsgate.algorithms import KeyType
from kmsgate.backends.base import BackendKey, KeyBackend

__all__ = ["BackendProfile"]


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
