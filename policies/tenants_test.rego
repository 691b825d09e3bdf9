# Tests of tenants.rego.
package kmsgate.authz_test

import rego.v1

tenant_input(principal_tenant, key_tenant) := object.union(input_with_roles(["admin"]), {
	"principal": {"tenant": principal_tenant},
	"resource": {"labels": {"tenant": key_tenant}},
})

test_another_tenants_key_is_denied_even_to_admin if {
	data.kmsgate.authz.deny == {"tenant isolation: the resource belongs to another tenant"} with input as tenant_input("acme", "globex")
}

test_the_same_tenant_or_an_unset_side_is_not_denied if {
	count(data.kmsgate.authz.deny) == 0 with input as tenant_input("acme", "acme")
	count(data.kmsgate.authz.deny) == 0 with input as tenant_input(null, "acme")
	count(data.kmsgate.authz.deny) == 0 with input as object.union(input_with_roles(["admin"]), {"principal": {"tenant": "acme"}})
}
