# The roles a principal holds, as the rules of this package read them (`roles`): the roles
# of its API token, and those other files map from verified OIDC claims or certificate
# fields (`roles contains "ml-sec" if { ... }`, see examples/policies/oidc_roles.rego).
# Admin is never mapped: it comes from a token only.
package kmsgate.authz

import rego.v1

roles contains role if {
	is_array(input.principal.roles) # anything else holds no role (and is no error)
	some role in input.principal.roles
}
