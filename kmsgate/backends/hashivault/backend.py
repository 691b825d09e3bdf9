"""`HashiVaultBackend`: the KeyBackend, MacCapable and WrapCapable operations on Transit keys,
built on the Vault client, the token handling and the batching of this package."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import ClassVar

import requests
from pydantic import ValidationError

from kmsgate.algorithms import (
    HashName,
    KeyType,
    KeyUsage,
    SignAlg,
    check_digest,
    sign_algorithm,
)
from kmsgate.backends.base import (
    BackendKey,
    BackendStatus,
    KeyBackend,
    KeySpec,
    MacCapable,
    PkiEngineCapable,
    SignMessage,
    WrapCapable,
    signed_so_far,
)
from kmsgate.backends.hashivault.client import _VaultClient
from kmsgate.backends.hashivault.coalescer import _Coalescer, _Result
from kmsgate.backends.hashivault.pki import VaultPki
from kmsgate.backends.hashivault.settings import HashiVaultSettings
from kmsgate.backends.hashivault.transit import (
    _MAC_HASH,
    _MOUNT,
    _NAME,
    _TRANSIT_HASH,
    _TRANSIT_TYPES,
    _WRAP_FORMAT,
    _WRAP_MIN_LEN,
    _aead_params,
    _b64,
    _KeyInfo,
    _public_key_pem,
    _Ref,
    _sign_params,
    _strip_prefix,
    _unb64,
)
from kmsgate.config import BackendSettings, validation_problems
from kmsgate.errors import (
    BackendError,
    ConfigError,
    Conflict,
    DecryptionFailed,
    InvalidRequest,
    KmsgateError,
    NotFound,
    NotSupported,
    Unavailable,
)

_log = logging.getLogger(__name__)


class HashiVaultBackend(KeyBackend, MacCapable, WrapCapable, PkiEngineCapable):
    """Keys in a Vault/OpenBao Transit mount. Thread-safe; every call may block (HTTP).

    Key material never leaves Transit (keys are created with `exportable=false`). kmsgate's
    version 1 of a key creates the Transit key `<key_prefix><name>` (Transit version 1); every
    later version is a Transit rotation, usually to the same number. A `BackendKey.ref` names
    mount, Transit key and Transit version: `hashivault:<mount>/<transit-name>#<version>`,
    and every operation pins that version (`key_version`), so a rotation made outside kmsgate
    never changes what a kmsgate version signs with. The numbers part when Transit rotated
    without kmsgate keeping the version (concurrent rotations, of which the catalogue keeps
    one; a reply lost, or that came after the request timed out): the next kmsgate version
    takes Transit's newest, so the two never block each other.

    - sign: `hash_algorithm`, `prehashed`, `signature_algorithm` (`pss` with an explicit salt
      length equal to the hash length, `pkcs1v15`), `marshaling_algorithm=asn1`; the
      `vault:vN:` prefix is stripped and N checked. Batches use `batch_input`: one request per
      (algorithm, prehashed) group and `batch_size` items. Verification is local (the service
      uses the public key read from Transit at creation).
    - MAC: `hmac` keys (`key_size` 32/48/64 bytes) and the `hmac` endpoint.
    - wrap/unwrap: `encrypt`/`decrypt` with `associated_data` (and a derivation `context` when
      the Transit key is derived). The wrapped form is compact binary, see `_WRAP_FORMAT`.
    - Errors: Vault sealed, down, unreachable or timing out -> BackendUnavailable (503 with
      Retry-After); kmsgate's own token refused -> BackendError (502). Vault's error text is
      logged, never put in an error detail.
    - Auth: a token (inline or `token_file`), AppRole or a Kubernetes service account; the
      token is renewed (or the login redone) at two thirds of its TTL by a background thread,
      and re-acquired once when Vault answers 403.
    """

    scheme: ClassVar[str] = "hashivault"

    def __init__(self, name: str, settings: HashiVaultSettings) -> None:
        super().__init__(name)
        self.settings = settings
        self._vault = _VaultClient(name, settings)
        self._coalescer = _Coalescer(settings.batch_size, settings.max_inflight)

    @classmethod
    def from_config(cls, name: str, cfg: BackendSettings) -> HashiVaultBackend:
        """Raises ConfigError (the message never repeats a configured secret)."""
        try:
            settings = HashiVaultSettings.model_validate(cfg.model_extra or {})
        except ValidationError as exc:
            problems = validation_problems(exc)
            raise ConfigError(f"backend {name!r} (hashivault): {problems}") from None
        return cls(name, settings)

    @property
    def http_session(self) -> requests.Session:
        """The HTTP session to Vault (tests and benchmarks attach response hooks to count)."""
        session: requests.Session = self._vault.hvac.adapter.session
        return session

    def pki(self, mount: str, role: str) -> VaultPki:
        """The PKI engine at `mount`, issuing through `role`, on this backend's connection.
        Raises InvalidRequest for a mount or role that is not a plain path segment."""
        return VaultPki(self._vault, mount, role)

    def _transit_name(self, name: str) -> str:
        if not _NAME.match(name):
            raise InvalidRequest(f"key name {name!r} cannot name a Transit key")
        return f"{self.settings.key_prefix}{name}"

    # -- KeyBackend ------------------------------------------------------------------------

    def create_key(self, spec: KeySpec) -> BackendKey:
        """Version 1 creates Transit key `<key_prefix><name>` (refused if it exists); version
        N > 1 rotates it to Transit version N.

        Raises InvalidRequest for a name Transit cannot hold or a version below 1, Conflict if
        version 1's Transit key already exists, NotSupported, BackendUnavailable, BackendError.
        """
        entry = _TRANSIT_TYPES.get(spec.key_type)
        if entry is None:
            raise NotSupported(f"backend {self.name!r} cannot hold {spec.key_type} keys")
        if spec.version < 1:
            raise InvalidRequest("key versions start at 1")
        transit_type, params = entry
        mount, name = self.settings.mount, self._transit_name(spec.name)
        existing = self._vault.read_info(mount, name)
        if existing is not None:
            self._check_type(name, existing, transit_type)
        if spec.version == 1:
            if existing is not None:
                raise Conflict(
                    f"Transit key {name!r} already exists in mount {mount!r}: made outside "
                    "kmsgate, or by an earlier creation of this key whose reply never came "
                    "back (Vault stalled); kmsgate does not take over a key it cannot tell "
                    "it made. If no kmsgate key uses it, delete it in Vault and create again"
                )
            body: dict[str, object] = {
                "type": transit_type,
                "exportable": False,
                "allow_plaintext_backup": False,
                **params,
            }
            if spec.key_type is KeyType.AES_256_GCM and self.settings.derived:
                body["derived"] = True
            try:
                reply = self._vault.call("POST", f"{mount}/keys/{name}", "create a key", body)
                info = self._vault.described(mount, name, reply)
            except (Unavailable, BackendError):
                # the reply was lost (a connection cut, a timeout): a key there now, at its
                # first version, was made by this call, which found none just before
                info = self._vault.read_info(mount, name)
                if info is None or info.latest_version != 1:
                    raise
        else:
            if existing is None:
                raise BackendError(f"Transit key {name!r} is missing: cannot add a version")
            info = existing
            after = _Ref.parse(spec.previous.ref).version if spec.previous else spec.version - 1
            if existing.latest_version <= after:
                try:
                    reply = self._vault.call("POST", f"{mount}/keys/{name}/rotate", "rotate a key")
                    info = self._vault.described(mount, name, reply)
                except BackendError:  # Vault's 500 for a commit that lost to another rotation
                    now = self._vault.read_info(mount, name)
                    if now is None or now.latest_version <= after:
                        raise
                    info = now
            # else Transit holds versions past the previous one that no kmsgate version uses
            # (a rotation that lost a race in the catalogue, or whose reply was lost): the
            # newest serves
        if info is None:
            raise BackendError(f"Transit key {name!r} vanished while being created")
        self._check_type(name, info, transit_type)
        if spec.version == 1 and info.latest_version != 1:
            raise BackendError(f"Transit key {name!r} was rotated outside kmsgate as it was made")
        ref = _Ref(mount, name, info.latest_version)
        pem = (
            _public_key_pem(spec.key_type, info.public_keys.get(info.latest_version))
            if spec.key_type.is_asymmetric
            else None
        )
        return BackendKey(str(ref), spec.key_type, spec.name, spec.version, None, pem)

    @staticmethod
    def _check_type(name: str, info: _KeyInfo, transit_type: str) -> None:
        if info.transit_type != transit_type:
            raise BackendError(f"Transit key {name!r} is {info.transit_type}, not {transit_type}")
        if info.exportable:
            raise BackendError(
                f"Transit key {name!r} was made exportable outside kmsgate (its material can "
                "leave Vault): kmsgate uses it no more"
            )

    def sign(self, key: BackendKey, data: bytes, alg: SignAlg, *, prehashed: bool) -> bytes:
        [result] = self.sign_many(key, [SignMessage(data, alg, prehashed)])
        if isinstance(result, KmsgateError):
            raise result
        return result

    def sign_many(
        self, key: BackendKey, messages: Sequence[SignMessage]
    ) -> list[bytes | KmsgateError]:
        """One Transit `sign` request per (algorithm, prehashed) group and `batch_size`
        items. Unavailable stops the call (`signed_so_far`: what was signed stays, the rest
        takes the error; raised if nothing was signed); other errors stay in place. Raises
        BackendError if the key reference is not a hashivault one or the Transit key was
        made exportable outside kmsgate, KeyDestroyed if it is gone."""
        ref = _Ref.parse(key.ref)
        self._vault.info(ref)  # cached: a key made exportable signs no more
        results: list[bytes | KmsgateError | None] = [None] * len(messages)
        groups: dict[tuple[str, bool], list[int]] = {}
        for index, message in enumerate(messages):
            try:
                self._check_sign(key.key_type, message)
            except KmsgateError as exc:
                results[index] = exc
                continue
            groups.setdefault((message.alg.name, message.prehashed), []).append(index)
        for (alg_name, prehashed), indexes in groups.items():
            params = _sign_params(messages[indexes[0]].alg, prehashed)

            def send(
                inputs: Sequence[bytes], params: Mapping[str, object] = params
            ) -> list[_Result]:
                return self._sign_chunk(ref, params, inputs)

            signed, down = self._batched(
                ("sign", key.ref, alg_name, prehashed), [messages[i].data for i in indexes], send
            )
            for index, result in zip(indexes, signed, strict=True):
                results[index] = result
            if down is not None:
                return signed_so_far(results, down)
        return [r for r in results if r is not None]

    @staticmethod
    def _check_sign(key_type: KeyType, message: SignMessage) -> None:
        sign_algorithm(key_type, message.alg.name)  # raises InvalidRequest if it does not fit
        if message.prehashed:
            check_digest(message.alg, message.data)

    def _sign_chunk(
        self, ref: _Ref, params: Mapping[str, object], inputs: Sequence[bytes]
    ) -> list[bytes | KmsgateError]:
        body = {
            **params,
            "key_version": ref.version,
            "batch_input": [{"input": _b64(data)} for data in inputs],
        }
        reply = self._vault.call("POST", f"{ref.mount}/sign/{ref.name}", "sign", body)
        return self._vault.batch_results(reply, ref, len(inputs), "signature", "signature")

    def destroy(self, key: BackendKey) -> None:
        """Destroy one Transit version as far as Transit allows.

        - the only version left: `deletion_allowed=true`, then delete the whole Transit key;
        - the oldest version left: raise `min_decryption_version` / `min_encryption_version`
          past it and trim it (`min_available_version`): its material is gone;
        - a version with older live versions below it (a rotation the catalogue rolled back):
          Transit cannot remove it alone. It stays unused; the next rotation reuses it, and
          destroying the whole key removes it.
        An already missing key or version is not an error. Raises BackendUnavailable,
        BackendError.
        """
        ref = _Ref.parse(key.ref)
        info = self._vault.read_info(ref.mount, ref.name)
        self._vault.forget(ref.mount, ref.name)
        if info is None or ref.version not in info.available_versions:
            return
        base = f"{ref.mount}/keys/{ref.name}"
        available = info.available_versions
        if len(available) == 1:
            self._vault.call("POST", f"{base}/config", "allow deletion", {"deletion_allowed": True})
            self._vault.call("DELETE", base, "delete a key")
        elif ref.version == available[0]:
            floor = ref.version + 1
            self._vault.call(
                "POST",
                f"{base}/config",
                "retire a version",
                {
                    "min_decryption_version": max(info.min_decryption_version, floor),
                    "min_encryption_version": max(info.min_encryption_version, floor),
                },
            )
            self._vault.call(
                "POST", f"{base}/trim", "trim a version", {"min_available_version": floor}
            )
        else:
            _log.warning(
                "hashivault %s: Transit cannot destroy version %s of %s alone (older versions "
                "are live); it stays unused until the key is destroyed",
                self.name,
                ref.version,
                ref.name,
            )

    def retire_versions_below(self, oldest: BackendKey) -> None:
        """Mirror kmsgate's `min_decrypt_version` (the version `oldest`) onto Transit's
        `min_decryption_version`, its Transit version, so Transit itself refuses to decrypt
        (and verify HMACs) below it: raised with it, and lowered with it (undoing a
        retirement, while Transit still holds those versions). Raises KeyDestroyed if the
        Transit key is gone, BackendUnavailable, BackendError (Vault refuses: the versions
        were trimmed)."""
        ref = _Ref.parse(oldest.ref)
        info = self._vault.info(ref)
        if ref.version == info.min_decryption_version:
            return
        body: dict[str, object] = {"min_decryption_version": ref.version}
        if info.min_encryption_version and info.min_encryption_version < ref.version:
            body["min_encryption_version"] = ref.version
        self._vault.call("POST", f"{ref.mount}/keys/{ref.name}/config", "set min version", body)
        self._vault.forget(ref.mount, ref.name)

    def status(self) -> BackendStatus:
        """Vault's health (unsealed, initialised) and whether it accepts kmsgate's token."""
        try:
            health = self._vault.health()
        except requests.RequestException as exc:
            _log.warning("hashivault %s: health check failed: %s", self.name, exc)
            tls = isinstance(exc, requests.exceptions.SSLError)
            return BackendStatus(False, "TLS verification failed" if tls else "unreachable")
        code = health.status_code
        if code == 503:
            return BackendStatus(False, "sealed")
        if code == 501:
            return BackendStatus(False, "not initialized")
        if code not in (200, 429, 472, 473):
            return BackendStatus(False, f"unhealthy (HTTP {code})")
        try:
            self._vault.call("GET", "auth/token/lookup-self", "check the token")
        except Unavailable as exc:
            return BackendStatus(False, exc.detail.removeprefix(f"backend {self.name!r} is "))
        except KmsgateError:
            return BackendStatus(False, "kmsgate's credentials were refused")
        return BackendStatus(True, "ok" if code == 200 else "ok (standby)")

    def close(self) -> None:
        self._vault.close()

    # -- MacCapable ------------------------------------------------------------------------

    def mac(self, key: BackendKey, data: bytes, hash_name: HashName) -> bytes:
        [tag] = self.mac_many(key, [data], hash_name)
        if isinstance(tag, KmsgateError):
            raise tag
        return tag

    def mac_many(
        self, key: BackendKey, messages: Sequence[bytes], hash_name: HashName
    ) -> list[bytes | KmsgateError]:
        """One Transit `hmac` request per `batch_size` messages (concurrent calls on the key
        share requests). Unavailable as `sign_many` treats it. Raises InvalidRequest for a
        key or hash that computes no such MAC, BackendError and KeyDestroyed as
        `sign_many`."""
        expected = _MAC_HASH.get(key.key_type)
        if expected is None:
            raise InvalidRequest(f"a {key.key_type} key cannot compute MACs")
        if hash_name is not expected:
            raise InvalidRequest(f"a {key.key_type} key computes HMAC-{expected.upper()} only")
        ref = _Ref.parse(key.ref)
        self._vault.info(ref)  # as `sign_many`

        def send(inputs: Sequence[bytes]) -> list[_Result]:
            return self._mac_chunk(ref, hash_name, inputs)

        done, down = self._batched(("hmac", key.ref, hash_name), messages, send)
        if down is not None:
            return signed_so_far(done, down)
        return [r for r in done if r is not None]

    def _batched(
        self,
        group: Hashable,
        inputs: Sequence[bytes],
        send: Callable[[Sequence[bytes]], list[_Result]],
    ) -> tuple[list[bytes | KmsgateError | None], Unavailable | None]:
        """`inputs` sent `batch_size` per request through the coalescer (concurrent calls
        of one `group` share requests): each result in its input's place, a failed chunk's
        error in each of its places. Stops at Unavailable, returned with the results so
        far (None for the inputs not sent)."""
        results: list[bytes | KmsgateError | None] = []
        size = self.settings.batch_size
        for start in range(0, len(inputs), size):
            chunk = list(inputs[start : start + size])
            try:
                results += self._coalescer.run(group, chunk, send)
            except Unavailable as exc:
                return [*results, *[None] * (len(inputs) - len(results))], exc
            except KmsgateError as exc:
                results += [exc] * len(chunk)
        return results, None

    def _mac_chunk(
        self, ref: _Ref, hash_name: HashName, inputs: Sequence[bytes]
    ) -> list[bytes | KmsgateError]:
        body = {
            "algorithm": _TRANSIT_HASH[hash_name],
            "key_version": ref.version,
            "batch_input": [{"input": _b64(data)} for data in inputs],
        }
        reply = self._vault.call("POST", f"{ref.mount}/hmac/{ref.name}", "compute a MAC", body)
        return self._vault.batch_results(
            reply, ref, len(inputs), "hmac", "MAC", expected_size=hash_name.digest_size
        )

    def verify_mac(self, key: BackendKey, data: bytes, mac: bytes, hash_name: HashName) -> bool:
        return hmac.compare_digest(self.mac(key, data, hash_name), mac)

    # -- WrapCapable -----------------------------------------------------------------------

    @staticmethod
    def _require_aes(key: BackendKey) -> None:
        if key.key_type.usage is not KeyUsage.ENCRYPT:
            raise InvalidRequest(f"a {key.key_type} key cannot wrap or unwrap")

    def wrap(self, key: BackendKey, plaintext: bytes, aad: bytes) -> bytes:
        self._require_aes(key)
        ref = _Ref.parse(key.ref)
        info = self._vault.info(ref)  # also keeps encrypt from re-creating a destroyed key (upsert)
        body = {
            "plaintext": _b64(plaintext),
            "key_version": ref.version,
            **_aead_params(info, aad),
        }
        try:
            reply = self._vault.call("POST", f"{ref.mount}/encrypt/{ref.name}", "encrypt", body)
        except BackendError:
            # Transit answers an encrypt with a key deleted since `info` was cached as an
            # upsert, which kmsgate's policy refuses (403): say the key is gone, if it is
            self._vault.forget(ref.mount, ref.name)
            self._vault.info(ref)
            raise
        raw = _strip_prefix((reply.get("data") or {}).get("ciphertext"), ref.version, "ciphertext")
        return _WRAP_FORMAT + ref.version.to_bytes(4, "big") + raw

    def unwrap(self, key: BackendKey, ciphertext: bytes, aad: bytes) -> bytes:
        """Decrypt with the Transit version recorded in the wrapped form (so a key handle
        survives rotation: auto-unseal). Raises DecryptionFailed (also for a version Transit
        no longer decrypts with), InvalidRequest, KeyDestroyed, BackendUnavailable,
        BackendError."""
        self._require_aes(key)
        if len(ciphertext) < _WRAP_MIN_LEN or not ciphertext.startswith(_WRAP_FORMAT):
            raise DecryptionFailed()
        version = int.from_bytes(ciphertext[1:5], "big")
        if version < 1:
            raise DecryptionFailed()
        ref = _Ref.parse(key.ref)
        info = self._vault.info(ref)
        body = {
            "ciphertext": f"vault:v{version}:{_b64(ciphertext[5:])}",
            **_aead_params(info, aad),
        }
        reply = self._vault.call(
            "POST",
            f"{ref.mount}/decrypt/{ref.name}",
            "decrypt",
            body,
            on_invalid=lambda _message: DecryptionFailed(),
        )
        try:
            return _unb64((reply.get("data") or {}).get("plaintext") or "")
        except (ValueError, TypeError):
            raise BackendError(f"backend {self.name!r} returned malformed plaintext") from None

    # -- auto-unseal support -----------------------------------------------------------------

    def wrapping_key(self, transit_name: str, *, mount: str | None = None) -> BackendKey:
        """A handle on an existing aes256-gcm96 Transit key (latest version), for wrapping
        softkms's root key outside the catalogue (auto-unseal). `transit_name` is the Transit
        key's own name (no prefix added). `unwrap` works across later Transit rotations.

        Raises NotFound if it does not exist, InvalidRequest if it is not aes256-gcm96, is
        exportable or was imported (a copy of it exists outside Vault), or a name is
        malformed; BackendUnavailable, BackendError.
        """
        mount = mount or self.settings.mount
        if not _NAME.match(transit_name) or not _MOUNT.match(mount):
            raise InvalidRequest("malformed Transit key or mount name")
        info = self._vault.read_info(mount, transit_name)
        if info is None:
            raise NotFound(f"no Transit key {transit_name!r} in mount {mount!r}")
        if info.transit_type != "aes256-gcm96" or info.exportable:
            raise InvalidRequest(
                f"Transit key {transit_name!r} is {info.transit_type}"
                f"{' and exportable' if info.exportable else ''}, not a non-exportable "
                "aes256-gcm96 key"
            )
        if info.imported:
            raise InvalidRequest(
                f"Transit key {transit_name!r} was imported: a copy of it exists outside Vault"
            )
        ref = _Ref(mount, transit_name, info.latest_version)
        return BackendKey(str(ref), KeyType.AES_256_GCM, transit_name, info.latest_version)
