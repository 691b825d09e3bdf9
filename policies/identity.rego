# Every authenticated principal may read who it is (GET /v1/sys/whoami, `kmsgate login`):
# its id, kind, tenant, claims and the roles this policy maps it to. It reveals nothing the
# caller did not present.
package kmsgate.authz

import rego.v1

allow if input.action == "principal.read"

reasons contains "a principal reads itself" if input.action == "principal.read"
