# Tests of the package defaults, plus the shared test inputs used by the other *_test.rego.
#
# Tests name the rules in full (data.kmsgate.authz.allow) instead of `import data.kmsgate.authz`
# and `authz.allow`: with regorus 0.13 a reference through an import alias only sees the
# definitions from one file of a package spread over several files (see docs/policy.md).
package kmsgate.authz_test

import rego.v1

# A complete input document for a caller without roles who signs with a model-sign key on a
# prod gateway. Tests change what they need with object.union / object.remove.
base_input := {
	"principal": {"id": "tok-1", "kind": "token", "roles": [], "claims": {}, "tenant": null},
	"action": "sign",
	"resource": {
		"kind": "key",
		"name": "release-signer",
		"purpose": "model-sign",
		"type": "ecdsa-p256",
		"backend": "local",
		"labels": {"env": "prod"},
	},
	"request": {"algorithm": "ecdsa-sha256"},
	"env": "prod",
	"now": "2026-01-01T00:00:00.000000Z",
	"exceptions": [],
}

# input_with_roles(roles) is base_input for a caller holding `roles`.
input_with_roles(roles) := object.union(base_input, {"principal": {"roles": roles}})

test_deny_by_default if {
	not data.kmsgate.authz.allow with input as base_input
}

test_allow_is_false_not_undefined if {
	data.kmsgate.authz.allow == false with input as base_input
}

test_deny_empty_input if {
	not data.kmsgate.authz.allow with input as {}
}

test_deny_missing_principal if {
	not data.kmsgate.authz.allow with input as object.remove(base_input, ["principal"])
}

test_deny_unknown_role if {
	not data.kmsgate.authz.allow with input as input_with_roles(["viewer", "auditor"])
}

test_deny_roles_not_a_list if {
	not data.kmsgate.authz.allow with input as input_with_roles("admin")
}

test_no_reasons_when_denied if {
	count(data.kmsgate.authz.reasons) == 0 with input as base_input
}
