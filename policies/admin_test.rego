# Tests of admin.rego.
package kmsgate.authz_test

import rego.v1

gateway_actions := [
	"sign", "verify", "mac", "mac.verify", "encrypt", "decrypt", "datakey", "rewrap",
	"key.create", "key.read", "key.list", "key.rotate", "key.disable", "key.enable", "key.update",
	"key.compromise", "key.delete", "key.cancel_deletion", "key.import",
	"token.create", "token.list", "token.revoke", "audit.read", "metrics.read",
	"policy.read", "policy.evaluate", "policy.reload",
	"ca.create", "ca.import", "ca.read", "cert.issue", "cert.read", "cert.renew", "cert.revoke",
	"exception.request", "exception.approve", "exception.read", "exception.revoke",
	"principal.read",
]

test_admin_may_sign if {
	data.kmsgate.authz.allow with input as input_with_roles(["admin"])
}

test_admin_reason if {
	data.kmsgate.authz.reasons == {"role admin"} with input as input_with_roles(["admin"])
}

test_admin_may_do_every_gateway_action if {
	every action in gateway_actions {
		data.kmsgate.authz.allow with input as object.union(input_with_roles(["admin"]), {"action": action})
	}
}

test_admin_may_use_any_key_in_any_env if {
	inp := object.union(input_with_roles(["reader", "admin"]), {
		"env": "dev",
		"resource": {"name": "prod-ca", "purpose": "ca"},
	})
	data.kmsgate.authz.allow with input as inp
}

test_admin_role_is_case_sensitive if {
	not data.kmsgate.authz.allow with input as input_with_roles(["Admin"])
}

test_admin_role_in_claims_is_not_a_role if {
	inp := object.union(base_input, {"principal": {"claims": {"roles": ["admin"]}}})
	not data.kmsgate.authz.allow with input as inp
}
