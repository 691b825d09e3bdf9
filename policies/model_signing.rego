# Model signing (seed 004 §8.4): principals with the role "ml-sec" may sign with keys whose
# purpose is "model-sign", only on a gateway whose environment is "prod", and only within
# one hour of the start of their session: for an API token `claims.session_start` (RFC 3339,
# its creation), for an OIDC token `claims.iat` (never a `session_start` claim the issuer
# put in it), measured against `input.now`. Nothing
# else is granted here (verification, key management and other environments need other
# rules).
package kmsgate.authz

import rego.v1

allow if {
	input.action == "sign"
	input.env == "prod"
	input.resource.purpose == "model-sign"
	"ml-sec" in roles
	session_age_s < 3600
}

reasons contains "role ml-sec: sign with a model-sign key in prod, session under 1h" if {
	input.action == "sign"
	input.env == "prod"
	input.resource.purpose == "model-sign"
	"ml-sec" in roles
	session_age_s < 3600
}

# Seconds since the principal's session began (undefined without a session start: no sign).
# An OIDC `iat` up to a minute ahead of the gateway's clock counts as now.
session_age_s := age if {
	input.principal.kind == "token"
	is_string(input.principal.claims.session_start)
	# checked first: a string that does not parse must not become an evaluation error
	regex.match(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$`, input.principal.claims.session_start)
	age := (time.parse_rfc3339_ns(input.now) - time.parse_rfc3339_ns(input.principal.claims.session_start)) / 1000000000
	age > -60
}

session_age_s := age if {
	input.principal.kind == "oidc"
	is_number(input.principal.claims.iat)
	age := (time.parse_rfc3339_ns(input.now) / 1000000000) - input.principal.claims.iat
	age > -60
}
