# Tenant isolation: a principal of one tenant never uses a key labelled for another tenant,
# whatever else allows it (the admin rule too). It holds when both are set: the principal's
# `tenant` (an OIDC issuer's `tenant_claim`) and the key's label `tenant`.
#
# A `deny` string overrides every `allow` (docs/policy.md).
package kmsgate.authz

import rego.v1

deny contains "tenant isolation: the resource belongs to another tenant" if {
	is_string(input.principal.tenant)
	is_string(input.resource.labels.tenant)
	input.principal.tenant != input.resource.labels.tenant
}
