"""pkcs11: keys generated and held by a PKCS#11 token (an HSM; SoftHSM2 in the tests). The
package exports the backend class and its settings; see docs/backends/pkcs11.md."""

from kmsgate.backends.pkcs11.backend import Pkcs11Backend
from kmsgate.backends.pkcs11.settings import DEFAULT_ALLOWED_MODULES, Pkcs11Settings

__all__ = ["DEFAULT_ALLOWED_MODULES", "Pkcs11Backend", "Pkcs11Settings"]
