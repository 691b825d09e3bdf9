# Principals with the role "admin" may do everything.
package kmsgate.authz

import rego.v1

allow if has_role("admin")

reasons contains "role admin" if has_role("admin")
