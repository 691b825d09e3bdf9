# Tests of z8_adapter.rego with seed 004's policy as written (it reads the clock itself:
# time.now_ns()).
package kmsgate.authz_test

import rego.v1

z8_request(claims, purpose, env, action) := {
	"principal": {"id": "ci:repo", "kind": "oidc", "roles": [], "claims": claims},
	"action": action,
	"resource": {"kind": "key", "name": "model-key", "purpose": purpose},
	"env": env,
	"exceptions": [],
}

ml_sec(started_ns_ago) := {"role": "ml-sec", "session_start": time.now_ns() - started_ns_ago}

minutes(n) := n * 60000000000

test_ml_sec_signs_in_prod_within_the_hour if {
	data.kmsgate.authz.allow with input as z8_request(ml_sec(minutes(10)), "model-sign", "prod", "sign")
	data.kmsgate.authz.reasons == {"seed 004 policy z8.kms"} with input as z8_request(ml_sec(minutes(10)), "model-sign", "prod", "sign")
}

test_a_session_older_than_an_hour_is_denied if {
	not data.kmsgate.authz.allow with input as z8_request(ml_sec(minutes(61)), "model-sign", "prod", "sign")
}

test_another_env_purpose_role_or_action_is_denied if {
	not data.kmsgate.authz.allow with input as z8_request(ml_sec(minutes(1)), "model-sign", "dev", "sign")
	not data.kmsgate.authz.allow with input as z8_request(ml_sec(minutes(1)), "envelope-data", "prod", "sign")
	not data.kmsgate.authz.allow with input as z8_request({"role": "dev", "session_start": time.now_ns()}, "model-sign", "prod", "sign")
	not data.kmsgate.authz.allow with input as z8_request(ml_sec(minutes(1)), "model-sign", "prod", "key.delete")
}

test_no_claims_is_denied_not_an_error if {
	not data.kmsgate.authz.allow with input as z8_request({}, "model-sign", "prod", "sign")
}
