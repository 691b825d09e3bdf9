# Just-in-time exceptions: approved, time-limited grants.
#
# input.exceptions holds the grants the gateway found active for this principal (it has
# already checked approval, expiry and revocation). A grant allows the request when it lists
# input.action in its `actions` and its `resource` glob matches input.resource.name.
# glob.match uses the default delimiter ".": `*` and `?` do not match a "." in the name.
package kmsgate.authz

import rego.v1

allow if count(exception_ids) > 0

reasons contains sprintf("exception %v", [id]) if some id in exception_ids

# The ids of the grants that cover this request. The type checks keep a malformed grant or
# a request without a resource name from turning into an evaluation error (which would deny
# every request, including ones allowed by other rules).
exception_ids contains grant.id if {
	is_array(input.exceptions)
	some grant in input.exceptions
	is_array(grant.actions)
	input.action in grant.actions
	is_string(grant.resource)
	is_string(input.resource.name)
	glob.match(grant.resource, [], input.resource.name)
}
