"""Checks on a key made outside kmsgate (by a ceremony tool) before the pkcs11 backend adopts
it: the URI names this backend's token, the object is a protected key of the right type fit
for its use, and an asymmetric key's public key object matches it; and, for a secret key,
the check record that later shows it is still the key adopted (`key_check_record`)."""

from __future__ import annotations

import hmac
import secrets
from typing import Any

import pkcs11
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11 import KeyType as P11KeyType
from pkcs11 import exceptions as p11e

from kmsgate.algorithms import (
    KeyType,
    KeyUsage,
    mac_algorithm,
    sign_algorithm,
    verify_with_public_key,
)
from kmsgate.backends.pkcs11.keys import (
    _ED25519_PARAMS,
    _HMAC_KEY_TYPES,
    _HMAC_MECHANISMS,
    _KINDS,
    _attr,
    _Kind,
    _pem,
    _public_key,
    _sign_input,
)
from kmsgate.backends.pkcs11.sessions import _DECRYPT_ERRORS, _Connection, _Worker, find_objects
from kmsgate.errors import BackendError, InvalidRequest
from kmsgate.uri import Pkcs11Uri


def _check_token_attributes(conn: _Connection, parsed: Pkcs11Uri) -> None:
    """Raises InvalidRequest unless the URI's token attributes match `conn`'s token and it
    selects the key by token, serial, manufacturer, model, object, id and type only."""
    info = conn.token
    expected = {
        "token": conn.label,
        "serial": conn.serial.decode("ascii", errors="replace").strip(),
        "manufacturer": info.manufacturer_id,
        "model": info.model,
    }
    for name, value in expected.items():
        given = parsed.text(name)
        if given is not None and given != value:
            raise InvalidRequest(f"the URI's {name} does not match this backend's token")
    if parsed.path.keys() - {
        "token",
        "serial",
        "manufacturer",
        "model",
        "object",
        "id",
        "type",
    }:
        raise InvalidRequest(
            "only token, serial, manufacturer, model, object, id and type may select a key"
        )


def _adopted_public_key(worker: _Worker, key_type: KeyType, private: Any, key_id: bytes) -> str:
    """The PEM public key of the asymmetric key `private`, from the public key object with its
    id (or, for RSA, the private key), checked by signing a random challenge. Raises
    InvalidRequest, python-pkcs11 errors."""
    public = None
    if key_id:
        publics = find_objects(
            worker.session, {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: key_id}
        )
        if len(publics) > 1:
            raise InvalidRequest("several public key objects share the key's id")
        public = publics[0] if publics else None
    if public is None and key_type not in (KeyType.RSA_3072, KeyType.RSA_4096):
        raise InvalidRequest("no public key object with the key's id on the token")
    try:
        public_key = _public_key(key_type, public, private)
    except (BackendError, ValueError, p11e.PKCS11Error):
        raise InvalidRequest(f"the public key object cannot be read as a {key_type} key") from None
    # proof of possession: the pair must match
    challenge = secrets.token_bytes(32)
    alg = sign_algorithm(key_type, None)
    prepared = _sign_input(key_type, alg, challenge, False)
    raw = private.sign(
        prepared.payload, mechanism=prepared.mechanism, mechanism_param=prepared.param
    )
    try:
        signature = prepared.finish(raw)
    except BackendError:
        signature = b""
    if not verify_with_public_key(public_key, alg, challenge, signature, prehashed=False):
        raise InvalidRequest("the public key object does not match the private key")
    return _pem(public_key)


_CURVE_NAMES = {
    pkcs11.util.ec.encode_named_curve_parameters(kind.curve): kind.curve
    for kind in _KINDS.values()
    if kind.p11_type == P11KeyType.EC and kind.curve is not None
} | dict.fromkeys(_ED25519_PARAMS, "Ed25519")


def _described(obj: Any, p11_type: Any) -> str:
    """What the key `obj` is, for an error message: `an EC key on secp256r1`, `an RSA-2048
    key`, `an AES key`, `a GENERIC_SECRET key`."""
    if p11_type in (P11KeyType.EC, P11KeyType.EC_EDWARDS):
        curve = _CURVE_NAMES.get(_attr(obj, Attribute.EC_PARAMS), "another curve")
        return f"an {p11_type.name} key on {curve}"
    if p11_type == P11KeyType.RSA:
        bits = len(_attr(obj, Attribute.MODULUS) or b"") * 8
        return f"an RSA-{bits} key" if bits else "an RSA key"
    name = getattr(p11_type, "name", None) or "unknown"
    return f"{'an' if name[0] in 'AEIOU' else 'a'} {name} key"


def _wanted(kind: _Kind) -> str:
    """What a key of `kind` is on a token, for an error message: `EC on secp384r1`."""
    if kind.p11_type == P11KeyType.RSA:
        return f"RSA-{kind.bits}"
    if kind.curve is not None:
        curve = "Ed25519" if kind.p11_type == P11KeyType.EC_EDWARDS else kind.curve
        return f"{kind.p11_type.name} on {curve}"
    if kind.p11_type == P11KeyType.AES:
        return f"AES-{kind.bits}"
    return f"a secret key of at least {kind.bits} bits"


def _check_adoptable(key_type: KeyType, kind: _Kind, obj: Any) -> None:
    """Raises InvalidRequest unless `obj` is a protected key of `key_type` fit for its use:
    sensitive, not extractable, private (usable only after login). A mismatch names what the
    key is and what `key_type` needs."""
    p11_type = _attr(obj, Attribute.KEY_TYPE)
    if key_type.usage is KeyUsage.MAC:
        type_ok = p11_type in _HMAC_KEY_TYPES
    else:
        type_ok = p11_type == kind.p11_type
    if not type_ok:
        raise InvalidRequest(
            f"the key on the token is {_described(obj, p11_type)}, not {key_type} ({_wanted(kind)})"
        )
    if (
        _attr(obj, Attribute.SENSITIVE) is not True
        or _attr(obj, Attribute.EXTRACTABLE) is not False
    ):
        raise InvalidRequest("only sensitive, non-extractable keys can be adopted")
    if _attr(obj, Attribute.PRIVATE) is not True:
        raise InvalidRequest(
            "only private keys (CKA_PRIVATE) can be adopted: a public key object is usable "
            "without the PIN, and some tokens (SoftHSM) store its value unencrypted; make it "
            "with pkcs11-tool --private"
        )
    if kind.p11_type == P11KeyType.RSA:
        modulus = _attr(obj, Attribute.MODULUS) or b""
        if len(modulus) * 8 != kind.bits:
            raise InvalidRequest(
                f"the key on the token is {_described(obj, p11_type)}, not {key_type} "
                f"({_wanted(kind)})"
            )
    elif kind.curve is not None:
        params = _attr(obj, Attribute.EC_PARAMS)
        wanted = (
            _ED25519_PARAMS
            if key_type is KeyType.ED25519
            else (pkcs11.util.ec.encode_named_curve_parameters(kind.curve),)
        )
        if params not in wanted:
            raise InvalidRequest(
                f"the key on the token is {_described(obj, p11_type)}, not {key_type} "
                f"({_wanted(kind)})"
            )
    else:
        length = _attr(obj, Attribute.VALUE_LEN)
        assert kind.bits is not None
        size = "of unknown length" if length is None else f"{length * 8} bits"
        if key_type is KeyType.AES_256_GCM and length != 32:
            raise InvalidRequest(f"the AES key on the token is {size}, not 256 ({key_type})")
        if key_type is not KeyType.AES_256_GCM and (length is None or length * 8 < kind.bits):
            raise InvalidRequest(
                f"the HMAC key on the token is {size}, shorter than the {kind.bits} bits "
                f"{key_type} needs"
            )
    if key_type is KeyType.AES_256_GCM:
        usage_ok = _attr(obj, Attribute.ENCRYPT) and _attr(obj, Attribute.DECRYPT)
    else:
        usage_ok = _attr(obj, Attribute.SIGN)
    if not usage_ok:
        raise InvalidRequest("the key on the token is not allowed to do what its type needs")


_CHECK_TEXT = b"kmsgate: the secret key adopted on this token"
_CHECK_NONCE_BYTES = 12
_CHECK_TAG_BITS = 128


def key_check_record(key_type: KeyType, obj: Any) -> bytes:
    """What the adopted secret key `obj` makes of a fixed text, kept as the key version's
    material: an HMAC of it, or its AES-GCM encryption under a random nonce (`nonce ||
    ciphertext || tag`). Neither reveals the key. Raises python-pkcs11 errors."""
    if key_type is KeyType.AES_256_GCM:
        nonce = secrets.token_bytes(_CHECK_NONCE_BYTES)
        sealed: bytes = obj.encrypt(
            _CHECK_TEXT, mechanism=Mechanism.AES_GCM, mechanism_param=_check_params(nonce)
        )
        return nonce + sealed
    tag: bytes = obj.sign(_CHECK_TEXT, mechanism=_HMAC_MECHANISMS[mac_algorithm(key_type, None)])
    return tag


def check_same_key(key_type: KeyType, obj: Any, record: bytes) -> None:
    """Raises InvalidRequest unless the secret key `obj` is the one that made `record`
    (`key_check_record`): the AES key decrypts it, the HMAC key makes the same tag. Someone
    with the PIN may have put a key whose value they know in place of the one adopted.
    Raises python-pkcs11 errors when the token fails (an AES key that cannot decrypt even
    what it has just encrypted)."""
    if key_type is KeyType.AES_256_GCM:
        same = _decrypts(obj, record)
        if not same:  # a wrong key, unless the token cannot decrypt at all
            _decrypts(obj, key_check_record(key_type, obj), failing=True)
    else:
        same = hmac.compare_digest(key_check_record(key_type, obj), record)
    if not same:
        raise InvalidRequest(
            "it is not the key that was adopted (it does not match the check record made "
            "at adoption): replaced on the token"
        )


def _decrypts(obj: Any, record: bytes, *, failing: bool = False) -> bool:
    """Whether the AES key `obj` decrypts the check record `record` to the check text. A
    decryption error is False, or is raised if `failing`; other token errors are raised."""
    try:
        plain = obj.decrypt(
            record[_CHECK_NONCE_BYTES:],
            mechanism=Mechanism.AES_GCM,
            mechanism_param=_check_params(record[:_CHECK_NONCE_BYTES]),
        )
    except _DECRYPT_ERRORS:
        if failing:
            raise
        return False
    return hmac.compare_digest(plain, _CHECK_TEXT)


def _check_params(nonce: bytes) -> Any:
    return pkcs11.GCMParams(nonce, b"", _CHECK_TAG_BITS)
