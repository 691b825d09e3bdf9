"""The signer of the audit log's checkpoints: a kmsgate key of purpose `audit`, signing
through its backend like every other key (softkms, Vault, AWS KMS, an HSM).

The audit package cannot reach keys or backends (it lies below the service); bootstrap
gives its sink a `CheckpointSigner`, called from the sink's background thread only.
"""

from __future__ import annotations

from kmsgate.algorithms import SignAlg, sign_algorithm
from kmsgate.audit.checkpoint import CheckpointSignature
from kmsgate.backends.base import Registry
from kmsgate.catalogue import AUDIT_PURPOSE, Catalogue, Key, KeyVersion
from kmsgate.errors import InvalidRequest

__all__ = ["CheckpointSigner"]


class CheckpointSigner:
    """Signs checkpoint payloads with the primary version of the key `name` (a
    `kmsgate.audit.checkpoint.Signer`). The key is looked up at each call, so a rotation
    or a key created after start-up is used at the next checkpoint."""

    def __init__(self, catalogue: Catalogue, registry: Registry, name: str) -> None:
        self._catalogue = catalogue
        self._registry = registry
        self.name = name

    def check(self) -> None:
        """Raises NotFound if the key does not exist, InvalidRequest if it is not an
        enabled signing key of purpose `audit` (KeyDisabled, ...), KeyVersionUnusable if its
        primary version cannot sign."""
        self._signing()

    def _signing(self) -> tuple[Key, KeyVersion, SignAlg]:
        """The key, its primary version and algorithm. Raises what `check` raises."""
        key = self._catalogue.get(self.name)
        if key.purpose != AUDIT_PURPOSE:
            raise InvalidRequest(
                f"key {self.name!r} has purpose {key.purpose!r}; checkpoints need {AUDIT_PURPOSE!r}"
            )
        key.require_enabled()
        return key, key.usable_version(None, for_signing=True), sign_algorithm(key.type, None)

    def __call__(self, payload: bytes) -> CheckpointSignature:
        """Sign `payload` with the key's default algorithm. Raises what `check` raises,
        BackendUnavailable or BackendError."""
        key, version, alg = self._signing()
        backend = self._registry.holding(key.backend)
        signature = backend.sign_one_checked(
            key.backend_key(version), payload, alg, prehashed=False
        )
        return CheckpointSignature(key.name, version.version, alg.name, signature)
