# Tests of exceptions.rego.
package kmsgate.authz_test

import rego.v1

grant_42 := {
	"id": "ex-42",
	"actions": ["sign", "verify"],
	"resource": "release-*",
	"ticket": "SEC-1234",
	"expires_at": "2026-01-01T01:00:00.000000Z",
}

# input_with_grants(grants) is base_input (no roles) with these active grants.
input_with_grants(grants) := object.union(base_input, {"exceptions": grants})

test_exception_allows_listed_action_on_matching_resource if {
	data.kmsgate.authz.allow with input as input_with_grants([grant_42])
}

test_exception_reason_names_the_grant if {
	data.kmsgate.authz.reasons == {"exception ex-42"} with input as input_with_grants([grant_42])
}

test_exception_reasons_name_every_matching_grant if {
	other := object.union(grant_42, {"id": "ex-7", "resource": "release-signer"})
	data.kmsgate.authz.reasons == {"exception ex-42", "exception ex-7"} with input as input_with_grants([grant_42, other])
}

test_exception_for_another_action_denied if {
	every action in ["decrypt", "key.delete", "signx", ""] {
		inp := object.union(input_with_grants([grant_42]), {"action": action})
		not data.kmsgate.authz.allow with input as inp
	}
}

test_exception_for_another_resource_denied if {
	every name in ["prod-ca", "my-release-signer", "Release-signer"] {
		inp := object.union(input_with_grants([grant_42]), {"resource": {"name": name}})
		not data.kmsgate.authz.allow with input as inp
	}
}

test_exception_glob_star_does_not_match_a_dot if {
	inp := object.union(input_with_grants([grant_42]), {"resource": {"name": "release-signer.v2"}})
	not data.kmsgate.authz.allow with input as inp
}

test_exception_exact_pattern if {
	grant := object.union(grant_42, {"resource": "release-signer"})
	data.kmsgate.authz.allow with input as input_with_grants([grant])
}

test_exception_without_resource_name_denied if {
	inp := object.union(input_with_grants([grant_42]), {"resource": {"name": null}})
	not data.kmsgate.authz.allow with input as inp
}

test_exception_malformed_grants_are_ignored if {
	grants := [
		"ex-1",
		{"id": "ex-2", "actions": "sign", "resource": "*"},
		{"id": "ex-3", "actions": ["sign"], "resource": null},
		{"id": "ex-4", "actions": ["sign"]},
		{"actions": ["sign"], "resource": "*"},
		{"id": 5, "actions": ["sign"], "resource": "*"},
	]
	not data.kmsgate.authz.allow with input as input_with_grants(grants)
}

test_exception_malformed_grants_do_not_break_other_rules if {
	inp := object.union(input_with_roles(["admin"]), {"exceptions": ["junk", {"id": 1}]})
	data.kmsgate.authz.allow with input as inp
}

test_exceptions_null_or_missing_denied if {
	not data.kmsgate.authz.allow with input as object.union(base_input, {"exceptions": null})
	not data.kmsgate.authz.allow with input as object.remove(base_input, ["exceptions"])
}

test_exception_for_a_purpose_covers_every_key_of_it if {
	grant := object.union(grant_42, {"resource": "purpose:model-sign"})
	data.kmsgate.authz.allow with input as input_with_grants([grant])
	other := object.union(input_with_grants([grant]), {"resource": {"name": "x", "purpose": "ca"}})
	not data.kmsgate.authz.allow with input as other
}

test_exception_purpose_pattern_is_no_name_glob if {
	grant := object.union(grant_42, {"resource": "purpose:*"})
	not data.kmsgate.authz.allow with input as input_with_grants([grant])
}

grant_input(action, roles, owner) := object.union(input_with_roles(roles), {
	"action": action,
	"resource": {"kind": "exception", "name": "0123456789abcdef", "owner": owner},
})

test_any_principal_requests_a_grant if {
	data.kmsgate.authz.allow with input as grant_input("exception.request", [], "tok-1")
}

test_an_approver_approves_reads_and_revokes if {
	every action in ["exception.approve", "exception.read", "exception.revoke"] {
		data.kmsgate.authz.allow with input as grant_input(action, ["approver"], "someone")
	}
}

test_the_requester_reads_and_revokes_its_own_grant_only if {
	every action in ["exception.read", "exception.revoke"] {
		data.kmsgate.authz.allow with input as grant_input(action, [], "tok-1")
		not data.kmsgate.authz.allow with input as grant_input(action, [], "someone")
		not data.kmsgate.authz.allow with input as grant_input(action, [], null)
	}
}

test_without_the_role_nobody_approves if {
	not data.kmsgate.authz.allow with input as grant_input("exception.approve", ["ml-sec"], "someone")
	not data.kmsgate.authz.allow with input as grant_input("exception.approve", [], "tok-1")
}

# A resource without a purpose (a certificate) is matched by name; a purpose grant never
# covers it, and asking must not turn into an evaluation error (which would deny every
# rule's allow).
test_exception_on_a_resource_without_purpose if {
	cert := {"kind": "cert", "name": "5e910a7c", "purpose": null}
	by_name := object.union(grant_42, {"actions": ["cert.revoke"], "resource": "5e910a7c"})
	inp := object.union(input_with_grants([by_name]), {"action": "cert.revoke", "resource": cert})
	data.kmsgate.authz.allow with input as inp
	by_purpose := object.union(by_name, {"resource": "purpose:ca"})
	admin := object.union(input_with_roles(["admin"]), {"action": "cert.revoke", "resource": cert})
	data.kmsgate.authz.allow with input as object.union(admin, {"exceptions": [by_purpose]})
}
