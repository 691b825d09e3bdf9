"""hashivault: keys held by a HashiCorp Vault or OpenBao Transit engine, through hvac. The
package exports the backend class and its settings; see docs/backends/hashivault.md for
configuration, the Vault policy kmsgate needs and what `destroy` can and cannot do with
Transit."""

from kmsgate.backends.hashivault.backend import HashiVaultBackend
from kmsgate.backends.hashivault.settings import AppRoleAuth, HashiVaultSettings, KubernetesAuth

__all__ = ["AppRoleAuth", "HashiVaultBackend", "HashiVaultSettings", "KubernetesAuth"]
