# Tests of model_signing.rego.
package kmsgate.authz_test

import rego.v1

# an ml-sec token whose session began 10 minutes before base_input's `now`
ml_sec_input := object.union(input_with_roles(["ml-sec"]), {"principal": {"claims": {"session_start": "2025-12-31T23:50:00Z"}}})

test_ml_sec_may_sign_with_model_sign_key_in_prod if {
	data.kmsgate.authz.allow with input as ml_sec_input
}

test_ml_sec_sign_reason if {
	data.kmsgate.authz.reasons == {"role ml-sec: sign with a model-sign key in prod, session under 1h"} with input as ml_sec_input
}

test_ml_sec_denied_outside_prod if {
	every env in ["dev", "staging", "Prod", ""] {
		not data.kmsgate.authz.allow with input as object.union(ml_sec_input, {"env": env})
	}
}

test_ml_sec_denied_without_env if {
	not data.kmsgate.authz.allow with input as object.remove(ml_sec_input, ["env"])
}

test_ml_sec_denied_other_purpose if {
	every purpose in ["envelope-data", "ca", "model-signing", ""] {
		inp := object.union(ml_sec_input, {"resource": {"purpose": purpose}})
		not data.kmsgate.authz.allow with input as inp
	}
}

test_ml_sec_denied_without_purpose if {
	inp := object.union(ml_sec_input, {"resource": {"purpose": null}})
	not data.kmsgate.authz.allow with input as inp
}

test_ml_sec_denied_verify_and_other_actions if {
	every action in ["verify", "mac", "key.rotate", "key.delete", "key.create", "cert.issue"] {
		not data.kmsgate.authz.allow with input as object.union(ml_sec_input, {"action": action})
	}
}

test_ml_sec_denied_unknown_action if {
	not data.kmsgate.authz.allow with input as object.union(ml_sec_input, {"action": "sign.everything"})
}

test_model_signing_wrong_role_denied if {
	every roles in [[], ["ml-ops"], ["ML-SEC"], ["reader"]] {
		not data.kmsgate.authz.allow with input as input_with_roles(roles)
	}
}

test_model_signing_missing_principal_denied if {
	not data.kmsgate.authz.allow with input as object.remove(ml_sec_input, ["principal"])
}

test_ml_sec_denied_once_the_session_is_an_hour_old if {
	every start in ["2025-12-31T23:00:00Z", "2025-12-31T22:00:00Z", "2020-01-01T00:00:00Z"] {
		inp := object.union(ml_sec_input, {"principal": {"claims": {"session_start": start}}})
		not data.kmsgate.authz.allow with input as inp
	}
}

test_ml_sec_denied_without_a_session_start if {
	every claims in [{}, {"session_start": 5}, {"session_start": "yesterday"}, {"iat": "1"}] {
		inp := object.union(input_with_roles(["ml-sec"]), {"principal": {"claims": claims}})
		not data.kmsgate.authz.allow with input as inp
	}
}

test_ml_sec_oidc_session_starts_at_iat if {
	now_s := time.parse_rfc3339_ns(base_input.now) / 1000000000
	fresh := object.union(input_with_roles(["ml-sec"]), {"principal": {"kind": "oidc", "claims": {"iat": now_s - 600}}})
	data.kmsgate.authz.allow with input as fresh
	stale := object.union(input_with_roles(["ml-sec"]), {"principal": {"kind": "oidc", "claims": {"iat": now_s - 3601}}})
	not data.kmsgate.authz.allow with input as stale
	future := object.union(input_with_roles(["ml-sec"]), {"principal": {"kind": "oidc", "claims": {"iat": now_s + 3600}}})
	not data.kmsgate.authz.allow with input as future
}

test_ml_sec_oidc_session_start_claim_does_not_replace_iat if {
	now_s := time.parse_rfc3339_ns(base_input.now) / 1000000000
	claims := {"iat": now_s - 86400, "session_start": base_input.now}
	inp := object.union(input_with_roles(["ml-sec"]), {"principal": {"kind": "oidc", "claims": claims}})
	not data.kmsgate.authz.allow with input as inp
}
