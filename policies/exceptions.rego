# Just-in-time exceptions: approved, time-limited grants.
#
# input.exceptions holds the grants the gateway found active for this principal (it has
# already checked approval, expiry and revocation). A grant allows the request when it lists
# input.action in its `actions` and its `resource` glob matches input.resource.name; the
# reason "exception <id>" names it so the audit record can too.
#
# glob.match uses the default delimiter ".": `*` and `?` do not match a "." in the name.
#
# The type checks keep a malformed grant, or a request without a resource name, from turning
# into an evaluation error, which would deny every request (even those other rules allow).
package kmsgate.authz

import rego.v1

allow if {
	is_array(input.exceptions)
	some grant in input.exceptions
	is_string(grant.id)
	is_array(grant.actions)
	input.action in grant.actions
	is_string(grant.resource)
	is_string(input.resource.name)
	glob.match(grant.resource, [], input.resource.name)
}

reasons contains concat(" ", ["exception", grant.id]) if {
	is_array(input.exceptions)
	some grant in input.exceptions
	is_string(grant.id)
	is_array(grant.actions)
	input.action in grant.actions
	is_string(grant.resource)
	is_string(input.resource.name)
	glob.match(grant.resource, [], input.resource.name)
}
