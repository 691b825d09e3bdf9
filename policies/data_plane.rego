# Envelope encryption (seed 004): keys of purpose "envelope-data" encrypt, decrypt and make
# data keys only for data-plane service identities, principals holding the role
# "data-plane" in `roles` (map workload identities to it: a SPIFFE ID of an mTLS
# certificate or a service-account token, see examples/policies/oidc_roles.rego). Operators
# get no such rule: reading data is not their job (a JIT exception can grant it for a time).
package kmsgate.authz

import rego.v1

allow if {
	input.resource.purpose == "envelope-data"
	input.action in {"encrypt", "decrypt", "datakey"}
	"data-plane" in roles
}

reasons contains "role data-plane: envelope encryption" if {
	input.resource.purpose == "envelope-data"
	input.action in {"encrypt", "decrypt", "datakey"}
	"data-plane" in roles
}
