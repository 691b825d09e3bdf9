"""Reading a certificate's (or a request's) extensions."""

from __future__ import annotations

from typing import TypeVar

from cryptography import x509

ExtensionT = TypeVar("ExtensionT", bound=x509.ExtensionType)


def extension_value(extensions: x509.Extensions, kind: type[ExtensionT]) -> ExtensionT | None:
    """The value of the extension of class `kind` in `extensions`, None if there is none."""
    try:
        return extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
