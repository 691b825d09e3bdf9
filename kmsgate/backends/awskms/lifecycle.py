"""Key lifecycle in AWS KMS: creating KMS keys (tags, public key, the `<alias_prefix><name>`
alias), on-demand rotation of symmetric keys, adopting existing keys, and disabling or
scheduling the deletion of the KMS key behind a destroyed version."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives import serialization

from kmsgate.algorithms import KeyType, key_type_of_public_key
from kmsgate.backends.awskms.client import _AwsError, _KmsClient
from kmsgate.backends.awskms.material import _REF, _Material
from kmsgate.backends.awskms.specs import _CONTEXT_PREFIX, _KEY_SPECS
from kmsgate.backends.base import BackendKey, KeySpec
from kmsgate.errors import (
    BackendError,
    Conflict,
    InvalidRequest,
    KeyDestroyed,
    KmsgateError,
    NotFound,
    NotSupported,
    Unavailable,
)

_log = logging.getLogger(__name__)

_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TAG_VALUE = re.compile(r"^[\w\s.:/=+\-@]*$")


def _alias_of(prefix: str, name: str) -> str:
    """`<prefix><name>` with `.` written `/` (one-to-one: kmsgate names hold no `/`)."""
    return prefix + name.replace(".", "/")


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _tags(kms: _KmsClient, spec: KeySpec) -> list[dict[str, str]]:
    tags = {**kms.settings.tags}
    for label, value in spec.labels.items():
        if _TAG_VALUE.match(value) and not label.startswith(("aws:", _CONTEXT_PREFIX)):
            tags[label] = value
        else:
            _log.info("awskms: label %r not copied to a tag (characters AWS refuses)", label)
    tags["kmsgate:name"] = spec.name
    tags["kmsgate:version"] = str(spec.version)
    tags["kmsgate:type"] = spec.key_type.value
    return [{"TagKey": k, "TagValue": v} for k, v in sorted(tags.items())]


def create_key(kms: _KmsClient, spec: KeySpec, policy: str | None) -> BackendKey:
    """A new KMS key, tagged, with the key policy `policy` (None: AWS's default), for
    `spec` (aliased once the catalogue takes it: `point_alias`); for version N > 1 of an
    aes-256-gcm key, one on-demand rotation instead. Raises as
    `AwsKmsBackend.create_key`."""
    if not _KEY_NAME.match(spec.name) or spec.version < 1:
        raise InvalidRequest("invalid key name or version")
    key_spec, usage, _ = _KEY_SPECS[spec.key_type]
    if spec.key_type is KeyType.AES_256_GCM and spec.version > 1:
        return _rotate_symmetric(kms, spec)
    policy_param = {} if policy is None else {"Policy": policy}
    try:
        reply = kms.call(
            "create_key",
            "control",
            KeySpec=key_spec,
            KeyUsage=usage,
            Description=f"kmsgate key {spec.name} version {spec.version}",
            Tags=_tags(kms, spec),
            **policy_param,
        )
    except _AwsError as exc:
        if exc.code in ("ValidationException", "UnsupportedOperationException"):
            raise NotSupported(
                f"backend {kms.name!r}: the AWS KMS endpoint does not offer {key_spec} keys"
            ) from None
        if exc.code == "LimitExceededException":
            raise Conflict(f"backend {kms.name!r}: the AWS account's key quota is spent") from None
        raise kms.fail(exc, "create a key") from None
    arn = _arn_of(reply)
    try:
        public_pem = _public_key(kms, arn, spec.key_type)
    except KmsgateError:
        _schedule_deletion(kms, arn)  # no orphan: the key is useless without its record
        raise
    material = _Material(arn=arn, spec=key_spec)
    return BackendKey(
        ref=f"awskms:{arn}#{spec.version}",
        key_type=spec.key_type,
        name=spec.name,
        version=spec.version,
        material=material.dump(),
        public_key_pem=public_pem,
    )


def _arn_of(reply: Mapping[str, Any]) -> str:
    try:
        arn = str(reply["KeyMetadata"]["Arn"])
    except (KeyError, TypeError):
        raise BackendError("the backend returned an unexpected key description") from None
    if not arn.startswith("arn:") or ":key/" not in arn:
        raise BackendError("the backend returned an unexpected key ARN")
    return arn


def _public_key(kms: _KmsClient, arn: str, key_type: KeyType) -> str | None:
    """PEM SubjectPublicKeyInfo from GetPublicKey, checked against `key_type` (None for
    symmetric keys). Raises BackendError."""
    if not key_type.is_asymmetric:
        return None
    reply = kms.translated_call("read a public key", "get_public_key", "control", KeyId=arn)
    try:
        public = serialization.load_der_public_key(reply["PublicKey"])
        if key_type_of_public_key(public) is not key_type:
            raise ValueError("wrong key type")
    except (KeyError, TypeError, ValueError, InvalidRequest):
        raise BackendError("the backend returned an unusable public key") from None
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode("ascii")


def point_alias(kms: _KmsClient, key: BackendKey) -> None:
    """Make `<alias_prefix><name>` point at the KMS key of `key`, the new primary version
    (create the alias, or move it from an older key; for a rotation of a symmetric key,
    the same KMS key: an alias that failed before is mended); nothing for an adopted key
    (kmsgate names it nowhere in AWS). Raises BackendUnavailable, BackendError."""
    material = _Material.load(key)
    if material.adopted:
        return
    alias = _alias_of(kms.settings.alias_prefix, key.name)
    create = key.version == 1
    arn = material.arn
    first, second = ("create_alias", "update_alias") if create else ("update_alias", "create_alias")
    try:
        kms.call(first, "control", AliasName=alias, TargetKeyId=arn)
        return
    except _AwsError as exc:
        if exc.code not in ("AlreadyExistsException", "NotFoundException"):
            raise kms.fail(exc, "set the key alias") from None
    if create:
        _log.warning("awskms: alias %s existed; moving it to the new key", alias)
    kms.translated_call("set the key alias", second, "control", AliasName=alias, TargetKeyId=arn)


def _rotate_symmetric(kms: _KmsClient, spec: KeySpec) -> BackendKey:
    """Version N > 1 of an aes-256-gcm key: RotateKeyOnDemand on the KMS key of the version
    before it (`spec.previous`; without one, the key the alias names), recorded as the
    (N-1)th rotation. Raises Conflict when AWS refuses or an adopted key is to be rotated,
    KeyDestroyed when the KMS key is gone."""
    if spec.previous is not None:
        material = _Material.load(spec.previous)
        if material.adopted:
            raise Conflict("this key's KMS key was adopted: rotate it in AWS")
        key_id = material.arn
    else:
        key_id = _alias_of(kms.settings.alias_prefix, spec.name)
    try:
        described = kms.call("describe_key", "control", KeyId=key_id)
    except _AwsError as exc:
        if exc.code == "NotFoundException":
            raise KeyDestroyed(
                f"the KMS key {key_id} no longer exists: nothing to rotate"
            ) from None
        raise kms.fail(exc, "find the key to rotate") from None
    arn = _arn_of(described)
    if described["KeyMetadata"].get("KeySpec") != "SYMMETRIC_DEFAULT":
        raise BackendError(f"backend {kms.name!r}: {key_id} is not a symmetric key")
    try:
        kms.call("rotate_key_on_demand", "control", KeyId=arn)
    except _AwsError as exc:
        if exc.code == "LimitExceededException":
            raise Conflict(
                "AWS KMS allows a limited number of on-demand rotations per key"
            ) from None
        if exc.code == "ConflictException":
            raise kms.unavailable("rotating this key already") from None
        raise kms.fail(exc, "rotate a key") from None
    material = _Material(
        arn=arn, spec="SYMMETRIC_DEFAULT", rotation=spec.version - 1, rotated_at=_now()
    )
    return BackendKey(
        ref=f"awskms:{arn}#{spec.version}",
        key_type=spec.key_type,
        name=spec.name,
        version=spec.version,
        material=material.dump(),
    )


_MADE_INSIDE = frozenset({"AWS_KMS", "AWS_CLOUDHSM"})
"""Origins whose key material was generated where it stays: no copy exists elsewhere."""


def adopt_key(kms: _KmsClient, spec: KeySpec, uri: str, *, sole_copy: bool = False) -> BackendKey:
    """The record of the existing KMS key `uri` names, checked against `spec.key_type`
    (`sole_copy`: and made by AWS KMS or its CloudHSM key store, not imported nor held in an
    external key store). Raises as `AwsKmsBackend.adopt_key`."""
    key_id = uri.removeprefix("awskms:")
    if not key_id or len(key_id) > 2048 or any(c.isspace() for c in key_id):
        raise InvalidRequest("malformed awskms key reference")
    try:
        reply = kms.call("describe_key", "control", KeyId=key_id)
    except _AwsError as exc:
        if exc.code in ("NotFoundException", "InvalidArnException", "ValidationException"):
            raise NotFound("no such AWS KMS key") from None
        raise kms.fail(exc, "describe a key") from None
    arn = _arn_of(reply)
    meta = reply["KeyMetadata"]
    key_spec, usage, _ = _KEY_SPECS[spec.key_type]
    actual_spec, actual_usage = meta.get("KeySpec", "unknown"), meta.get("KeyUsage", "unknown")
    if actual_spec != key_spec:
        raise InvalidRequest(f"the AWS KMS key is {actual_spec}, not {spec.key_type} ({key_spec})")
    if actual_usage != usage:
        raise InvalidRequest(
            f"the AWS KMS key is {actual_spec} for {actual_usage}, not for {usage} "
            f"as {spec.key_type} needs"
        )
    if meta.get("KeyState") != "Enabled":
        raise InvalidRequest("the AWS KMS key is not enabled")
    if sole_copy and meta.get("Origin") not in _MADE_INSIDE:
        raise InvalidRequest(
            f"the AWS KMS key's origin is {meta.get('Origin', 'unknown')}, not AWS_KMS or "
            "AWS_CLOUDHSM: its material was made outside AWS KMS (copies of it may exist, and "
            "imported material may expire)"
        )
    material = _Material(arn=arn, spec=key_spec, adopted=True)
    return BackendKey(
        ref=f"awskms:{arn}#{spec.version}",
        key_type=spec.key_type,
        name=spec.name,
        version=spec.version,
        material=material.dump(),
        public_key_pem=_public_key(kms, arn, spec.key_type),
    )


def destroy_key(kms: _KmsClient, key: BackendKey) -> None:
    """Schedule the deletion of the KMS key behind `key` and drop its alias (an adopted key
    is left as it is). Raises as `AwsKmsBackend.destroy`."""
    match = _REF.match(key.ref)
    if match is None:
        raise BackendError("the key reference is not an awskms reference")
    arn = match["arn"]
    try:
        material = _Material.load(key)
    except KeyDestroyed:
        material = None
    if material is not None and material.rotation:
        _log.info(
            "awskms: %s v%d is a rotation of a shared KMS key: nothing to delete",
            key.name,
            key.version,
        )
        return
    if material is not None and material.adopted:
        _log.info("awskms: %s v%d was adopted: the KMS key is left as it is", key.name, key.version)
        return
    _drop_alias(kms, key.name, arn)
    _schedule_deletion(kms, arn, raise_errors=True)


def _drop_alias(kms: _KmsClient, name: str, arn: str) -> None:
    alias = _alias_of(kms.settings.alias_prefix, name)
    try:
        described = kms.call("describe_key", "control", KeyId=alias)
        if _arn_of(described) == arn:
            kms.call("delete_alias", "control", AliasName=alias)
    except _AwsError as exc:
        if exc.code != "NotFoundException":
            raise kms.fail(exc, "delete the key alias") from None


def _schedule_deletion(kms: _KmsClient, arn: str, *, raise_errors: bool = False) -> None:
    try:
        kms.call(
            "schedule_key_deletion",
            "control",
            # the key id, not the ARN: same key for AWS (our own account); moto 5.2
            # fails with HTTP 500 on an ARN here
            KeyId=arn.rsplit("/", 1)[1],
            PendingWindowInDays=kms.settings.pending_window_days,
        )
    except _AwsError as exc:
        if exc.code in ("NotFoundException", "KMSInvalidStateException"):
            return  # gone or already pending deletion
        if raise_errors:
            raise kms.fail(exc, "schedule a key deletion") from None
        _log.error("awskms: could not schedule the deletion of %s: %s", arn, exc.code)
    except Unavailable:
        if raise_errors:
            raise
        _log.error("awskms: could not schedule the deletion of %s (unavailable)", arn)
