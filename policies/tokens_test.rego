# Tests of tokens.rego.
package kmsgate.authz_test

import rego.v1

token_create(creator_roles, token_roles) := object.union(input_with_roles(creator_roles), {
	"action": "token.create",
	"resource": {"kind": "token"},
	"request": {"roles": token_roles},
})

test_a_token_with_a_role_its_creator_lacks_is_denied if {
	data.kmsgate.authz.deny == {"a token can carry only roles its creator holds"} with input as token_create(["token-admin"], ["admin"])
	count(data.kmsgate.authz.deny) == 1 with input as token_create(["token-admin", "ci"], ["ci", "ml-sec"])
}

test_a_token_with_the_creators_roles_is_not_denied if {
	count(data.kmsgate.authz.deny) == 0 with input as token_create(["token-admin", "ci"], ["ci"])
	count(data.kmsgate.authz.deny) == 0 with input as token_create(["token-admin"], [])
}

test_admin_tokens_may_carry_any_role if {
	count(data.kmsgate.authz.deny) == 0 with input as token_create(["admin"], ["ci", "ml-sec", "admin"])
	data.kmsgate.authz.allow with input as token_create(["admin"], ["ci", "ml-sec", "admin"])
}

test_other_actions_are_not_touched if {
	count(data.kmsgate.authz.deny) == 0 with input as object.union(token_create(["ci"], ["admin"]), {"action": "token.list"})
}

test_only_an_admin_gives_the_approver_role if {
	"only an admin gives the approver role" in data.kmsgate.authz.deny with input as token_create(["token-admin", "approver"], ["approver"])
	"only an admin gives the approver role" in data.kmsgate.authz.deny with input as token_create(["token-admin"], ["approver"])
	count(data.kmsgate.authz.deny) == 0 with input as token_create(["admin"], ["approver"])
}

test_only_an_admin_makes_orphans if {
	orphan := {"roles": ["ci"], "orphan": true}
	data.kmsgate.authz.deny == {"only an admin makes a token that outlives its maker (orphan)"} with input as object.union(token_create(["token-admin", "ci"], []), {"request": orphan})
	count(data.kmsgate.authz.deny) == 0 with input as object.union(token_create(["admin"], []), {"request": orphan})
	count(data.kmsgate.authz.deny) == 0 with input as object.union(token_create(["token-admin", "ci"], []), {"request": {"roles": ["ci"], "orphan": false}})
}

test_an_approver_makes_no_tokens if {
	data.kmsgate.authz.deny == {"an approver makes no tokens (it would approve what they ask)"} with input as token_create(["token-admin", "approver"], ["token-admin"])
	count(data.kmsgate.authz.deny) == 0 with input as token_create(["admin", "approver"], ["ci"])
}
