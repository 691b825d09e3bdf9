# Principals with the role "admin" may do everything.
#
# Each rule body is written out in `allow` and again in `reasons`: with regorus a helper rule
# or function costs several microseconds per decision, the repeated comparison much less.
package kmsgate.authz

import rego.v1

allow if "admin" in input.principal.roles

reasons contains "role admin" if "admin" in input.principal.roles
