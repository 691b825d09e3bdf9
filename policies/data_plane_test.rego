# Tests of data_plane.rego.
package kmsgate.authz_test

import rego.v1

envelope(action, roles) := object.union(input_with_roles(roles), {
	"action": action,
	"resource": {"purpose": "envelope-data", "type": "aes-256-gcm"},
})

test_the_data_plane_encrypts_and_decrypts if {
	every action in ["encrypt", "decrypt", "datakey"] {
		data.kmsgate.authz.allow with input as envelope(action, ["data-plane"])
	}
}

test_no_other_role_decrypts_envelope_data if {
	every roles in [[], ["ml-sec"], ["approver"], ["dev", "ci"], ["Data-Plane"]] {
		not data.kmsgate.authz.allow with input as envelope("decrypt", roles)
	}
}

test_the_data_plane_does_nothing_else if {
	every action in ["sign", "rewrap", "key.read", "key.rotate"] {
		not data.kmsgate.authz.allow with input as envelope(action, ["data-plane"])
	}
	other := object.union(envelope("decrypt", ["data-plane"]), {"resource": {"purpose": "model-sign"}})
	not data.kmsgate.authz.allow with input as other
}
