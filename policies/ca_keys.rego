# CA keys (purpose "ca") never sign raw data: the gateway refuses `sign` on them whatever the
# policy says (400 invalid_request), since a raw signature by a CA key could be passed off
# as a certificate, a CRL or an OCSP answer. Only the PKI signs with them (cert.issue, CRLs,
# OCSP). This file grants nothing; ca_keys_test.rego checks that no shipped rule other than
# admin's allows a raw `sign` on a CA key, so that the refusal never rests on the gateway
# alone.
package kmsgate.authz
