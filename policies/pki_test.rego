# Tests of pki.rego.
package kmsgate.authz_test

import rego.v1

renewal := {
	"principal": {"id": "spiffe://dev.lab/ns/a/sa/b", "kind": "mtls", "roles": [], "claims": {"serial": "1f"}},
	"action": "cert.renew",
	"resource": {"kind": "ca", "name": "dev"},
	"request": {"serial": "1f", "ca": "dev", "profile": "workload"},
	"env": "prod",
}

test_the_holder_renews_its_own_certificate if {
	data.kmsgate.authz.allow with input as renewal
	data.kmsgate.authz.reasons == {"the holder renews its own certificate"} with input as renewal
}

test_no_renewal_of_another_certificate if {
	not data.kmsgate.authz.allow with input as object.union(renewal, {"request": {"serial": "20"}})
}

test_no_renewal_with_a_token if {
	token := object.union(renewal, {"principal": {"id": "token:x", "kind": "token", "roles": [], "claims": {"serial": "1f"}}})
	not data.kmsgate.authz.allow with input as token
}

test_an_mtls_principal_may_not_issue if {
	not data.kmsgate.authz.allow with input as object.union(renewal, {"action": "cert.issue"})
}
