"""The offline root's key on a PKCS#11 token (an HSM kept offline, a smart card).

`kmsgate ca init-root --token URI` makes the root key on the token and signs the root's
certificate with it; `kmsgate ca sign-intermediate --token URI` signs intermediates with it.
Both run in the ceremony process only, through the pkcs11 backend and `RemoteKey`: the key is
made with the backend's template (sensitive, never extractable), found with its adoption
checks, and signs through the same code as a gateway's HSM-held CA.

The RFC 7512 URI names the token (`token=` label or `serial=`) and, for an existing key, the
key (`object=` label and/or `id=`, as `init-root` prints it). Its query names the module
(`module-path=`, allow-listed like a configured backend's module) and may name the file that
holds the PIN (`pin-source=file:/path`); a `pin-value` is refused, since a PIN is never
written in a URI. Without `pin-source`, the caller hands the PIN over in an environment
variable of its own process (the CLI prompts for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast
from urllib.parse import unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kmsgate.algorithms import KeyType, key_type_of_public_key
from kmsgate.backends import backend_class
from kmsgate.backends.base import KeySpec
from kmsgate.config import BackendSettings
from kmsgate.errors import Conflict, InvalidRequest, NotFound
from kmsgate.pki.remote_key import remote_private_key
from kmsgate.pki.root import RootKey
from kmsgate.uri import Pkcs11Uri

if TYPE_CHECKING:  # python-pkcs11 is an extra: imported only once a token is opened
    from kmsgate.backends.pkcs11 import Pkcs11Backend

ROOT_KEY_LABEL = "kmsgate-root"
"""The key's name when the URI of `init-root` names no `object`; the token object is
labelled `<name>.v1`."""
_BACKEND = "root-token"


@dataclass(frozen=True)
class RootToken:
    """Where the root key is: a module, a token and (for an existing key) the key."""

    uri: Pkcs11Uri

    @classmethod
    def parse(cls, text: str) -> RootToken:
        """Raises InvalidRequest: not a PKCS#11 URI, no `module-path`, no token, a PIN in
        the URI, or a `pin-source` that is not a file."""
        uri = Pkcs11Uri.parse(text)
        if "pin-value" in uri.query:
            raise InvalidRequest("a PIN is never written in a URI: use pin-source or the prompt")
        if "module-path" not in uri.query:
            raise InvalidRequest("the token URI needs module-path=<the PKCS#11 module>")
        if uri.token is None and uri.serial is None:
            raise InvalidRequest("the token URI needs token=<label> or serial=<serial>")
        token = cls(uri)
        token.pin_file()  # a pin-source that is not a file is refused now
        return token

    @property
    def key_reference(self) -> str:
        """The URI's path alone (token and key), as a backend key reference."""
        return Pkcs11Uri(self.uri.path).format()

    def pin_file(self) -> Path | None:
        """The PIN's file, from `pin-source` (`file:` URI or a path). Raises InvalidRequest."""
        source = self.uri.query.get("pin-source")
        if source is None:
            return None
        text = source.decode("utf-8", errors="replace")
        if text.startswith("file:"):
            parts = urlsplit(text)
            if parts.netloc not in ("", "localhost"):
                raise InvalidRequest("pin-source must be a local file")
            text = unquote(parts.path)
        if not text.startswith("/"):
            raise InvalidRequest("pin-source must be an absolute file path or file: URI")
        return Path(text)

    def open(self, pin_env: str | None = None) -> Pkcs11Backend:
        """The pkcs11 backend on this token: the PIN from `pin-source`, else from the
        environment variable `pin_env`. Raises ConfigError (module not allow-listed, PIN
        unreadable or unset; python-pkcs11 not installed), InvalidRequest."""
        pin_file = self.pin_file()
        if pin_file is None and pin_env is None:
            raise InvalidRequest("the token's PIN: set pin-source in the URI, or give it")
        settings = {
            "type": "pkcs11",
            "module": self.uri.query["module-path"].decode("utf-8", errors="replace"),
            "token": self.uri.token,
            "token_serial": self.uri.serial,
            "sessions": 1,
            **({"pin_file": str(pin_file)} if pin_file else {"pin_env": pin_env}),
        }
        config = BackendSettings.model_validate({k: v for k, v in settings.items() if v})
        return cast("Pkcs11Backend", backend_class("pkcs11").from_config(_BACKEND, config))


def create_root_key(backend: Pkcs11Backend, token: RootToken, key_type: str) -> tuple[RootKey, str]:
    """A new root key on the token (named by the URI's `object`, else `ROOT_KEY_LABEL`) and
    the URI that finds it again. Raises Conflict if the token has a key of that name,
    InvalidRequest (key type), NotSupported, BackendError."""
    name = token.uri.object or ROOT_KEY_LABEL
    if key_type not in (KeyType.ECDSA_P256, KeyType.ECDSA_P384, KeyType.RSA_3072, KeyType.RSA_4096):
        raise InvalidRequest(f"a root key on a token cannot be {key_type!r}")
    spec = KeySpec(name=name, version=1, key_type=KeyType(key_type))
    label = Pkcs11Uri({**token.uri.path, "object": f"{name}.v1".encode(), "type": b"private"})
    try:
        backend.adopt_key(spec, label.format())
    except NotFound:
        pass
    else:
        raise Conflict(f"the token holds a key labelled {name}.v1 already: refusing a second")
    made = backend.create_key(spec)
    assert made.public_key_pem is not None  # asymmetric keys come with their public key
    public = serialization.load_pem_public_key(made.public_key_pem.encode())
    return _root_key(remote_private_key(backend, made, public)), made.ref


def find_root_key(backend: Pkcs11Backend, token: RootToken, root_cert: x509.Certificate) -> RootKey:
    """The root key the URI names, checked against the root certificate (and by the
    backend's adoption checks: sensitive, never extractable, may sign). Raises NotFound,
    InvalidRequest (another key, or a URI that matches several), BackendError."""
    public = root_cert.public_key()
    spec = KeySpec(name=ROOT_KEY_LABEL, version=1, key_type=key_type_of_public_key(public))
    held = backend.adopt_key(spec, token.key_reference)
    return _root_key(remote_private_key(backend, held, public))


def _root_key(key: object) -> RootKey:
    if not isinstance(key, RootKey):
        raise InvalidRequest("a root key is an ECDSA or RSA key")
    return key
