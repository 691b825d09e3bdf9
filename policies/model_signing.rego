# Model signing: principals with the role "ml-sec" may sign with keys whose purpose is
# "model-sign", and only on a gateway whose environment is "prod". Nothing else is granted
# here (verification, key management and other environments need other rules).
package kmsgate.authz

import rego.v1

allow if {
	input.action == "sign"
	input.env == "prod"
	input.resource.purpose == "model-sign"
	"ml-sec" in roles
}

reasons contains "role ml-sec: sign with a model-sign key in prod" if {
	input.action == "sign"
	input.env == "prod"
	input.resource.purpose == "model-sign"
	"ml-sec" in roles
}
