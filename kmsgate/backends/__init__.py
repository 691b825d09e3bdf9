"""Key backends: softkms (embedded), pkcs11, hashivault, awskms.

Backend classes are imported only when configured, so an optional dependency that is not
installed fails at start-up with the extra to install, never at import time.
"""

from __future__ import annotations

import importlib

from kmsgate.backends.base import KeyBackend
from kmsgate.errors import ConfigError

# type -> (module, class, pip extra)
BACKEND_TYPES: dict[str, tuple[str, str, str | None]] = {
    "softkms": ("kmsgate.backends.softkms", "SoftKmsBackend", None),
    "pkcs11": ("kmsgate.backends.pkcs11", "Pkcs11Backend", "pkcs11"),
    "hashivault": ("kmsgate.backends.hashivault", "HashiVaultBackend", "vault"),
    "awskms": ("kmsgate.backends.awskms", "AwsKmsBackend", "aws"),
}


def backend_class(type_name: str) -> type[KeyBackend]:
    """The class implementing backend type `type_name`.

    Raises ConfigError for an unknown type, a type not built yet, or a missing extra.
    """
    entry = BACKEND_TYPES.get(type_name)
    if entry is None:
        raise ConfigError(f"unknown backend type {type_name!r}; known: {sorted(BACKEND_TYPES)}")
    module_name, class_name, extra = entry
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ConfigError(f"backend type {type_name!r} is not available yet") from exc
        hint = f": pip install 'kmsgate[{extra}]'" if extra else ""
        raise ConfigError(f"backend type {type_name!r} needs {exc.name}{hint}") from exc
    cls: type[KeyBackend] = getattr(module, class_name)
    return cls
