# Just-in-time exceptions: approved, time-limited grants.
#
# input.exceptions holds the grants the gateway found active for this principal (it has
# already checked approval, expiry and revocation). A grant allows the request when it lists
# input.action in its `actions` and its `resource` matches: a glob over input.resource.name,
# or `purpose:<p>` for every key of purpose p. The reason "exception <id>" names the grant,
# and the audit record then carries its id.
#
# glob.match uses the default delimiter ".": `*` and `?` do not match a "." in the name.
#
# The type checks keep a malformed grant, or a request without a resource name, from turning
# into an evaluation error, which would deny every request (even those other rules allow).
#
# Managing grants: every authenticated principal may ask for one for itself; role
# `approver` approves (the gateway refuses the requester approving its own grant, whatever
# this file says); the requester or an approver may read and revoke a grant.
package kmsgate.authz

import rego.v1

allow if {
	some grant in matching_grants
	is_string(grant.id)
}

reasons contains concat(" ", ["exception", grant.id]) if {
	some grant in matching_grants
	is_string(grant.id)
}

matching_grants contains grant if {
	is_array(input.exceptions)
	some grant in input.exceptions
	is_array(grant.actions)
	input.action in grant.actions
	is_string(grant.resource)
	resource_matches(grant.resource)
}

resource_matches(pattern) if {
	not startswith(pattern, "purpose:")
	is_string(input.resource.name)
	glob.match(pattern, [], input.resource.name)
}

resource_matches(pattern) if {
	is_string(input.resource.purpose)
	pattern == concat("", ["purpose:", input.resource.purpose])
}

allow if input.action == "exception.request"

reasons contains "any principal asks for a grant" if input.action == "exception.request"

allow if {
	input.action in {"exception.approve", "exception.read", "exception.revoke"}
	"approver" in roles
}

reasons contains "role approver" if {
	input.action in {"exception.approve", "exception.read", "exception.revoke"}
	"approver" in roles
}

allow if {
	input.action in {"exception.read", "exception.revoke"}
	is_string(input.resource.owner)
	input.resource.owner == input.principal.id
}

reasons contains "the requester's own grant" if {
	input.action in {"exception.read", "exception.revoke"}
	is_string(input.resource.owner)
	input.resource.owner == input.principal.id
}
