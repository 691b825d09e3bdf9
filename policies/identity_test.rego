# Tests of identity.rego.
package kmsgate.authz_test

import rego.v1

test_any_principal_reads_itself if {
	inp := object.union(input_with_roles([]), {"action": "principal.read", "resource": {"kind": "principal"}})
	data.kmsgate.authz.allow with input as inp
	data.kmsgate.authz.reasons == {"a principal reads itself"} with input as inp
}

test_reading_itself_grants_nothing_else if {
	# (exceptions.rego lets anyone ask for a grant)
	every action in [a | some a in gateway_actions; not a in {"principal.read", "exception.request"}] {
		not data.kmsgate.authz.allow with input as object.union(input_with_roles([]), {"action": action})
	}
}
