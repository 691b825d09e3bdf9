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
# The matching grants are the helper set `granted`, which `allow` and `reasons` both read:
# the compiled VM that decides evaluates it once per decision. An exact key name or a
# purpose costs a comparison, `prefix*` a few string built-ins; only other globs call
# glob.match. The type checks keep a malformed grant, or a request without a resource name,
# from turning into an evaluation error, which would deny every request.
#
# Managing grants: every authenticated principal may ask for one for itself; role
# `approver` approves (the gateway refuses the requester approving its own grant, whatever
# this file says); the requester or an approver may read and revoke a grant.
package kmsgate.authz

import rego.v1

granted contains grant.id if {
	is_array(input.exceptions)
	some grant in input.exceptions
	is_string(grant.id)
	input.action in grant.actions
	is_string(grant.resource)
	_covers(grant.resource)
}

allow if some _ in granted

reasons contains concat(" ", ["exception", id]) if some id in granted

# A key name, exactly: the usual grant, and no built-in call.
_covers(pattern) if pattern == input.resource.name

_covers(pattern) if {
	is_string(input.resource.purpose)
	pattern == concat("", ["purpose:", input.resource.purpose])
}

# `prefix*`, the usual glob, without glob.match (which costs several times more): `*` does
# not match a "." (see the note on globs above).
_covers(pattern) if {
	_prefix_glob(pattern)
	is_string(input.resource.name)
	prefix := trim_suffix(pattern, "*")
	startswith(input.resource.name, prefix)
	not contains(trim_prefix(input.resource.name, prefix), ".")
}

_covers(pattern) if {
	_wild(pattern)
	not _prefix_glob(pattern)
	is_string(input.resource.name)
	glob.match(pattern, [], input.resource.name)
}

_prefix_glob(pattern) if {
	endswith(pattern, "*")
	not _wild(trim_suffix(pattern, "*"))
}

_wild(text) if contains(text, "*")

_wild(text) if contains(text, "?")

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
