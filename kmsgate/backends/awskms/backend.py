"""`AwsKmsBackend`: signing, MACs, wrapping and EncryptionContext encryption with keys held by
AWS KMS; key creation, adoption and deletion are delegated to `lifecycle`."""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from pydantic import ValidationError

from kmsgate.algorithms import HashName, KeyType, SignAlg
from kmsgate.backends.awskms import lifecycle
from kmsgate.backends.awskms.client import _AwsError, _KmsClient
from kmsgate.backends.awskms.material import _Material
from kmsgate.backends.awskms.settings import AwsKmsSettings, read_key_policy
from kmsgate.backends.awskms.specs import (
    _AWS_HASH,
    _CIPHERTEXT_MAX,
    _CONTEXT_PREFIX,
    _MAC_HASH,
    _RAW_MAX,
    QuotaClass,
    sign_plan,
)
from kmsgate.backends.base import (
    ROOT_KEK_NAME,
    AdoptCapable,
    BackendKey,
    BackendStatus,
    KeyBackend,
    KeySpec,
    MacCapable,
    SignMessage,
    WrapCapable,
    signed_so_far,
)
from kmsgate.config import BackendSettings, validation_problems
from kmsgate.errors import (
    BackendError,
    ConfigError,
    DecryptionFailed,
    InvalidRequest,
    KeyDestroyed,
    KmsgateError,
    Unavailable,
)

_log = logging.getLogger(__name__)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


class AwsKmsBackend(KeyBackend, MacCapable, WrapCapable, AdoptCapable):
    """AWS KMS through boto3: sign, MAC, wrap, encrypt with an EncryptionContext, rewrap.

    Key material never leaves KMS. Every kmsgate key version is recorded as the KMS key that backs
    it (`BackendKey.material`, JSON: ARN, KeySpec, and for rotated symmetric keys the on-demand
    rotation it stands for). `BackendKey.ref` is `awskms:<key ARN>#<kmsgate version>`.

    - Keys: `CreateKey` with the KeySpec / KeyUsage of the kmsgate type (`_KEY_SPECS`), the key
      policy of `key_policy_file` if set, tags from
      the labels plus `kmsgate:name` / `kmsgate:version`, alias `<alias_prefix><name>` (a `.` in a
      kmsgate name becomes `/`: AWS alias names cannot hold dots, kmsgate names cannot hold
      slashes, so the mapping is one-to-one) pointing at the newest KMS key of the kmsgate key.
    - Rotation: an aes-256-gcm key keeps one KMS key; version N > 1 is one `RotateKeyOnDemand`
      (AWS picks the right key material on decrypt). Asymmetric and HMAC keys cannot be rotated
      by AWS: version N > 1 is a new KMS key, and the alias moves to it.
    - Deletion: `destroy` schedules the KMS key's deletion (`ScheduleKeyDeletion`, window
      `pending_window_days`) and removes the alias if it still points at that key.
    - sign: `MessageType=RAW` for messages of 1-4096 bytes, `DIGEST` for digests (hashed locally
      for longer or empty messages). ECDSA with a hash other than the curve's own (P-256 with
      SHA-384, ...) signs the digest truncated or zero-padded to the curve's size, which is
      exactly what ECDSA does with a longer or shorter hash (FIPS 186-5, 6.4.1). RSA-PSS is
      AWS's: MGF1 with the message hash, salt = hash length. Verification is local (the service
      uses the public key read once with `GetPublicKey`).
    - MAC: `GenerateMac` / `VerifyMac` (1-4096 bytes, the API's limit).
    - wrap/unwrap: `Encrypt` / `Decrypt` with an EncryptionContext (the kmsgate context, the key
      name and the AAD), the KMS key pinned on decrypt. `encrypt`/`decrypt`/`generate_data_key`
      take a string-map context; `rewrap` is `ReEncrypt` between two KMS keys.
    - Throttling and transient errors: retried with full jitter (`max_attempts`), then
      BackendUnavailable (503 with Retry-After). An optional token bucket per quota class
      (`rate_limits`) keeps kmsgate under the account's request quotas.
    - kmsgate's key states are kmsgate's: the service refuses disabled keys before calling here,
      and a destroyed version (material dropped, or destroyed through this instance) is refused
      here whatever KMS would do.

    AWS error text is logged (never key material, plaintext or credentials), never put in an
    error detail.
    """

    scheme: ClassVar[str] = "awskms"

    def __init__(self, name: str, settings: AwsKmsSettings, *, client: Any | None = None) -> None:
        """Raises ConfigError if `key_policy_file` is unusable (`read_key_policy`) or the
        AWS client cannot be made."""
        super().__init__(name)
        self.settings = settings
        policy_file = settings.key_policy_file
        self._key_policy = None if policy_file is None else read_key_policy(name, policy_file)
        self._kms = _KmsClient(name, settings, client)
        self._destroyed: set[str] = set()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def from_config(cls, name: str, cfg: BackendSettings) -> AwsKmsBackend:
        """Raises ConfigError for invalid settings (the message never repeats a value)."""
        try:
            settings = AwsKmsSettings.model_validate(cfg.model_extra or {})
        except ValidationError as exc:
            problems = validation_problems(exc)
            raise ConfigError(f"backend {name!r} (awskms): {problems}") from None
        return cls(name, settings)

    @property
    def requests(self) -> int:
        """Requests sent to AWS (tries included), for tests and metrics."""
        return self._kms.requests

    def _check_live(self, key: BackendKey) -> _Material:
        """The key's material. Raises KeyDestroyed if kmsgate destroyed it, whatever AWS
        says; BackendError if its KMS key is in another region than the backend's (AWS
        would answer "not found", and the key would look destroyed)."""
        material = _Material.load(key)
        if key.ref in self._destroyed:
            raise KeyDestroyed(f"version {key.version} of {key.name!r} was destroyed")
        region = material.arn.split(":")[3]
        if region != self._kms.region:
            raise BackendError(
                f"version {key.version} of {key.name!r} is a KMS key in region {region}, but "
                f"backend {self.name!r} uses region {self._kms.region}: correct its `region`"
            )
        return material

    # -- keys -------------------------------------------------------------------------------

    def create_key(self, spec: KeySpec) -> BackendKey:
        """Version 1: a new KMS key. Version N > 1: a new KMS key (asymmetric, HMAC) or one
        on-demand rotation (aes-256-gcm), in the region of the version before it. The alias
        follows when the catalogue takes the version (`promoted`).

        Raises InvalidRequest for a name or version AWS cannot take, NotSupported if the
        endpoint refuses the KeySpec, Conflict when AWS refuses (the account's key quota or
        the key's on-demand rotations are spent, no KMS key carries the alias to rotate),
        KeyDestroyed if the KMS key to rotate is gone, BackendUnavailable (also while AWS is
        rotating the key already), BackendError (also when the version before is in another
        region than the backend's: a new version would go elsewhere).
        """
        if spec.previous is not None:
            self._check_live(spec.previous)
        return lifecycle.create_key(self._kms, spec, self._key_policy)

    def promoted(self, key: BackendKey) -> None:
        """Point the key's alias at the KMS key of `key` (`lifecycle.point_alias`)."""
        lifecycle.point_alias(self._kms, key)

    def adopt_key(self, spec: KeySpec, uri: str) -> BackendKey:
        """An existing KMS key (`awskms:<key id | ARN | alias/...>`, or the bare form),
        checked against `spec.key_type`. Creates no alias and no tag. Raises InvalidRequest,
        NotFound, BackendUnavailable, BackendError."""
        return lifecycle.adopt_key(self._kms, spec, uri)

    def key_identity(self, ref: str) -> str:
        """The KMS key's ARN: a reference is `awskms:<ARN>#<version>`."""
        return ref.partition("#")[0]

    def wrapping_key(self, reference: str) -> BackendKey:
        """A handle on an existing, enabled symmetric KMS key (`awskms:<key id | ARN |
        alias/...>`, or the bare form), for wrapping softkms's root key outside the
        catalogue (auto-unseal, `root_key_wrap`). Creates, tags and changes nothing. The
        handle's name, bound into the EncryptionContext, is always `kmsgate-root-kek`, so the
        wrapped key unwraps whichever form of `reference` names the key, and after AWS
        rotates it. Raises NotFound, InvalidRequest (malformed, not SYMMETRIC_DEFAULT, not
        enabled, its material made outside AWS KMS: imported or in an external key store),
        BackendUnavailable, BackendError."""
        spec = KeySpec(ROOT_KEK_NAME, 1, KeyType.AES_256_GCM)
        return lifecycle.adopt_key(self._kms, spec, reference, sole_copy=True)

    def destroy(self, key: BackendKey) -> None:
        """Schedule the KMS key's deletion (`pending_window_days`) and drop its alias.

        Version N > 1 of an aes-256-gcm key shares the KMS key of version 1: AWS cannot
        delete one rotation's material, so only kmsgate forgets it, as it forgets an adopted
        key (made outside kmsgate, left as it is). An already deleted key is not an error.
        Raises BackendUnavailable, BackendError.
        """
        with self._lock:
            self._destroyed.add(key.ref)
        lifecycle.destroy_key(self._kms, key)

    # -- sign -------------------------------------------------------------------------------

    def sign(self, key: BackendKey, data: bytes, alg: SignAlg, *, prehashed: bool) -> bytes:
        """Sign with KMS (see `sign_plan`). Raises InvalidRequest, KeyDestroyed,
        BackendUnavailable, BackendError."""
        if not key.key_type.is_asymmetric:
            raise InvalidRequest(f"a {key.key_type} key cannot sign")
        plan = sign_plan(key.key_type, alg, data, prehashed=prehashed)
        material = self._check_live(key)
        quota: QuotaClass = "rsa" if key.key_type in (KeyType.RSA_3072, KeyType.RSA_4096) else "ecc"
        reply = self._kms.translated_call(
            "sign",
            "sign",
            quota,
            KeyId=material.arn,
            Message=plan.message,
            MessageType=plan.message_type,
            SigningAlgorithm=plan.algorithm,
        )
        signature = reply.get("Signature")
        if not isinstance(signature, bytes) or reply.get("SigningAlgorithm") != plan.algorithm:
            raise BackendError("the backend returned a malformed signature")
        if reply.get("KeyId") not in (material.arn, None):
            raise BackendError("the backend signed with another key")
        return signature

    def sign_many(
        self, key: BackendKey, messages: Sequence[SignMessage]
    ) -> list[bytes | KmsgateError]:
        """Sign in parallel (`max_concurrency` requests in flight); KMS has no batch Sign.
        Unavailable: the signatures made stay, the rest takes the error (raised if nothing
        was signed, see `signed_so_far`); other errors stay in place."""
        if len(messages) <= 1 or self.settings.max_concurrency == 1:
            return super().sign_many(key, messages)

        def one(m: SignMessage) -> bytes | KmsgateError:
            try:
                return self.sign(key, m.data, m.alg, prehashed=m.prehashed)
            except KmsgateError as exc:
                return exc

        results = list(self._executor().map(one, messages))
        down = next((r for r in results if isinstance(r, Unavailable)), None)
        return results if down is None else signed_so_far(results, down)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.settings.max_concurrency, thread_name_prefix=f"awskms-{self.name}"
                )
            return self._pool

    # -- MAC --------------------------------------------------------------------------------

    def _mac_request(self, key: BackendKey, data: bytes, hash_name: HashName) -> tuple[str, str]:
        expected = _MAC_HASH.get(key.key_type)
        if expected is None:
            raise InvalidRequest(f"a {key.key_type} key cannot compute MACs")
        if hash_name is not expected:
            raise InvalidRequest(f"a {key.key_type} key computes HMAC-{expected.value.upper()}")
        if not 1 <= len(data) <= _RAW_MAX:
            raise InvalidRequest(f"AWS KMS computes MACs over 1 to {_RAW_MAX} bytes")
        return self._check_live(key).arn, f"HMAC_{_AWS_HASH[expected]}"

    def mac(self, key: BackendKey, data: bytes, hash_name: HashName) -> bytes:
        """GenerateMac. Raises InvalidRequest (type, hash, size), KeyDestroyed,
        BackendUnavailable, BackendError."""
        arn, aws_alg = self._mac_request(key, data, hash_name)
        reply = self._kms.translated_call(
            "compute a MAC",
            "generate_mac",
            "symmetric",
            KeyId=arn,
            Message=data,
            MacAlgorithm=aws_alg,
        )
        tag = reply.get("Mac")
        if not isinstance(tag, bytes) or len(tag) != hash_name.digest_size:
            raise BackendError("the backend returned a malformed MAC")
        return tag

    def verify_mac(self, key: BackendKey, data: bytes, mac: bytes, hash_name: HashName) -> bool:
        """VerifyMac (AWS compares); a tag of the wrong length is false without a request."""
        arn, aws_alg = self._mac_request(key, data, hash_name)
        if len(mac) != hash_name.digest_size:
            return False
        try:
            reply = self._kms.call(
                "verify_mac", "symmetric", KeyId=arn, Message=data, MacAlgorithm=aws_alg, Mac=mac
            )
        except _AwsError as exc:
            if exc.code == "KMSInvalidMacException":
                return False
            raise self._kms.fail(exc, "verify a MAC") from None
        return reply.get("MacValid") is True

    # -- encryption -------------------------------------------------------------------------

    def _encryption_key(self, key: BackendKey) -> str:
        if key.key_type is not KeyType.AES_256_GCM:
            raise InvalidRequest(f"a {key.key_type} key cannot encrypt or wrap")
        return self._check_live(key).arn

    @staticmethod
    def encryption_context(
        key: BackendKey, context: Mapping[str, str] | None = None, aad: bytes | None = None
    ) -> dict[str, str]:
        """The EncryptionContext for `key`: the caller's context, the kmsgate key name and
        (for `wrap`) the AAD in base64url. Raises InvalidRequest for a reserved key."""
        result: dict[str, str] = {}
        for k, v in (context or {}).items():
            if k.startswith(_CONTEXT_PREFIX) or k.startswith("aws"):
                raise InvalidRequest(f"context key {k!r}: the prefix is reserved")
            result[k] = v
        result[f"{_CONTEXT_PREFIX}key"] = key.name
        if aad:
            result[f"{_CONTEXT_PREFIX}aad"] = _b64url(aad)
        return result

    def _decrypt_failure(self, exc: _AwsError, what: str) -> KmsgateError:
        """Decrypt-like calls: a ciphertext that is bad, of another key, or whose context a
        key policy condition refuses (AccessDenied depends on the request then) is the
        caller's: DecryptionFailed. The error code is logged for operators."""
        if exc.code in ("InvalidCiphertextException", "IncorrectKeyException"):
            return DecryptionFailed()
        if exc.code == "AccessDeniedException":
            _log.warning("awskms %s: AccessDenied reported as decryption_failed", what)
            return DecryptionFailed()
        return self._kms.fail(exc, what)

    def encrypt(
        self, key: BackendKey, plaintext: bytes, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Encrypt (1-4096 bytes) with the EncryptionContext of `context`. Raises
        InvalidRequest, KeyDestroyed, BackendUnavailable, BackendError."""
        return self._encrypt(key, plaintext, self.encryption_context(key, context))

    def _encrypt(self, key: BackendKey, plaintext: bytes, context: dict[str, str]) -> bytes:
        arn = self._encryption_key(key)
        if not 1 <= len(plaintext) <= _RAW_MAX:
            raise InvalidRequest(f"AWS KMS encrypts 1 to {_RAW_MAX} bytes")
        reply = self._kms.translated_call(
            "encrypt",
            "encrypt",
            "symmetric",
            KeyId=arn,
            Plaintext=plaintext,
            EncryptionContext=context,
        )
        blob = reply.get("CiphertextBlob")
        if not isinstance(blob, bytes) or not blob:
            raise BackendError("the backend returned a malformed ciphertext")
        return blob

    def decrypt(
        self, key: BackendKey, ciphertext: bytes, context: Mapping[str, str] | None = None
    ) -> bytes:
        """Decrypt with the KMS key pinned. Raises DecryptionFailed, InvalidRequest (not an
        aes-256-gcm key, a reserved context key), KeyDestroyed, BackendUnavailable,
        BackendError."""
        return self._decrypt(key, ciphertext, self.encryption_context(key, context))

    def _decrypt(self, key: BackendKey, ciphertext: bytes, context: dict[str, str]) -> bytes:
        arn = self._encryption_key(key)
        if not 1 <= len(ciphertext) <= _CIPHERTEXT_MAX:
            raise DecryptionFailed()
        try:
            reply = self._kms.call(
                "decrypt",
                "symmetric",
                KeyId=arn,
                CiphertextBlob=ciphertext,
                EncryptionContext=context,
            )
        except _AwsError as exc:
            raise self._decrypt_failure(exc, "decrypt") from None
        plaintext = reply.get("Plaintext")
        if reply.get("KeyId") not in (arn, None):
            raise DecryptionFailed()
        if not isinstance(plaintext, bytes):
            raise BackendError("the backend returned a malformed plaintext")
        return plaintext

    def wrap(self, key: BackendKey, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt bound to `aad` (in the EncryptionContext). Raises InvalidRequest outside
        1-4096 bytes."""
        return self._encrypt(key, plaintext, self.encryption_context(key, aad=aad))

    def unwrap(self, key: BackendKey, ciphertext: bytes, aad: bytes) -> bytes:
        """Reverse `wrap`. Raises DecryptionFailed if the ciphertext or `aad` is wrong."""
        return self._decrypt(key, ciphertext, self.encryption_context(key, aad=aad))

    def generate_data_key(
        self,
        key: BackendKey,
        num_bytes: int = 32,
        context: Mapping[str, str] | None = None,
        *,
        include_plaintext: bool = True,
    ) -> tuple[bytes | None, bytes]:
        """(plaintext or None, ciphertext) of a fresh data key made and wrapped by KMS
        (GenerateDataKey / GenerateDataKeyWithoutPlaintext); `decrypt` unwraps it. Raises
        InvalidRequest (not an aes-256-gcm key, a size outside 1-1024 bytes, a reserved
        context key), KeyDestroyed, BackendUnavailable, BackendError."""
        arn = self._encryption_key(key)
        if not 1 <= num_bytes <= 1024:
            raise InvalidRequest("data keys are 1 to 1024 bytes")
        operation = (
            "generate_data_key" if include_plaintext else ("generate_data_key_without_plaintext")
        )
        reply = self._kms.translated_call(
            "generate a data key",
            operation,
            "symmetric",
            KeyId=arn,
            NumberOfBytes=num_bytes,
            EncryptionContext=self.encryption_context(key, context),
        )
        blob = reply.get("CiphertextBlob")
        plaintext = reply.get("Plaintext") if include_plaintext else None
        if not isinstance(blob, bytes) or (
            include_plaintext and (not isinstance(plaintext, bytes) or len(plaintext) != num_bytes)
        ):
            raise BackendError("the backend returned a malformed data key")
        return plaintext, blob

    def rewrap(
        self,
        source: BackendKey,
        ciphertext: bytes,
        destination: BackendKey,
        *,
        source_context: Mapping[str, str] | None = None,
        destination_context: Mapping[str, str] | None = None,
    ) -> bytes:
        """ReEncrypt from `source` to `destination` (both KMS keys of this backend): the
        plaintext never leaves KMS. Raises DecryptionFailed, InvalidRequest (a key that is
        not aes-256-gcm, a reserved context key), KeyDestroyed, BackendUnavailable,
        BackendError."""
        source_arn = self._encryption_key(source)
        destination_arn = self._encryption_key(destination)
        if not 1 <= len(ciphertext) <= _CIPHERTEXT_MAX:
            raise DecryptionFailed()
        try:
            reply = self._kms.call(
                "re_encrypt",
                "symmetric",
                CiphertextBlob=ciphertext,
                SourceKeyId=source_arn,
                SourceEncryptionContext=self.encryption_context(source, source_context),
                DestinationKeyId=destination_arn,
                DestinationEncryptionContext=self.encryption_context(
                    destination, destination_context
                ),
            )
        except _AwsError as exc:
            raise self._decrypt_failure(exc, "re-encrypt") from None
        if reply.get("SourceKeyId") not in (source_arn, None):
            raise DecryptionFailed()
        blob = reply.get("CiphertextBlob")
        if not isinstance(blob, bytes) or reply.get("KeyId") not in (destination_arn, None):
            raise BackendError("the backend returned a malformed ciphertext")
        return blob

    # -- status and shutdown --------------------------------------------------------------

    def status(self) -> BackendStatus:
        """Reachable and accepting kmsgate's credentials (ListKeys with Limit=1)."""
        try:
            self._kms.call("list_keys", "control", Limit=1)
        except Unavailable as exc:  # the readiness reply names the backend already
            return BackendStatus(
                ok=False, detail=exc.detail.removeprefix(f"backend {self.name!r} is ")
            )
        except (_AwsError, KmsgateError):
            return BackendStatus(ok=False, detail="AWS KMS refused the request")
        return BackendStatus(ok=True)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._kms.close()
