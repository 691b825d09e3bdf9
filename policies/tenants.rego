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

# A key's labels are changed (`key.update`): a principal of a tenant neither gives one of
# its keys to another tenant nor makes it every tenant's by dropping its label.
deny contains "tenant isolation: the new labels give the key to another tenant" if {
	is_string(input.principal.tenant)
	is_object(input.request.labels)
	input.request.labels.tenant != input.principal.tenant
}

deny contains "tenant isolation: the new labels give the key to another tenant" if {
	is_string(input.principal.tenant)
	is_object(input.request.labels)
	input.resource.labels.tenant == input.principal.tenant
	not is_string(input.request.labels.tenant)
}
