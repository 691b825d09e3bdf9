# Tests of ca_keys.rego: no role but admin may ask for a raw signature by a CA key.
package kmsgate.authz_test

import rego.v1

test_no_role_but_admin_signs_with_a_ca_key if {
	every roles in [[], ["ml-sec"], ["data-plane"], ["approver"], ["ml-sec", "data-plane", "approver"]] {
		inp := object.union(input_with_roles(roles), {"resource": {"purpose": "ca", "name": "ca.dev"}})
		not data.kmsgate.authz.allow with input as inp
	}
}
