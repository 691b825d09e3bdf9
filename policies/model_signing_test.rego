# Tests of model_signing.rego.
package kmsgate.authz_test

import rego.v1

ml_sec_input := input_with_roles(["ml-sec"])

test_ml_sec_may_sign_with_model_sign_key_in_prod if {
	data.kmsgate.authz.allow with input as ml_sec_input
}

test_ml_sec_sign_reason if {
	data.kmsgate.authz.reasons == {"role ml-sec: sign with a model-sign key in prod"} with input as ml_sec_input
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
