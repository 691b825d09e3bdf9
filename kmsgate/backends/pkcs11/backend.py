"""`Pkcs11Backend`: the KeyBackend, MacCapable, WrapCapable and AdoptCapable operations on keys
held by a PKCS#11 token, run through the token's session pool."""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, ClassVar

import pkcs11
from pkcs11 import Attribute, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11e

from kmsgate.algorithms import HashName, KeyType, SignAlg, mac_algorithm
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
from kmsgate.backends.pkcs11.adopt import (
    _adopted_public_key,
    _check_adoptable,
    _check_token_attributes,
    check_same_key,
    key_check_record,
)
from kmsgate.backends.pkcs11.keys import (
    _HMAC_MECHANISMS,
    _KINDS,
    _PRIVATE,
    _SECRET,
    _attr,
    _generated,
    _key_template,
    _parse_ref,
    _pem,
    _public_key,
    _secret_template,
    _selector,
    _sign_input,
    _SignInput,
)
from kmsgate.backends.pkcs11.sessions import (
    _ITEM_ERRORS,
    SEVERAL_OBJECTS,
    _Connection,
    _SessionPool,
    _Worker,
    find_objects,
)
from kmsgate.backends.pkcs11.settings import Pkcs11Settings, _settings
from kmsgate.config import BackendSettings
from kmsgate.errors import (
    BackendError,
    BackendUnavailable,
    DecryptionFailed,
    InvalidRequest,
    KeyDestroyed,
    KmsgateError,
    NotFound,
    NotSupported,
)
from kmsgate.uri import Pkcs11Uri

log = logging.getLogger(__name__)

_NONCE_BYTES = 12
_TAG_BYTES = 16
_ID_BYTES = 16
_GENERATED = (Attribute.LOCAL, Attribute.ALWAYS_SENSITIVE, Attribute.NEVER_EXTRACTABLE)
"""What a key kmsgate generated on the token shows."""
_BATCH_CHUNK = 32
"""Batch signs hold the module lock for at most this many signatures at a time."""


class Pkcs11Backend(KeyBackend, MacCapable, WrapCapable, AdoptCapable):
    """Keys on one PKCS#11 token, referenced by RFC 7512 URIs. Thread-safe.

    Keys are generated on the token (CKA_TOKEN, CKA_SENSITIVE, not extractable, a label
    `<name>.v<version>` and a random 16-byte CKA_ID) and referenced by RFC 7512 URIs
    (`pkcs11:token=kmsgate;object=k.v1;id=%8F...;type=private`), so `BackendKey.material` is
    None: nothing secret leaves the token (an adopted secret key's is its check record, see
    `adopt_key`). Operations:

    - ECDSA P-256/P-384: the message is hashed in software and signed with CKM_ECDSA (SoftHSM
      has no CKM_ECDSA_SHA256); the raw r||s is returned as DER.
    - RSA-3072/4096: CKM_RSA_PKCS_PSS over the digest (MGF1 with the message hash, salt = hash
      length) or CKM_RSA_PKCS over a DigestInfo (PKCS#1 v1.5).
    - Ed25519: CKM_EDDSA, where the token offers it (else 501 not_supported).
    - HMAC: generic secret keys with CKM_SHA{256,384,512}_HMAC.
    - AES-256-GCM (`wrap`/`unwrap` for envelope encryption): CKM_AES_GCM with a random 96-bit
      nonce and the AAD; output `nonce || ciphertext || tag`.
    """

    scheme: ClassVar[str] = "pkcs11"

    def __init__(self, name: str, settings: Pkcs11Settings) -> None:
        super().__init__(name)
        self.settings = settings
        self._pool = _SessionPool(name, settings)

    @classmethod
    def from_config(cls, name: str, cfg: BackendSettings) -> Pkcs11Backend:
        """Check the config (module allow-listed, PIN source readable). The token is opened
        lazily on first use. Raises ConfigError."""
        return cls(name, _settings(name, cfg))

    # -- KeyBackend ------------------------------------------------------------------------

    def create_key(self, spec: KeySpec) -> BackendKey:
        kind = _KINDS[spec.key_type]
        label = f"{spec.name}.v{spec.version}"
        key_id = secrets.token_bytes(_ID_BYTES)

        def generate(conn: _Connection, worker: _Worker) -> tuple[str, str | None]:
            missing = sorted(m.name for m in kind.mechanisms if int(m) not in conn.mechanisms)
            if missing:
                raise NotSupported(
                    f"the token of backend {self.name!r} cannot hold {spec.key_type} keys "
                    f"(no {', '.join(missing)})"
                )
            if kind.object_class == _SECRET:
                worker.session.generate_key(
                    kind.p11_type,
                    kind.bits,
                    id=key_id,
                    label=label,
                    store=True,
                    capabilities=MechanismFlag(0),
                    template=_secret_template(spec.key_type),
                )
                return conn.label, None
            public_template: dict[Attribute, Any] = {
                Attribute.PRIVATE: False,
                Attribute.VERIFY: True,
                Attribute.ENCRYPT: False,
                Attribute.WRAP: False,
            }
            if kind.curve is not None:
                public_template[Attribute.EC_PARAMS] = pkcs11.util.ec.encode_named_curve_parameters(
                    kind.curve
                )
            public, private = worker.session.generate_keypair(
                kind.p11_type,
                kind.bits,
                id=key_id,
                label=label,
                store=True,
                capabilities=MechanismFlag(0),
                public_template=public_template,
                private_template={
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.SIGN: True,
                    Attribute.DECRYPT: False,
                    Attribute.UNWRAP: False,
                    Attribute.DERIVE: False,
                },
            )
            try:
                return conn.label, _pem(_public_key(spec.key_type, public, private))
            except Exception:
                for obj in (private, public):
                    with suppress(p11e.PKCS11Error):
                        obj.destroy()
                raise

        token_label, pem = self._pool.call(f"create a {spec.key_type} key", generate, retry=False)
        ref = Pkcs11Uri(
            {
                "token": token_label.encode(),
                "object": label.encode(),
                "id": key_id,
                "type": kind.uri_type.encode(),
            }
        ).format()
        return BackendKey(ref, spec.key_type, spec.name, spec.version, None, pem)

    def sign(self, key: BackendKey, data: bytes, alg: SignAlg, *, prehashed: bool) -> bytes:
        prepared = _sign_input(key.key_type, alg, data, prehashed)

        def run(conn: _Connection, worker: _Worker) -> bytes:
            private = self._key_object(conn, worker, key)
            raw: bytes = private.sign(
                prepared.payload, mechanism=prepared.mechanism, mechanism_param=prepared.param
            )
            return raw

        return prepared.finish(self._pool.call("sign", run))

    def sign_many(
        self, key: BackendKey, messages: Sequence[SignMessage]
    ) -> list[bytes | KmsgateError]:
        """Hash every message first, then sign chunks of `_BATCH_CHUNK` per lock hold. An
        HSM out of reach stops the call (`signed_so_far`)."""
        results: list[bytes | KmsgateError | None] = [None] * len(messages)
        pending: list[tuple[int, _SignInput]] = []
        for index, message in enumerate(messages):
            try:
                pending.append(
                    (index, _sign_input(key.key_type, message.alg, message.data, message.prehashed))
                )
            except KmsgateError as exc:
                results[index] = exc
        for start in range(0, len(pending), _BATCH_CHUNK):
            chunk = pending[start : start + _BATCH_CHUNK]

            def run(
                conn: _Connection, worker: _Worker, chunk: list[tuple[int, _SignInput]] = chunk
            ) -> list[bytes | KmsgateError]:
                private = self._key_object(conn, worker, key)
                signed: list[bytes | KmsgateError] = []
                for _, prepared in chunk:
                    try:
                        signed.append(
                            private.sign(
                                prepared.payload,
                                mechanism=prepared.mechanism,
                                mechanism_param=prepared.param,
                            )
                        )
                    except _ITEM_ERRORS as exc:
                        log.warning("pkcs11 backend %r: sign failed: %s", self.name, exc)
                        signed.append(BackendError("the HSM failed to sign"))
                return signed

            try:
                raws = self._pool.call("sign", run)
            except BackendUnavailable as exc:
                return signed_so_far(results, exc)
            except KmsgateError as exc:
                raws = [exc] * len(chunk)
            for (index, prepared), raw in zip(chunk, raws, strict=True):
                try:
                    results[index] = raw if isinstance(raw, KmsgateError) else prepared.finish(raw)
                except KmsgateError as exc:
                    results[index] = exc
        return [r for r in results if r is not None]  # every message was signed or failed

    def _key_object(self, conn: _Connection, worker: _Worker, key: BackendKey) -> Any:
        """The private or secret key object of `key`, checked before its first use
        (`_check_protected`). Raises as `_SessionPool.key_object`."""
        return self._pool.key_object(
            conn, worker, key, lambda found: self._check_protected(key, found)
        )

    def _check_protected(self, key: BackendKey, found: Any) -> None:
        """Raises BackendError (and logs why) unless `found` is a key `key`'s version may
        use: what `adopt_key` requires (type, size, sensitive, not extractable, its usage)
        and, for a version kmsgate generated (`_generated`), made on the token and never
        readable (CKA_LOCAL, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE), for an adopted
        secret key, the one its check record was made with (`check_same_key`): someone with
        the PIN may have replaced it by a key whose value they know."""
        try:
            kind, generated = _KINDS[key.key_type], _generated(key)
            _check_adoptable(key.key_type, kind, found)
            if generated and any(_attr(found, a) is not True for a in _GENERATED):
                raise InvalidRequest("it was not generated on the token, or was readable once")
            if key.material is not None:  # an adopted secret key's check record
                check_same_key(key.key_type, found, key.material)
            elif kind.object_class == _SECRET and not generated:
                log.warning(
                    "pkcs11 backend %r: key %r version %d was adopted before check records: "
                    "a key put in its place on the token would not be noticed",
                    self.name,
                    key.name,
                    key.version,
                )
        except InvalidRequest as exc:
            log.error(
                "pkcs11 backend %r: the object behind key %r version %d is refused: %s",
                self.name,
                key.name,
                key.version,
                exc.detail,
            )
            raise BackendError(
                f"the token's object for this key version is not a protected key: {exc.detail}"
            ) from None

    def destroy(self, key: BackendKey) -> None:
        """Destroy the key's objects on the token: its private or secret key, and every
        public key object under its label and id (one planted beside it too). Idempotent:
        when none is found, the module is re-initialised (SoftHSM may not show this process
        objects another process made) and they are looked for again before the key counts
        as gone. Raises BackendError, BackendUnavailable."""
        kind = _KINDS[key.key_type]
        selector = _selector(_parse_ref(key.ref))

        def run(conn: _Connection, worker: _Worker) -> None:
            conn.forget(key.ref)
            secret = find_objects(worker.session, _key_template(key))
            if len(secret) > 1:
                raise BackendError(SEVERAL_OBJECTS)
            public = []  # every one: a public object anyone may add (no PIN) goes too
            if kind.object_class == _PRIVATE:
                template = {Attribute.CLASS: ObjectClass.PUBLIC_KEY, **selector}
                while batch := find_objects(worker.session, template):
                    public += batch
                    for obj in batch:
                        obj.destroy()
            if not secret and not public:
                raise p11e.NoSuchKey("no object matches the key reference")
            for obj in secret:
                obj.destroy()

        with suppress(KeyDestroyed):  # still none after re-initialising: gone already
            self._pool.call("destroy the key", run, retry=False, refresh_after=0.0)

    def keep_state_in(self, directory: Path) -> None:
        """A PIN file the token refused is not tried again by any process of the gateway
        (`PinRefusals`) until it or the token changes."""
        self._pool.refusals.keep_in(directory)

    def status(self) -> BackendStatus:
        return self._pool.status()

    def close(self) -> None:
        self._pool.close()

    # -- MacCapable ------------------------------------------------------------------------

    def mac(self, key: BackendKey, data: bytes, hash_name: HashName) -> bytes:
        if mac_algorithm(key.key_type, None) is not hash_name:
            raise InvalidRequest(f"a {key.key_type} key cannot compute hmac-{hash_name}")
        mechanism = _HMAC_MECHANISMS[hash_name]

        def run(conn: _Connection, worker: _Worker) -> bytes:
            secret = self._key_object(conn, worker, key)
            tag: bytes = secret.sign(data, mechanism=mechanism)
            return tag

        return self._pool.call("compute a MAC", run)

    def verify_mac(self, key: BackendKey, data: bytes, mac: bytes, hash_name: HashName) -> bool:
        return hmac.compare_digest(self.mac(key, data, hash_name), mac)

    # -- WrapCapable -----------------------------------------------------------------------

    def _require_aes(self, key: BackendKey) -> None:
        if key.key_type is not KeyType.AES_256_GCM:
            raise InvalidRequest(f"a {key.key_type} key cannot encrypt or decrypt")

    def wrap(self, key: BackendKey, plaintext: bytes, aad: bytes) -> bytes:
        self._require_aes(key)
        nonce = secrets.token_bytes(_NONCE_BYTES)
        params = pkcs11.GCMParams(nonce, aad, _TAG_BYTES * 8)

        def run(conn: _Connection, worker: _Worker) -> bytes:
            secret = self._key_object(conn, worker, key)
            sealed: bytes = secret.encrypt(
                plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=params
            )
            return sealed

        return nonce + self._pool.call("encrypt", run)

    def unwrap(self, key: BackendKey, ciphertext: bytes, aad: bytes) -> bytes:
        self._require_aes(key)
        if len(ciphertext) < _NONCE_BYTES + _TAG_BYTES:
            raise DecryptionFailed()
        params = pkcs11.GCMParams(ciphertext[:_NONCE_BYTES], aad, _TAG_BYTES * 8)
        body = ciphertext[_NONCE_BYTES:]

        def run(conn: _Connection, worker: _Worker) -> bytes:
            secret = self._key_object(conn, worker, key)
            plain: bytes = secret.decrypt(body, mechanism=Mechanism.AES_GCM, mechanism_param=params)
            return plain

        return self._pool.call("decrypt", run, decrypting=True)

    # -- RootKeyWrapper --------------------------------------------------------------------

    def wrapping_key(self, reference: str) -> BackendKey:
        """A handle on an existing AES-256 key on the token (`reference`: an RFC 7512 URI,
        checked as `adopt_key` checks an aes-256-gcm key, and also never extractable and
        always sensitive: no copy can exist), for wrapping softkms's root key outside the
        catalogue (auto-unseal, `root_key_wrap`). Creates and changes nothing. Raises as
        `adopt_key`."""
        key = self.adopt_key(KeySpec(ROOT_KEK_NAME, 1, KeyType.AES_256_GCM), reference)

        def check(conn: _Connection, worker: _Worker) -> None:
            secret = self._key_object(conn, worker, key)
            if (
                _attr(secret, Attribute.NEVER_EXTRACTABLE) is not True
                or _attr(secret, Attribute.ALWAYS_SENSITIVE) is not True
            ):
                raise InvalidRequest(
                    "the wrapping key was extractable or not sensitive at some time: copies "
                    "of it may exist outside the token"
                )

        self._pool.call("check the wrapping key", check)
        return key

    # -- AdoptCapable ----------------------------------------------------------------------

    def adopt_key(self, spec: KeySpec, uri: str) -> BackendKey:
        """Take over a key a ceremony tool made on this backend's token.

        The URI names one object (`id` and/or `object`; `token`, `serial`, `manufacturer`,
        `model` must match the configured token if given; `type` must be `private` for
        asymmetric types and `secret-key` for the others). The key must be sensitive, not
        extractable, of `spec.key_type`, and allowed to sign (or MAC, or encrypt+decrypt);
        an asymmetric key needs a public key object with the same id, which must match the
        private key (checked by signing a random challenge). A secret key's version gets a
        check record as its material (`key_check_record`): a key put in its place later is
        refused before its first use. A key not found is looked for again on a token that
        answers, after re-initialising the module (another process may have just made it).
        Raises InvalidRequest, NotFound, BackendError, BackendUnavailable (the token gone
        or replaced: the next call opens the new one).
        """
        kind = _KINDS[spec.key_type]
        parsed = Pkcs11Uri.parse_key_reference(uri)
        if parsed.type is not None and parsed.type != kind.uri_type:
            raise InvalidRequest(
                f"a {spec.key_type} key is a type={kind.uri_type} object, not {parsed.type}"
            )

        def run(conn: _Connection, worker: _Worker) -> tuple[str, bytes | None, str | None]:
            _check_token_attributes(conn, parsed)
            template = {Attribute.CLASS: kind.object_class, **_selector(parsed)}
            found = find_objects(worker.session, template)
            if not found:  # the pool checks the token and looks once more (`_Pool.call`)
                raise p11e.NoSuchKey("no such key on the token")
            if len(found) > 1:
                raise InvalidRequest("the URI matches several keys; add 'id' or 'object'")
            obj = found[0]
            _check_adoptable(spec.key_type, kind, obj)
            key_id: bytes = _attr(obj, Attribute.ID) or b""
            label: str = _attr(obj, Attribute.LABEL) or ""
            if not key_id and not label:
                raise InvalidRequest("the key has neither a label nor an id to refer to it by")
            canonical: dict[str, bytes] = {"token": conn.label.encode()}
            exact: dict[Attribute, Any] = {Attribute.CLASS: kind.object_class}
            if label:
                canonical["object"] = label.encode()
                exact[Attribute.LABEL] = label
            if key_id:
                canonical["id"] = key_id
                exact[Attribute.ID] = key_id
            canonical["type"] = kind.uri_type.encode()
            if len(find_objects(worker.session, exact)) != 1:
                raise InvalidRequest("the key's label and id do not identify it uniquely")
            if kind.object_class == _PRIVATE:
                pem = _adopted_public_key(worker, spec.key_type, obj, key_id)
                return Pkcs11Uri(canonical).format(), None, pem
            return Pkcs11Uri(canonical).format(), key_check_record(spec.key_type, obj), None

        try:
            ref, record, pem = self._pool.call("adopt the key", run)
        except KeyDestroyed:  # missing on a token that answers, after looking again
            raise NotFound("no such key on the token") from None
        return BackendKey(ref, spec.key_type, spec.name, spec.version, record, pem)
