"""The record kmsgate persists per awskms key version (`BackendKey.material`): which KMS key
backs it, its KeySpec and, for a rotated symmetric key, the rotation it stands for; never key
material."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from kmsgate.backends.awskms.specs import _SPEC_TYPES
from kmsgate.backends.base import BackendKey
from kmsgate.errors import BackendError, KeyDestroyed

_MATERIAL_FORMAT = 1
_REF = re.compile(r"^awskms:(?P<arn>arn:[^#\s]+:key/[^#\s]+)#(?P<version>[1-9][0-9]{0,9})$")


@dataclass(frozen=True, slots=True)
class _Material:
    """What kmsgate persists per key version: which KMS key backs it (never key material)."""

    arn: str
    spec: str
    rotation: int = 0
    """Symmetric keys: the on-demand rotations kmsgate requested up to this version."""
    rotated_at: str | None = None
    adopted: bool = False

    def dump(self) -> bytes:
        body: dict[str, object] = {"format": _MATERIAL_FORMAT, "arn": self.arn, "spec": self.spec}
        if self.rotation:
            body["rotation"] = self.rotation
            body["rotated_at"] = self.rotated_at
        if self.adopted:
            body["adopted"] = True
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def load(cls, key: BackendKey) -> _Material:
        """The material of `key`. Raises KeyDestroyed if dropped, BackendError if unreadable."""
        if key.material is None:
            raise KeyDestroyed(f"version {key.version} of {key.name!r} was destroyed")
        try:
            body = json.loads(key.material)
            if body.get("format") != _MATERIAL_FORMAT:
                raise ValueError("unknown format")
            material = cls(
                arn=str(body["arn"]),
                spec=str(body["spec"]),
                rotation=int(body.get("rotation", 0)),
                rotated_at=body.get("rotated_at"),
                adopted=bool(body.get("adopted", False)),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BackendError("the stored awskms key record is unreadable") from None
        match = _REF.match(key.ref)
        if match is None or match["arn"] != material.arn or int(match["version"]) != key.version:
            raise BackendError("the stored awskms key record does not match its reference")
        if _SPEC_TYPES.get(material.spec) is not key.key_type:
            raise BackendError("the stored awskms key record does not match the key type")
        return material
