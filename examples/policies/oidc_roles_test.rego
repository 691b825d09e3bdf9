# Tests of oidc_roles.rego (run with the shipped policies:
# `kmsgate policy test` on a directory holding both).
package kmsgate.authz_test

import rego.v1

github_job(claims) := {
	"principal": {"id": "gha:repo", "kind": "oidc", "roles": [], "claims": object.union({
		"iss": "https://token.actions.githubusercontent.com",
		"repository": "acme/models",
		"ref": "refs/heads/main",
		"iat": 1767225300, # 5 minutes before `now`
	}, claims)},
	"action": "sign",
	"resource": {"kind": "key", "name": "model-key", "purpose": "model-sign"},
	"request": {},
	"env": "prod",
	"now": "2026-01-01T00:00:00Z",
}

test_a_main_branch_job_of_the_repository_signs_model_keys if {
	data.kmsgate.authz.allow with input as github_job({})
}

test_another_branch_or_repository_does_not if {
	not data.kmsgate.authz.allow with input as github_job({"ref": "refs/heads/feature"})
	not data.kmsgate.authz.allow with input as github_job({"repository": "acme/other"})
}

test_the_role_stays_within_model_signing if {
	not data.kmsgate.authz.allow with input as object.union(github_job({}), {"action": "key.delete"})
}

service_account(sub, sans) := {
	"principal": {"id": "k8s:x", "kind": "oidc", "roles": [], "claims": {
		"iss": "https://kubernetes.default.svc.cluster.local",
		"sub": sub,
	}},
	"action": "cert.issue",
	"resource": {"kind": "ca", "name": "dev"},
	"request": {"profile": "workload", "sans": sans},
	"env": "prod",
}

test_a_service_account_gets_its_own_spiffe_id if {
	data.kmsgate.authz.allow with input as service_account(
		"system:serviceaccount:ml:server", ["uri:spiffe://dev.lab/ns/ml/sa/server"]
	)
}

test_from_the_workload_ca_only if {
	not data.kmsgate.authz.allow with input as object.union(
		service_account("system:serviceaccount:ml:server", ["uri:spiffe://dev.lab/ns/ml/sa/server"]),
		{"resource": {"kind": "ca", "name": "servers"}},
	)
}

test_and_no_other_name if {
	not data.kmsgate.authz.allow with input as service_account(
		"system:serviceaccount:ml:server", ["uri:spiffe://dev.lab/ns/ml/sa/admin"]
	)
	not data.kmsgate.authz.allow with input as service_account(
		"system:serviceaccount:ml:server",
		["uri:spiffe://dev.lab/ns/ml/sa/server", "dns:server.ml"],
	)
	not data.kmsgate.authz.allow with input as service_account(
		"system:serviceaccount:ml", ["uri:spiffe://dev.lab/ns/ml/sa/server"]
	)
}
