# Example: roles for OIDC principals, from their verified claims. Copy this file into the
# policy directory and change the repository, branch and service accounts to yours.
#
# - A GitHub Actions job of acme/models running on main gets the role "ml-sec", so the
#   shipped model_signing.rego lets it sign with model-sign keys (in prod only).
# - A Kubernetes service account system:serviceaccount:NS:SA may get a workload certificate
#   for spiffe://dev.lab/ns/NS/sa/SA, and no other name, from the CA `workload_ca` only.
package kmsgate.authz

import rego.v1

roles contains "ml-sec" if {
	input.principal.kind == "oidc"
	input.principal.claims.iss == "https://token.actions.githubusercontent.com"
	input.principal.claims.repository == "acme/models"
	input.principal.claims.ref == "refs/heads/main"
}

# the CA that issues workload certificates (`dev`: the one `serve --dev` makes)
workload_ca := "dev"

allow if {
	input.action == "cert.issue"
	input.resource.name == workload_ca
	input.request.profile == "workload"
	input.request.sans == [own_spiffe_id]
}

reasons contains "a service account gets its own SPIFFE ID" if {
	input.action == "cert.issue"
	input.resource.name == workload_ca
	input.request.profile == "workload"
	input.request.sans == [own_spiffe_id]
}

own_spiffe_id := sprintf("uri:spiffe://dev.lab/ns/%s/sa/%s", [parts[2], parts[3]]) if {
	input.principal.kind == "oidc"
	input.principal.claims.iss == "https://kubernetes.default.svc.cluster.local"
	parts := split(input.principal.claims.sub, ":")
	count(parts) == 4
	parts[0] == "system"
	parts[1] == "serviceaccount"
}
