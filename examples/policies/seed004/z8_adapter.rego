# Example: an existing policy brought as it is. z8_kms.v0.rego is seed 004's key-usage
# policy, unmodified (package z8.kms, Rego v0 syntax: the `.v0.rego` name tells the gateway
# to read it so). This file asks it about each `sign` request, with the input it was written
# for:
#
#   key_purpose  <- input.resource.purpose
#   claims       <- input.principal.claims  (an OIDC token's claims: role, session_start in
#                                            nanoseconds since the epoch)
#   env          <- input.env
#
# Copy both files into the policy directory to use them.
package kmsgate.authz

import rego.v1

z8_input := {
	"key_purpose": input.resource.purpose,
	"claims": input.principal.claims,
	"env": input.env,
}

allow if {
	input.action == "sign"
	data.z8.kms.allow with input as z8_input
}

reasons contains "seed 004 policy z8.kms" if {
	input.action == "sign"
	data.z8.kms.allow with input as z8_input
}
