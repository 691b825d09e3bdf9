# Tokens: a token carries only roles its creator holds, and only an admin makes one that
# outlives the revocation of the token that makes it (an orphan). Only admin may create
# tokens under the shipped rules; a team that lets another role create them (a
# `token-admin`, say) still cannot let it mint a token with a role it lacks, such as admin.
# An admin's tokens may carry any role.
#
# A `deny` string overrides every `allow` (docs/policy.md).
package kmsgate.authz

import rego.v1

deny contains "a token can carry only roles its creator holds" if {
	input.action == "token.create"
	not "admin" in input.principal.roles
	some role in input.request.roles
	not role in roles
}

# The four-eyes rule counts principals, and each token is one: a holder of `approver` who
# could mint another `approver` token would approve its own JIT requests with it. Only an
# admin gives the role, to someone else.
deny contains "only an admin gives the approver role" if {
	input.action == "token.create"
	not "admin" in input.principal.roles
	"approver" in input.request.roles
}

# Nor does a principal holding `approver` make tokens, whatever rule lets it: a token it
# made would be another principal, asking for the JIT grants it then approves.
deny contains "an approver makes no tokens (it would approve what they ask)" if {
	input.action == "token.create"
	not "admin" in input.principal.roles
	"approver" in roles
}

# Revoking a token revokes the tokens it made, unless they were made orphans: a principal
# who could make orphans would leave working tokens behind whatever was revoked.
deny contains "only an admin makes a token that outlives its maker (orphan)" if {
	input.action == "token.create"
	not "admin" in input.principal.roles
	input.request.orphan == true
}
