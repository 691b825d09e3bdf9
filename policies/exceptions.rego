# Just-in-time exceptions: approved, time-limited grants.
#
# input.exceptions holds the grants the gateway found active for this principal that list
# input.action (it has already checked approval, expiry and revocation). A grant allows the
# request when its `resource` matches: a glob over input.resource.name, or `purpose:<p>` for
# every key of purpose p. The reason "exception <id>" names the grant, and the audit record
# then carries its id.
#
# glob.match uses the default delimiter ".": `*` and `?` do not match a "." in the name.
#
# Each body is written out in `allow` and again in `reasons` (see admin.rego): a helper rule
# costs more per decision. The type checks keep a malformed grant, or a request without a
# resource name, from turning into an evaluation error, which would deny every request.
#
# Managing grants: every authenticated principal may ask for one for itself; role
# `approver` approves (the gateway refuses the requester approving its own grant, whatever
# this file says); the requester or an approver may read and revoke a grant.
package kmsgate.authz

import rego.v1

allow if {
	input.exceptions != [] # cheap: most decisions have no grant (no builtin call then)
	is_array(input.exceptions)
	some grant in input.exceptions
	is_string(grant.id)
	input.action in grant.actions
	is_string(grant.resource)
	is_string(input.resource.name)
	glob.match(grant.resource, [], input.resource.name)
	not startswith(grant.resource, "purpose:")
}

allow if {
	input.exceptions != [] # cheap: most decisions have no grant (no builtin call then)
	is_array(input.exceptions)
	some grant in input.exceptions
	is_string(grant.id)
	input.action in grant.actions
	grant.resource == concat("", ["purpose:", input.resource.purpose])
}

reasons contains concat(" ", ["exception", grant.id]) if {
	input.exceptions != [] # cheap: most decisions have no grant (no builtin call then)
	is_array(input.exceptions)
	some grant in input.exceptions
	is_string(grant.id)
	input.action in grant.actions
	is_string(grant.resource)
	is_string(input.resource.name)
	glob.match(grant.resource, [], input.resource.name)
	not startswith(grant.resource, "purpose:")
}

reasons contains concat(" ", ["exception", grant.id]) if {
	input.exceptions != [] # cheap: most decisions have no grant (no builtin call then)
	is_array(input.exceptions)
	some grant in input.exceptions
	is_string(grant.id)
	input.action in grant.actions
	grant.resource == concat("", ["purpose:", input.resource.purpose])
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
