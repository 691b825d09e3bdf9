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

relabel_input(key_tenant, labels) := object.union(tenant_input("acme", key_tenant), {
	"action": "key.update",
	"request": {"labels": labels},
})

test_relabelling_a_key_to_another_tenant_or_to_none_is_denied if {
	denied := {"tenant isolation: the new labels give the key to another tenant"}
	data.kmsgate.authz.deny == denied with input as relabel_input("acme", {"tenant": "globex"})
	data.kmsgate.authz.deny == denied with input as relabel_input("acme", {})
	data.kmsgate.authz.deny == denied with input as relabel_input("acme", {"team": "ml"})
}

test_relabelling_within_the_tenant_is_not_denied if {
	count(data.kmsgate.authz.deny) == 0 with input as relabel_input("acme", {"tenant": "acme", "team": "ml"})
	count(data.kmsgate.authz.deny) == 0 with input as object.union(relabel_input("acme", {}), {"principal": {"tenant": null}})
	count(data.kmsgate.authz.deny) == 0 with input as object.union(relabel_input("acme", {"tenant": "acme"}), {"request": {"labels": null}})
}
