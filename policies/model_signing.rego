# Model signing: principals with the role "ml-sec" may sign with keys whose purpose is
# "model-sign", and only on a gateway whose environment is "prod". Nothing else is granted
# here (verification, key management, other environments need another rule).
package kmsgate.authz

import rego.v1

allow if ml_sec_model_sign

reasons contains "role ml-sec: sign with a model-sign key in prod" if ml_sec_model_sign

ml_sec_model_sign if {
	has_role("ml-sec")
	input.action == "sign"
	input.resource.purpose == "model-sign"
	input.env == "prod"
}
