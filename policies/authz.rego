# Entry point of the kmsgate authorization policy.
#
# The gateway evaluates data.kmsgate.authz.allow for every request and allows it only when
# the value is exactly `true`. data.kmsgate.authz.reasons (a set of strings) says which rules
# allowed it. Every other file of this package adds `allow if ...` rules: a request is allowed
# when any of them holds (rules are OR-ed) and denied otherwise.
#
# The input document is described in docs/policy.md.
package kmsgate.authz

import rego.v1

# Deny by default. Keep this the only `default allow` of the package.
default allow := false
