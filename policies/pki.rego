# Certificates: a workload renews its own certificate over mTLS.
#
# The gateway keeps the names, the profile and the CA of the certificate being renewed
# (a CSR with other names is refused before the policy is asked); the policy decides only
# that the holder of a valid, unrevoked certificate may renew that certificate.
package kmsgate.authz

import rego.v1

allow if {
	input.action == "cert.renew"
	input.principal.kind == "mtls"
	input.request.serial == input.principal.claims.serial
}

reasons contains "the holder renews its own certificate" if {
	input.action == "cert.renew"
	input.principal.kind == "mtls"
	input.request.serial == input.principal.claims.serial
}
